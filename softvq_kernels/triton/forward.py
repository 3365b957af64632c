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
    addmm_acc,
    check_interpreter_dtypes,
    dot_precision,
    matmul_into,
    mm_acc,
    mma,
    rows_contiguous,
    score_operands,
    score_tile,
    stage_chunk,
    tl_acc,
)


@triton.jit
def _online_kernel(x_ptr, c_ptr, colv_ptr, rowv_ptr, tau_ptr,
                   m_ptr, l_ptr, idx_ptr, acc_ptr, s_ptr,
                   T, V, D, tiles_per_split, tile0, slot0,
                   stride_x, stride_c, stride_acc_s, stride_acc_t, stride_s,
                   DIST: tl.constexpr, ACC_Y: tl.constexpr, FROM_GEMM: tl.constexpr,
                   PREC_S: tl.constexpr, PREC_Y: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   D_PAD: tl.constexpr):
    """Program (t-block, split): online max m, sum l (relative to m), first argmax, and with ACC_Y the
    unnormalised sum_v exp(a - m) c_v over the split's vocabulary tiles; written to the split's slot.
    FROM_GEMM: the tiles tile0 + [0, tiles_per_split) of one vocabulary chunk whose <x, c> products cuBLAS
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
        a = score_tile(x_ptr, c_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c,
                       DIST, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, s_ptr, stride_s, tile0 * BLOCK_V, FROM_GEMM)
        tile_max = tl.max(a, 1)
        # first argmax within the tile: the smallest column whose score equals the tile max
        tile_arg = tl.min(tl.where(a == tile_max[:, None], cols[None, :], 2147483647), 1).to(tl.int32)
        idx = tl.where(tile_max > m, tile_arg, idx)  # strict: ties keep the earlier tile's index
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)  # the first tile of a split always has a real column: m_new finite
        p = tl.exp(a - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if ACC_Y:
            vt = tl.load(c_ptr + cols[:, None] * stride_c + dcols[None, :],
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


def forward(x, codebook, tau, scoring, need_counts):
    """Backend contract (softvq_kernels.backends): y (T, d) acc dtype, true lse (T,), argmax (T,), counts."""
    check_interpreter_dtypes(x, codebook)
    x, codebook = rows_contiguous(x), rows_contiguous(codebook)
    T, d = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    cfg = configs.get_config(V, d, x.dtype, device)
    counts = torch.zeros(V, dtype=acc, device=device) if need_counts else None
    if T == 0:
        empty = torch.empty(0, dtype=acc, device=device)
        return x.new_zeros(0, d, dtype=acc), empty, torch.empty(0, dtype=torch.int64, device=device), counts
    tau = tau.reshape(1)
    operands, xoff = score_operands(x, codebook, tau.reshape(()), scoring)
    d_pad = triton.next_power_of_2(d)
    fused = d_pad <= cfg.fused_max_d
    if not fused and cfg.score_gemm:
        return _forward_score_gemm(cfg, x, codebook, tau, operands, xoff, counts, acc)
    per_split, n_split = configs.vocab_splits(cfg, T, V, device)
    m = torch.empty(n_split, T, dtype=acc, device=device)
    l = torch.empty(n_split, T, dtype=acc, device=device)
    idx = torch.empty(n_split, T, dtype=torch.int64, device=device)
    part = torch.empty(n_split, T, d, dtype=acc, device=device) if fused else m
    dist, colv, rowv = operands
    _online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
        x, codebook, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, l, idx, part, x,
        T, V, d, per_split, 0, 0,
        x.stride(0), codebook.stride(0),
        part.stride(0) if fused else 0, part.stride(1) if fused else 0, 0,
        DIST=dist, ACC_Y=fused, FROM_GEMM=False,
        PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
        ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=d_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    w, total, lse, indices = _merge_splits(m, l, idx, xoff)
    if fused:
        y = part[0] if n_split == 1 else (part * w[:, :, None]).sum(dim=0)  # elementwise: never TF32
        y = y.div_((total if n_split > 1 else l[0])[:, None])
        if need_counts:
            stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                        v_start=0, v_stop=V, counts=counts)
        return y, lse, indices, counts
    # Staged output (large d): exact p tiles of one vocabulary chunk at a time, then y += P @ codebook.
    y = torch.empty(T, d, dtype=acc, device=device)
    width = configs.chunk_width(cfg, T, V, codebook.element_size())
    work = torch.empty(T, width, dtype=codebook.dtype, device=device)
    for start in range(0, V, width):
        stop = min(start + width, V)
        stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, p_out=work, counts=counts)
        matmul_into(y, work[:, : stop - start], codebook[start:stop], cfg, accumulate=start > 0)
    return y, lse, indices, counts


def _merge_splits(m, l, idx, xoff):
    """Merge per-split (m, l, idx) by their LSE (a no-op rescale for one split): (weights, sum, true lse,
    argmax). Ties between splits go to the lowest split, so the index is the first argmax overall."""
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max)
    total = (w * l).sum(dim=0)
    lse_a = m_max + total.log()
    first_best = (m == m_max).to(torch.int8).argmax(dim=0, keepdim=True)  # first split reaching the max
    indices = idx.gather(0, first_best).squeeze(0)
    lse = lse_a - xoff if xoff is not None else lse_a
    return w, total, lse, indices


def score_chunks(cfg, T: int, V: int):
    """[(start, stop)] of the cuBLAS-scores schedule: chunks whose fp32 (T, width) product fits the
    workspace budget; forward and backward use the same chunks, so every score is the same cuBLAS
    product bit for bit (p = 1 exactly at a one-hot argmax)."""
    width = configs.chunk_width(cfg, T, V, 4)
    return [(start, min(start + width, V)) for start in range(0, V, width)]


def _forward_score_gemm(cfg, x, codebook, tau, operands, xoff, counts, acc):
    """Large d on cuBLAS: per vocabulary chunk S = x C_c^T (fp32), the online lse / argmax kernel reads S;
    then per chunk S again, exact p tiles from S (the staging kernel) and y += P C_c. 6 T V d FLOPs, all
    of them cuBLAS GEMMs; Triton only reads S and writes P."""
    T, d = x.shape
    V = codebook.shape[0]
    dist, colv, rowv = operands
    chunks = score_chunks(cfg, T, V)
    splits = [configs.vocab_splits(cfg, T, stop - start, x.device) for start, stop in chunks]
    n_slots = sum(n for _, n in splits)
    m = torch.empty(n_slots, T, dtype=acc, device=x.device)
    l = torch.empty_like(m)
    idx = torch.empty(n_slots, T, dtype=torch.int64, device=x.device)
    slot = 0
    for (start, stop), (per_split, n_split) in zip(chunks, splits):
        s = mm_acc(x, codebook[start:stop].T, acc)
        _online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
            x, codebook, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, l, idx, m, s,
            T, stop, d, per_split, start // cfg.block_v, slot,
            x.stride(0), codebook.stride(0), 0, 0, s.stride(0),
            DIST=dist, ACC_Y=False, FROM_GEMM=True,
            PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
            ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        slot += n_split
    _, _, lse, indices = _merge_splits(m, l, idx, xoff)
    y = torch.zeros(T, d, dtype=acc, device=x.device)
    width = chunks[0][1] - chunks[0][0]
    work = torch.empty(T, width, dtype=codebook.dtype, device=x.device)
    for start, stop in chunks:
        s = mm_acc(x, codebook[start:stop].T, acc)
        stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, p_out=work, counts=counts, s_chunk=s)
        addmm_acc(y, work[:, : stop - start], codebook[start:stop])
    return y, lse, indices, counts


def codebook_stats(x, codebook, tau, scoring, lse, rows):
    """The backend hook: counts sum_t p_tv (V,) and sums sum_t p_tv rows_t (V, d), p from the saved lse.

    One staging pass (scores, 2 T V d) and one product P^T rows (2 T V d) per vocabulary chunk; p is staged
    in rows' dtype (fp32: these are statistics, not a hot training path).
    """
    check_interpreter_dtypes(x, codebook, rows)
    x, codebook, rows, lse = rows_contiguous(x), rows_contiguous(codebook), rows_contiguous(rows), lse.contiguous()
    T, d = x.shape
    V, d_rows = codebook.shape[0], rows.shape[1]
    acc = acc_dtype(tau.dtype)
    counts = torch.zeros(V, dtype=acc, device=x.device)
    sums = (torch.zeros if T == 0 else torch.empty)(V, d_rows, dtype=acc, device=x.device)
    if T == 0:
        return counts, sums
    cfg = configs.get_config(V, d, x.dtype, x.device)
    tau1 = tau.reshape(1)
    operands, xoff = score_operands(x, codebook, tau, scoring)
    width = configs.chunk_width(cfg, T, V, rows.element_size())
    work = torch.empty(T, width, dtype=rows.dtype, device=x.device)
    for start in range(0, V, width):
        stop = min(start + width, V)
        stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau1, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, p_out=work, counts=counts)
        matmul_into(sums[start:stop], work[:, : stop - start].T, rows, cfg)
    return counts, sums


def expected_counts_gradient(cfg, x, codebook, tau, operands, xoff, lse, grad_counts, s_chunks=None):
    """c_t = sum_v p_tv grad_counts_v (T,): the one scores pass (2 T V d) a counts gradient costs."""
    T = x.shape[0]
    V = codebook.shape[0]
    out = torch.zeros(T, dtype=lse.dtype, device=x.device)
    grad_counts = grad_counts.contiguous()
    chunks = s_chunks or [(0, V)]
    for start, stop in chunks:
        s = mm_acc(x, codebook[start:stop].T, lse.dtype) if s_chunks else None
        stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, row_weights=(grad_counts, out), s_chunk=s)
    return out
