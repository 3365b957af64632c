"""Static Hopper / Ampere check of the Triton kernels, without a GPU.

What it does: runs the backend's own launchers (``softvq_kernels.triton.forward`` / ``backward`` /
``lse_argmax``) on ``meta`` tensors of the reference shapes, with the config the sm_90 (or sm_80) table picks
and each schedule switched on, and records every Triton launch instead of running it (the JIT's own binder
gives the exact signature, specialisation and constexprs a GPU run would compile). Each distinct launch is then
compiled for an explicit target (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``: ptxas from the
triton wheel, no driver needed) and its machine code is read:

- registers and spill bytes (ptxas -v), dynamic shared memory (the launch's ``metadata.shared``);
- spill instructions (STL / LDL) inside a loop: a loop body is the address range of a backward branch in
  the SASS (``cuobjdump -sass``); a spill there costs local-memory traffic every iteration, one outside
  every loop costs it once;
- HGMMA (wgmma) / HMMA (mma.sync) and TMA (UTMALDG / UTMASTG / UBLKCP) instruction counts.

A kernel fails when: it has spill instructions inside a loop; its ``tl.dot`` is not lowered to wgmma on
sm_90 (every dot: no HMMA left) or to mma on sm_80; its shared memory exceeds the per-block limit; or ptxas
says its wgmma are serialised.

Run ``python -m softvq_kernels.triton.static_check`` (options: --help) for the table; it exits 1 when a
kernel fails. Results are cached per compile (keyed on triton's own compile key: kernel source, constexprs,
signature, options, target), so a rerun costs seconds. docs/kernels.md explains how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler.compiler import get_cache_key  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from softvq_kernels import sass  # noqa: E402
from softvq_kernels.backends import Scoring  # noqa: E402
from softvq_kernels.triton import common, configs  # noqa: E402

# The package's forward / backward functions shadow these submodules' names: import the modules themselves.
triton_forward = importlib.import_module("softvq_kernels.triton.forward")
triton_backward = importlib.import_module("softvq_kernels.triton.backward")

# T x V x d of the benchmarks (README): LLM vocabularies at their hidden sizes, plus the small-d sweep.
REFERENCE_SHAPES = (
    (4096, 32000, 256),
    (16384, 32000, 128),
    (16384, 32000, 64),
    (65536, 128256, 256),
    (8192, 151936, 896),
    (8192, 128256, 2048),
    (4096, 128256, 4096),
)


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int
    sm_count: int  # what planning.program_target would see (the vocabulary split depends on it)
    smem_per_block: int  # the opt-in dynamic shared memory limit of one block, bytes
    dot_instruction: str  # what a 16-bit tl.dot must become in SASS


ARCHES = {
    "sm_90": Arch(90, 132, 227 * 1024, "HGMMA"),  # H100 / H200 SXM: 228 KB per SM, 227 KB per block
    "sm_80": Arch(80, 108, 163 * 1024, "HMMA"),  # A100: 164 KB per SM, 163 KB per block
}

# Schedules: KernelConfig fields switched on over the table's entry. "default" is what a GPU runs today.
# Each runs the soft forward, the backward and the hard-mode forward (lse_argmax); a schedule that does not
# apply at a shape (fused_* need next_pow2(d) <= fused_max_d, online_output needs score_gemm) is skipped there.
SCHEDULES = {
    "default": {},
    "fused": {"fused_finish": True, "fused_backward": True},
    "online_output": {"online_output": True},
    # The default schedule with the online forward's frame / codebook tiles read through TMA descriptors
    # (KernelConfig.tma; sm_90 only: TMA is Hopper's). Its other kernels are the default schedule's compiles.
    "tma": {"tma": True},
    # The fused schedule with every x / codebook / g tile of its online forward and its backward kernels
    # (counts gradient, dC, dx) read through TMA descriptors.
    "fused_tma": {"fused_finish": True, "fused_backward": True, "tma": True},
}
# Schedules that exist on some architectures only.
SCHEDULE_ARCHES = {"tma": ("sm_90",), "fused_tma": ("sm_90",)}
# The same with code counts asked for and a gradient on them (extra kernels / constexpr variants).
COUNTS_SUFFIX = "+counts"


def require_compiler() -> None:
    """The interpreter replaces @triton.jit (nothing to compile): refuse clearly where kernels are compiled.
    Importing this module stays possible everywhere (the suite imports every module under the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("softvq_kernels.triton.static_check needs TRITON_INTERPRET unset (it compiles real kernels)")


def schedule_applies(schedule: str, cfg: configs.KernelConfig, d: int, arch: str = "sm_90") -> bool:
    fused = triton.next_power_of_2(d) <= cfg.fused_max_d
    base = schedule.removesuffix(COUNTS_SUFFIX)
    if arch not in SCHEDULE_ARCHES.get(base, (arch,)):
        return False
    if base == "tma":  # the online kernel computes its own score tiles (not the cuBLAS-scores schedule)
        return fused or not cfg.score_gemm
    if base in ("fused", "fused_tma"):
        return fused
    if base == "online_output":
        return not fused and cfg.score_gemm
    return True


def table_config(arch: str, V: int, d: int, dtype: torch.dtype) -> configs.KernelConfig:
    """What configs.get_config returns on a GPU of this architecture (the committed table, no tuned files)."""
    return configs.TABLES[arch].get((V, d, dtype)) or configs.default_config(V, d, dtype, arch)


# ---------------------------------------------------------------------------------------------
# Recording the launches


@dataclasses.dataclass
class Launch:
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options (num_warps, num_stages, ...)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def source(self) -> ASTSource:
        return ASTSource(self.fn, self.signature, self.constexprs, self.attrs)

    def describe(self) -> str:
        """The constexprs and launch options that make this compile differ from its siblings."""
        names = self.fn.arg_names
        shown = {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}
        shown = {k: (str(v).removeprefix("triton.language.") if not isinstance(v, (int, bool)) else v)
                 for k, v in shown.items()}
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in shown.items()
                 if k.startswith(("BLOCK", "D_PAD")) or v not in (0, False)]
        return (" ".join(parts) + f" w{self.options.num_warps} s{self.options.num_stages}").strip()


