"""The O(T d + V d) end of every fused backward: ``BackwardPieces`` -> (dx, dc, dtau).

Written once for all backends (the kernels only produce the O(T V d) sums). Formulas and why each
correction term is there: docs/math.md, "Backward" and "Exactness". Shapes: x (T, d) real frames,
codebook (V, d), y (T, d) the forward's output, lse (T,), grad_lse (T,) or None.
"""

from __future__ import annotations

import torch

from softvq_kernels.backends import BackwardPieces, Scoring, score_centre
from softvq_kernels.reference import COSINE_EPS


def finish_backward(pieces: BackwardPieces, x, codebook, tau, scoring: Scoring, y, lse, grad_lse):
    """-> grad_x (T, d), grad_codebook (V, d), grad_tau (0-dim), all in tau's (accumulation) dtype."""
    acc = tau.dtype
    T, V = x.shape[0], codebook.shape[0]
    distance = scoring.distance
    gamma = grad_lse.to(acc) if grad_lse is not None else torch.zeros(T, dtype=acc, device=x.device)
    # sum_v ds_tv is gamma_t exactly; what the pass summed differs by the rounding of delta (formed from
    # the forward's rounded y). ds as computed is ds + p * residual, so each row sum below takes
    # residual * (sum_v p ...) back off: exact for any per-row error, and 0 in one-hot rows.
    residual = pieces.ds_rows - gamma
    ds_s_rows = pieces.ds_u_rows - residual * pieces.p_u_rows + gamma * score_centre(lse.to(acc), V)  # sum_v ds s
    grad_tau = -ds_s_rows.sum() / tau
    x_acc, y_acc = x.to(acc), y.to(acc)
    grad_codebook = pieces.grad_codebook.to(acc)
    if distance == "cosine":
        r, q = scoring.x_inv_norm.to(acc), scoring.codebook_inv_norm.to(acc)
        # s = <x, c> r q / tau: d r_t / d x_t = -r_t^3 x_t where the norm was not clamped (else 0).
        live_r = torch.where(r < 1 / COSINE_EPS, r * r, 0.0)
        live_q = torch.where(q < 1 / COSINE_EPS, q * q, 0.0)
        grad_x = r[:, None] * pieces.grad_x_raw - (live_r * ds_s_rows)[:, None] * x_acc
        grad_codebook = grad_codebook - (live_q * pieces.ds_s_cols)[:, None] * codebook.to(acc)
        return grad_x, grad_codebook, grad_tau
    k = (2.0 if distance == "l2" else 1.0) / tau
    correction = residual[:, None] * y_acc
    if distance == "l2":  # d s_tv / d x_t = (2 / tau)(c_v - x_t): the x_t part sums to gamma_t x_t
        correction = correction + gamma[:, None] * x_acc
        grad_codebook = grad_codebook - (k * pieces.ds_cols)[:, None] * codebook.to(acc)
    return pieces.grad_x_raw - k * correction, grad_codebook, grad_tau
