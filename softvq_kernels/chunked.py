"""Memory-bounded soft VQ in PyTorch: walk the vocabulary in chunks with an online log-sum-exp.

Forward keeps a running max m_t, normaliser l_t and unnormalised output per frame, so memory is
O(T * chunk) instead of O(T * V). Backward recomputes each chunk's probabilities from the saved
lse and forms every gradient by the formulas of the math note. This is the CPU default and the
baseline every GPU backend is compared with.

For l2 the chunks score a_tv = (2<x_t, c_v> - ||c_v||^2) / tau, which differs from the true score
by ||x_t||^2 / tau (constant per frame), so the softmax is the same and the ||x||^2 term never
needs to cancel against a large cross term.

The chunk size comes from a memory budget for the (T, chunk) temporaries; ``options`` overrides
either for a block of code (tests use it to check chunk-size independence).
"""

from __future__ import annotations

import contextlib
import os

import math

import torch

from softvq_kernels.reference import accumulation_dtype

# Bytes for the live (T, chunk) temporaries; backward holds about four of them at once.
DEFAULT_MEMORY_BUDGET = int(os.environ.get("SOFTVQ_CHUNK_BUDGET_BYTES", 64 * 2**20))
_LIVE_TEMPORARIES = 4
_MIN_CHUNK = 64

_options = {"chunk_size": None, "memory_budget": DEFAULT_MEMORY_BUDGET}


