"""Paired A/B of the chunked backend against an older chunked.py, in one process.

    git show 383ee95:softvq_kernels/chunked.py > /tmp/chunked_base.py
    CLOCK=cpu NT=1 python benchmarks/cpu_chunked_ab.py 2048x16000x256 l2 3 /tmp/chunked_base.py

Calls each version's forward, backward and lse_argmax directly (no autograd, no epilogue), alternating
A and B every repetition, and prints medians against the floors (4, 10 and 2 T·V·d FLOPs at the best
torch.mm rate of a few chunk-shaped products measured at the start). CLOCK=cpu times with
time.process_time and NT=1 runs one torch thread: on a machine other processes keep busy, CPU time of
one thread moves far less than wall time of two.
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

from softvq_kernels import chunked as new
from softvq_kernels.autograd import inverse_norms
from softvq_kernels.backends import Scoring


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    torch.set_num_threads(int(os.environ.get("NT", "2")))
    clock = time.process_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter
    T, V, d = (int(a) for a in sys.argv[1].split("x"))
    distance, reps, base_path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    impls = {"base": load(base_path, "chunked_base"), "new": new}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=gen)
    codebook = torch.randn(V, d, generator=gen) * 0.5
    grad_y = torch.randn(T, d, generator=gen)
    tau = torch.tensor(1.0)
    scoring = Scoring(distance, inverse_norms(x), inverse_norms(codebook)) if distance == "cosine" else Scoring(distance)
    rate = 0.0
    for m, k, n in [(T, d, 1024), (T, d, 512), (1024, d, 1024), (T, d, 256)]:
        a, b, out = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
        torch.mm(a, b.T, out=out)
        times = []
        for _ in range(10):
            t0 = clock()
            torch.mm(a, b.T, out=out)
            times.append(clock() - t0)
        rate = max(rate, 2 * m * n * k / statistics.median(times))
    results = {name: {"fwd": [], "bwd": [], "hard": []} for name in impls}
    for rep in range(reps + 1):  # the first repetition warms up
        for name, module in impls.items():
            t0 = clock()
            y, lse, _, _ = module.forward(x, codebook, tau, scoring, False)
            t1 = clock()
            module.backward(grad_y, x, codebook, tau, scoring, y, lse, None, None)
            t2 = clock()
            module.lse_argmax(x, codebook, tau, scoring)
            t3 = clock()
            if rep:
                results[name]["fwd"].append(t1 - t0)
                results[name]["bwd"].append(t2 - t1)
                results[name]["hard"].append(t3 - t2)
    tvd = T * V * d
    print(f"{T}x{V}x{d} {distance} best mm {rate / 1e9:.1f} GF/s; floors fwd {4 * tvd / rate:.3f} "
          f"bwd {10 * tvd / rate:.3f} hard {2 * tvd / rate:.3f}")
    for name in impls:
        f, b, h = (statistics.median(results[name][k]) for k in ("fwd", "bwd", "hard"))
        print(f"{name:5s} fwd {f:.3f} ({f / (4 * tvd / rate):.2f}x) bwd {b:.3f} ({b / (10 * tvd / rate):.2f}x) "
              f"fwd+bwd {f + b:.3f} ({(f + b) / (14 * tvd / rate):.2f}x) hard {h:.3f} ({h / (2 * tvd / rate):.2f}x)")


if __name__ == "__main__":
    main()
