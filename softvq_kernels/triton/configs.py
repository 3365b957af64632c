"""Block sizes for the Triton kernels: a small table keyed on (V, d, dtype), looked up once per key
and cached. dtype is that of the score operands x and codebook (the input dtype). Nothing is tuned at
import; ``softvq_kernels.triton.tuning`` times candidates and stores winners in the same cache;
``override`` forces a config in a block of code (tests use it to reach the staged large-d path and
the vocabulary split at tiny shapes).

Configs are keyed by GPU architecture (``device_arch``: sm_90, sm_80, other), so a table measured on one
GPU is never applied to another. Tuned entries can come from JSON per architecture named by
SOFTVQ_TRITON_CONFIGS (``_load_arch_file``; written by ``tuning.tune_to_file``, read at the first CUDA
lookup of that architecture, never at import).

Why the GPU defaults are what they are (the sweeps behind them: benchmarks/results/, commit log):
- d <= 256: 128x128 score tiles with 8 warps, 32-wide k steps in 4 stages (d = 256: 64x128 in 3, the 128-row
  tiles spill, see _GPU_16BIT_D256; this and the other register-driven choices are unmeasured); the backward is staged
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
    # Warps of the counts-only staging launch (column sums of p, nothing stored; 0: num_warps). Its p feeds only
    # a sum, so it need not share the online kernel's bits (static_check: at d = 256 on sm_90, 8 warps on a
    # 64 x 128 tile get their wgmma serialised by ptxas, 4 do not).
    counts_num_warps: int = 0
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
    # The FlashAttention-style schedule of flash.py for next_pow2(d) <= fused_max_d (GPU default off until
    # measured): fused_finish, the forward finishes y / lse / argmax in the online kernel (or one merge
    # kernel when the vocabulary is split) with the norms in one prologue launch (also the hard-mode
    # forward); fused_backward, dC and dx from two kernels with on-chip accumulators, nothing staged.
    fused_finish: bool = False
    fused_backward: bool = False
    # Tiles of the fused backward's kernels (0: block_t / block_v; BLOCK_K is always block_k, so the scores keep
    # their bits) and the width of the codebook kernel's d-blocks (0: all of next_pow2(d) in one block; each
    # further d-block recomputes the scores and dp). Chosen so the kernels do not spill (static_check).
    fused_bwd_block_t: int = 0
    fused_bwd_block_v: int = 0
    fused_bwd_block_d: int = 0
    # score_gemm forward in one pass over the vocabulary (y accumulated chunk by chunk with a conditionally
    # rescaled online softmax: 4 T V d FLOPs instead of 6). GPU default off until measured.
    online_output: bool = False
    # Read the frame and codebook tiles of the online forward kernel (common.online_kernel: the default forward's
    # score tiles and, for d <= fused_max_d, its output product's codebook tile) through device-side TMA tensor
    # descriptors (tl.make_tensor_descriptor: UTMALDG on sm_90) instead of pointer loads. Inputs TMA cannot
    # read (row strides or base not 16-byte aligned, a pre-Hopper GPU) fall back to the pointer path with a
    # common.TMAFallback warning. Off everywhere until measured (static_check: compiled, HGMMA kept, no spills).
    tma: bool = False


# Interpreter (CPU): any block >= 16 works; larger blocks interpret faster.
_CPU = KernelConfig(block_t=32, block_v=32, block_k=32, fused_max_d=64, mm_block_m=32, mm_block_n=32,
                    mm_block_k=32, mm_num_warps=4, mm_num_stages=1, workspace_bytes=4 * 2**20, min_chunk_cols=0,
                    min_programs=1)

# Register budget (python -m softvq_kernels.triton.static_check, sm_90 and sm_80, no GPU needed): _mm_kernel at
# 128 x 128 with 8 warps has its wgmma serialised by ptxas (C7515), with 4 warps it pipelines; the staged
# backward's staging kernel spills 20 B per thread inside its loop at 3 stages and none at 4 (248 registers);
# the fused backward's kernels need 64-row tiles and <= 128-wide d-blocks not to spill (fused_bwd_*).
_GPU_16BIT_SMALL_D = KernelConfig(block_t=128, block_v=128, block_k=32, num_warps=8, num_stages=4, mm_num_warps=4,
                                  fused_bwd_block_t=64, fused_bwd_block_v=64, fused_bwd_block_d=128)
# d = 256: the forward's 128 x 256 fp32 output accumulator beside a 128 x 128 score tile spills (255 registers,
# 328 B per thread, inside the vocabulary loop); with 64-row tiles it holds in 228 registers.
# The counts-only staging launch on these tiles: ptxas serialises its score wgmma (C7515) with 8 warps at every
# stage count (2-4 tried) and pipelines it with 4 (108 registers): counts_num_warps=4 (sm_90 only; sm_80 has no wgmma).
_GPU_16BIT_D256 = dataclasses.replace(_GPU_16BIT_SMALL_D, block_t=64, num_stages=3, counts_num_warps=4)
# sm_80 (mma.sync, no wgmma): _mm_kernel's two-product variant at 4 warps needs 128 accumulator registers per thread
# and spills inside its k loop (255 registers); at 8 warps it does not (and nothing to serialise).
_SM80_16BIT_SMALL_D = dataclasses.replace(_GPU_16BIT_SMALL_D, mm_num_warps=8)
_SM80_16BIT_D256 = dataclasses.replace(_GPU_16BIT_D256, mm_num_warps=8, counts_num_warps=0)
_GPU_16BIT_LARGE_D = KernelConfig(block_t=128, block_v=128, block_k=64, num_warps=8, num_stages=3,
                                  mm_block_m=128, mm_block_n=128, mm_block_k=64, mm_num_warps=4, mm_num_stages=3,
                                  gemm="cublas", score_gemm=True)
_GPU_16BIT_MID_D = dataclasses.replace(_GPU_16BIT_LARGE_D, score_gemm=False)
_GPU_FP32 = KernelConfig(block_t=32, block_v=64, block_k=32, num_warps=4, num_stages=2, fused_max_d=128,
                         mm_block_m=64, mm_block_n=64, mm_block_k=32, mm_num_warps=4,
                         mm_num_stages=2)

# Safe rule for GPUs nothing was measured on ("other": consumer Ampere / Ada, Blackwell, ...): small
# tiles and two stages fit in about 100 KB of shared memory; cuBLAS does the large-d products.
_SAFE_16BIT_SMALL_D = KernelConfig(block_t=64, block_v=64, block_k=32, num_warps=4, num_stages=2, fused_max_d=128,
                                   mm_block_m=64, mm_block_n=64, mm_block_k=32, mm_num_warps=4, mm_num_stages=2)
_SAFE_16BIT_LARGE_D = dataclasses.replace(_SAFE_16BIT_SMALL_D, gemm="cublas", score_gemm=True)

# Config families by GPU architecture (``device_arch``). Exact entries (V, d, dtype) per family; other keys
# use the family's rule in ``default_config``. sm_90's entries were measured on an H200 (benchmarks/results/);
# they are never applied to another architecture.
ARCHES = ("sm_90", "sm_80", "other")
TABLES: dict[str, dict[tuple[int, int, torch.dtype], KernelConfig]] = {
    "sm_90": {
        (32000, 256, torch.bfloat16): _GPU_16BIT_D256,
        (151936, 896, torch.bfloat16): _GPU_16BIT_MID_D,
        (128256, 2048, torch.bfloat16): _GPU_16BIT_LARGE_D,
        (128256, 4096, torch.bfloat16): _GPU_16BIT_LARGE_D,
    },
    "sm_80": {},
    "other": {},
}
TABLE = TABLES["sm_90"]  # the measured H200 entries

_cache: dict[tuple, KernelConfig] = {}
_override: list[KernelConfig] = []
_arch_of_device: dict[int, str] = {}
_files_loaded: set[str] = set()
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def key_text(V: int, d: int, dtype: torch.dtype) -> str:
    return f"{V},{d},{DTYPE_NAMES[dtype]}"


def arch_of_capability(major: int, minor: int) -> str:
    """sm_90 (H100 / H200), sm_80 (A100, A800: the sm_90 rules fit its 164 KB of shared memory), else
    "other" (the safe rule): sm_86 / sm_89 have 100 KB, too little for the sm_90 pipelines."""
    return {(9, 0): "sm_90", (8, 0): "sm_80"}.get((major, minor), "other")


def device_arch(device: torch.device) -> str:
    """The config family of a CUDA device (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _arch_of_device.get(index)
    if arch is None:
        arch = _arch_of_device[index] = arch_of_capability(*torch.cuda.get_device_capability(index))
    return arch


def _parse_table(entries: dict, origin: str) -> dict[tuple[int, int, torch.dtype], KernelConfig]:
    names = {v: k for k, v in DTYPE_NAMES.items()}
    table = {}
    for key, fields in entries.items():
        try:
            V, d, dtype = key.split(",")
            table[(int(V), int(d), names[dtype])] = KernelConfig(**fields)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{origin}: entry {key!r} is not 'V,d,dtype': {{KernelConfig field: value}} ({exc})") from exc
    return table


def _load_arch_file(arch: str) -> None:
    """Merge this architecture's tuned entries from SOFTVQ_TRITON_CONFIGS into TABLES[arch], once per
    architecture, at its first CUDA lookup (never at import). The variable names a directory holding
    <arch>.json files ({"V,d,dtype": {field: value}}) or one file {"<arch>": {"V,d,dtype": {...}}, ...}
    (what ``tuning.tune_to_file`` writes). Entries are applied only to the architecture they name."""
    _files_loaded.add(arch)
    path = os.environ.get("SOFTVQ_TRITON_CONFIGS")
    if not path:
        return
    if os.path.isdir(path):
        file = os.path.join(path, f"{arch}.json")
        if os.path.exists(file):
            with open(file) as f:
                TABLES[arch].update(_parse_table(json.load(f), file))
        return
    with open(path) as f:
        data = json.load(f)
    unknown = [key for key in data if key not in ARCHES]
    if unknown:
        raise ValueError(
            f"SOFTVQ_TRITON_CONFIGS={path}: top-level keys must be GPU architectures {ARCHES} (tables are "
            f"never applied to a GPU they were not tuned on), got {unknown[:3]}"
        )
    TABLES[arch].update(_parse_table(data.get(arch, {}), f"{path} [{arch}]"))


def default_config(V: int, d: int, dtype: torch.dtype, arch: str = "sm_90") -> KernelConfig:
    d_pad = triton.next_power_of_2(d)
    if arch == "other":
        if dtype in (torch.float32, torch.float64):
            return _GPU_FP32
        return _SAFE_16BIT_SMALL_D if d_pad <= 128 else _SAFE_16BIT_LARGE_D
    if dtype in (torch.float32, torch.float64):
        return _GPU_FP32
    if d_pad <= 128:
        return _SM80_16BIT_SMALL_D if arch == "sm_80" else _GPU_16BIT_SMALL_D
    if d_pad <= 256:
        return _SM80_16BIT_D256 if arch == "sm_80" else _GPU_16BIT_D256
    return _GPU_16BIT_MID_D if d_pad <= 1024 else _GPU_16BIT_LARGE_D


def _cache_key(V: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (V, d, dtype, device.type, device_arch(device) if device.type == "cuda" else None)


def get_config(V: int, d: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The config for one call; the device's architecture table is consulted once per key."""
    if _override:
        return _override[-1]
    device = torch.device(device)
    key = _cache_key(V, d, dtype, device)
    config = _cache.get(key)
    if config is None:
        arch = key[4]
        if arch is None:
            config = _CPU
        else:
            if arch not in _files_loaded:
                _load_arch_file(arch)
            config = TABLES[arch].get((V, d, dtype)) or default_config(V, d, dtype, arch)
        _cache[key] = config
    return config


def remember(V: int, d: int, dtype: torch.dtype, device, config: KernelConfig) -> None:
    """Use ``config`` for (V, d, dtype) on ``device`` (and its architecture) from now on (tuning's winner)."""
    _cache[_cache_key(V, d, dtype, torch.device(device))] = config


def cache_info() -> dict[tuple, KernelConfig]:
    return dict(_cache)


def clear_cache() -> None:
    """Forget cached lookups, device architectures and which tuned files were read."""
    _cache.clear()
    _arch_of_device.clear()
    _files_loaded.clear()


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
