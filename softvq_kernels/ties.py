"""Ties between identical codebook rows go to the lowest index, on every backend.

Embedding tables hold identical rows (untrained or reserved tokens). Their scores are equal in exact
arithmetic, but a blocked GEMM rounds identical columns differently by position, so each backend's argmax
would pick a different one of them. ``first_identical_rows`` maps every chosen index to the lowest index
of a row equal to it (value equality, so -0.0 == 0.0), which makes ``indices``, hard-mode codes and EMA
counts the same on every backend. Other exact ties (equidistant distinct codes, parallel rows under
cosine) stay decided by rounding.

Cost: one pass over the codebook (an exact integer hash per row, O(V d), remembered while the codebook is
unchanged), a few sorts of V keys and an O(T d) check; no (T, V) or (V, V) tensor. A key collision
between distinct rows (probability about 2^-48 per pair) can only leave an index where the backend put
it, never map it to a different row: every mapping is checked against the rows themselves.
"""

from __future__ import annotations

import torch

# A row's key is the dot of its bits, read as int32 (int16 for 16-bit dtypes, or for very wide rows), with
# random integer weights, computed in fp64: with |bits| < 2^31, weights < 2^w and P pieces per row, every
# partial sum stays below 2^52 when 31 + w + log2(P) <= 52, so the dot is exact whatever the GEMM's
# summation order and identical rows get identical keys on any device. Enough keys are taken that two
# distinct rows share all of them with probability below about 2^-48.
_EXACT_BITS = 52
_TOTAL_WEIGHT_BITS = 48
_CHUNK_ELEMENTS = 1 << 21
_GPU_CHUNK_ELEMENTS = 1 << 24
_PRIME = 2147483629  # the largest prime below 2^31
_cache: dict = {}


def _layout(rows: torch.Tensor) -> tuple[torch.dtype, int, int, int]:
    """(integer view dtype, pieces per row, weight bits, number of keys) for exact fp64 keys."""
    for view, value_bits in ((torch.int32, 31), (torch.int16, 15)):
        if rows.element_size() < view.itemsize:
            continue
        pieces = rows.shape[1] * rows.element_size() // view.itemsize
        weight_bits = _EXACT_BITS - value_bits - max(pieces - 1, 1).bit_length()
        if weight_bits >= 6:
            return view, pieces, weight_bits, max(2, -(-_TOTAL_WEIGHT_BITS // weight_bits))
    raise ValueError(f"codebook rows of {rows.shape[1]} {rows.dtype} values are too wide to hash exactly")


def row_keys(codebook: torch.Tensor) -> torch.Tensor:
    """(V, d) floating -> (V, K) int64 keys, equal for rows with equal values (-0.0 == 0.0)."""
    rows = codebook.detach()
    view, pieces, weight_bits, n_keys = _layout(rows)
    g = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(1, 1 << weight_bits, (pieces, n_keys), generator=g, dtype=torch.int64)
    weights = weights.to(rows.device, torch.float64)
    V = rows.shape[0]
    keys = torch.empty(V, n_keys, dtype=torch.float64, device=rows.device)
    # fp64 pieces per block: cache-sized on the CPU, large on a GPU (few launches for a 128k x 4096 table)
    budget = _CHUNK_ELEMENTS if rows.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    step = max(1, budget // pieces)
    for start in range(0, V, step):
        block = (rows[start : start + step] + 0.0).contiguous()  # + 0.0 turns -0.0 into +0.0
        keys[start : start + step] = block.view(view).to(torch.float64) @ weights
    # Two keys per int64 sort key (each reduced modulo a prime below 2^31): half the sorts.
    keys = keys.to(torch.int64).remainder_(_PRIME)
    if n_keys % 2:
        keys = torch.cat([keys, torch.zeros_like(keys[:, :1])], dim=1)
    return keys[:, 0::2] * _PRIME + keys[:, 1::2]


def first_of_equal_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys (V, K) int64 -> (V,) int64: for each row the lowest index with the same keys."""
    V = keys.shape[0]
    order = torch.arange(V, device=keys.device)
    for column in reversed(range(keys.shape[1])):  # stable sorts, last key first: a lexicographic order
        order = order[torch.sort(keys[order, column], stable=True).indices]
    ordered = keys[order]
    starts = torch.ones(V, dtype=torch.bool, device=keys.device)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    positions = torch.arange(V, device=keys.device)
    group_start = torch.where(starts, positions, 0).cummax(dim=0).values
    return torch.empty_like(order).scatter_(0, order, order[group_start])


def _first_identical_map(codebook: torch.Tensor) -> torch.Tensor:
    """first_of_equal_keys(row_keys(codebook)), remembered for the last codebook seen on each device while
    its storage, layout and version counter (bumped by every in-place update) are unchanged: a frozen
    table (inference, a frozen LLM's embeddings) is hashed once."""
    tag = (codebook.data_ptr(), codebook._version, tuple(codebook.shape), codebook.stride(), codebook.dtype)
    hit = _cache.get(codebook.device)
    if hit is not None and hit[0] == tag:
        return hit[1]
    first = first_of_equal_keys(row_keys(codebook))
    _cache[codebook.device] = (tag, first)
    return first


@torch.library.custom_op("softvq::first_identical_rows", mutates_args=())
def first_identical_rows(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """indices (...,) int64 into codebook (V, d), -1 allowed (left as is) -> the lowest index of a row
    equal to codebook[indices] (itself when it has no duplicate). A custom op: one opaque node for
    torch.compile, which runs it eagerly with the hash cache."""
    V = codebook.shape[0]
    if V <= 1 or indices.numel() == 0:
        return indices.clone()
    first = _first_identical_map(codebook)
    valid = indices >= 0
    chosen = indices.clamp(0, V - 1)
    candidate = first[chosen]
    rows = codebook.detach()
    same = (rows[candidate] == rows[chosen]).all(dim=-1)  # exact check: a key collision never maps a row away
    return torch.where(valid & same, candidate, indices)


@first_identical_rows.register_fake
def _first_identical_rows_fake(codebook, indices):
    return torch.empty_like(indices)
