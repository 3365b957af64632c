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

Speed (docs/kernels.md, "chunked"): the time that is not matrix products is elementwise passes over
(T, chunk) tiles, so each pass writes into a tile allocated once per call (a fresh multi-MiB tensor
per chunk costs its page faults every time), the products write their results in place (``out=``),
the codebook gradient's two products are one product over 2T rows, and on CPU the two searches that
only a few rows need (the first argmax of rows whose maximum improved, the one-hot rows of the
backward) touch those rows only.
"""

from __future__ import annotations

import math

import torch

from softvq_kernels import planning
from softvq_kernels.backends import BackwardPieces, Scoring, centre_vocab, score_centre
from softvq_kernels.reference import accumulation_dtype


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever PyTorch does


_LOG2_E = 1.4426950408889634


def _exp_(z):
    """exp(z) in place. On CPU as exp2(z log2 e), with every argument whose result would be subnormal
    sent to -inf (result 0): torch.exp there (MKL VML) and subnormal results both take a slow path,
    10-15x slower per element than exp2 in range, and log-probabilities below -87 are the bulk of a
    large vocabulary. exp2(0) is 1 exactly, so a one-hot row's p stays exactly 1 at its argmax."""
    if z.device.type != "cpu":
        return z.exp_()
    smallest_normal_exponent = math.log2(torch.finfo(z.dtype).tiny)
    return torch.nn.functional.threshold_(z.mul_(_LOG2_E), smallest_normal_exponent, -torch.inf).exp2_()


def _tile(buffer, rows, cols):
    """A contiguous (rows, cols) view of the front of a flat workspace buffer."""
    return buffer[: rows * cols].view(rows, cols)


class _Scorer:
    """Score chunks; for l2 these are a_tv (true score + ||x_t||^2 / tau), true scores otherwise.

    Every pass forms a chunk's scores with the same call on the same operands, so they are bitwise the
    scores the forward formed lse from (docs/math.md, Exactness 1)."""

    def __init__(self, x, codebook, tau, scoring: Scoring):
        self.acc = accumulation_dtype(x.dtype)
        self.codebook, self.distance = codebook, scoring.distance
        self.x = x.to(self.acc)
        self.col_scale = None
        if scoring.distance == "l2":
            self.x_scaled = self.x * (2.0 / tau)
            self.neg_key_sq_norm_scaled = -(codebook.to(self.acc).pow(2).sum(-1) / tau)
            self.frame_offset = self.x.pow(2).sum(-1) / tau  # true score = a_tv - frame_offset
        elif scoring.distance == "cosine":
            self.x_scaled = self.x * (scoring.x_inv_norm.to(self.acc) / tau)[:, None]
            self.col_scale = scoring.codebook_inv_norm.to(self.acc)
        else:
            self.x_scaled = self.x / tau

    def workspace(self, count=1):
        """A flat buffer for ``count`` (T, chunk) tiles of this call's widest chunk."""
        T, V = self.x.shape[0], self.codebook.shape[0]
        return torch.empty(count * T * _chunk_width(T, V, self.acc), dtype=self.acc, device=self.x.device)

    def __call__(self, start, stop, out):
        """(codebook chunk in the acc dtype, score chunk written into ``out`` (T, stop - start))."""
        c = self.codebook[start:stop].to(self.acc)
        if self.distance == "l2":
            return c, torch.addmm(self.neg_key_sq_norm_scaled[start:stop], self.x_scaled, c.T, out=out)
        s = torch.mm(self.x_scaled, c.T, out=out)
        if self.col_scale is not None:
            s.mul_(self.col_scale[start:stop])
        return c, s

    def true_lse(self, lse_a):
        return lse_a - self.frame_offset if self.distance == "l2" else lse_a

    def true_scores(self, start, stop, out):
        """(codebook chunk, true scores s_tv of the chunk in ``out``), formed as in every other pass."""
        c, s = self(start, stop, out)
        if self.distance == "l2":
            s.sub_(self.frame_offset[:, None])
        return c, s

    def probs(self, start, stop, lse, out):
        """(codebook chunk, p = exp(s - lse) in ``out``) with the true-score lse.

        Subtracting the true scores' lse (not a_tv - (lse + offset)) keeps p bitwise 1 at the argmax
        in the one-hot regime, because forward formed lse from the same rounded quantities.
        """
        c, s = self.true_scores(start, stop, out)
        return c, _exp_(s.sub_(lse[:, None]))


