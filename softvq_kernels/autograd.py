"""Forward and backward shared by every fused backend: masking, cosine inverse norms, dtypes, the
counts-gradient and the epilogue live here once, so a backend only implements the O(T V d) passes on
real frames. ``softvq_kernels.op`` registers these two functions as the ``softvq::soft_vq`` custom op
and its backward (there is no other autograd path for the fused backends).
"""

from __future__ import annotations

import torch

from softvq_kernels import backends
from softvq_kernels.backends import Scoring
from softvq_kernels.epilogue import finish_backward
from softvq_kernels.reference import COSINE_EPS, accumulation_dtype


def inverse_norms(t: torch.Tensor) -> torch.Tensor:
    """t: (N, d) -> 1 / max(||t_n||, eps) (N,) in the accumulation dtype (norms accumulate there, so
    16-bit rows keep their tensor-core products and no normalised copy is made)."""
    norms = torch.linalg.vector_norm(t, dim=-1, dtype=accumulation_dtype(t.dtype))
    return norms.clamp_min(COSINE_EPS).reciprocal()


class PreparedCall:
    """The backend's view of one call: real frames only, the scoring rule, acc-dtype tau (also used by
    softvq_kernels.distributed for each shard)."""

    def __init__(self, x, codebook, tau, mask, distance):
        self.acc = accumulation_dtype(x.dtype)
        self.tau = tau.detach().to(self.acc)
        self.rows = None if mask is None else mask.nonzero().squeeze(1)
        self.frames = self.compact(x)
        if distance == "cosine":
            self.scoring = Scoring("cosine", inverse_norms(self.frames), inverse_norms(codebook))
        else:
            self.scoring = Scoring(distance)

    def compact(self, t):
        return t if self.rows is None or t is None else t.index_select(0, self.rows)

    def scatter(self, t_real, total, fill=0):
        """(R, ...) rows of real frames -> (total, ...) with ``fill`` in the masked rows."""
        if self.rows is None:
            return t_real
        return t_real.new_full((total, *t_real.shape[1:]), fill).index_copy_(0, self.rows, t_real)


def fused_forward(x, codebook, tau, mask, distance, backend_name, need_counts, need_sums):
    """x: (T, d), codebook: (V, d), tau: 0-dim, mask: (T,) bool or None.

    Returns y (T, d) in the accumulation dtype (zeros in masked rows; the caller casts it to x's
    dtype, and the backward gets this full-precision y), lse (T,) in the accumulation dtype (0 in
    masked rows), indices (T,) int64 (-1 in masked rows), counts (V,) soft counts in the accumulation
    dtype (zeros unless need_counts), sums (V, d) fp32 soft sums m_v = sum_t p_tv x_t (shape (0, d)
    unless need_sums: the backend's ``codebook_stats``, one scores pass and one product); masked frames
    count nowhere. Autocast is switched off inside: the backend accumulates in fp32 whatever the context.
    """
    T, d = x.shape
    V = codebook.shape[0]
    backend = backends.load_backend(backend_name)
    with torch.autocast(x.device.type, enabled=False):
        prep = PreparedCall(x, codebook, tau, mask, distance)
        y_real, lse_real, idx_real, counts = backend.forward(
            prep.frames, codebook, prep.tau, prep.scoring, need_counts and not need_sums
        )
        if need_sums:
            counts, sums = backend.codebook_stats(prep.frames, codebook, prep.tau, prep.scoring, lse_real,
                                                  prep.frames.to(prep.acc))
        else:
            sums = torch.zeros(0, d, dtype=torch.float32, device=x.device)
        if counts is None:
            counts = torch.zeros(V, dtype=prep.acc, device=x.device)
        y = prep.scatter(y_real.to(prep.acc), T)
        lse = prep.scatter(lse_real.to(prep.acc), T)
        indices = prep.scatter(idx_real, T, fill=-1)
    return y, lse, indices, counts.to(prep.acc), sums.float()


def fused_lse_argmax(x, codebook, tau, mask, distance, backend_name):
    """Hard mode / inference: lse (T,) in the accumulation dtype (0 in masked rows) and the first argmax
    indices (T,) int64 (-1 in masked rows), without the weighted sum: the backend's optional
    ``lse_argmax`` hook (the online pass alone), else its forward with the output dropped."""
    T = x.shape[0]
    backend = backends.load_backend(backend_name)
    with torch.autocast(x.device.type, enabled=False):
        prep = PreparedCall(x, codebook, tau, mask, distance)
        hook = getattr(backend, "lse_argmax", None)
        if hook is not None:
            lse_real, idx_real = hook(prep.frames, codebook, prep.tau, prep.scoring)
        else:
            _, lse_real, idx_real, _ = backend.forward(prep.frames, codebook, prep.tau, prep.scoring, False)
        return prep.scatter(lse_real.to(prep.acc), T), prep.scatter(idx_real, T, fill=-1)


def fused_backward(grad_y, grad_lse, grad_counts, x, codebook, tau, mask, y, lse, distance, backend_name):
    """Gradients of L for x (T, d), codebook (V, d) and tau (0-dim), in their dtypes, where
    dL/dy = grad_y (T, d), dL/dlse = grad_lse (T,) or None, dL/dcounts = grad_counts (V,) or None.

    y and lse are fused_forward's outputs (the backward recomputes p from lse; nothing else is saved).
    """
    backend = backends.load_backend(backend_name)
    if grad_y.dtype != x.dtype and x.dtype in (torch.float16, torch.bfloat16):
        # soft_vq returns y in x's dtype, so grad_y arrives here as the exact upcast of an x-dtype
        # gradient: casting back loses nothing and keeps the backend's g products on tensor cores.
        grad_y = grad_y.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        prep = PreparedCall(x, codebook, tau, mask, distance)
        y_real, lse_real, grad_lse_real = prep.compact(y), prep.compact(lse), prep.compact(grad_lse)
        pieces = backend.backward(
            prep.compact(grad_y), prep.frames, codebook, prep.tau, prep.scoring, y_real, lse_real,
            None if grad_lse_real is None else grad_lse_real.to(prep.acc),
            None if grad_counts is None else grad_counts.to(prep.acc),
        )
        grad_frames, grad_codebook, grad_tau = finish_backward(
            pieces, prep.frames, codebook, prep.tau, prep.scoring, y_real, lse_real, grad_lse_real
        )
        grad_x = prep.scatter(grad_frames.to(x.dtype), x.shape[0])
    return grad_x.contiguous(), grad_codebook.to(codebook.dtype).contiguous(), grad_tau.reshape(()).to(tau.dtype)
