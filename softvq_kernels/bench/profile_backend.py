"""Per-kernel CUDA time of one soft_vq forward + backward through the public API, for any backend.

    python -m softvq_kernels.bench.profile_backend --backend cuda --shapes 4096x32000x256
"""

from __future__ import annotations

import argparse

import torch

import softvq_kernels as sk
from softvq_kernels.bench.bench_op import parse_shape


def kernel_times(fn, calls: int = 3) -> list[tuple[str, int, float]]:
    """[(kernel name, launches per call, ms per call)] of ``calls`` runs of ``fn`` under torch.profiler,
    slowest first (fn is run once before, so compilation stays out)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            rows.append((evt.key[:70], evt.count // calls, t / calls / 1e3))
    return sorted(rows, key=lambda r: -r[2])


def print_rows(title: str, rows, top: int = 10) -> None:
    print(title)
    for name, n, ms in rows[:top]:
        print(f"  {ms:9.3f} ms  x{n:<5d} {name}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="cuda")
    p.add_argument("--shapes", default="4096x32000x256,8192x128256x2048")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    for text in args.shapes.split(","):
        T, V, d = parse_shape(text)
        x = torch.randn(T, d, device="cuda").to(dtype).requires_grad_()
        c = (torch.randn(V, d, device="cuda") * 0.5).to(dtype).requires_grad_()
        g = torch.randn(T, d, device="cuda").to(dtype)

        def step():
            y = sk.soft_vq(x, c, float(d) ** 0.5, backend=args.backend)
            y.backward(g)

        rows = kernel_times(step)
        print_rows(f"--- {args.backend} {text} fwd+bwd per call, total {sum(r[2] for r in rows):.2f} ms", rows)


if __name__ == "__main__":
    main()
