"""The specification: soft VQ in a dozen lines of PyTorch that materialise the (T, V) scores.

Autograd differentiates it (y, lse and code_counts all carry gradient), so it is also the oracle every
other backend is tested against (run in float64). It needs O(T * V) memory: use it for tests and
small problems only. The math, with every gradient, is in docs/math.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Norms are clamped below by this before dividing (cosine distance); shared by every backend.
COSINE_EPS = 1e-8


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low precision accumulates in fp32; fp64 stays fp64 (gradcheck needs it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scores(x: torch.Tensor, codebook: torch.Tensor, temperature: torch.Tensor, distance: str) -> torch.Tensor:
    """x: (T, d), codebook: (V, d) -> (T, V) scores s_tv of docs/math.md."""
    if distance == "l2":
        sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(-1)
        return -sq_dist / temperature
    if distance == "cosine":
        x, codebook = F.normalize(x, dim=-1, eps=COSINE_EPS), F.normalize(codebook, dim=-1, eps=COSINE_EPS)
    return x @ codebook.T / temperature


def soft_vq_reference(x, codebook, temperature, distance="l2", mask=None):
    """x: (T, d), codebook: (V, d), temperature: 0-dim tensor, mask: (T,) bool or None.

    Returns y (T, d) in x's dtype, lse (T,), indices (T,) int64, code_counts (V,) (lse and counts in
    the accumulation dtype). Masked frames get y = 0, lse = 0, index -1, count nowhere, and are never
    read: a NaN in a masked frame reaches no output and no gradient.
    """
    acc = accumulation_dtype(x.dtype)
    frames = x.to(acc) if mask is None else torch.where(mask[:, None], x.to(acc), 0.0)
    s = scores(frames, codebook.to(acc), temperature.to(acc), distance)
    probs = s.softmax(dim=-1)
    lse = s.logsumexp(dim=-1)
    indices = s.argmax(dim=-1)
    if mask is not None:
        probs = torch.where(mask[:, None], probs, 0.0)
        lse = torch.where(mask, lse, 0.0)
        indices = indices.masked_fill(~mask, -1)
    y = probs @ codebook.to(acc)
    return y.to(x.dtype), lse, indices, probs.sum(dim=0)


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever PyTorch does
