"""Where the Triton backend's time goes on a GPU: per-kernel CUDA time of one forward and one backward
(torch.profiler), then a sweep of block configs for forward and backward separately.

    python -m softvq_kernels.bench.profile_triton --shapes 4096x32000x256,8192x128256x2048 --out prof.json

A development tool for tuning (the benchmark of record is softvq_kernels.bench.bench_op).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import triton.testing

from softvq_kernels.backends import Scoring
from softvq_kernels.bench.bench_op import parse_shape
from softvq_kernels.bench.profile_backend import kernel_times, print_rows
from softvq_kernels.triton import backward as triton_backward
from softvq_kernels.triton import configs
from softvq_kernels.triton import forward as triton_forward


def _problem(T, V, d, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=gen).to(dtype)
    c = (torch.randn(V, d, device="cuda", generator=gen) * 0.5).to(dtype)
    g = torch.randn(T, d, device="cuda", generator=gen).to(dtype)
    tau = torch.tensor(float(d) ** 0.5, device="cuda")
    return x, c, g, tau


def phases(x, c, g, tau, distance="l2"):
    """{"fwd": fn, "bwd": fn}: one Triton forward and one backward (with this forward's y and lse) through
    the backend contract, l2 or dot (cosine needs inverse norms: use profile_backend for it)."""
    scoring = Scoring(distance)
    y, lse, _, _ = triton_forward(x, c, tau, scoring, False)
    return {"fwd": lambda: triton_forward(x, c, tau, scoring, False),
            "bwd": lambda: triton_backward(g, x, c, tau, scoring, y, lse, None, None)}


def kernel_breakdown(T, V, d, dtype):
    x, c, g, tau = _problem(T, V, d, dtype)
    out = {}
    for phase, fn in phases(x, c, g, tau).items():
        out[phase] = kernel_times(fn)
        print_rows(f"--- {T}x{V}x{d} {phase}: per call", out[phase], top=8)
    return out


def sweep(T, V, d, dtype, variants):
    x, c, g, tau = _problem(T, V, d, dtype)
    base = configs.get_config(V, d, dtype, x.device)
    results = []
    for fields in variants:
        cfg = dataclasses.replace(base, **fields)
        try:
            with configs.override(cfg):
                fns = phases(x, c, g, tau)
                fwd = triton.testing.do_bench(fns["fwd"], warmup=5, rep=30)
                bwd = triton.testing.do_bench(fns["bwd"], warmup=5, rep=30)
        except Exception as exc:  # out of shared memory / registers: this variant just loses
            fwd = bwd = float("inf")
            print(f"  {fields}: failed {type(exc).__name__}: {str(exc)[:120]}")
        flops = T * V * d
        results.append({"fields": fields, "fwd_ms": fwd, "bwd_ms": bwd,
                        "fwd_tflops": 4 * flops / fwd / 1e9, "bwd_tflops": 10 * flops / bwd / 1e9})
        print(f"  fwd {fwd:8.3f} ms ({4 * flops / fwd / 1e9:6.1f} TF/s)  bwd {bwd:8.3f} ms ({10 * flops / bwd / 1e9:6.1f} TF/s)  {fields}", flush=True)
    return results


SMALL_D = [
    {},
    {"gemm": "cublas"},
    {"block_t": 64, "block_v": 128},
    {"num_stages": 3},
    {"block_k": 32, "num_stages": 3},
    {"block_t": 128, "block_v": 64},
]
LARGE_D = [
    {},
    {"score_gemm": False},
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x32000x256,8192x128256x2048")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    p.add_argument("--no-sweep", action="store_true")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    report = {}
    for text in args.shapes.split(","):
        T, V, d = parse_shape(text)
        entry = {"breakdown": kernel_breakdown(T, V, d, dtype)}
        if not args.no_sweep:
            print(f"--- sweep {text}")
            entry["sweep"] = sweep(T, V, d, dtype, SMALL_D if d <= 256 else LARGE_D)
        report[text] = entry
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