@contextlib.contextmanager
def recording(arch: str):
    """Inside the block every Triton launch is recorded (not run), bound for this architecture's target;
    CUDA-only host paths (cuBLAS GEMMs) are taken for meta tensors as they would be on the GPU."""
    target = GPUTarget("cuda", ARCHES[arch].capability, 32)
    backend = make_backend(target)
    launches: list[Launch] = []
    binders: dict[int, object] = {}

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        launches.append(Launch(self, signature, constexprs, attrs, options))

    saved_run, saved_cublas = JITFunction.run, common.cublas_can_take
    JITFunction.run = record
    common.cublas_can_take = lambda c, *operands: (
        c.device.type in ("cuda", "meta") and c.dtype in (torch.float32, operands[0].dtype)
        and operands[0].dtype in common.LOW_PRECISION and all(t.dtype == operands[0].dtype for t in operands))
    try:
        yield target, launches
    finally:
        JITFunction.run, common.cublas_can_take = saved_run, saved_cublas


def record_launches(arch: str, shape: tuple[int, int, int], schedule: str, dtype=torch.bfloat16,
                    distance: str = "l2", overrides: dict | None = None) -> tuple[configs.KernelConfig, list[Launch]] | None:
    """The config and the Triton launches of one forward + backward + hard-mode forward, or None when the
    schedule does not apply at this shape. overrides: KernelConfig fields replaced in the table's entry."""
    require_compiler()
    T, V, d = shape
    base = dataclasses.replace(table_config(arch, V, d, dtype), **(overrides or {}))
    if not schedule_applies(schedule, base, d, arch):
        return None
    counts = schedule.endswith(COUNTS_SUFFIX)
    cfg = dataclasses.replace(base, min_programs=2 * ARCHES[arch].sm_count,
                              **SCHEDULES[schedule.removesuffix(COUNTS_SUFFIX)])
    meta = dict(device="meta")
    x = torch.empty(T, d, dtype=dtype, **meta)
    codebook = torch.empty(V, d, dtype=dtype, **meta)
    tau = torch.empty((), dtype=torch.float32, **meta)
    scoring = Scoring(distance, *(() if distance != "cosine" else
                                  (torch.empty(T, **meta), torch.empty(V, **meta))))
    with recording(arch) as (_, launches), configs.override(cfg):
        y, lse, _, _ = triton_forward.forward(x, codebook, tau, scoring, counts)
        grad_counts = torch.empty(V, **meta) if counts else None
        triton_backward.backward(torch.empty_like(x), x, codebook, tau, scoring, y, lse, None, grad_counts)
        triton_forward.lse_argmax(x, codebook, tau, scoring)
    return cfg, launches


