"""Per-kernel CUDA time of one soft_vq forward + backward through the public API, for any backend.

    python -m benchmarks.profile_backend --backend cuda --shapes 4096x32000x256
"""

from __future__ import annotations

import argparse

import torch

import softvq_kernels as sk
from benchmarks.bench_op import parse_shape


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

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if t > 0:
                rows.append((evt.key[:70], evt.count // 3, t / 3 / 1e3))
        rows.sort(key=lambda r: -r[2])
        print(f"--- {args.backend} {text} fwd+bwd per call, total {sum(r[2] for r in rows):.2f} ms")
        for name, n, ms in rows[:10]:
            print(f"  {ms:9.3f} ms  x{n:<5d} {name}")


if __name__ == "__main__":
    main()
