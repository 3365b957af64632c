"""Memory-bounded soft VQ in PyTorch: walk the vocabulary in chunks with an online log-sum-exp.

Forward keeps a running max m_t, normaliser l_t and unnormalised output per frame, so memory is
O(T * chunk) instead of O(T * V). Backward recomputes each chunk's probabilities from the saved
lse and forms the sums of ``BackwardPieces`` (softvq_kernels.epilogue finishes them). This is the
CPU default and the baseline every GPU backend is compared with. Math: docs/math.md.

For l2 the chunks score a_tv = (2<x_t, c_v> - ||c_v||^2) / tau, which differs from the true score
by ||x_t||^2 / tau (constant per frame), so the softmax is the same and the ||x||^2 term never
needs to cancel against a large cross term. Cosine scores are <x_t, c_v> r_t q_v / tau with the
inverse norms r, q in the accumulation dtype (no normalised copy of either operand).

The chunk width comes from ``softvq_kernels.planning`` (one memory budget for every backend).
"""

from __future__ import annotations


import torch

from softvq_kernels import planning
from softvq_kernels.backends import BackwardPieces, Scoring, score_centre
from softvq_kernels.reference import accumulation_dtype


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever PyTorch does


class _Scorer:
    """Score chunks; for l2 these are a_tv (true score + ||x_t||^2 / tau), true scores otherwise."""

    def __init__(self, x, codebook, tau, scoring: Scoring):
        self.acc = accumulation_dtype(x.dtype)
        self.codebook, self.distance = codebook, scoring.distance
        self.x = x.to(self.acc)
        self.col_scale = None
        if scoring.distance == "l2":
            self.x_scaled = self.x * (2.0 / tau)
            self.key_sq_norm_scaled = codebook.to(self.acc).pow(2).sum(-1) / tau
            self.frame_offset = self.x.pow(2).sum(-1) / tau  # true score = a_tv - frame_offset
        elif scoring.distance == "cosine":
            self.x_scaled = self.x * (scoring.x_inv_norm.to(self.acc) / tau)[:, None]
            self.col_scale = scoring.codebook_inv_norm.to(self.acc)
        else:
            self.x_scaled = self.x / tau

    def __call__(self, start, stop):
        """(codebook chunk in the acc dtype, score chunk (T, stop - start))."""
        c = self.codebook[start:stop].to(self.acc)
        if self.distance == "l2":
            return c, torch.addmm(-self.key_sq_norm_scaled[start:stop], self.x_scaled, c.T)
        s = self.x_scaled @ c.T
        if self.col_scale is not None:
            s.mul_(self.col_scale[start:stop])
        return c, s

    def true_lse(self, lse_a):
        return lse_a - self.frame_offset if self.distance == "l2" else lse_a

    def true_scores(self, start, stop):
        """(codebook chunk, true scores s_tv of the chunk), formed as in every other pass."""
        c, s = self(start, stop)
        if self.distance == "l2":
            s.sub_(self.frame_offset[:, None])
        return c, s

    @staticmethod
    def probs_from_true_scores(s, lse):
        """p = exp(s - lse), bitwise the values ``log_probs`` gives (same two roundings)."""
        return (s - lse[:, None]).exp_()

    def log_probs(self, start, stop, lse):
        """(codebook chunk, log p chunk) with p recomputed from the true-score lse: exp(s - lse).

        Subtracting the true scores' lse (not a_tv - (lse + offset)) keeps p bitwise 1 at the argmax
        in the one-hot regime, because forward formed lse from the same rounded quantities.
        """
        c, log_p = self(start, stop)
        if self.distance == "l2":
            log_p.sub_(self.frame_offset[:, None])
        return c, log_p.sub_(lse[:, None])


