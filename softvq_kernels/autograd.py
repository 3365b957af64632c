"""Forward and backward shared by every fused backend: cosine normalisation, masking, dtype handling
and the codebook statistics live here once, so a backend only implements l2/dot forward and backward
on real frames. ``softvq_kernels.op`` registers these two functions as the ``softvq::soft_vq`` custom
op and its backward (there is no other autograd path for the fused backends).
"""

from __future__ import annotations

import torch

from softvq_kernels import backends
from softvq_kernels.reference import COSINE_EPS, accumulation_dtype


def _normalise_rows(t: torch.Tensor):
    """t: (N, d) -> (t / max(||t||, eps) in t's dtype, the clamped norms (N, 1) in fp32/fp64).

    The norms accumulate in fp32 and the division rounds once into t's dtype, so 16-bit inputs stay
    16-bit for the backend's tensor-core products and no fp32 copy of a (V, d) codebook is made.
    """
    norms = torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=accumulation_dtype(t.dtype))
    norms = norms.clamp_min(COSINE_EPS)
    return torch.div(t, norms, out=torch.empty_like(t)), norms


def _normalise_rows_backward(grad_hat, t_hat, norms):
    """Chain rule through t_hat = t / max(||t||, eps); rows whose norm was clamped are a plain scale."""
    projection = (grad_hat * t_hat).sum(-1, keepdim=True)
    unclamped = norms > COSINE_EPS
    return torch.where(unclamped, grad_hat - t_hat * projection, grad_hat) / norms


class _Prepared:
    """The backend's view of one call: real frames only, keys (normalised for cosine), acc-dtype tau."""

    def __init__(self, x, codebook, tau, mask, distance):
        self.acc = accumulation_dtype(x.dtype)
        self.tau = tau.detach().to(self.acc)
        self.rows = None if mask is None else mask.nonzero().squeeze(1)
        self.frames = x if self.rows is None else x.index_select(0, self.rows)
        self.x_norms = self.key_norms = None
        if distance == "cosine":
            self.frames, self.x_norms = _normalise_rows(self.frames)
            self.keys, self.key_norms = _normalise_rows(codebook)
        else:
            self.keys = codebook
        self.l2 = distance == "l2"

    def compact(self, t):
        return t if self.rows is None else t.index_select(0, self.rows)

    def scatter(self, t_real, total, fill=0):
        """(R, ...) rows of real frames -> (total, ...) with ``fill`` in the masked rows."""
        if self.rows is None:
            return t_real
        return t_real.new_full((total, *t_real.shape[1:]), fill).index_copy_(0, self.rows, t_real)


def _soft_sums(backend, prep: _Prepared, x, codebook, y_real, lse_real):
    """m_v = sum_t p_tv x_t over real frames (raw x, also for cosine), (V, d), without a (T, V) matrix:
    the value-role gradient of the backend's backward with upstream gradient x_t,
    d/dc_v sum_t <x_t, y_t> (value role) = sum_t p_tv x_t. Keys and values are passed as distinct
    tensor objects so the backend keeps the key-role gradient apart (about 10·T·V·d FLOPs; a
    backend's ``codebook_stats`` hook does it in 4·T·V·d, see fused_forward).
    """
    values = codebook.view_as(codebook)  # a distinct object: the backend returns the value role alone
    raw = prep.compact(x).to(prep.acc)
    _, _, grad_values, _ = backend.backward(
        raw, prep.frames, prep.keys, values, prep.tau, prep.l2, y_real, lse_real
    )
    return grad_values


def fused_forward(x, codebook, tau, mask, distance, backend_name, need_counts, need_sums):
    """x: (T, d), codebook: (V, d), tau: 0-dim, mask: (T,) bool or None.

    Returns y (T, d) in the accumulation dtype (zeros in masked rows; the caller casts it to x's
    dtype, and the backward gets this full-precision y as the backends expect), lse (T,) in the
    accumulation dtype (0 in masked rows), indices (T,) int64 (-1 in masked rows), counts (V,) fp32
    soft counts (zeros unless need_counts), sums (V, d) fp32 soft sums m_v = sum_t p_tv x_t (shape
    (0, d) unless need_sums); masked frames count nowhere.
    A backend may export ``codebook_stats(x, keys, tau, l2, lse, rows) -> (counts (V,), sums (V, d))``
    (sum_t p_tv and sum_t p_tv rows_t, p recomputed from lse: one scores pass and one product);
    without it the sums come from the backend's backward (_soft_sums).
    Autocast is switched off inside: the backend accumulates in fp32 whatever the caller's context.
    """
    T, d = x.shape
    V = codebook.shape[0]
    backend = backends.load_backend(backend_name)
    hook = getattr(backend, "codebook_stats", None) if need_sums else None
    with torch.autocast(x.device.type, enabled=False):
        prep = _Prepared(x, codebook, tau, mask, distance)
        y_real, lse_real, idx_real, counts = backend.forward(
            prep.frames, prep.keys, codebook, prep.tau, prep.l2, need_counts and hook is None
        )
        if hook is not None:
            counts, sums = hook(prep.frames, prep.keys, prep.tau, prep.l2, lse_real, prep.compact(x).to(prep.acc))
        elif need_sums:
            sums = _soft_sums(backend, prep, x, codebook, y_real, lse_real)
        else:
            sums = torch.zeros(0, d, dtype=torch.float32, device=x.device)
        if counts is None:
            counts = torch.zeros(V, dtype=torch.float32, device=x.device)
        y = prep.scatter(y_real.to(prep.acc), T)
        lse = prep.scatter(lse_real.to(prep.acc), T)
        indices = prep.scatter(idx_real, T, fill=-1)
    return y, lse, indices, counts.float(), sums.float()


def fused_backward(grad_y, x, codebook, tau, mask, y, lse, distance, backend_name):
    """Gradients of sum(grad_y * y) for x (T, d), codebook (V, d) and tau (0-dim), in their dtypes.

    y and lse are fused_forward's outputs (the backward recomputes p from lse; nothing else is saved).
    """
    backend = backends.load_backend(backend_name)
    if grad_y.dtype != x.dtype and x.dtype in (torch.float16, torch.bfloat16):
        # soft_vq returns y in x's dtype, so grad_y arrives here as the exact upcast of an x-dtype
        # gradient: casting back loses nothing and keeps the backend's g products on tensor cores
        # (an fp32 g would send every product to the fp32 path, ~30x slower on an H200).
        grad_y = grad_y.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        prep = _Prepared(x, codebook, tau, mask, distance)
        grad_frames, grad_keys, grad_values, grad_tau = backend.backward(
            prep.compact(grad_y), prep.frames, prep.keys, codebook, prep.tau, prep.l2,
            prep.compact(y), prep.compact(lse),
        )
        if distance == "cosine":
            grad_frames = _normalise_rows_backward(grad_frames, prep.frames, prep.x_norms)
            grad_keys = _normalise_rows_backward(grad_keys, prep.keys, prep.key_norms)
        grad_codebook = grad_values if grad_keys is None else grad_values + grad_keys
        grad_x = prep.scatter(grad_frames.to(x.dtype), x.shape[0])
    return grad_x, grad_codebook.to(codebook.dtype), grad_tau.reshape(()).to(tau.dtype)
