"""Forward: one online-softmax pass over the vocabulary (scores, running max / sum, argmax, and for
small d the weighted codebook sum), split over programs along V and merged by LSE; for large d the
output is formed from staged exact-probability tiles; code counts from the staging kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from softvq_kernels.triton import configs
from softvq_kernels.triton.common import (
    acc_dtype,
    check_interpreter_dtypes,
    dot_precision,
    matmul_into,
    mma,
    rowdot,
    rows_contiguous,
    addmm_acc,
    mm_acc,
    score_tile,
    stage_chunk,
    tl_acc,
)


@triton.jit
def _online_kernel(x_ptr, k_ptr, v_ptr, knorm_ptr, tau_ptr,
                   m_ptr, l_ptr, idx_ptr, acc_ptr, s_ptr,
                   T, V, D, tiles_per_split, tile0, slot0,
                   stride_x, stride_k, stride_v, stride_acc_s, stride_acc_t, stride_s,
                   L2: tl.constexpr, ACC_Y: tl.constexpr, FROM_GEMM: tl.constexpr,
                   PREC_S: tl.constexpr, PREC_Y: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   D_PAD: tl.constexpr):
    """Program (t-block, split): online max m, sum l (relative to m), first argmax, and with ACC_Y the
    unnormalised sum_v exp(a - m) v over the split's vocabulary tiles; written to the split's slot.
    FROM_GEMM: the tiles tile0 + [0, tiles_per_split) of one vocabulary chunk whose <x, k> products cuBLAS
    wrote to s_ptr (column tile0 * BLOCK_V first), into slot slot0 + split (V: the chunk's end)."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_T,), dtype=ACC)
    idx = tl.zeros((BLOCK_T,), dtype=tl.int32)
    if ACC_Y:
        dcols = tl.arange(0, D_PAD)
        acc = tl.zeros((BLOCK_T, D_PAD), dtype=ACC)
    first = tile0 + split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        a = score_tile(x_ptr, k_ptr, knorm_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
                       L2, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, s_ptr, stride_s, tile0 * BLOCK_V, FROM_GEMM)
        tile_max = tl.max(a, 1)
        tile_arg = tl.argmax(a, 1).to(tl.int32) + tile * BLOCK_V
        idx = tl.where(tile_max > m, tile_arg, idx)  # strict: ties keep the first index
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)  # the first tile of a split always has a real column: m_new finite
        p = tl.exp(a - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if ACC_Y:
            vt = tl.load(v_ptr + cols[:, None] * stride_v + dcols[None, :],
                         mask=col_ok[:, None] & (dcols < D)[None, :], other=0.0)
            acc = mma(p.to(vt.dtype), vt, acc * alpha[:, None], PREC_Y)
        m = m_new
    out = (slot0 + split) * T + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    tl.store(idx_ptr + out, idx.to(tl.int64), mask=row_ok)
    if ACC_Y:
        ptrs = acc_ptr + split * stride_acc_s + rows[:, None] * stride_acc_t + dcols[None, :]
        tl.store(ptrs, acc, mask=row_ok[:, None] & (dcols < D)[None, :])


def _num_splits(cfg, T: int, V: int, device: torch.device) -> tuple[int, int]:
    """(tiles per split, number of splits) so that t-blocks x splits reaches cfg.min_programs."""
    n_tiles = triton.cdiv(V, cfg.block_v)
    target = cfg.min_programs
    if target == 0:
        target = 1 if device.type != "cuda" else 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, min(n_tiles, triton.cdiv(target, triton.cdiv(T, cfg.block_t))))
    per_split = triton.cdiv(n_tiles, want)
    return per_split, triton.cdiv(n_tiles, per_split)