def _chunks(T, V, acc):
    step = planning.vocab_chunk(T, V, torch.finfo(acc).bits // 8, planning.CHUNKED_LIVE_TEMPORARIES)
    return [(start, min(start + step, V)) for start in range(0, V, step)]


def forward(x, codebook, tau, scoring, need_counts):
    """x: (T, d), codebook: (V, d), tau: 0-dim -> y (T, d) acc dtype, lse (T,), indices (T,), counts (V,)."""
    scorer = _Scorer(x, codebook, tau, scoring)
    acc, (T, d), V = scorer.acc, x.shape, codebook.shape[0]
    running_max = torch.full((T,), -torch.inf, dtype=acc, device=x.device)
    normaliser = torch.zeros(T, dtype=acc, device=x.device)
    y = torch.zeros(T, d, dtype=acc, device=x.device)
    indices = torch.zeros(T, dtype=torch.int64, device=x.device)
    chunks = _chunks(T, V, acc)
    for start, stop in chunks:
        c, s = scorer(start, stop)
        chunk_max, chunk_arg = s.max(dim=1)
        improved = chunk_max > running_max  # strict: ties keep the first index, like argmax
        indices = torch.where(improved, chunk_arg + start, indices)
        new_max = torch.maximum(running_max, chunk_max)
        rescale = torch.exp(running_max - new_max)
        p = s.sub_(new_max[:, None]).exp_()
        normaliser = normaliser * rescale + p.sum(dim=1)
        y = torch.addmm(y * rescale[:, None], p, c)
        running_max = new_max
    lse = scorer.true_lse(running_max + normaliser.log())
    y = y / normaliser[:, None]
    counts = None
    if need_counts:
        # The exact probabilities need the final lse, hence a second (scores-only) pass.
        counts = torch.empty(V, dtype=acc, device=x.device)
        for start, stop in chunks:
            counts[start:stop] = scorer.log_probs(start, stop, lse)[1].exp_().sum(dim=0)
    return y, lse, indices, counts


def lse_argmax(x, codebook, tau, scoring):
    """Hard mode: lse (T,) and first argmax (T,) without the weighted sum: the forward's online pass
    alone (2·T·V·d FLOPs instead of 4)."""
    scorer = _Scorer(x, codebook, tau, scoring)
    acc, T, V = scorer.acc, x.shape[0], codebook.shape[0]
    running_max = torch.full((T,), -torch.inf, dtype=acc, device=x.device)
    normaliser = torch.zeros(T, dtype=acc, device=x.device)
    indices = torch.zeros(T, dtype=torch.int64, device=x.device)
    for start, stop in _chunks(T, V, acc):
        _, s = scorer(start, stop)
        chunk_max, chunk_arg = s.max(dim=1)
        indices = torch.where(chunk_max > running_max, chunk_arg + start, indices)
        new_max = torch.maximum(running_max, chunk_max)
        normaliser = normaliser * torch.exp(running_max - new_max) + s.sub_(new_max[:, None]).exp_().sum(dim=1)
        running_max = new_max
    return scorer.true_lse(running_max + normaliser.log()), indices


def codebook_stats(x, codebook, tau, scoring, lse, rows):
    """Soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, d_rows), p recomputed from lse.

    One scores pass and one product per chunk (4·T·V·d FLOPs); used for EMA codebook updates.
    """
    scorer = _Scorer(x, codebook, tau, scoring)
    acc, T, V = scorer.acc, x.shape[0], codebook.shape[0]
    rows = rows.to(acc)
    counts = torch.empty(V, dtype=acc, device=x.device)
    sums = torch.empty(V, rows.shape[1], dtype=acc, device=x.device)
    for start, stop in _chunks(T, V, acc):
        p = scorer.log_probs(start, stop, lse)[1].exp_()
        counts[start:stop] = p.sum(dim=0)
        sums[start:stop] = p.T @ rows
    return counts, sums


def expected_counts_gradient(x, codebook, tau, scoring, lse, grad_counts):
    """c_t = sum_v p_tv grad_counts_v (T,): the one extra scores pass a counts gradient costs (2·T·V·d)."""
    scorer = _Scorer(x, codebook, tau, scoring)
    out = torch.zeros(x.shape[0], dtype=scorer.acc, device=x.device)
    for start, stop in _chunks(x.shape[0], codebook.shape[0], scorer.acc):
        out.addmv_(scorer.log_probs(start, stop, lse)[1].exp_(), grad_counts[start:stop].to(scorer.acc))
    return out


def backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts):
    """The sums of ``BackwardPieces`` for L with dL/dy = grad_y, dL/dlse = grad_lse, dL/dcounts = grad_counts.

    ds_tv = p_tv (dp_tv + gn_v - delta'_t), delta'_t = <g_t, y_t> + sum_v p_tv gn_v - gl_t; where p_tv
    is exactly 1 (a one-hot row) ds_tv = gl_t, the value a delta formed from the same dp gives: that keeps
    the one-hot regime (huge inputs, tiny tau) exact where ds would otherwise be pure rounding noise.
    """
    scorer = _Scorer(x, codebook, tau, scoring)
    acc, (T, d), V = scorer.acc, x.shape, codebook.shape[0]
    dev = x.device
    g = grad_y.to(acc)
    gamma = grad_lse.to(acc) if grad_lse is not None else torch.zeros(T, dtype=acc, device=dev)
    delta = (g * y.to(acc)).sum(-1) - gamma  # sum_v p dp - gl
    gn = None
    if grad_counts is not None:
        gn = grad_counts.to(acc)
        delta += expected_counts_gradient(x, codebook, tau, scoring, lse, gn)
    distance = scoring.distance
    key_scale = (2.0 if distance == "l2" else 1.0) / tau  # kappa_v = key_scale (times q_v for cosine)
    x_rows = scorer.x if distance != "cosine" else scorer.x * scoring.x_inv_norm.to(acc)[:, None]
    grad_x_raw = torch.zeros(T, d, dtype=acc, device=dev)
    grad_codebook = torch.empty(V, d, dtype=acc, device=dev)
    ds_rows = torch.zeros(T, dtype=acc, device=dev)
    ds_u_rows = torch.zeros(T, dtype=acc, device=dev)
    p_u_rows = torch.zeros(T, dtype=acc, device=dev)
    ds_cols = torch.empty(V, dtype=acc, device=dev) if distance == "l2" else None
    ds_s_cols = torch.empty(V, dtype=acc, device=dev) if distance == "cosine" else None
    centre = score_centre(lse, V)
    for start, stop in _chunks(T, V, acc):
        c, s = scorer.true_scores(start, stop)
        p = scorer.probs_from_true_scores(s, lse)
        dp = torch.addmm(-delta[:, None], g, c.T)
        if gn is not None:
            dp += gn[start:stop]
        ds = torch.where(p == 1.0, gamma[:, None], dp.mul_(p))
        if distance == "cosine":
            ds_s_cols[start:stop] = (ds * s).sum(dim=0)
        u = s.sub_(centre[:, None])  # s is not needed after this
        ds_u_rows += (ds * u).sum(dim=1)
        p_u_rows += (p * u).sum(dim=1)
        ds_rows += ds.sum(dim=1)
        if distance == "l2":
            ds_cols[start:stop] = ds.sum(dim=0)
        if distance == "cosine":
            ds_k = ds.mul_(scoring.codebook_inv_norm[start:stop].to(acc) * key_scale)
        else:
            ds_k = ds.mul_(key_scale)
        grad_x_raw.addmm_(ds_k, c)
        grad_codebook[start:stop] = torch.addmm(p.T @ g, ds_k.T, x_rows)
    return BackwardPieces(grad_x_raw, grad_codebook, ds_rows, ds_u_rows, p_u_rows, ds_cols, ds_s_cols)