@contextlib.contextmanager
def options(*, chunk_size: int | None = None, memory_budget: int | None = None):
    """Override the vocabulary chunk size, or the memory budget it is derived from, in a block."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    saved = dict(_options)
    _options.update(chunk_size=chunk_size, memory_budget=memory_budget or saved["memory_budget"])
    try:
        yield
    finally:
        _options.update(saved)


def chunk_size_for(num_frames: int, vocab_size: int, acc: torch.dtype) -> int:
    if _options["chunk_size"] is not None:
        return min(_options["chunk_size"], max(vocab_size, 1))
    per_column = max(num_frames, 1) * torch.finfo(acc).bits // 8 * _LIVE_TEMPORARIES
    return max(1, min(vocab_size, max(_MIN_CHUNK, _options["memory_budget"] // per_column)))


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever PyTorch does


class _Scorer:
    """Computes score chunks; for l2 these are a_tv (true score + ||x_t||^2 / tau)."""

    def __init__(self, x, keys, tau, l2):
        self.acc = accumulation_dtype(x.dtype)
        self.keys, self.l2 = keys, l2
        self.x = x.to(self.acc)
        self.x_scaled = self.x * ((2.0 if l2 else 1.0) / tau)
        if l2:
            self.key_sq_norm_scaled = keys.to(self.acc).pow(2).sum(-1) / tau
            self.frame_offset = self.x.pow(2).sum(-1) / tau  # true score = a_tv - frame_offset

    def __call__(self, start, stop):
        k = self.keys[start:stop].to(self.acc)
        if self.l2:
            return k, torch.addmm(-self.key_sq_norm_scaled[start:stop], self.x_scaled, k.T)
        return k, self.x_scaled @ k.T

    def true_lse(self, lse_a):
        return lse_a - self.frame_offset if self.l2 else lse_a

    def log_probs(self, start, stop, lse):
        """(keys chunk, log p chunk) with p recomputed from the true-score lse: exp(s - lse).

        Subtracting the true scores' lse (not a_tv - (lse + offset)) keeps p bitwise 1 at the argmax
        in the one-hot regime, because forward formed lse from the same rounded quantities.
        """
        k, log_p = self(start, stop)
        if self.l2:
            log_p.sub_(self.frame_offset[:, None])
        return k, log_p.sub_(lse[:, None])


def forward(x, keys, values, tau, l2, need_counts):
    """x: (T, d), keys/values: (V, d), tau: 0-dim -> y (T, d) acc dtype, lse (T,), indices (T,), counts (V,)."""
    scorer = _Scorer(x, keys, tau, l2)
    acc, (T, d), V = scorer.acc, x.shape, keys.shape[0]
    step = chunk_size_for(T, V, acc)
    running_max = torch.full((T,), -torch.inf, dtype=acc, device=x.device)
    normaliser = torch.zeros(T, dtype=acc, device=x.device)
    y = torch.zeros(T, d, dtype=acc, device=x.device)
    indices = torch.zeros(T, dtype=torch.int64, device=x.device)
    for start in range(0, V, step):
        stop = min(start + step, V)
        _, s = scorer(start, stop)
        chunk_max, chunk_arg = s.max(dim=1)
        improved = chunk_max > running_max  # strict: ties keep the first index, like argmax
        indices = torch.where(improved, chunk_arg + start, indices)
        new_max = torch.maximum(running_max, chunk_max)
        rescale = torch.exp(running_max - new_max)
        p = s.sub_(new_max[:, None]).exp_()
        normaliser = normaliser * rescale + p.sum(dim=1)
        y = torch.addmm(y * rescale[:, None], p, values[start:stop].to(acc))
        running_max = new_max
    lse = scorer.true_lse(running_max + normaliser.log())
    y = y / normaliser[:, None]
    counts = None
    if need_counts:
        # The exact probabilities need the final lse, hence a second (scores-only) pass.
        counts = torch.empty(V, dtype=acc, device=x.device)
        for start in range(0, V, step):
            stop = min(start + step, V)
            counts[start:stop] = scorer.log_probs(start, stop, lse)[1].exp_().sum(dim=0)
    return y, lse, indices, counts


def codebook_stats(x, keys, tau, l2, lse, rows):
    """Soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, d_rows), p recomputed from lse.

    One scores pass and one product per chunk (4·T·V·d FLOPs); used for EMA codebook updates.
    """
    scorer = _Scorer(x, keys, tau, l2)
    acc, T, V = scorer.acc, x.shape[0], keys.shape[0]
    step = chunk_size_for(T, V, acc)
    rows = rows.to(acc)
    counts = torch.empty(V, dtype=acc, device=x.device)
    sums = torch.empty(V, rows.shape[1], dtype=acc, device=x.device)
    for start in range(0, V, step):
        stop = min(start + step, V)
        p = scorer.log_probs(start, stop, lse)[1].exp_()
        counts[start:stop] = p.sum(dim=0)
        sums[start:stop] = p.T @ rows
    return counts, sums


def backward(grad_y, x, keys, values, tau, l2, y, lse):
    """Gradients of sum(grad_y * y) for x, keys, values (key role folded in when keys is values), tau.

    Three rewrites keep the one-hot regime (huge inputs) exact, where ds_tv is pure rounding noise:
    p is recomputed as exp(s - lse) from the true scores (bitwise 1 at the argmax, since forward's
    lse was formed the same way); d(tau) uses log p in place of s; and dx subtracts y_t sum_v ds_tv.
    All three are exact rewrites because sum_v ds_tv = 0.

    d(tau) is a covariance under p (of dp and the scores), often far smaller than its terms (near-uniform
    p), so it is summed over centred scores u = log p + log V (~0 for near-uniform p; any per-row shift
    is exact because sum_v ds = 0), and the part of ds that does not sum to zero in floating point
    (delta_t = <g_t, y_t> comes from the forward's rounded y, ds from the recomputed p) is taken off:
    sum_v ds u - (sum_v ds)(sum_v p u), which evaluates ds with the delta the recomputed p implies and
    makes any per-row shift (and its rounding) cancel. One-hot rows: both terms are ds* u*, so 0 exactly.
    """
    scorer = _Scorer(x, keys, tau, l2)
    acc, (T, d), V = scorer.acc, x.shape, keys.shape[0]
    step = chunk_size_for(T, V, acc)
    g = grad_y.to(acc)
    y = y.to(acc)
    delta = (g * y).sum(-1)  # <g_t, y_t> = sum_v p_tv dp_tv
    key_factor = (2.0 if l2 else 1.0) / tau
    shared = keys is values
    grad_x = torch.zeros(T, d, dtype=acc, device=x.device)
    ds_row_sums = torch.zeros(T, dtype=acc, device=x.device)
    grad_values = torch.empty(V, d, dtype=acc, device=x.device)
    grad_keys = grad_values if shared else torch.empty(V, d, dtype=acc, device=x.device)
    ds_times_u = torch.zeros((), dtype=acc, device=x.device)
    p_times_u_row_sums = torch.zeros(T, dtype=acc, device=x.device)
    log_vocab = math.log(V)
    for start in range(0, V, step):
        stop = min(start + step, V)
        k, log_p = scorer.log_probs(start, stop, lse)
        p = log_p.exp()
        v = k if shared else values[start:stop].to(acc)
        ds = torch.addmm(-delta[:, None], g, v.T).mul_(p)  # p_tv (dp_tv - delta_t)
        u = log_p.add_(log_vocab)  # log_p is not needed after p
        ds_times_u += torch.dot(ds.view(-1), u.view(-1))
        p_times_u_row_sums += (p * u).sum(dim=1)
        ds_row_sums += ds.sum(dim=1)
        grad_x.addmm_(ds, k)
        key_grad = ds.T @ scorer.x
        if l2:
            key_grad -= k * ds.sum(dim=0)[:, None]
        key_grad *= key_factor
        value_grad = p.T @ g
        if shared:
            grad_values[start:stop] = value_grad + key_grad
        else:
            grad_values[start:stop] = value_grad
            grad_keys[start:stop] = key_grad
    grad_x.sub_(y * ds_row_sums[:, None]).mul_(key_factor)
    grad_tau = -(ds_times_u - torch.dot(ds_row_sums, p_times_u_row_sums)) / tau
    return grad_x, (None if shared else grad_keys), grad_values, grad_tau