def _chunk_width(cfg, T: int, V: int, elem_bytes: int) -> int:
    cols = max(cfg.block_v, cfg.min_chunk_cols, cfg.workspace_bytes // max(T * elem_bytes, 1))
    cols = cols // cfg.block_v * cfg.block_v
    return min(cols, triton.cdiv(V, cfg.block_v) * cfg.block_v)


def x_offset(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """||x_t||^2 / tau: true l2 score = a_tv - x_offset_t. Computed identically in forward and backward."""
    return rowdot(x) / tau


def forward(x, keys, values, tau, l2, need_counts):
    """Backend contract (softvq_kernels.backends): y (T, d) acc dtype, true lse (T,), argmax (T,), counts."""
    check_interpreter_dtypes(x, keys, values)
    shared = values is keys
    x, keys = rows_contiguous(x), rows_contiguous(keys)
    values = keys if shared else rows_contiguous(values)
    T, d = x.shape
    V = keys.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    cfg = configs.get_config(V, d, x.dtype, device)  # the score operands' dtype (fp32 for cosine)
    counts = torch.zeros(V, dtype=acc, device=device) if need_counts else None
    if T == 0:
        empty = torch.empty(0, dtype=acc, device=device)
        return x.new_zeros(0, d, dtype=acc), empty, torch.empty(0, dtype=torch.int64, device=device), counts
    tau = tau.reshape(1)
    knorm = rowdot(keys) if l2 else None
    d_pad = triton.next_power_of_2(d)
    fused = d_pad <= cfg.fused_max_d
    if not fused and cfg.score_gemm:
        return _forward_score_gemm(cfg, x, keys, values, tau, l2, knorm, counts, acc)
    per_split, n_split = _num_splits(cfg, T, V, device)
    m = torch.empty(n_split, T, dtype=acc, device=device)
    l = torch.empty(n_split, T, dtype=acc, device=device)
    idx = torch.empty(n_split, T, dtype=torch.int64, device=device)
    part = torch.empty(n_split, T, d, dtype=acc, device=device) if fused else m
    grid = (triton.cdiv(T, cfg.block_t), n_split)
    _online_kernel[grid](
        x, keys, values, knorm if l2 else tau, tau, m, l, idx, part, x,
        T, V, d, per_split, 0, 0,
        x.stride(0), keys.stride(0), values.stride(0),
        part.stride(0) if fused else 0, part.stride(1) if fused else 0, 0,
        L2=l2, ACC_Y=fused, FROM_GEMM=False,
        PREC_S=dot_precision(x.dtype, keys.dtype), PREC_Y=dot_precision(values.dtype),
        ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=d_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    w, total, lse, indices, xoff = _merge_splits(m, l, idx, x, tau, l2)
    if fused:
        y = part[0] if n_split == 1 else (part * w[:, :, None]).sum(dim=0)  # elementwise: never TF32
        y = y.div_((total if n_split > 1 else l[0])[:, None])
        if need_counts:
            stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau, lse=lse, xoff=xoff,
                        v_start=0, v_stop=V, l2=l2, counts=counts)
        return y, lse, indices, counts
    # Staged output (large d): exact p tiles of one vocabulary chunk at a time, then y += P @ values.
    y = torch.empty(T, d, dtype=acc, device=device)
    width = _chunk_width(cfg, T, V, values.element_size())
    work = torch.empty(T, width, dtype=values.dtype, device=device)
    for start in range(0, V, width):
        stop = min(start + width, V)
        stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, l2=l2, p_out=work, counts=counts)
        matmul_into(y, work[:, : stop - start], values[start:stop], cfg, tau=tau, accumulate=start > 0)
    return y, lse, indices, counts


def _merge_splits(m, l, idx, x, tau, l2):
    """Merge per-split (m, l, idx) by their LSE (a no-op rescale for one split): (weights, sum, true lse,
    argmax, ||x||^2 / tau or None)."""
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max)
    total = (w * l).sum(dim=0)
    lse_a = m_max + total.log()
    indices = idx.gather(0, m.argmax(dim=0, keepdim=True)).squeeze(0)
    xoff = x_offset(x, tau.reshape(())) if l2 else None
    lse = lse_a - xoff if l2 else lse_a
    return w, total, lse, indices, xoff


