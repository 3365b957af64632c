"""Block sizes for the Triton kernels: a small table keyed on (V, d, dtype), looked up once per key
and cached. dtype is that of the score operands x and keys (the input dtype, but fp32 for cosine,
whose rows autograd.py normalises in fp32). Nothing is tuned at import; ``tune`` (called explicitly,
e.g. by benchmarks/gpu_suite.sh) times a few candidates and stores the winner in the same cache;
``override`` forces a config in a block of code (tests use it to reach the staged large-d path and
the vocabulary split at tiny shapes).

Tuned entries can also come from a JSON file named by SOFTVQ_TRITON_CONFIGS (written by ``tune_to_file``,
read at the first CUDA lookup, never at import): {"V,d,dtype": {field: value, ...}, ...}.

The 16-bit GPU entries were picked from a sweep on an H200 (2026-11-26, bf16, l2;
benchmarks/profile_triton.py, kernel times from triton.testing.do_bench):
- 4096x32000x256: 128x128 tiles with 8 warps, 32-wide k steps in 3 stages, and the *staged* backward.
  The FlashAttention-2 style fused backward (BLOCK x 256 fp32 accumulators on chip) ran at 53-78
  TFLOP/s whatever its tiles, the staged one (scores + dp on tensor cores, then GEMMs over the staged
  tiles) at 200: forward 0.71 ms, backward 1.67 ms (the first guess, 64x64 tiles: 1.28 + 6.07 ms).
- 8192x128256x2048: 128x128 tiles with 8 warps, the scores and dp of each vocabulary chunk from cuBLAS
  (``score_gemm``: Triton only reads them) and the staged tiles multiplied by cuBLAS into fp32
  accumulators: forward 24.9 ms, backward 40.9 ms (own score tiles + cuBLAS 29.7 + 50.6; own score
  tiles + _mm_kernel 32.6 + 54.2; 64-row score tiles 37.4 + 67.1). Larger GEMM tiles or deeper
  pipelines exceed the 227 KB of shared memory.
- d = 896 (8192x151936x896) keeps its own score tiles: there the cuBLAS scores were slower
  (fwd+bwd 54.4 vs 46.6 ms through the API).
fp32 entries are unmeasured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class KernelConfig:
    # Score-tile kernels (the online forward pass and the staging kernel share these so that they
    # compute bitwise identical scores).
    block_t: int = 64
    block_v: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Fused forward (output accumulator of BLOCK_T x next_pow2(d) held on chip) when next_pow2(d) <= this;
    # otherwise the staged schedule (module docstring of softvq_kernels.triton).
    fused_max_d: int = 256
    # Fused (FlashAttention-2 style, no workspace) backward when next_pow2(d) <= this; else staged.
    fused_bwd_max_d: int = 256
    # GEMM over staged tiles.
    mm_block_m: int = 128
    mm_block_n: int = 128
    mm_block_k: int = 64
    mm_num_warps: int = 8
    mm_num_stages: int = 3
    # Bytes of one staged (T, chunk) matrix; the chunk width is derived from it, but never narrower
    # than min_chunk_cols (at T = 65536 a 64 MiB budget leaves 512 columns: 250 chunks of thin GEMMs,
    # which made the backward 9x slower than the forward on an H200).
    workspace_bytes: int = 64 * 2**20
    min_chunk_cols: int = 2048
    # Split the vocabulary over programs until there are this many (0: twice the SM count on CUDA, 1 on CPU).
    min_programs: int = 0
    # Who multiplies the staged tiles: "triton" (_mm_kernel) or "cublas" (torch.mm with fp32 output, CUDA
    # 16-bit tiles only; anything else falls back to _mm_kernel).
    gemm: str = "triton"
    # Large d (the staged schedule): take <x, k> and <g, v> from cuBLAS products of each vocabulary chunk
    # (fp32, T x chunk) instead of the kernels' own tile products; Triton then only reads them.
    score_gemm: bool = False


# Interpreter (CPU): any block >= 16 works; larger blocks interpret faster.
_CPU = KernelConfig(block_t=32, block_v=32, block_k=32, fused_max_d=64, fused_bwd_max_d=64, mm_block_m=32, mm_block_n=32,
                    mm_block_k=32, mm_num_warps=4, mm_num_stages=1, workspace_bytes=4 * 2**20, min_chunk_cols=0,
                    min_programs=1)

# H200 picks (module docstring): the fused backward stays for the interpreter and for tuning, but on the
# GPU the staged backward is 3.7x faster at d = 256.
_GPU_16BIT_SMALL_D = KernelConfig(block_t=128, block_v=128, block_k=32, num_warps=8, num_stages=3,
                                  fused_bwd_max_d=0)
_GPU_16BIT_LARGE_D = KernelConfig(block_t=128, block_v=128, block_k=64, num_warps=8, num_stages=3,
                                  mm_block_m=128, mm_block_n=128, mm_block_k=64, mm_num_warps=8, mm_num_stages=3,
                                  gemm="cublas", score_gemm=True)
# d = 896: the cuBLAS score products lost to the kernels' own (fwd+bwd 54.4 vs 46.6 ms at 8192x151936x896).
_GPU_16BIT_MID_D = dataclasses.replace(_GPU_16BIT_LARGE_D, score_gemm=False)
# fp32 runs IEEE fp32 products on the FMA units (no TF32): its fused backward spills, so it stages.
_GPU_FP32 = KernelConfig(block_t=32, block_v=64, block_k=32, num_warps=4, num_stages=2, fused_max_d=128,
                         fused_bwd_max_d=0, mm_block_m=64, mm_block_n=64, mm_block_k=32, mm_num_warps=4,
                         mm_num_stages=2)

# Exact entries for the reference shapes (V, d, dtype); other keys use the rule in _default.
TABLE: dict[tuple[int, int, torch.dtype], KernelConfig] = {
    (32000, 256, torch.bfloat16): _GPU_16BIT_SMALL_D,
    (151936, 896, torch.bfloat16): _GPU_16BIT_MID_D,
    (128256, 2048, torch.bfloat16): _GPU_16BIT_LARGE_D,
    (128256, 4096, torch.bfloat16): _GPU_16BIT_LARGE_D,
}

_cache: dict[tuple, KernelConfig] = {}
_override: list[KernelConfig] = []
_env_loaded = False
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _key_text(V: int, d: int, dtype: torch.dtype) -> str:
    return f"{V},{d},{_DTYPE_NAMES[dtype]}"


def _load_env_table() -> None:
    """Merge SOFTVQ_TRITON_CONFIGS (if set) into TABLE, once, at the first CUDA lookup."""
    global _env_loaded
    _env_loaded = True
    path = os.environ.get("SOFTVQ_TRITON_CONFIGS")
    if not path:
        return
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    with open(path) as f:
        for key, fields in json.load(f).items():
            V, d, dtype = key.split(",")
            TABLE[(int(V), int(d), names[dtype])] = KernelConfig(**fields)


def _default(V: int, d: int, dtype: torch.dtype) -> KernelConfig:
    if dtype in (torch.float32, torch.float64):
        return _GPU_FP32
    d_pad = triton.next_power_of_2(d)
    return _GPU_16BIT_SMALL_D if d_pad <= 256 else _GPU_16BIT_MID_D if d_pad <= 1024 else _GPU_16BIT_LARGE_D


def get_config(V: int, d: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The config for one call; the table is consulted once per (V, d, dtype, device type)."""
    if _override:
        return _override[-1]
    key = (V, d, dtype, device.type)
    config = _cache.get(key)
    if config is None:
        if device.type == "cuda" and not _env_loaded:
            _load_env_table()
        config = _CPU if device.type != "cuda" else TABLE.get((V, d, dtype)) or _default(V, d, dtype)
        _cache[key] = config
    return config


