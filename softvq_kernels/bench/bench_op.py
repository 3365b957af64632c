"""Benchmark soft VQ: time and peak memory of naive PyTorch, torch.compile, PyTorch's fused attention
(SDPA, the same math for dot and l2) and every backend, against the GEMM floor measured in the same run.

    python -m softvq_kernels.bench                     # CPU default: 4096x32000x256 fp32 (or: softvq-bench)
    python -m softvq_kernels.bench --distance l2,dot,cosine --modes fwd,fwdbwd,hard --rounds 2
    python -m softvq_kernels.bench --device cuda --dtype bfloat16 \
        --shapes 4096x32000x256,8192x151936x896 --out benchmarks/results/h200.json --plot h200.png

Modes: fwd (no grad), fwdbwd (forward + backward of y), hard (hard-mode forward: lse and first argmax,
``lse_argmax``; eager: the scores, logsumexp and argmax). Each measurement of an implementation x shape
x distance x mode reports the median wall time of --reps calls after one warm-up, the best of
--rounds rounds (the whole job list is run once per round, so a slow spell of the machine hits every
variant alike), with ratios against eager, SDPA and the floor at the same shape, distance and mode.
- floor: the op's FLOPs (2·T·V·d per product: fwd 4, fwdbwd 14, hard 2) at the best matrix-product
  rate measured in the same run (CPU: torch.mm at the (T, d) x (d, w), (T, w) x (w, d) and
  (w, T) x (T, d) shapes of vocabulary chunks w = 256..2048, in a fresh process per round, best of
  the medians; CUDA: cuBLAS (T, d) x (d, V)). On CPU each timing process also measures those rates
  right after its timed calls: time_vs_floor_same_process divides by that floor, which a machine
  that other processes keep busy for minutes moves far less than the run-wide best.
- sdpa: F.scaled_dot_product_attention(x, E, E, scale=1/tau) for dot; for l2 the same call on
  q = [x, 1, 0...], k = [E, -||E||^2/2, 0...], v = [E, 0...] (d + 8 wide; q.k = a_tv tau / 2), scale
  2/tau, output sliced to d. There is no SDPA form of cosine's per-row scaling or of the hard mode.
- CPU memory, two figures, each variant in fresh subprocesses: peak_rss_bytes is the peak resident set
  of the timing process (VmHWM at its end) minus its resident set once the inputs exist: what
  `/usr/bin/time -v` shows a user, less the inputs. peak_bytes (the older figure) runs the calls again
  in another process with glibc's mmap threshold fixed, so freed buffers leave the resident set at
  once, and takes VmHWM (reset via /proc/self/clear_refs after the warm-up) minus the resident size
  just before the measured call: the working set of one call alone.
- CUDA: in-process, torch.cuda.max_memory_allocated() after reset_peak_memory_stats(); times from
  CUDA events.
"""

from __future__ import annotations

import argparse
import datetime
import math
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

IMPLS = ("eager", "compile", "sdpa", "chunked", "triton", "cuda")
MODES = ("fwd", "fwdbwd", "hard")
DISTANCES = ("l2", "dot", "cosine")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOPS_PER_TVD = {"fwd": 4, "fwdbwd": 14, "hard": 2}
SDPA_DISTANCES = ("l2", "dot")
L2_PAD = 8  # sdpa l2: q, k, v are d + 8 wide (the norm column, then zeros to a multiple of 8 past d)


def naive_scores(x, codebook, temperature, distance="l2"):
    """What people write by hand: the (T, V) scores, materialised."""
    if distance == "l2":
        sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(-1)
        return -sq_dist / temperature
    if distance == "cosine":
        x, codebook = F.normalize(x, dim=-1), F.normalize(codebook, dim=-1)
    return x @ codebook.T / temperature


def naive_soft_vq(x: torch.Tensor, codebook: torch.Tensor, temperature: float, distance: str = "l2") -> torch.Tensor:
    """Eager PyTorch: materialise the scores, softmax, weighted sum."""
    return torch.softmax(naive_scores(x, codebook, temperature, distance), dim=-1) @ codebook


def naive_lse_argmax(x, codebook, temperature, distance="l2"):
    """Eager hard mode: the scores, their logsumexp and first argmax."""
    s = naive_scores(x, codebook, temperature, distance)
    return s.logsumexp(dim=-1), s.argmax(dim=-1)


