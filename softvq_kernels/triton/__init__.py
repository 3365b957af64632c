"""Triton backend: fused soft VQ kernels (issue 3). The same kernels run on CUDA and, with
TRITON_INTERPRET=1 set before triton is imported, in Triton's CPU interpreter (how CI tests them).

What this backend implements, and what it relies on. ``softvq_kernels.autograd`` compacts masked
frames away before calling ``forward``/``backward`` (rows are all real frames here) and turns cosine
into ``dot`` on normalised rows (values stay raw, the chain rule through the normalisation is done
there), so the kernels implement l2 and dot only. Masks and cosine are tested end to end through
``soft_vq`` in tests/test_triton.py and tests/test_backends.py.

Scores. l2 uses a_tv = (2<x_t, k_v> - ||k_v||^2) / tau (the true score plus ||x_t||^2 / tau, which the
softmax ignores); ||k_v||^2 is one row-norm kernel per call, ||x_t||^2 / tau one per call. Every score
tile comes from ``common.score_tile`` with the same BLOCK_K, so all kernels recompute bitwise equal
scores and p = exp((a - ||x||^2/tau) - lse) is exactly 1 at the argmax of a one-hot row.

Forward schedule (forward.py).
1. ``_online_kernel``, grid (T / BLOCK_T, splits): one pass over the program's share of the vocabulary
   with an online max / sum and the first argmax. When next_pow2(d) <= ``fused_max_d`` (256 for 16-bit
   inputs on the GPU) it also keeps the unnormalised output sum_v exp(a - m) v in a BLOCK_T x d register
   accumulator: a FlashAttention-style single pass, 4 T V d FLOPs. The vocabulary is split across
   programs when T / BLOCK_T alone would leave SMs idle; partial (m, l, idx, output) are merged by their
   LSE (w_s = exp(m_s - max m), y = sum w_s acc_s / sum w_s l_s), argmax by the largest split max.
2. Large d (d = 896-8192): a BLOCK_T x d accumulator does not fit on chip (64 x 4096 fp32 is the whole
   register file), so the online pass computes only lse and argmax (2 T V d), and the output is made by
   staging: for each vocabulary chunk of ``width`` columns (T x width fits ``workspace_bytes``, 64 MiB:
   4096 columns at T = 8192 in bf16), ``_stage_kernel`` writes the exact
   probabilities p = exp(s - lse) in the input dtype (as FlashAttention rounds P before its PV product)
   and ``_mm_kernel`` adds P @ values_chunk into an fp32 y. 6 T V d FLOPs, all tensor-core GEMM work; the
   staged tile costs 4 bytes per 4d FLOPs (intensity d >= 896 > the H200 bf16 ridge of ~206 FLOP/B).
3. code_counts need the final lse, so they cannot come from the online pass: they are the column sums of
   the staging kernel (atomics over T blocks), free in the staged path and a second scores-only launch
   (2 T V d) in the fused path, run only when counts are asked for. ``codebook_stats`` (the autograd.py
   hook for EMA statistics) stages p chunk by chunk for counts and soft sums sum_t p_tv x_t (4 T V d).

Backward schedule (backward.py). Both variants recompute p = exp((a - ||x||^2/tau) - lse) from the saved
lse and ds = p (<g, v> - <g, y>); fp32 accumulation throughout.
- Fused, next_pow2(d) <= ``fused_bwd_max_d`` (256 for 16-bit on the GPU): FlashAttention-2 style, no
  workspace at all. ``_fused_codebook_kernel`` owns BLOCK_V codebook rows and loops over every frame
  (scores, dp, p^T g and ds^T x into one on-chip BLOCK_V x d accumulator when keys is values, two
  otherwise: 8 T V d FLOPs); ``_fused_frames_kernel`` owns BLOCK_T frames and loops over the vocabulary
  (scores, dp, ds c: 6 T V d). 14 T V d in all, each output row written once, in its final form.
- Staged, large d: per vocabulary chunk ``_stage_kernel`` recomputes scores and dp (4 T V d), writes p
  and ds for the chunk (T x width each, input dtype) and adds the row / column sums of ds and
  sum ds log p with atomics; then ``_mm_kernel`` does dx += ds @ k_chunk (fp32 accumulator over chunks)
  and one two-product GEMM writes the chunk's codebook rows
  sum_t p g_t + (2/tau)(sum_t ds x_t - c_v sum_t ds) directly (key role folded in when keys is values).
  10 T V d FLOPs; the staged tiles cost 10 bytes per 10 d FLOPs, cheap for d >= 896.
Exactness rewrites (as in the chunked backend): dtau = -(1/tau) sum ds u with u = log p + log V and the
per-row correction -(sum_v ds)(sum_v p u) (backward.backward says why), and
dx = (2/tau)(sum_v ds c_v - y sum_v ds); both are exact because sum_v ds = 0 and keep one-hot rows exact.

Dtypes: fp32 / fp16 / bf16 with fp32 accumulation (fp32 products use IEEE fp32, not TF32, so fp32 runs
on the FMA units and its GPU config stages the backward), and fp64 with fp64 accumulation (gradcheck;
compiled for sm_90 here, never run on a GPU). The interpreter's bf16 tl.dot is wrong, so bf16 is tested on GPUs
only. Block sizes: configs.py, picked from a sweep on an H200 (2026-11-26): there the staged backward
beats the fused one at d = 256 (1.6 vs 6.1 ms at 4096x32000x256), so GPUs stage at every d, and at large d
the staged tiles are multiplied by cuBLAS (``KernelConfig.gemm``). For d >= 2048 the GPU config also takes
each vocabulary chunk's scores and dp from cuBLAS products (``KernelConfig.score_gemm``, fp32, T x chunk),
so every FLOP of the forward (6 T V d) and backward (10 T V d) is a cuBLAS GEMM and the Triton kernels only
read S / dP and write P / ds; forward and backward use the same chunks, hence bitwise the same scores.
Measured speed and memory: README.md.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

try:
    import triton  # noqa: F401

    # Loaded now so that the names ``forward``/``backward`` below (the contract's functions) are bound
    # after, not replaced by, the submodules of the same name.
    from softvq_kernels.triton import backward as _backward_module
    from softvq_kernels.triton import forward as _forward_module

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - triton is a dependency on Linux x86-64
    _IMPORT_ERROR = exc


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return f"triton failed to import ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton kernels run on CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"Triton kernels need CUDA tensors, got device type {device.type!r}"


def forward(x, keys, values, tau, l2, need_counts):
    return _forward_module.forward(x, keys, values, tau, l2, need_counts)


def backward(grad_y, x, keys, values, tau, l2, y, lse):
    return _backward_module.backward(grad_y, x, keys, values, tau, l2, y, lse)


def codebook_stats(x, keys, tau, l2, lse, rows):
    """Optional hook of softvq_kernels.autograd: (counts (V,), soft sums (V, d)) from the saved lse."""
    return _forward_module.codebook_stats(x, keys, tau, l2, lse, rows)
