"""Block sizes for the Triton kernels: a small table keyed on (V, d, dtype), looked up once per key
and cached. dtype is that of the score operands x and codebook (the input dtype). Nothing is tuned at
import; ``softvq_kernels.triton.tuning`` times candidates and stores winners in the same cache;
``override`` forces a config in a block of code (tests use it to reach the staged large-d path and
the vocabulary split at tiny shapes).

Tuned entries can also come from a JSON file named by SOFTVQ_TRITON_CONFIGS (written by
``tuning.tune_to_file``, read at the first CUDA lookup, never at import): {"V,d,dtype": {field: value}}.

Why the GPU defaults are what they are (the sweeps behind them: benchmarks/results/, commit log):
- d <= 256: 128x128 score tiles with 8 warps, 32-wide k steps in 3 stages; the backward is staged
  (scores and dp on tensor cores, then GEMMs over staged p / ds tiles), several times faster than a
  FlashAttention-2 style backward whose BLOCK x d fp32 accumulators spill at d = 256.
- d >= 2048: the scores and dp of each vocabulary chunk come from cuBLAS (``score_gemm``: the Triton
  kernels only read them) and cuBLAS multiplies the staged tiles into fp32 accumulators; larger Triton
  tiles or deeper pipelines exceed the shared memory.
- d = 896 keeps the kernels' own score tiles (its cuBLAS score products measured slower).
fp32 entries are unmeasured: fp32 products are IEEE fp32 on the FMA units (no TF32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import triton

from softvq_kernels import planning


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
    # GEMM over staged tiles.
    mm_block_m: int = 128
    mm_block_n: int = 128
    mm_block_k: int = 64
    mm_num_warps: int = 8
    mm_num_stages: int = 3
    # Bytes of one staged (T, chunk) matrix (0: softvq_kernels.planning's budget, SOFTVQ_WORKSPACE_BYTES);
    # the chunk is never narrower than min_chunk_cols, because at large T a byte budget alone leaves
    # hundreds of thin chunks whose GEMMs run far below the GPU's rate.
    workspace_bytes: int = 0
    min_chunk_cols: int = 2048
    # Split the vocabulary over programs until there are this many (0: planning.program_target).
    min_programs: int = 0
    # Who multiplies the staged tiles: "triton" (_mm_kernel) or "cublas" (torch.mm with fp32 output, CUDA
    # 16-bit tiles only; anything else runs _mm_kernel).
    gemm: str = "triton"
    # Large d (the staged schedule): take <x, k> and <g, v> from cuBLAS products of each vocabulary chunk
    # (fp32, T x chunk) instead of the kernels' own tile products; Triton then only reads them.
    score_gemm: bool = False


# Interpreter (CPU): any block >= 16 works; larger blocks interpret faster.
_CPU = KernelConfig(block_t=32, block_v=32, block_k=32, fused_max_d=64, mm_block_m=32, mm_block_n=32,
                    mm_block_k=32, mm_num_warps=4, mm_num_stages=1, workspace_bytes=4 * 2**20, min_chunk_cols=0,
                    min_programs=1)

_GPU_16BIT_SMALL_D = KernelConfig(block_t=128, block_v=128, block_k=32, num_warps=8, num_stages=3)
_GPU_16BIT_LARGE_D = KernelConfig(block_t=128, block_v=128, block_k=64, num_warps=8, num_stages=3,
                                  mm_block_m=128, mm_block_n=128, mm_block_k=64, mm_num_warps=8, mm_num_stages=3,
                                  gemm="cublas", score_gemm=True)
_GPU_16BIT_MID_D = dataclasses.replace(_GPU_16BIT_LARGE_D, score_gemm=False)
_GPU_FP32 = KernelConfig(block_t=32, block_v=64, block_k=32, num_warps=4, num_stages=2, fused_max_d=128,
                         mm_block_m=64, mm_block_n=64, mm_block_k=32, mm_num_warps=4,
                         mm_num_stages=2)

# Exact entries for the reference shapes (V, d, dtype); other keys use the rule in default_config.
TABLE: dict[tuple[int, int, torch.dtype], KernelConfig] = {
    (32000, 256, torch.bfloat16): _GPU_16BIT_SMALL_D,
    (151936, 896, torch.bfloat16): _GPU_16BIT_MID_D,
    (128256, 2048, torch.bfloat16): _GPU_16BIT_LARGE_D,
    (128256, 4096, torch.bfloat16): _GPU_16BIT_LARGE_D,
}

_cache: dict[tuple, KernelConfig] = {}
_override: list[KernelConfig] = []
_env_loaded = False
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def key_text(V: int, d: int, dtype: torch.dtype) -> str:
    return f"{V},{d},{DTYPE_NAMES[dtype]}"


def _load_env_table() -> None:
    """Merge SOFTVQ_TRITON_CONFIGS (if set) into TABLE, once, at the first CUDA lookup."""
    global _env_loaded
    _env_loaded = True
    path = os.environ.get("SOFTVQ_TRITON_CONFIGS")
    if not path:
        return
    names = {v: k for k, v in DTYPE_NAMES.items()}
    with open(path) as f:
        for key, fields in json.load(f).items():
            V, d, dtype = key.split(",")
            TABLE[(int(V), int(d), names[dtype])] = KernelConfig(**fields)


def default_config(V: int, d: int, dtype: torch.dtype) -> KernelConfig:
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
        config = _CPU if device.type != "cuda" else TABLE.get((V, d, dtype)) or default_config(V, d, dtype)
        _cache[key] = config
    return config


def remember(V: int, d: int, dtype: torch.dtype, device_type: str, config: KernelConfig) -> None:
    """Use ``config`` for (V, d, dtype) on ``device_type`` from now on (what tuning does with a winner)."""
    _cache[(V, d, dtype, device_type)] = config


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


def chunk_width(cfg: KernelConfig, T: int, V: int, elem_bytes: int) -> int:
    """Columns of one staged vocabulary chunk (a multiple of block_v), from softvq_kernels.planning."""
    return planning.vocab_chunk(T, V, elem_bytes, multiple=cfg.block_v, min_cols=max(cfg.block_v, cfg.min_chunk_cols),
                                budget=cfg.workspace_bytes or None)


def vocab_splits(cfg: KernelConfig, T: int, V: int, device: torch.device) -> tuple[int, int]:
    """(tiles per split, number of splits) of the online pass, from softvq_kernels.planning."""
    target = cfg.min_programs or planning.program_target(device)
    return planning.vocab_splits(triton.cdiv(T, cfg.block_t), triton.cdiv(V, cfg.block_v), target)
