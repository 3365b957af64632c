"""Benchmark soft VQ: time and peak memory of naive PyTorch, torch.compile and every backend.

    python -m softvq_kernels.bench                     # CPU default: 4096x32000x256 fp32 (or: softvq-bench)
    python -m softvq_kernels.bench --device cuda --dtype bfloat16 \
        --shapes 4096x32000x256,8192x151936x896 --out benchmarks/results/h200.json --plot h200.png

Each measurement of an implementation x shape x mode reports the median wall time and the peak
memory beyond the inputs, with ratios against eager PyTorch measured in the same run.
- CPU: every measurement runs in a fresh subprocess with glibc's mmap threshold fixed, so freed
  buffers leave the resident set at once; peak = VmHWM (reset via /proc/self/clear_refs after the
  warm-up) minus the resident size just before the timed calls. Times come from a separate
  subprocess with the default allocator.
- CUDA: in-process, torch.cuda.max_memory_allocated() after reset_peak_memory_stats(); times from
  CUDA events. The cuBLAS GEMM rate is measured at each shape ((T, d) @ (d, V)) in the same run,
  and the fused op's FLOPs (4TVd forward, 10TVd backward) are reported as a fraction of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IMPLS = ("eager", "compile", "chunked", "triton", "cuda")
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOPS_PER_TVD = {"fwd": 4, "fwdbwd": 14}


def naive_soft_vq(x: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """What people write by hand: materialise the (T, V) distances, softmax, weighted sum."""
    sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(-1)
    return torch.softmax(-sq_dist / temperature, dim=-1) @ codebook


def _make_fn(impl: str, distance: str):
    if impl == "eager":
        return naive_soft_vq
    if impl == "compile":
        return torch.compile(naive_soft_vq)
    import softvq_kernels as sk

    return lambda x, codebook, temperature: sk.soft_vq(x, codebook, temperature, distance=distance, backend=impl)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        T, V, d = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like TxVxd (e.g. 4096x32000x256), got {text!r}")
    if min(T, V, d) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return T, V, d


def _inputs(shape, dtype, device, mode, seed=0):
    T, V, d = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
    codebook = torch.randn(V, d, generator=gen).mul_(0.5).to(device=device, dtype=dtype)
    if mode == "fwdbwd":
        x.requires_grad_()
        codebook.requires_grad_()
    upstream = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
    return x, codebook, upstream


def _step(fn, x, codebook, upstream, mode, temperature):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x, codebook, temperature)
    y = fn(x, codebook, temperature)
    y.backward(upstream)
    x.grad = codebook.grad = None
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(impl, shape, dtype, device, mode, reps, distance, what):
    """One measurement in this process. what: "time" | "memory" | "both" (CUDA)."""
    fn = _make_fn(impl, distance)
    x, codebook, upstream = _inputs(shape, dtype, device, mode)
    temperature = 1.0
    try:
        _step(fn, x, codebook, upstream, mode, temperature)  # warm-up: compile, autotune, allocations
        _sync(device)
        result = {}
        if what in ("memory", "both"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                _step(fn, x, codebook, upstream, mode, temperature)
                _sync(device)
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            else:
                base = _rss_bytes("VmRSS")
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")  # resets VmHWM to the current resident size
                _step(fn, x, codebook, upstream, mode, temperature)
                result["peak_bytes"] = max(_rss_bytes("VmHWM") - base, 0)
        if what in ("time", "both"):
            times = []
            for _ in range(reps):
                if device.type == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    _step(fn, x, codebook, upstream, mode, temperature)
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) / 1e3)
                else:
                    t0 = time.perf_counter()
                    _step(fn, x, codebook, upstream, mode, temperature)
                    times.append(time.perf_counter() - t0)
            result["time_s"] = statistics.median(times)
            result["times_s"] = times
        return result
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del x, codebook, upstream
        if device.type == "cuda":
            torch.cuda.empty_cache()


def gemm_rate(shape, dtype, device, reps=20):
    """FLOP/s of the cuBLAS product (T, d) @ (d, V) in this dtype, measured now."""
    T, V, d = shape
    a = torch.randn(T, d, device=device, dtype=dtype)
    b = torch.randn(d, V, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    stop.record()
    stop.synchronize()
    return 2 * T * V * d * reps / (start.elapsed_time(stop) / 1e3)


def _run_in_subprocess(impl, shape, dtype_name, mode, reps, distance, what, timeout):
    """Fresh interpreter per CPU measurement, so one run's allocations never hide in another's peak."""
    job = dict(impl=impl, shape=shape, dtype=dtype_name, mode=mode, reps=reps, distance=distance, what=what)
    env = dict(os.environ)
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # large blocks go back to the OS when freed
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "softvq_kernels.bench.bench_op", "--worker", json.dumps(job)],
            # cwd: the folder holding this softvq_kernels, so the worker imports this same copy
            capture_output=True, text=True, env=env, timeout=timeout, cwd=Path(__file__).resolve().parents[2],
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": "worker failed: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions(device):
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return versions


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _available_impls(requested, device):
    from softvq_kernels import backends

    chosen, skipped = [], {}
    for impl in requested:
        reason = None if impl in ("eager", "compile") else backends.unavailable_reason(impl, device)
        if reason is None:
            chosen.append(impl)
        else:
            skipped[impl] = reason
    return chosen, skipped


def run_benchmark(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls, skipped = _available_impls(args.impls, device)
    for impl, why in skipped.items():
        print(f"skipping {impl}: {why}", file=sys.stderr)
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the benchmark usable without it
        def tqdm(it, **_):
            return it

    jobs = [(shape, mode, impl) for shape in args.shapes for mode in args.modes for impl in impls]
    rates = {}
    for shape, mode, impl in tqdm(jobs, desc="benchmark", unit="run"):
        T, V, d = shape
        if device.type == "cuda":
            if shape not in rates:
                rates[shape] = gemm_rate(shape, dtype, device)
            result = measure(impl, shape, dtype, device, mode, args.reps, args.distance, "both")
        else:
            result = _run_in_subprocess(impl, shape, args.dtype, mode, args.reps, args.distance, "time", args.timeout)
            if "error" not in result:
                memory = _run_in_subprocess(impl, shape, args.dtype, mode, 1, args.distance, "memory", args.timeout)
                result.update(memory)
        row = {"impl": impl, "T": T, "V": V, "d": d, "mode": mode, **result}
        if "time_s" in row:
            row["tflops"] = FLOPS_PER_TVD[mode] * T * V * d / row["time_s"] / 1e12
            if shape in rates:
                row["gemm_tflops"] = rates[shape] / 1e12
                row["fraction_of_gemm"] = row["tflops"] * 1e12 / rates[shape]
        rows.append(row)
    _add_ratios(rows)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "versions": _versions(device),
        "dtype": args.dtype,
        "distance": args.distance,
        "shapes": [list(s) for s in args.shapes],
        "reps": args.reps,
        "skipped": skipped,
        "results": rows,
    }


def _add_ratios(rows):
    """Time and memory of every row relative to eager PyTorch at the same shape and mode."""
    eager = {(r["T"], r["V"], r["d"], r["mode"]): r for r in rows if r["impl"] == "eager"}
    for row in rows:
        base = eager.get((row["T"], row["V"], row["d"], row["mode"]))
        if base is None:
            continue
        if "time_s" in row and "time_s" in base:
            row["time_vs_eager"] = row["time_s"] / base["time_s"]
        if "peak_bytes" in row and base.get("peak_bytes"):
            row["memory_vs_eager"] = row["peak_bytes"] / base["peak_bytes"]


def format_table(report: dict) -> str:
    header = f"{'shape TxVxd':>20} {'mode':>7} {'impl':>8} {'time ms':>10} {'x eager':>8} {'peak MiB':>10} {'x eager':>8} {'TFLOP/s':>8} {'% GEMM':>7}"
    lines = [f"{report['device']} | {report['dtype']} | {report['distance']} | {report['date']}", header, "-" * len(header)]
    for r in report["results"]:
        shape = f"{r['T']}x{r['V']}x{r['d']}"
        if "error" in r:
            lines.append(f"{shape:>20} {r['mode']:>7} {r['impl']:>8}   {r['error']}")
            continue

        def fmt(key, spec, scale=1.0):
            return format(r[key] * scale, spec) if key in r else "-"

        lines.append(
            f"{shape:>20} {r['mode']:>7} {r['impl']:>8} {fmt('time_s', '10.1f', 1e3)} {fmt('time_vs_eager', '8.2f')}"
            f" {fmt('peak_bytes', '10.1f', 2**-20)} {fmt('memory_vs_eager', '8.3f')} {fmt('tflops', '8.3f')}"
            f" {fmt('fraction_of_gemm', '7.1%')}"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "time_s" in r]
    groups = sorted({(r["T"], r["V"], r["d"], r["mode"]) for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups)), 4.5))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        times, mems = [], []
        for g in groups:
            match = [r for r in rows if (r["T"], r["V"], r["d"], r["mode"]) == g and r["impl"] == impl]
            times.append(match[0]["time_s"] * 1e3 if match else 0)
            mems.append(match[0].get("peak_bytes", 0) / 2**20 if match else 0)
        xs = [i + k * width for i in range(len(groups))]
        axes[0].bar(xs, times, width, label=impl)
        axes[1].bar(xs, mems, width, label=impl)
    labels = [f"{T}x{V}x{d}\n{mode}" for T, V, d, mode in groups]
    for ax, title in zip(axes, ("median time (ms)", "peak memory beyond inputs (MiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"soft VQ, {report['dtype']}, {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    torch.manual_seed(0)
    result = measure(
        job["impl"], tuple(job["shape"]), DTYPES[job["dtype"]], torch.device("cpu"), job["mode"],
        job["reps"], job["distance"], job["what"],
    )
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--distance", default="l2", choices=("l2", "cosine", "dot"))
    parser.add_argument("--shapes", default=[(4096, 32000, 256)],
                        type=lambda s: [parse_shape(p) for p in s.split(",")], help="TxVxd[,TxVxd...]")
    parser.add_argument("--impls", default=list(IMPLS), type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--modes", default=list(MODES), type=lambda s: s.split(","), help="fwd,fwdbwd")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per CPU measurement subprocess")
    parser.add_argument("--out", default=None, help="JSON report path (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--plot", default=None, help="PNG path for a bar plot")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown implementation {impl!r} (choose from {', '.join(IMPLS)})")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.reps is None:
        args.reps = 20 if args.device.startswith("cuda") else 3
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    report = run_benchmark(args)
    out = args.out or f"benchmarks/results/{torch.device(args.device).type}-{report['date'][:10]}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    print(format_table(report))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
