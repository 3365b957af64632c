"""Forward: one online-softmax pass over the vocabulary (scores, running max / sum, argmax, and for
small d the weighted codebook sum), split over programs along V and merged by LSE; for large d the
output is formed from staged exact-probability tiles; code counts from the staging kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from softvq_kernels.triton import configs, flash
from softvq_kernels.triton.common import (
    acc_dtype,
    addmm_acc,
    check_interpreter_dtypes,
    dot_precision,
    matmul_into,
    mm_acc,
    online_kernel,
    online_tma,
    rows_contiguous,
    score_operands,
    score_tile,
    stage_chunk,
    tl_acc,
)


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
    d_pad = triton.next_power_of_2(d)
    fused = d_pad <= cfg.fused_max_d
    if fused and cfg.fused_finish:
        return flash.forward(cfg, x, codebook, tau, scoring, need_counts)
    tau = tau.reshape(1)
    operands, xoff = score_operands(x, codebook, tau.reshape(()), scoring)
    if not fused and cfg.score_gemm:
        if cfg.online_output:
            return _forward_score_gemm_online(cfg, x, codebook, tau, operands, xoff, counts, acc)
        return _forward_score_gemm(cfg, x, codebook, tau, operands, xoff, counts, acc)
    per_split, n_split = configs.vocab_splits(cfg, T, V, device)
    m = torch.empty(n_split, T, dtype=acc, device=device)
    l = torch.empty(n_split, T, dtype=acc, device=device)
    idx = torch.empty(n_split, T, dtype=torch.int64, device=device)
    part = torch.empty(n_split, T, d, dtype=acc, device=device) if fused else m
    dist, colv, rowv = operands
    online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
        x, codebook, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, l, idx, part, x, x, x,
        T, V, d, per_split, 0, 0,
        x.stride(0), codebook.stride(0),
        part.stride(0) if fused else 0, part.stride(1) if fused else 0, 0,
        DIST=dist, ACC_Y=fused, FROM_GEMM=False, FINISH=False,
        PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
        ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=d_pad,
        TMA=online_tma(cfg, x, codebook, fused, d_pad), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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


def _score_gemm_lse_argmax(cfg, x, codebook, tau, operands, xoff, acc):
    """The cuBLAS-scores online pass: per vocabulary chunk S = x C_c^T (fp32) and the online kernel reading
    S for the running max / sum / first argmax; -> (true lse (T,), argmax (T,), chunks). 2 T V d FLOPs."""
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
        online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
            x, codebook, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, l, idx, m, s, s, s,
            T, stop, d, per_split, start // cfg.block_v, slot,
            x.stride(0), codebook.stride(0), 0, 0, s.stride(0),
            DIST=dist, ACC_Y=False, FROM_GEMM=True, FINISH=False,
            PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
            ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        slot += n_split
    _, _, lse, indices = _merge_splits(m, l, idx, xoff)
    return lse, indices, chunks


def _forward_score_gemm(cfg, x, codebook, tau, operands, xoff, counts, acc):
    """Large d on cuBLAS: per vocabulary chunk S = x C_c^T (fp32), the online lse / argmax kernel reads S;
    then per chunk S again, exact p tiles from S (the staging kernel) and y += P C_c. 6 T V d FLOPs, all
    of them cuBLAS GEMMs; Triton only reads S and writes P."""
    T, d = x.shape
    lse, indices, chunks = _score_gemm_lse_argmax(cfg, x, codebook, tau, operands, xoff, acc)
    y = torch.zeros(T, d, dtype=acc, device=x.device)
    width = chunks[0][1] - chunks[0][0]
    work = torch.empty(T, width, dtype=codebook.dtype, device=x.device)
    for start, stop in chunks:
        s = mm_acc(x, codebook[start:stop].T, acc)
        stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                    v_start=start, v_stop=stop, p_out=work, counts=counts, s_chunk=s)
        addmm_acc(y, work[:, : stop - start], codebook[start:stop])
    return y, lse, indices, counts


# A row's reference max (what its stored P tiles and its y are relative to) moves only when a chunk's max
# exceeds it by more than this (natural log units), as FlashAttention-4 rescales. Stale by at most this,
# P <= e^8 ~ 3e3 stays finite in fp16. It must stay below -log(2^-24) ~ 16.6: a row that is exactly
# one-hot (p == 1 in fp32) has every other score more than that below its max, so its reference max
# is always moved onto the max itself and lse = m + log(1) is the max bit for bit, as in the other paths.
RESCALE_THRESHOLD = 8.0


@triton.jit
def _chunk_online_kernel(s_ptr, colv_ptr, rowv_ptr, tau_ptr, m_ptr, best_ptr, l_ptr, idx_ptr, p_ptr, y_ptr,
                         T, D, v_start, v_stop, stride_s, stride_p, stride_y,
                         DIST: tl.constexpr, FIRST: tl.constexpr, THRESHOLD: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program: BLOCK_T rows of the vocabulary chunk [v_start, v_stop), whose <x, c> products cuBLAS wrote
    to s (T, chunk) fp32. Pass 1 over the chunk: its row max and first argmax; the running best / argmax
    (T,) are updated, and the reference max m (T,) moves only past THRESHOLD, in which case l (T,) and that
    row of y (T, d) fp32 are multiplied by exp(m_old - m_new) here (rows that did not move are not touched).
    Pass 2: P = exp(a - m) (T, chunk) in P's dtype and l += its row sums. FIRST: the chunk that starts the
    running state (y is not read: the host's product writes it). O(T chunk) work, no FLOPs beyond exp."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    chunk_max = tl.full((BLOCK_T,), float("-inf"), dtype=ACC)
    chunk_arg = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        a = score_tile(s_ptr, s_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, 0, 0,
                       DIST, 0, ACC, BLOCK_T, BLOCK_V, 16, s_ptr, stride_s, v_start, True)
        tile_max = tl.max(a, 1)
        tile_arg = tl.min(tl.where(a == tile_max[:, None], cols[None, :], 2147483647), 1).to(tl.int32)
        chunk_arg = tl.where(tile_max > chunk_max, tile_arg, chunk_arg)
        chunk_max = tl.maximum(chunk_max, tile_max)
    if FIRST:
        m = chunk_max
        best = chunk_max
        idx = chunk_arg.to(tl.int64)
        l = tl.zeros((BLOCK_T,), dtype=ACC)
    else:
        m_old = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        best = tl.load(best_ptr + rows, mask=row_ok, other=0.0)
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
        idx = tl.where(chunk_max > best, chunk_arg.to(tl.int64), idx)  # strict: ties keep the earlier chunk
        best = tl.maximum(best, chunk_max)
        moved = chunk_max > m_old + THRESHOLD
        m = tl.where(moved, chunk_max, m_old)
        alpha = tl.exp(m_old - m)
        l = tl.load(l_ptr + rows, mask=row_ok, other=0.0) * alpha
        rescale = row_ok & moved
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            ptrs = y_ptr + rows[:, None] * stride_y + dcols[None, :]
            ok = rescale[:, None] & (dcols < D)[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) * alpha[:, None], mask=ok)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        a = score_tile(s_ptr, s_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, 0, 0,
                       DIST, 0, ACC, BLOCK_T, BLOCK_V, 16, s_ptr, stride_s, v_start, True)
        p = tl.exp(a - m[:, None])
        l += tl.sum(p, 1)
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(p_ptr + rows[:, None] * stride_p + (cols - v_start)[None, :], p.to(p_ptr.dtype.element_ty), mask=ok)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(l_ptr + rows, l, mask=row_ok)
    tl.store(idx_ptr + rows, idx, mask=row_ok)


def _forward_score_gemm_online(cfg, x, codebook, tau, operands, xoff, counts, acc):
    """Large d, one pass over the vocabulary (KernelConfig.online_output): per chunk S = x C_c^T (cuBLAS,
    fp32), ``_chunk_online_kernel`` (running max / sum / argmax, P_c = exp(S - m) in the input dtype, rows
    of y rescaled only when their max moved past RESCALE_THRESHOLD), y += P_c C_c (cuBLAS into fp32);
    finally y /= l. 4 T V d FLOPs (the staged schedule: 6); code counts add a scores pass (2 T V d) and
    only when asked, since they need the final lse. Same chunks (so the same S bits) as the backward."""
    T, d = x.shape
    V = codebook.shape[0]
    dist, colv, rowv = operands
    chunks = score_chunks(cfg, T, V)
    m = torch.empty(T, dtype=acc, device=x.device)
    best, l = torch.empty_like(m), torch.empty_like(m)
    idx = torch.empty(T, dtype=torch.int64, device=x.device)
    work = torch.empty(T, chunks[0][1] - chunks[0][0], dtype=codebook.dtype, device=x.device)
    y = None
    for start, stop in chunks:
        s = mm_acc(x, codebook[start:stop].T, acc)
        _chunk_online_kernel[(triton.cdiv(T, cfg.block_t),)](
            s, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, best, l, idx, work,
            tau if y is None else y,
            T, d, start, stop, s.stride(0), work.stride(0), 0 if y is None else y.stride(0),
            DIST=dist, FIRST=y is None, THRESHOLD=RESCALE_THRESHOLD, ACC=tl_acc(acc),
            BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_D=64, num_warps=cfg.num_warps,
        )
        p = work[:, : stop - start]
        if y is None:
            y = mm_acc(p, codebook[start:stop], acc)
        else:
            addmm_acc(y, p, codebook[start:stop])
    y = y.div_(l[:, None])
    lse = m + l.log()
    if xoff is not None:
        lse = lse - xoff
    if counts is not None:
        for start, stop in chunks:
            stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau, lse=lse, xoff=xoff,
                        v_start=start, v_stop=stop, counts=counts, s_chunk=mm_acc(x, codebook[start:stop].T, acc))
    return y, lse, idx, counts


def lse_argmax(x, codebook, tau, scoring):
    """Hard mode / inference: the true lse (T,) and first argmax (T,) without the weighted sum: the online
    pass alone (2 T V d FLOPs; the soft forward is 4 T V d, or 6 on the staged schedule)."""
    check_interpreter_dtypes(x, codebook)
    x, codebook = rows_contiguous(x), rows_contiguous(codebook)
    T, d = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    if T == 0:
        return torch.empty(0, dtype=acc, device=device), torch.empty(0, dtype=torch.int64, device=device)
    cfg = configs.get_config(V, d, x.dtype, device)
    if cfg.fused_finish and not cfg.score_gemm:
        _, lse, indices, _ = flash.forward(cfg, x, codebook, tau, scoring, False, need_output=False)
        return lse, indices
    tau = tau.reshape(1)
    operands, xoff = score_operands(x, codebook, tau.reshape(()), scoring)
    if cfg.score_gemm:
        lse, indices, _ = _score_gemm_lse_argmax(cfg, x, codebook, tau, operands, xoff, acc)
        return lse, indices
    dist, colv, rowv = operands
    per_split, n_split = configs.vocab_splits(cfg, T, V, device)
    m = torch.empty(n_split, T, dtype=acc, device=device)
    l = torch.empty_like(m)
    idx = torch.empty(n_split, T, dtype=torch.int64, device=device)
    online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
        x, codebook, tau if colv is None else colv, tau if rowv is None else rowv, tau, m, l, idx, m, x, x, x,
        T, V, d, per_split, 0, 0, x.stride(0), codebook.stride(0), 0, 0, 0,
        DIST=dist, ACC_Y=False, FROM_GEMM=False, FINISH=False,
        PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
        ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=16,
        TMA=online_tma(cfg, x, codebook, False, 16), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _, _, lse, indices = _merge_splits(m, l, idx, xoff)
    return lse, indices


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