def sdpa_soft_vq(x, codebook, temperature, distance="l2"):
    """y through PyTorch's fused attention (its flash kernel on CPU and CUDA): one query per frame, one
    key and value per code. dot: scores <x, c> / tau. l2: q = [x, 1, 0...], k = [c, -||c||^2 / 2, 0...],
    scale 2 / tau gives (2<x, c> - ||c||^2) / tau, the l2 score up to a per-frame constant."""
    if distance == "dot":
        q, k, v, scale = x, codebook, codebook, 1.0 / temperature
    elif distance == "l2":
        zeros = lambda t: t.new_zeros(t.shape[0], L2_PAD - 1)  # noqa: E731
        q = torch.cat([x, x.new_ones(x.shape[0], 1), zeros(x)], dim=1)
        k = torch.cat([codebook, -0.5 * codebook.pow(2).sum(-1, keepdim=True), zeros(codebook)], dim=1)
        v = F.pad(codebook, (0, L2_PAD))
        scale = 2.0 / temperature
    else:
        raise ValueError(f"no SDPA form of distance {distance!r}")
    y = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], scale=scale)[0, 0]
    return y[:, : x.shape[1]]


def supports(impl: str, distance: str, mode: str) -> bool:
    return impl != "sdpa" or (distance in SDPA_DISTANCES and mode != "hard")


def _make_fn(impl: str, distance: str, mode: str = "fwd"):
    if mode == "hard":
        if impl in ("eager", "compile"):
            fn = lambda x, c, t: naive_lse_argmax(x, c, t, distance)  # noqa: E731
            return torch.compile(fn) if impl == "compile" else fn
        from softvq_kernels import api

        return lambda x, c, t: api.lse_argmax(x, c, t, distance, None, impl)
    if impl in ("eager", "compile"):
        fn = lambda x, c, t: naive_soft_vq(x, c, t, distance)  # noqa: E731
        return torch.compile(fn) if impl == "compile" else fn
    if impl == "sdpa":
        return lambda x, c, t: sdpa_soft_vq(x, c, t, distance)
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
    if mode in ("fwd", "hard"):
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
    fn = _make_fn(impl, distance, mode)
    x, codebook, upstream = _inputs(shape, dtype, device, mode)
    rss_with_inputs = _rss_bytes("VmRSS") if device.type == "cpu" else None
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
            if device.type == "cpu":  # never reset in a timing process: the peak a user sees, less the inputs
                result["peak_rss_bytes"] = max(_rss_bytes("VmHWM") - rss_with_inputs, 0)
                # the floor again, right after the timed calls in this process: a ratio that a busy
                # machine (other processes taking cores for minutes) moves far less than the run-wide best
                result["gemm_flops_per_s_same_process"] = max(cpu_gemm_rates(shape, dtype, reps=3).values())
        return result
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del x, codebook, upstream
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cpu_gemm_rates(shape, dtype, reps=5):
    """{"TxKxN": FLOP/s} of torch.mm at the shapes a chunked CPU pass multiplies: scores (T, d) x (d, w),
    the weighted sum (T, w) x (w, d) and the codebook gradient (w, T) x (T, d), for chunk widths
    w = 256..2048 (at most V); the median of ``reps`` timed calls after one warm-up, in this process."""
    T, V, d = shape
    rates = {}
    for w in sorted({min(w, V) for w in (256, 512, 1024, 2048)}):
        for m, k, n in ((T, d, w), (T, w, d), (w, T, d)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            out = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=out)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                times.append(time.perf_counter() - t0)
            rates[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times)
    return rates


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
    """Fresh interpreter per CPU measurement, so one run's allocations never hide in another's peak.
    what: "time" | "memory" | "gemm" (cpu_gemm_rates at this shape)."""
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
        reason = None if impl in ("eager", "compile", "sdpa") else backends.unavailable_reason(impl, device)
        if reason is None:
            chosen.append(impl)
        else:
            skipped[impl] = reason
    return chosen, skipped


def _load():
    """(1, 5, 15)-minute load averages: how busy the machine was (other processes slow every figure)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(args, on_progress=None) -> dict:
    """Every job of args, round by round; ``on_progress(report)`` after each job gets the report of
    what is measured so far (main writes it to --out, so a run stopped early keeps its rows)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls, skipped = _available_impls(args.impls, device)
    for impl, why in skipped.items():
        print(f"skipping {impl}: {why}", file=sys.stderr)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the benchmark usable without it
        def tqdm(it, **_):
            return it

    load_at_start = _load()
    # in the order of --modes, then --distance: what is listed first is measured first
    jobs = [(shape, distance, mode, impl) for shape in args.shapes for mode in args.modes
            for distance in args.distances for impl in impls if supports(impl, distance, mode)]
    gemm = {shape: {} for shape in args.shapes}  # "TxKxN" -> best rate over the rounds
    measured = {job: [] for job in jobs}
    for round_index in range(args.rounds):
        for shape in args.shapes:  # the GEMM rates, each round, beside the op's own measurements
            if device.type == "cuda":
                rates = {"x".join(map(str, (shape[0], shape[2], shape[1]))): gemm_rate(shape, dtype, device)}
            else:
                rates = _run_in_subprocess("gemm", shape, args.dtype, "fwd", 5, "l2", "gemm", args.timeout)
                if "error" in rates:
                    raise RuntimeError(f"GEMM rate measurement failed at {shape}: {rates['error']}")
            for key, rate in rates.items():
                gemm[shape][key] = max(rate, gemm[shape].get(key, 0.0))
        for job in tqdm(jobs, desc=f"round {round_index + 1}/{args.rounds}", unit="run"):
            shape, distance, mode, impl = job
            load = _load()
            if device.type == "cuda":
                result = measure(impl, shape, dtype, device, mode, args.reps, distance, "both")
            else:
                result = _run_in_subprocess(impl, shape, args.dtype, mode, args.reps, distance, "time", args.timeout)
                if "error" not in result and args.memory_runs:
                    memory = _run_in_subprocess(impl, shape, args.dtype, mode, 1, distance, "memory", args.timeout)
                    result.update(memory)
            result["load_before"] = load
            measured[job].append(result)
            if on_progress is not None:
                on_progress(_report(args, device, impls, skipped, load_at_start, gemm, measured))
    return _report(args, device, impls, skipped, load_at_start, gemm, measured)