# ---------------------------------------------------------------------------------------------
# Compiling and reading the machine code


def ptxas_figures(log: str) -> dict:
    """Registers, spill bytes per thread and wgmma serialisation warnings of the one kernel in a ptxas -v log."""
    figures = list(sass.ptxas_by_function(log).values())
    if len(figures) != 1:
        raise ValueError(f"expected one entry function in the ptxas log, found {len(figures)}:\n{log[-2000:]}")
    return figures[0]


def cache_dir() -> Path:
    root = os.environ.get("SOFTVQ_STATIC_CHECK_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "softvq_kernels" / "static_check"


def _cache_file(launch: Launch, target: GPUTarget) -> Path:
    key = hashlib.sha256((get_cache_key(launch.source(), make_backend(target), launch.options, env_vars={})
                          + triton.__version__ + "v1").encode()).hexdigest()
    return cache_dir() / f"{key}.json"


def cached_figures(launch: Launch, target: GPUTarget) -> dict | None:
    cached = _cache_file(launch, target)
    return json.loads(cached.read_text()) if cached.is_file() else None


def compile_and_read(launch: Launch, target: GPUTarget, use_cache: bool = True) -> dict:
    """Compile one launch for ``target`` and read its figures (cached on triton's compile key)."""
    src = launch.source()
    cached = _cache_file(launch, target)
    if use_cache and cached.is_file():
        return json.loads(cached.read_text())
    start = time.perf_counter()
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # ptxas runs, its -v log printed
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=launch.options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        listing = subprocess.run([sass.triton_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                 text=True, check=True).stdout
    ttgir = kernel.asm["ttgir"]
    figures = {
        "kernel": launch.name,
        "variant": launch.describe(),
        **ptxas_figures(log.getvalue()),
        "smem_bytes": kernel.metadata.shared,
        **sass.sass_counts(listing),
        "dots": len(re.findall(r"\btt\.dot\b", kernel.asm["ttir"])),
        "dots_not_wgmma": len(re.findall(r"\btt\.dot\b", ttgir)),  # on sm_90 every dot should be ttng.warp_group_dot
        "compile_s": round(time.perf_counter() - start, 1),
    }
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")  # workers write in parallel: rename is atomic
        partial.write_text(json.dumps(figures))
        partial.replace(cached)
    return figures


def failures(figures: dict, arch: str) -> list[str]:
    """Why this compile fails the check (empty: it passes)."""
    spec = ARCHES[arch]
    out = []
    if figures["spill_instrs_in_loops"]:
        out.append(f"{figures['spill_instrs_in_loops']} spill instructions inside loops "
                   f"({figures['spill_store_bytes']}/{figures['spill_load_bytes']} B spill st/ld per thread)")
    if figures["dots"]:
        if spec.dot_instruction == "HGMMA" and (figures["hgmma"] == 0 or figures["hmma"] or figures["dots_not_wgmma"]):
            out.append(f"tl.dot not all wgmma ({figures['hgmma']} HGMMA, {figures['hmma']} HMMA)")
        if spec.dot_instruction == "HMMA" and figures["hmma"] == 0:
            out.append("tl.dot not lowered to mma (no HMMA)")
    if figures["smem_bytes"] > spec.smem_per_block:
        out.append(f"shared memory {figures['smem_bytes']} B > {spec.smem_per_block} B per block")
    if figures["wgmma_serialized"]:
        out.append("ptxas: wgmma serialized")
    return out


# ---------------------------------------------------------------------------------------------
# The sweep and its table


# The launches a forked worker compiles (set by _compile_all before the pool forks; workers inherit it).
_POOL_JOBS: list[tuple["Launch", int, bool]] = []


def _compile_job(index: int) -> tuple[int, dict]:
    launch, capability, use_cache = _POOL_JOBS[index]
    return index, compile_and_read(launch, GPUTarget("cuda", capability, 32), use_cache)


def default_jobs() -> int:
    """Parallel compiles: one per core (each triton.compile + ptxas runs on one), at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _compile_all(jobs_in: list[tuple["Launch", str]], use_cache: bool, jobs: int, done) -> list[dict]:
    """Figures of every (launch, arch), cached ones read here, the rest compiled by ``jobs`` forked workers
    (the launches hold JIT functions, which do not pickle; a fork inherits them). done(i, figures) as each ends."""
    results: list[dict | None] = [None] * len(jobs_in)
    todo = []
    for i, (launch, arch) in enumerate(jobs_in):
        target = GPUTarget("cuda", ARCHES[arch].capability, 32)
        hit = cached_figures(launch, target) if use_cache else None
        if hit is not None:
            results[i] = hit
            done(i, hit)
        else:
            todo.append(i)
    if len(todo) > 1 and jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        _POOL_JOBS[:] = [(jobs_in[i][0], ARCHES[jobs_in[i][1]].capability, use_cache) for i in todo]
        try:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                for k, figures in pool.imap_unordered(_compile_job, range(len(todo))):
                    results[todo[k]] = figures
                    done(todo[k], figures)
        finally:
            _POOL_JOBS.clear()
    else:
        for i in todo:
            launch, arch = jobs_in[i]
            results[i] = compile_and_read(launch, GPUTarget("cuda", ARCHES[arch].capability, 32), use_cache)
            done(i, results[i])
    return results


def sweep(arches, shapes, schedules, *, use_cache=True, progress=None, overrides=None, jobs=1,
          kernels=None) -> list[dict]:
    """One row per distinct compile: its figures, failures, and where (shape, schedule) it is launched.
    kernels: only the launches of these kernel names (None: all). jobs: parallel compiles."""
    require_compiler()
    distinct: dict[str, tuple[Launch, str, list[str]]] = {}
    for arch in arches:
        backend = make_backend(GPUTarget("cuda", ARCHES[arch].capability, 32))
        for shape in shapes:
            for schedule in schedules:
                recorded = record_launches(arch, shape, schedule, overrides=overrides)
                if recorded is None:
                    continue
                for launch in recorded[1]:
                    if kernels and launch.name not in kernels:
                        continue
                    key = arch + get_cache_key(launch.source(), backend, launch.options, env_vars={})
                    places = distinct.setdefault(key, (launch, arch, []))[2]
                    place = f"{'x'.join(map(str, shape))} {schedule}"
                    if place not in places:
                        places.append(place)
    keys = list(distinct)
    rows: list[dict | None] = [None] * len(keys)

    def done(i, figures):
        launch, arch, places = distinct[keys[i]]
        rows[i] = {"arch": arch, "id": hashlib.sha256(keys[i].encode()).hexdigest()[:6], **figures,
                   "failures": failures(figures, arch), "used_at": places}
        if progress:
            progress(rows[i])

    _compile_all([(launch, arch) for launch, arch, _ in distinct.values()], use_cache, jobs, done)
    return rows


def _collapse_places(places: list[str]) -> str:
    by_schedule: dict[str, list[str]] = {}
    for place in places:
        shape, schedule = place.split(" ")
        by_schedule.setdefault(schedule, []).append(shape)
    return "; ".join(f"{schedule}: {', '.join(shapes)}" for schedule, shapes in by_schedule.items())


def markdown_table(rows: list[dict]) -> str:
    head = ("| arch | kernel | id | variant (constexprs, warps, stages) | schedule: shapes | regs | spill B st/ld | "
            "spill instrs (in loops) | smem KB | HGMMA | HMMA | TMA | result |")
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["variant"])):
        lines.append(
            f"| {row['arch']} | `{row['kernel']}` | {row['id']} | {row['variant']} | {_collapse_places(row['used_at'])} | {row['regs']} | "
            f"{row['spill_store_bytes']}/{row['spill_load_bytes']} | {row['spill_instrs']} ({row['spill_instrs_in_loops']}) | "
            f"{row['smem_bytes'] / 1024:.0f} | {row['hgmma']} | {row['hmma']} | {row['tma']} | "
            f"{('FAIL (known, KNOWN_FAILURES): ' if known_failure(row) else 'FAIL: ') + '; '.join(row['failures']) if row['failures'] else 'ok'} |")
    return "\n".join(lines)


# Failures not fixed yet, each with why; the script still reports them as FAIL and exits 1, and the test
# (tests/test_static_check.py) warns with this list and fails if the failing set differs from it in either
# direction (a new failure, or one fixed without its entry removed).
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    # (empty: the last one, the counts-only _stage_kernel at d = 256 on sm_90 whose wgmma ptxas serialised with
    # 8 warps, runs on 4 since configs.KernelConfig.counts_num_warps)
}


def known_failure(row: dict) -> str | None:
    return KNOWN_FAILURES.get((row["arch"], row["kernel"], row["variant"]))


# Shapes the CI test compiles (tests/test_static_check.py): every distinct compile of the full sweep except the
# ones only 16384x32000x64 launches (26 of 142: the d <= 128 kernels again at the same tiles, warps and stages
# with their d-sized accumulators half as wide as at d = 128, which CI compiles); 4096x128256x4096 launches
# nothing 8192x128256x2048 does not. The script's default (and the committed table) is every reference shape.
CI_SHAPES = ((4096, 32000, 256), (16384, 32000, 128), (65536, 128256, 256), (8192, 151936, 896), (8192, 128256, 2048))


def main(argv=None) -> int:
    require_compiler()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHES), choices=list(ARCHES))
    parser.add_argument("--shapes", default="all", help="'all', 'ci', or T,V,d[;T,V,d...]")
    parser.add_argument("--schedules", nargs="+",
                        default=[*SCHEDULES, *(name + COUNTS_SUFFIX for name in ("default", "fused", "fused_tma"))],
                        help=f"of {list(SCHEDULES)}, each optionally with {COUNTS_SUFFIX}")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="KernelConfig fields to replace in every table entry (to try a config before committing it)")
    parser.add_argument("--kernels", nargs="+", help="compile only the launches of these kernels (default: all)")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="parallel compiles (default: one per core, <= 8)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--json", help="write the rows (and how they were made) to this file")
    parser.add_argument("--markdown", help="write the table (and how it was made) to this file")
    args = parser.parse_args(argv)
    if args.shapes == "all":
        shapes = REFERENCE_SHAPES
    elif args.shapes == "ci":
        shapes = CI_SHAPES
    else:
        shapes = tuple(tuple(int(n) for n in item.split(",")) for item in args.shapes.split(";"))
    start = time.perf_counter()

    def progress(row):
        print(f"  compiled {row['arch']} {row['kernel']} [{row['variant']}] in {row['compile_s']} s: "
              f"{row['regs']} regs, {row['spill_instrs_in_loops']} spills in loops", file=sys.stderr, flush=True)

    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        default = getattr(configs.KernelConfig(), field)
        overrides[field] = value if isinstance(default, str) else (value == "True") if isinstance(default, bool) else int(value)
    rows = sweep(args.arch, shapes, args.schedules, use_cache=not args.no_cache, progress=progress, overrides=overrides,
                 jobs=args.jobs, kernels=args.kernels)
    failing = [row for row in rows if row["failures"]]
    command = "python -m softvq_kernels.triton.static_check " + " ".join(argv if argv is not None else sys.argv[1:])
    header = {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "command": command.strip(),
        "shapes": ["x".join(map(str, s)) for s in shapes],
        "schedules": args.schedules,
        "config overrides": overrides or "none (the committed tables)",
        "kernels": args.kernels or "all",
        "dtype": "bfloat16",
        "distance": "l2",
        "seconds": round(time.perf_counter() - start, 1),
    }
    table = markdown_table(rows)
    summary = (f"{len(rows)} distinct compiles, {len(failing)} failing"
               + (": " + ", ".join(sorted({f"{r['arch']} {r['kernel']}" for r in failing})) if failing else ""))
    print(table)
    for row in failing:
        print(f"FAIL {row['arch']} {row['kernel']} [{row['variant']}] at {_collapse_places(row['used_at'])}: "
              + "; ".join(row["failures"]) + (f" (known: {known_failure(row)})" if known_failure(row) else ""))
    print(summary)
    if args.markdown:
        Path(args.markdown).write_text(
            "# Static check of the Triton kernels (no GPU)\n\n"
            + "\n".join(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in header.items())
            + f"\n- result: {summary}\n\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "summary": summary, "rows": rows,
                                               "known_failures": {"|".join(k): v for k, v in KNOWN_FAILURES.items()}},
                                              indent=1))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