def cache_info() -> dict[tuple, KernelConfig]:
    return dict(_cache)


def clear_cache() -> None:
    _cache.clear()


@contextlib.contextmanager
def override(config: KernelConfig | None = None, **fields):
    """Use ``config`` (or the CPU/GPU default with ``fields`` replaced) for every call in the block."""
    base = config or _CPU
    _override.append(dataclasses.replace(base, **fields))
    try:
        yield _override[-1]
    finally:
        _override.pop()


def tune(T: int, V: int, d: int, dtype: torch.dtype, candidates=None, *, backward: bool = True,
         device="cuda", bench=None):
    """Time candidate configs for forward (+ backward) at (T, V, d, dtype) and cache the fastest.

    Explicit only (never at import). ``bench(fn) -> milliseconds`` defaults to triton.testing.do_bench
    (CUDA). Returns (winner, [(config, milliseconds), ...]); a config that fails to run scores inf.
    """
    from softvq_kernels.triton import backward as run_backward
    from softvq_kernels.triton import forward as run_forward

    if bench is None:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=2, rep=20)

    device = torch.device(device)
    if candidates is None:
        base = TABLE.get((V, d, dtype)) or _default(V, d, dtype)
        candidates = [base] + [
            dataclasses.replace(base, block_t=bt, block_v=bv, num_warps=w)
            for bt, bv, w in ((64, 64, 8), (64, 128, 8), (128, 64, 8), (128, 128, 8), (64, 64, 4))
            if (bt, bv, w) != (base.block_t, base.block_v, base.num_warps)
        ] + [
            dataclasses.replace(base, mm_block_n=256, mm_num_warps=8),
            dataclasses.replace(base, workspace_bytes=base.workspace_bytes // 4),
            dataclasses.replace(base, workspace_bytes=base.workspace_bytes * 2),
        ]
        if triton.next_power_of_2(d) <= base.fused_max_d:  # fused vs staged, forward and backward
            candidates += [dataclasses.replace(base, fused_bwd_max_d=0), dataclasses.replace(base, fused_max_d=0, fused_bwd_max_d=0)]
    x = torch.randn(T, d, device=device, dtype=dtype)
    c = torch.randn(V, d, device=device, dtype=dtype) / d**0.5
    tau = torch.tensor(1.0, device=device)
    g = torch.randn(T, d, device=device, dtype=dtype)
    best, best_ms, timings = None, float("inf"), []
    for config in candidates:
        _override.append(config)
        try:
            def step():
                y, lse, _, _ = run_forward(x, c, c, tau, True, False)
                if backward:
                    run_backward(g, x, c, c, tau, True, y, lse)

            ms = bench(step)
        except Exception:  # a candidate that does not compile (e.g. out of shared memory) just loses
            ms = float("inf")
        finally:
            _override.pop()
        timings.append((config, ms))
        if ms < best_ms:
            best, best_ms = config, ms
    _cache[(V, d, dtype, device.type)] = best
    return best, timings


def tune_to_file(path: str, shapes, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tune each (T, V, d) of ``shapes`` and write the winners as a SOFTVQ_TRITON_CONFIGS file."""
    table, report = {}, {}
    for T, V, d in shapes:
        best, timings = tune(T, V, d, dtype)
        table[_key_text(V, d, dtype)] = dataclasses.asdict(best)
        report[f"{T}x{V}x{d}"] = [(dataclasses.asdict(c), ms) for c, ms in timings]
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    return report