def _report(args, device, impls, skipped, load_at_start, gemm, measured):
    from softvq_kernels import backends

    rows = []
    for shape in args.shapes:
        T, V, d = shape
        best_rate = max(gemm[shape].values())
        for mode in args.modes:
            for distance in args.distances:
                if not any(measured.get((shape, distance, mode, impl)) for impl in impls):
                    continue
                rows.append({"impl": "floor", "T": T, "V": V, "d": d, "distance": distance, "mode": mode,
                             "time_s": FLOPS_PER_TVD[mode] * T * V * d / best_rate,
                             "gemm_tflops": best_rate / 1e12})
                for impl in impls:
                    if measured.get((shape, distance, mode, impl)):
                        rows.append(_best_round(measured[(shape, distance, mode, impl)], impl, shape, distance, mode,
                                                best_rate))
    _add_ratios(rows)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m softvq_kernels.bench " + " ".join(args.argv),
        "device": _device_name(device),
        "versions": _versions(device),
        "auto_backend": backends.resolve_backend("auto", device),
        "load_average_1_5_15min": {"start": load_at_start, "end": _load()},
        "dtype": args.dtype,
        "distances": list(args.distances),
        "shapes": [list(s) for s in args.shapes],
        "reps": args.reps,
        "rounds": args.rounds,
        "gemm_flops_per_s": {"x".join(map(str, s)): rates for s, rates in gemm.items()},
        "skipped": skipped,
        "results": rows,
    }


def _best_round(results, impl, shape, distance, mode, best_rate):
    """One row from a job's rounds: the round with the lowest median time (all rounds' medians kept)."""
    T, V, d = shape
    timed = [r for r in results if "time_s" in r]
    row = {"impl": impl, "T": T, "V": V, "d": d, "distance": distance, "mode": mode}
    if not timed:
        return {**row, **results[0]}
    best = min(timed, key=lambda r: r["time_s"])
    row.update(best)
    row["round_medians_s"] = [r["time_s"] for r in timed]
    for key in ("peak_bytes", "peak_rss_bytes"):  # memory does not depend on load: the largest seen
        values = [r[key] for r in timed if key in r]
        if values:
            row[key] = max(values)
    row["tflops"] = FLOPS_PER_TVD[mode] * T * V * d / row["time_s"] / 1e12
    row["fraction_of_gemm"] = row["tflops"] * 1e12 / best_rate
    if "gemm_flops_per_s_same_process" in best:
        floor_here = FLOPS_PER_TVD[mode] * T * V * d / best["gemm_flops_per_s_same_process"]
        row["time_vs_floor_same_process"] = row["time_s"] / floor_here
    return row


def _add_ratios(rows):
    """Time and memory of every row relative to eager, SDPA and the floor at the same shape, distance, mode."""
    def key(r):
        return (r["T"], r["V"], r["d"], r["distance"], r["mode"])

    by_impl = {impl: {key(r): r for r in rows if r["impl"] == impl} for impl in ("eager", "sdpa", "floor")}
    for row in rows:
        for impl, suffix in (("eager", "eager"), ("sdpa", "sdpa"), ("floor", "floor")):
            base = by_impl[impl].get(key(row))
            if base is None or "time_s" not in row or "time_s" not in base:
                continue
            row[f"time_vs_{suffix}"] = row["time_s"] / base["time_s"]
            if impl == "eager":
                for mem, ratio in (("peak_bytes", "memory_vs_eager"), ("peak_rss_bytes", "rss_vs_eager")):
                    if mem in row and base.get(mem):
                        row[ratio] = row[mem] / base[mem]


