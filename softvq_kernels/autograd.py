"""One autograd.Function for every fused backend: cosine normalisation, masking and dtype handling
live here once, so a backend only implements l2/dot forward and backward on real frames."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from softvq_kernels.reference import COSINE_EPS


def _normalise_rows(t: torch.Tensor):
    """t: (N, d) -> (t / max(||t||, eps), the clamped norms (N, 1))."""
    norms = t.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return t / norms, norms


def _normalise_rows_backward(grad_hat, t_hat, norms):
    """Chain rule through t_hat = t / max(||t||, eps); rows whose norm was clamped are a plain scale."""
    projection = (grad_hat * t_hat).sum(-1, keepdim=True)
    unclamped = norms > COSINE_EPS
    return torch.where(unclamped, grad_hat - t_hat * projection, grad_hat) / norms


class SoftVQFunction(torch.autograd.Function):
    """x: (T, d), codebook: (V, d), tau: 0-dim, mask: (T,) bool or None -> y, lse, indices, counts."""

    @staticmethod
    def forward(ctx, x, codebook, tau, distance, mask, backend, need_counts):
        T, d = x.shape
        acc_tau = tau.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        rows = None if mask is None else mask.nonzero().squeeze(1)
        frames = x if rows is None else x.index_select(0, rows)
        x_norms = key_norms = None
        if distance == "cosine":
            frames, x_norms = _normalise_rows(frames.to(acc_tau.dtype))
            keys, key_norms = _normalise_rows(codebook.to(acc_tau.dtype))
        else:
            keys = codebook
        y_real, lse_real, idx_real, counts = backend.forward(
            frames, keys, codebook, acc_tau, distance == "l2", need_counts
        )
        if counts is None:
            counts = torch.zeros(codebook.shape[0], dtype=torch.float32, device=x.device)
        if rows is None:
            y, lse, indices = y_real, lse_real, idx_real
        else:
            y = y_real.new_zeros(T, d).index_copy_(0, rows, y_real)
            lse = lse_real.new_zeros(T).index_copy_(0, rows, lse_real)
            indices = idx_real.new_full((T,), -1).index_copy_(0, rows, idx_real)
        ctx.save_for_backward(frames, keys, codebook, acc_tau, rows, x_norms, key_norms, y_real, lse_real)
        ctx.distance, ctx.backend, ctx.x_shape = distance, backend, x.shape
        ctx.input_dtypes = (x.dtype, codebook.dtype, tau.dtype)
        ctx.mark_non_differentiable(lse, indices, counts)
        return y.to(x.dtype), lse.float(), indices, counts.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_lse, _grad_indices, _grad_counts):
        frames, keys, codebook, tau, rows, x_norms, key_norms, y_real, lse_real = ctx.saved_tensors
        x_dtype, codebook_dtype, tau_dtype = ctx.input_dtypes
        if rows is not None:
            grad_y = grad_y.index_select(0, rows)
        grad_frames, grad_keys, grad_values, grad_tau = ctx.backend.backward(
            grad_y, frames, keys, codebook, tau, ctx.distance == "l2", y_real, lse_real
        )
        if ctx.distance == "cosine":
            grad_frames = _normalise_rows_backward(grad_frames, frames, x_norms)
            grad_keys = _normalise_rows_backward(grad_keys, keys, key_norms)
        grad_codebook = grad_values if grad_keys is None else grad_values + grad_keys
        if rows is not None:
            grad_frames = grad_frames.new_zeros(ctx.x_shape).index_copy_(0, rows, grad_frames)
        return (
            grad_frames.to(x_dtype),
            grad_codebook.to(codebook_dtype),
            grad_tau.to(tau_dtype),
            None,
            None,
            None,
            None,
        )
