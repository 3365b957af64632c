"""Triton backend: fused soft VQ kernels. The same kernels run on CUDA and, with TRITON_INTERPRET=1 set
before triton is imported, in Triton's CPU interpreter (how CI tests them).

``softvq_kernels.autograd`` compacts masked frames away before calling ``forward``/``backward`` (rows
are all real frames here) and passes cosine as inverse row norms (scores <x, c> r_t q_v / tau, scaled
inside the kernels: no normalised copy of the codebook). The kernels implement l2, dot and cosine.

Scores. l2 uses a_tv = (2<x_t, c_v> - ||c_v||^2) / tau (the true score plus ||x_t||^2 / tau, which the
softmax ignores). Every score tile comes from ``common.score_tile`` with the same BLOCK_K (or from the
same cuBLAS chunk product), so all kernels recompute bitwise equal scores and p = exp(s - lse) is
exactly 1 at the argmax of a one-hot row.

Forward (forward.py).
1. ``online_kernel`` (common.py), grid (T / BLOCK_T, splits): one pass over the program's share of the vocabulary
   with an online max / sum and the first argmax. When next_pow2(d) <= ``fused_max_d`` it also keeps
   the unnormalised output sum_v exp(a - m) c_v in a BLOCK_T x d register accumulator (FlashAttention
   style, 4 T V d FLOPs). The vocabulary is split across programs when T / BLOCK_T alone would leave
   SMs idle; partial (m, l, idx, output) merge by their LSE, the index by the first split at the max.
2. Large d: a BLOCK_T x d accumulator does not fit on chip, so the online pass computes only lse and
   argmax (2 T V d) and the output is staged: per vocabulary chunk ``_stage_kernel`` writes the exact
   probabilities p = exp(s - lse) in the input dtype and a GEMM adds P @ C_chunk into an fp32 y
   (6 T V d, all tensor-core work; the staged tile costs 4 bytes per 4 d FLOPs).
3. code_counts need the final lse: column sums of the staging kernel (atomics over T blocks), free in the
   staged path and a scores-only launch (2 T V d) in the fused path, run only when asked for.

Opt-in schedules (KernelConfig fields, off in every GPU default until a GPU measures them; tests force them):
- fused_finish / fused_backward (flash.py, d <= fused_max_d): the forward writes y, lse and argmax from the
  online kernel itself (or one merge kernel when the vocabulary is split), norms in one prologue launch;
  the backward is FlashAttention-2 style, a codebook-block kernel (dC in both roles) and a frame-block
  kernel (dx and the row sums) with on-chip accumulators and nothing staged: forward + backward in at
  most 6 launches, no host reads, shapes alone fix every grid (CUDA-graph capturable).
- online_output (forward.py, with score_gemm): the large-d forward in one pass over the vocabulary, P_c
  relative to a running max that moves only past RESCALE_THRESHOLD (FlashAttention-4's rescale): 4 T V d.
Hard mode (``lse_argmax``): the online pass without the output, 2 T V d, on every schedule.

Backward (backward.py): staged at every d by default, see its docstring. A gradient on code_counts costs one
extra scores-only pass (c_t = sum_v p_tv gn_v is needed before any ds); a gradient on lse is free.

Dtypes: fp32 / fp16 / bf16 with fp32 accumulation (fp32 products use IEEE fp32, not TF32), and fp64
with fp64 accumulation (gradcheck). The interpreter's bf16 tl.dot is wrong, so bf16 is tested on GPUs
only. Block sizes: configs.py; tuning: tuning.py.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

try:
    import triton  # noqa: F401

    from softvq_kernels.triton.backward import backward as _backward
    from softvq_kernels.triton.forward import codebook_stats as _codebook_stats
    from softvq_kernels.triton.forward import forward as _forward
    from softvq_kernels.triton.forward import lse_argmax as _lse_argmax

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


def forward(x, codebook, tau, scoring, need_counts):
    return _forward(x, codebook, tau, scoring, need_counts)


def backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts):
    return _backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts)


def codebook_stats(x, codebook, tau, scoring, lse, rows):
    return _codebook_stats(x, codebook, tau, scoring, lse, rows)


def lse_argmax(x, codebook, tau, scoring):
    return _lse_argmax(x, codebook, tau, scoring)