def format_table(report: dict) -> str:
    header = (f"{'shape TxVxd':>18} {'dist':>6} {'mode':>6} {'impl':>8} {'time ms':>9} {'x floor':>7} {'(proc)':>6}"
              f" {'x sdpa':>6}"
              f" {'x eager':>7} {'RSS MiB':>8} {'x eager':>7} {'peak MiB':>8} {'x eager':>7}")
    load = report.get("load_average_1_5_15min", {})
    lines = [f"{report['device']} | {report['dtype']} | {report['date']} | load (1/5/15 min) at start {load.get('start')},"
             f" end {load.get('end')}", header, "-" * len(header)]
    for r in report["results"]:
        shape = f"{r['T']}x{r['V']}x{r['d']}"
        lead = f"{shape:>18} {r['distance']:>6} {r['mode']:>6} {r['impl']:>8}"
        if "error" in r:
            lines.append(f"{lead}   {r['error']}")
            continue

        def fmt(key, width, digits, scale=1.0):
            return format(r[key] * scale, f"{width}.{digits}f") if key in r else format("-", f">{width}")

        lines.append(
            f"{lead} {fmt('time_s', 9, 1, 1e3)} {fmt('time_vs_floor', 7, 2)} {fmt('time_vs_floor_same_process', 6, 2)}"
            f" {fmt('time_vs_sdpa', 6, 2)}"
            f" {fmt('time_vs_eager', 7, 2)} {fmt('peak_rss_bytes', 8, 1, 2**-20)} {fmt('rss_vs_eager', 7, 3)}"
            f" {fmt('peak_bytes', 8, 1, 2**-20)} {fmt('memory_vs_eager', 7, 3)}"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "time_s" in r]
    groups = sorted({(r["T"], r["V"], r["d"], r["distance"], r["mode"]) for r in rows})
    impls = [i for i in ("floor", *IMPLS) if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(groups)), 4.8))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        times, mems = [], []
        for g in groups:
            match = [r for r in rows if (r["T"], r["V"], r["d"], r["distance"], r["mode"]) == g and r["impl"] == impl]
            times.append(match[0]["time_s"] if match else 0)
            mems.append(match[0].get("peak_rss_bytes", match[0].get("peak_bytes", 0)) / 2**20 if match else 0)
        xs = [i + k * width for i in range(len(groups))]
        axes[0].bar(xs, times, width, label=impl)
        axes[1].bar(xs, mems, width, label=impl)
    labels = [f"{T}x{V}x{d}\n{dist} {mode}" for T, V, d, dist, mode in groups]
    titles = ("median time (s); floor = FLOPs at the best GEMM rate", "peak resident set above the inputs (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"soft VQ, {report['dtype']}, {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    torch.manual_seed(0)
    if job["what"] == "gemm":
        print(json.dumps(cpu_gemm_rates(tuple(job["shape"]), DTYPES[job["dtype"]], job["reps"])))
        return
    result = measure(
        job["impl"], tuple(job["shape"]), DTYPES[job["dtype"]], torch.device("cpu"), job["mode"],
        job["reps"], job["distance"], job["what"],
    )
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--distance", "--distances", dest="distances", default=["l2"], type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(DISTANCES)} (default l2)")
    parser.add_argument("--shapes", default=[(4096, 32000, 256)],
                        type=lambda s: [parse_shape(p) for p in s.split(",")], help="TxVxd[,TxVxd...]")
    parser.add_argument("--impls", default=list(IMPLS), type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--modes", default=["fwd", "fwdbwd"], type=lambda s: s.split(","),
                        help=f"comma-separated subset of {','.join(MODES)} (default fwd,fwdbwd)")
    parser.add_argument("--rounds", type=int, default=1, help="run every job this many times; rows keep the best round")
    parser.add_argument("--no-memory-runs", dest="memory_runs", action="store_false",
                        help="CPU: skip the second (mmap-threshold) memory process; the RSS figure is still taken")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per CPU measurement subprocess")
    parser.add_argument("--out", default=None, help="JSON report path (default benchmarks/results/<device>-<date>.json)")
    parser.add_argument("--plot", default=None, help="PNG path for a bar plot")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return _worker(args.worker)
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown implementation {impl!r} (choose from {', '.join(IMPLS)})")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    for distance in args.distances:
        if distance not in DISTANCES:
            parser.error(f"--distance: unknown distance {distance!r} (choose from {', '.join(DISTANCES)})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.reps is None:
        args.reps = 20 if args.device.startswith("cuda") else 3
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    out = args.out or (f"benchmarks/results/{torch.device(args.device).type}-"
                       f"{datetime.datetime.now(datetime.timezone.utc).date().isoformat()}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)

    def write(report):
        Path(out).write_text(json.dumps(report, indent=2) + "\n")

    report = run_benchmark(args, on_progress=write)
    write(report)
    if args.plot:
        plot(report, args.plot)
    print(format_table(report))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
