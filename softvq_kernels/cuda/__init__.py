"""The ``cuda`` backend: CUDA C++ kernels (csrc/) behind the backend contract of ``softvq_kernels.backends``.

The compiled module is ``softvq_kernels._cuda`` when ``pip install`` built it, else a JIT build of
csrc/ on first use (see ``_build.py``). Masks and dtype handling are done by
``softvq_kernels.autograd`` (fused_forward / fused_backward); these functions see real frames only, and
cosine as inverse row norms scaled inside the kernels. Inputs: float32, float16 or bfloat16 (fp32
accumulation; fp32 products use 3xTF32 on tensor cores).
"""

from __future__ import annotations

import math

import torch

from softvq_kernels import planning
from softvq_kernels.backends import BackwardPieces, centre_vocab
from softvq_kernels.cuda import _build

MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA (WMMA) needs sm_80


def unavailable_reason(device: torch.device) -> str | None:
    """None when the cuda backend can run on tensors of ``device``; otherwise a sentence saying why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available to PyTorch"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"the cuda backend needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer, this one is {capability[0]}.{capability[1]}"
        )
    return _build.build_unavailable_reason()


_DIST_CODES = {"dot": 0, "l2": 1, "cosine": 2}  # softvq::Distance in csrc/softvq.h
_TILE = 64  # the kernels' BM = BN


def _scoring_args(scoring):
    return _DIST_CODES[scoring.distance], scoring.x_inv_norm, scoring.codebook_inv_norm


def _chunk_cols(x, codebook, live_matrices):
    return planning.vocab_chunk(x.shape[0], codebook.shape[0], x.element_size(), live_matrices, multiple=_TILE)


def forward(x, codebook, tau, scoring, need_counts):
    """x: (T, d), codebook: (V, d), tau: 0-dim -> y (T, d) fp32, lse (T,) fp32, indices (T,) int64,
    counts (V,) fp32 or None. See softvq_kernels.backends for the contract."""
    return _build.load().forward(x, codebook, tau, *_scoring_args(scoring), bool(need_counts),
                                 planning.program_target(x.device), _chunk_cols(x, codebook, 1))


def backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts):
    """-> BackwardPieces (fp32); P and dS are staged, two (T, chunk) workspaces."""
    pieces = _build.load().backward(grad_y, x, codebook, tau, *_scoring_args(scoring), y, lse, grad_lse, grad_counts,
                                    _chunk_cols(x, codebook, 2), math.log(centre_vocab(scoring, codebook.shape[0])))
    return BackwardPieces(*pieces)


def codebook_stats(x, codebook, tau, scoring, lse, rows):
    """Soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, D), fp32, p recomputed from lse."""
    return _build.load().codebook_stats(x, codebook, tau, *_scoring_args(scoring), lse, rows,
                                        _chunk_cols(x, codebook, 1))