def _chunk_width(T, V, acc):
    return planning.vocab_chunk(T, V, torch.finfo(acc).bits // 8, planning.CHUNKED_LIVE_TEMPORARIES)


def _chunks(T, V, acc):
    step = _chunk_width(T, V, acc)
    return [(start, min(start + step, V)) for start in range(0, V, step)]


def _update_first_argmax(indices, improved, s, start):
    """indices_t := start + the first argmax of s_t in the rows where ``improved`` (the chunk's maximum
    beats every earlier chunk's strictly, so ties keep the earliest index). On CPU only those rows are
    searched: after the first few chunks they are few, and a full argmax costs as much as an exp pass."""
    if s.device.type != "cpu":
        return torch.where(improved, s.argmax(dim=1) + start, indices)
    rows = improved.nonzero().squeeze(1)
    if rows.numel() == s.shape[0]:
        return s.argmax(dim=1).add_(start)
    if rows.numel():
        indices.index_copy_(0, rows, s.index_select(0, rows).argmax(dim=1).add_(start))
    return indices


def _online_pass(scorer, need_output):
    """The forward's single pass: running max, normaliser, first argmax and (need_output) the
    unnormalised weighted sum. Returns (lse of the true scores, indices, y or None)."""
    acc, (T, d), V = scorer.acc, scorer.x.shape, scorer.codebook.shape[0]
    dev = scorer.x.device
    running_max = torch.full((T,), -torch.inf, dtype=acc, device=dev)
    normaliser = torch.zeros(T, dtype=acc, device=dev)
    y = torch.zeros(T, d, dtype=acc, device=dev) if need_output else None
    indices = torch.zeros(T, dtype=torch.int64, device=dev)
    scores = scorer.workspace()
    for start, stop in _chunks(T, V, acc):
        c, s = scorer(start, stop, _tile(scores, T, stop - start))
        chunk_max = s.amax(dim=1)
        indices = _update_first_argmax(indices, chunk_max > running_max, s, start)
        new_max = torch.maximum(running_max, chunk_max)
        rescale = torch.exp(running_max - new_max)
        p = _exp_(s.sub_(new_max[:, None]))
        normaliser.mul_(rescale).add_(p.sum(dim=1))
        if y is not None:
            y.mul_(rescale[:, None]).addmm_(p, c)
        running_max = new_max
    lse = scorer.true_lse(running_max + normaliser.log())
    if y is not None:
        y.div_(normaliser[:, None])
    return lse, indices, y


def forward(x, codebook, tau, scoring, need_counts):
    """x: (T, d), codebook: (V, d), tau: 0-dim -> y (T, d) acc dtype, lse (T,), indices (T,), counts (V,)."""
    scorer = _Scorer(x, codebook, tau, scoring)
    lse, indices, y = _online_pass(scorer, need_output=True)
    counts = None
    if need_counts:
        # The exact probabilities need the final lse, hence a second (scores-only) pass.
        T, V = x.shape[0], codebook.shape[0]
        counts = torch.empty(V, dtype=scorer.acc, device=x.device)
        probs = scorer.workspace()
        for start, stop in _chunks(T, V, scorer.acc):
            torch.sum(scorer.probs(start, stop, lse, _tile(probs, T, stop - start))[1], dim=0, out=counts[start:stop])
    return y, lse, indices, counts


def lse_argmax(x, codebook, tau, scoring):
    """Hard mode: lse (T,) and first argmax (T,) without the weighted sum: the forward's online pass
    alone (2·T·V·d FLOPs instead of 4)."""
    lse, indices, _ = _online_pass(_Scorer(x, codebook, tau, scoring), need_output=False)
    return lse, indices


def codebook_stats(x, codebook, tau, scoring, lse, rows):
    """Soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, d_rows), p recomputed from lse.

    One scores pass and one product per chunk (4·T·V·d FLOPs); used for EMA codebook updates.
    """
    scorer = _Scorer(x, codebook, tau, scoring)
    acc, T, V = scorer.acc, x.shape[0], codebook.shape[0]
    rows = rows.to(acc)
    counts = torch.empty(V, dtype=acc, device=x.device)
    sums = torch.empty(V, rows.shape[1], dtype=acc, device=x.device)
    probs = scorer.workspace()
    for start, stop in _chunks(T, V, acc):
        p = scorer.probs(start, stop, lse, _tile(probs, T, stop - start))[1]
        torch.sum(p, dim=0, out=counts[start:stop])
        torch.mm(p.T, rows, out=sums[start:stop])
    return counts, sums


def expected_counts_gradient(x, codebook, tau, scoring, lse, grad_counts):
    """c_t = sum_v p_tv grad_counts_v (T,): the one extra scores pass a counts gradient costs (2·T·V·d)."""
    scorer = _Scorer(x, codebook, tau, scoring)
    T, V = x.shape[0], codebook.shape[0]
    out = torch.zeros(T, dtype=scorer.acc, device=x.device)
    probs = scorer.workspace()
    for start, stop in _chunks(T, V, scorer.acc):
        p = scorer.probs(start, stop, lse, _tile(probs, T, stop - start))[1]
        out.addmv_(p, grad_counts[start:stop].to(scorer.acc))
    return out


def _one_hot_entries_take_grad_lse(ds, p, gamma):
    """ds_tv := gl_t where p_tv == 1 exactly (docs/math.md, Exactness 2). On CPU only the rows whose
    largest p reaches 1 are compared (usually none: one max scan instead of a compare and a select
    over the whole tile); elsewhere one select without a host synchronisation."""
    if p.device.type != "cpu":
        torch.where(p == 1.0, gamma[:, None], ds, out=ds)
        return
    rows = (p.amax(dim=1) >= 1.0).nonzero().squeeze(1)
    if rows.numel():
        one_hot = torch.where(p.index_select(0, rows) == 1.0, gamma.index_select(0, rows)[:, None], ds.index_select(0, rows))
        ds.index_copy_(0, rows, one_hot)


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
    neg_delta = (-delta)[:, None]
    distance = scoring.distance
    key_scale = (2.0 if distance == "l2" else 1.0) / tau  # kappa_v = key_scale (times q_v for cosine)
    x_rows = scorer.x if distance != "cosine" else scorer.x * scoring.x_inv_norm.to(acc)[:, None]
    # grad_codebook_v = sum_t p_tv g_t + kappa_v sum_t ds_tv x_t = [p; ds q]^T [g; key_scale x]: one
    # product over 2T rows, with p and ds written into the two halves of one (2T, chunk) tile.
    values_and_keys = torch.cat([g, x_rows * key_scale])
    col_scale = scoring.codebook_inv_norm.to(acc) if distance == "cosine" else None
    grad_x_raw = torch.zeros(T, d, dtype=acc, device=dev)  # sum_v ds_tv q_v c_v; key_scale at the end
    grad_codebook = torch.empty(V, d, dtype=acc, device=dev)
    ds_rows = torch.zeros(T, dtype=acc, device=dev)
    ds_u_rows = torch.zeros(T, dtype=acc, device=dev)
    p_u_rows = torch.zeros(T, dtype=acc, device=dev)
    ds_cols = torch.empty(V, dtype=acc, device=dev) if distance == "l2" else None
    ds_s_cols = torch.empty(V, dtype=acc, device=dev) if distance == "cosine" else None
    centre = score_centre(lse, centre_vocab(scoring, V))[:, None]
    lse_col = lse[:, None]
    scores, p_and_ds_tiles, products = scorer.workspace(), scorer.workspace(2), scorer.workspace()
    for start, stop in _chunks(T, V, acc):
        w = stop - start
        c, s = scorer.true_scores(start, stop, _tile(scores, T, w))
        p_and_ds = _tile(p_and_ds_tiles, 2 * T, w)
        p, ds = p_and_ds[:T], p_and_ds[T:]
        _exp_(torch.sub(s, lse_col, out=p))  # bitwise Scorer.probs
        torch.addmm(neg_delta, g, c.T, out=ds)  # dp - delta'
        if gn is not None:
            ds.add_(gn[start:stop])
        ds.mul_(p)
        _one_hot_entries_take_grad_lse(ds, p, gamma)
        product = _tile(products, T, w)
        if distance == "cosine":
            torch.sum(torch.mul(ds, s, out=product), dim=0, out=ds_s_cols[start:stop])
        u = s.sub_(centre)  # s is not needed after this
        ds_u_rows += torch.mul(ds, u, out=product).sum(dim=1)
        p_u_rows += torch.mul(p, u, out=product).sum(dim=1)
        ds_rows += ds.sum(dim=1)
        if distance == "l2":
            torch.sum(ds, dim=0, out=ds_cols[start:stop])
        if col_scale is not None:
            ds.mul_(col_scale[start:stop])
        grad_x_raw.addmm_(ds, c)
        torch.mm(p_and_ds.T, values_and_keys, out=grad_codebook[start:stop])
    grad_x_raw.mul_(key_scale)
    return BackwardPieces(grad_x_raw, grad_codebook, ds_rows, ds_u_rows, p_u_rows, ds_cols, ds_s_cols)