def score_chunks(cfg, T: int, V: int):
    """[(start, stop)] of the cuBLAS-scores schedule: chunks whose fp32 (T, width) product fits the
    workspace budget; forward and backward use the same chunks, so every score is the same cuBLAS
    product bit for bit (p = 1 exactly at a one-hot argmax)."""
    width = _chunk_width(cfg, T, V, 4)
    return [(start, min(start + width, V)) for start in range(0, V, width)]


def _forward_score_gemm(cfg, x, keys, values, tau, l2, knorm, counts, acc):
    """Large d on cuBLAS: per vocabulary chunk S = x K_c^T (fp32), the online lse / argmax kernel reads S;
    then per chunk S again, exact p tiles from S (the staging kernel) and y += P V_c. 6 T V d FLOPs, all
    of them cuBLAS GEMMs; Triton only reads S and writes P."""
    T, d = x.shape
    V = keys.shape[0]
    chunks = score_chunks(cfg, T, V)
    splits = [_num_splits(cfg, T, stop - start, x.device) for start, stop in chunks]  # (tiles each, count)
    n_slots = sum(n for _, n in splits)
    m = torch.empty(n_slots, T, dtype=acc, device=x.device)
    l = torch.empty_like(m)
    idx = torch.empty(n_slots, T, dtype=torch.int64, device=x.device)
    slot = 0
    for (start, stop), (per_split, n_split) in zip(chunks, splits):
        s = mm_acc(x, keys[start:stop].T, acc)
        _online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
            x, keys, values, knorm if l2 else tau, tau, m, l, idx, m, s,
            T, stop, d, per_split, start // cfg.block_v, slot,
            x.stride(0), keys.stride(0), values.stride(0), 0, 0, s.stride(0),
            L2=l2, ACC_Y=False, FROM_GEMM=True,
            PREC_S=dot_precision(x.dtype, keys.dtype), PREC_Y=dot_precision(values.dtype),
            ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        slot += n_split
    _, _, lse, indices, xoff = _merge_splits(m, l, idx, x, tau, l2)
    y = torch.zeros(T, d, dtype=acc, device=x.device)
    width = chunks[0][1] - chunks[0][0]
    work = torch.empty(T, width, dtype=values.dtype, device=x.device)
    for start, stop in chunks:
        s = mm_acc(x, keys[start:stop].T, acc)
        stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, l2=l2, p_out=work, counts=counts, s_chunk=s)
        addmm_acc(y, work[:, : stop - start], values[start:stop])
    return y, lse, indices, counts


def codebook_stats(x, keys, tau, l2, lse, rows):
    """The autograd.py hook: counts sum_t p_tv (V,) and sums sum_t p_tv rows_t (V, d), p from the saved lse.

    One staging pass (scores, 2 T V d) and one product P^T rows (2 T V d) per vocabulary chunk; p is staged
    in rows' dtype (fp32: these are statistics, not a hot training path).
    """
    check_interpreter_dtypes(x, keys, rows)
    x, keys, rows, lse = rows_contiguous(x), rows_contiguous(keys), rows_contiguous(rows), lse.contiguous()
    T, d = x.shape
    V, d_rows = keys.shape[0], rows.shape[1]
    acc = acc_dtype(tau.dtype)
    counts = torch.zeros(V, dtype=acc, device=x.device)
    sums = (torch.zeros if T == 0 else torch.empty)(V, d_rows, dtype=acc, device=x.device)
    if T == 0:
        return counts, sums
    cfg = configs.get_config(V, d, x.dtype, x.device)
    tau1 = tau.reshape(1)
    knorm = rowdot(keys) if l2 else None
    xoff = x_offset(x, tau) if l2 else None
    width = _chunk_width(cfg, T, V, rows.element_size())
    work = torch.empty(T, width, dtype=rows.dtype, device=x.device)
    for start in range(0, V, width):
        stop = min(start + width, V)
        stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau1, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, l2=l2, p_out=work, counts=counts)
        matmul_into(sums[start:stop], work[:, : stop - start].T, rows, cfg, tau=tau1)
    return counts, sums
