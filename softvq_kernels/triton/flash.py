"""The few-launch schedule for d <= fused_max_d (KernelConfig.fused_finish / fused_backward), written the
way FlashAttention-2/3 is: every T x V quantity lives only on chip, nothing of size T x V or split x T x d
is staged between kernels (except the vocabulary-split partials of the forward), and no launch depends on
a value read back to the host (CUDA-graph capturable: the grid depends on shapes only).

Launches (unmasked l2; dot and cosine skip the norms):
  forward   ``_prologue_kernel`` (||c||^2, ||x||^2 / tau)       1
            ``online_kernel`` with FINISH (one split), or       1
            ``online_kernel`` partials + ``_merge_kernel``      2   (vocabulary split over programs)
            code counts, only when asked: the staging kernel    +1
  backward  ``_prologue_kernel`` (norms, delta = <g, y> - gl)   1
            ``_counts_gradient_kernel``, only for a counts grad +1
            ``_codebook_grad_kernel`` (dC, both roles)           1
            ``_frame_grad_kernel`` (dx and the row sums)         1
so forward + backward is 5 (one split) or 6 launches. The hard-mode forward (``need_output=False``) is the
same online kernel without the output accumulator: 2 T V d FLOPs instead of 4.

Bitwise agreement (p == 1 exactly at a one-hot argmax): scores come from ``common.score_tile`` with the
config's BLOCK_K, squared norms from ``common.rowdot_block`` with the launch shape ``rowdot`` uses and
||x||^2 / tau rounded as torch divides (``tl.div_rn``), so this schedule and the staged one agree bit for
bit and either forward may be paired with either backward.

The backward's ds rule is chunked.py's: ds = p (dp + gn - delta'), delta' = <g, y> + sum_v p gn_v - gl,
and ds = gl where p == 1. It produces ``BackwardPieces`` directly; softvq_kernels.epilogue finishes them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from softvq_kernels.backends import BackwardPieces, centre_vocab
from softvq_kernels.triton import configs
from softvq_kernels.triton.common import (
    DIST_CODES,
    DIST_COSINE,
    DIST_L2,
    ROWDOT_BLOCK_R,
    acc_dtype,
    dot_precision,
    mma,
    online_kernel,
    online_tma,
    rowdot_block,
    rowdot_block_d,
    score_tile,
    score_tile_tma,
    stage_chunk,
    tl_acc,
    tma_aligned_rows,
    tma_fallback_reason,
    tma_transpose,
    use_tma,
)


def padded_d(d: int) -> int:
    """Width of the on-chip (BLOCK, d) accumulators: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _prologue_kernel(x_ptr, c_ptr, g_ptr, y_ptr, gamma_ptr, tau_ptr, xoff_ptr, knorm_ptr, delta_ptr,
                     T, V, D, stride_x, stride_c, stride_g, stride_y,
                     NORMS: tl.constexpr, DELTA: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The O((T + V) d) row work of one call in one launch. Programs [0, cdiv(T, BLOCK_R)) take frame rows:
    NORMS: xoff_t = ||x_t||^2 / tau; DELTA: delta_t = <g_t, y_t> - gl_t. The programs after them take
    codebook rows (NORMS only): knorm_v = ||c_v||^2. 2 (T + V) d FLOPs at most."""
    pid = tl.program_id(0)
    n_frame_blocks = tl.cdiv(T, BLOCK_R)
    if pid < n_frame_blocks:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < T
        if NORMS:
            sq = rowdot_block(x_ptr, x_ptr, rows, row_ok, D, stride_x, stride_x, ACC, BLOCK_R, BLOCK_D)
            tl.store(xoff_ptr + rows, tl.div_rn(sq, tl.load(tau_ptr).to(ACC)), mask=row_ok)
        if DELTA:
            gy = rowdot_block(g_ptr, y_ptr, rows, row_ok, D, stride_g, stride_y, ACC, BLOCK_R, BLOCK_D)
            if HAS_GAMMA:
                gy = gy - tl.load(gamma_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            tl.store(delta_ptr + rows, gy, mask=row_ok)
    else:
        rows = (pid - n_frame_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < V
        sq = rowdot_block(c_ptr, c_ptr, rows, row_ok, D, stride_c, stride_c, ACC, BLOCK_R, BLOCK_D)
        tl.store(knorm_ptr + rows, sq, mask=row_ok)


def prologue(x, codebook, tau1, scoring, *, g=None, y=None, gamma=None, delta=None):
    """((DIST code, colv, rowv), xoff) as ``common.score_operands`` returns them (bitwise the same values),
    and with g, y also delta = <g, y> - gamma into ``delta``; one launch, none for dot/cosine forwards."""
    dist = DIST_CODES[scoring.distance]
    T, D = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau1.dtype)
    norms = dist == DIST_L2
    xoff = torch.empty(T, dtype=acc, device=x.device) if norms else None
    knorm = torch.empty(V, dtype=acc, device=x.device) if norms else None
    with_delta = g is not None
    if norms or with_delta:
        grid = (triton.cdiv(T, ROWDOT_BLOCK_R) + (triton.cdiv(V, ROWDOT_BLOCK_R) if norms else 0),)
        dummy = tau1
        _prologue_kernel[grid](
            x, codebook, g if with_delta else x, y if with_delta else x, dummy if gamma is None else gamma, tau1,
            dummy if xoff is None else xoff, dummy if knorm is None else knorm, dummy if delta is None else delta,
            T, V, D, x.stride(0), codebook.stride(0), g.stride(0) if with_delta else 0, y.stride(0) if with_delta else 0,
            NORMS=norms, DELTA=with_delta, HAS_GAMMA=gamma is not None,
            ACC=tl_acc(acc), BLOCK_R=ROWDOT_BLOCK_R, BLOCK_D=rowdot_block_d(D), num_warps=4,
        )
    if dist == DIST_L2:
        return (dist, knorm, None), xoff
    if dist == DIST_COSINE:
        return (dist, scoring.codebook_inv_norm.contiguous(), scoring.x_inv_norm.contiguous()), None
    return (dist, None, None), None


@triton.jit
def _merge_kernel(m_ptr, l_ptr, idx_ptr, part_ptr, xoff_ptr, y_ptr, lse_ptr, out_idx_ptr,
                  T, D, n_split, stride_part_s, stride_part_t, stride_y,
                  DIST: tl.constexpr, ACC_Y: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the vocabulary splits of BLOCK_T rows by their LSE: y = sum_s w_s acc_s / sum_s w_s l_s with
    w_s = exp(m_s - max_s m_s), the true lse, and the index of the first split reaching the max (so the
    first argmax overall). Partials: m, l, idx (n_split, T), part (n_split, T, d). O(n_split T d)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    m_max = tl.full((BLOCK_T,), float("-inf"), dtype=ACC)
    for s in range(0, n_split):
        m_max = tl.maximum(m_max, tl.load(m_ptr + s * T + rows, mask=row_ok, other=0.0).to(ACC))
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    idx = tl.zeros((BLOCK_T,), dtype=tl.int64)
    found = tl.zeros((BLOCK_T,), dtype=tl.int32)
    if ACC_Y:
        dcols = tl.arange(0, D_PAD)
        out_ok = row_ok[:, None] & (dcols < D)[None, :]
        acc = tl.zeros((BLOCK_T, D_PAD), dtype=ACC)
    for s in range(0, n_split):
        m_s = tl.load(m_ptr + s * T + rows, mask=row_ok, other=0.0).to(ACC)
        w = tl.exp(m_s - m_max)
        total += w * tl.load(l_ptr + s * T + rows, mask=row_ok, other=0.0).to(ACC)
        at_max = m_s == m_max
        idx = tl.where(at_max & (found == 0), tl.load(idx_ptr + s * T + rows, mask=row_ok, other=0), idx)
        found = tl.where(at_max, 1, found)
        if ACC_Y:
            part = tl.load(part_ptr + s * stride_part_s + rows[:, None] * stride_part_t + dcols[None, :],
                           mask=out_ok, other=0.0).to(ACC)
            acc += part * w[:, None]
    lse = m_max + tl.log(total)
    if DIST == 1:
        lse = lse - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(out_idx_ptr + rows, idx, mask=row_ok)
    if ACC_Y:
        tl.store(y_ptr + rows[:, None] * stride_y + dcols[None, :], acc / total[:, None], mask=out_ok)


def forward(cfg, x, codebook, tau, scoring, need_counts, need_output=True):
    """x (T, d), codebook (V, d), T > 0 -> y (T, d) acc dtype (None unless need_output), true lse (T,),
    first argmax (T,), counts (V,) or None. 4 T V d FLOPs (2 T V d without the output), + 2 T V d for counts."""
    T, d = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    tau1 = tau.reshape(1)
    (dist, colv, rowv), xoff = prologue(x, codebook, tau1, scoring)
    d_pad = padded_d(d)
    per_split, n_split = configs.vocab_splits(cfg, T, V, device)
    lse = torch.empty(T, dtype=acc, device=device)
    indices = torch.empty(T, dtype=torch.int64, device=device)
    y = torch.empty(T, d, dtype=acc, device=device) if need_output else None
    dummy = tau1
    finish = n_split == 1
    if finish:
        m = l = idx = dummy
        out = y if need_output else dummy
        idx = indices
    else:
        m = torch.empty(n_split, T, dtype=acc, device=device)
        l = torch.empty_like(m)
        idx = torch.empty(n_split, T, dtype=torch.int64, device=device)
        out = torch.empty(n_split, T, d, dtype=acc, device=device) if need_output else dummy
    online_kernel[(triton.cdiv(T, cfg.block_t), n_split)](
        x, codebook, dummy if colv is None else colv, dummy if rowv is None else rowv, tau1,
        m, l, idx, out, x, dummy if xoff is None else xoff, lse,
        T, V, d, per_split, 0, 0,
        x.stride(0), codebook.stride(0),
        out.stride(0) if need_output and not finish else 0, out.stride(-2) if need_output else 0, 0,
        DIST=dist, ACC_Y=need_output, FROM_GEMM=False, FINISH=finish,
        PREC_S=dot_precision(x.dtype, codebook.dtype), PREC_Y=dot_precision(codebook.dtype),
        ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=d_pad,
        TMA=online_tma(cfg, x, codebook, need_output, d_pad), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not finish:
        _merge_kernel[(triton.cdiv(T, cfg.block_t),)](
            m, l, idx, out, dummy if xoff is None else xoff, y if need_output else dummy, lse, indices,
            T, d, n_split, out.stride(0) if need_output else 0, out.stride(1) if need_output else 0,
            y.stride(0) if need_output else 0,
            DIST=dist, ACC_Y=need_output, ACC=tl_acc(acc), BLOCK_T=cfg.block_t, D_PAD=d_pad,
            num_warps=cfg.num_warps,
        )
    counts = None
    if need_counts:
        counts = torch.zeros(V, dtype=acc, device=device)
        stage_chunk(cfg, x=x, codebook=codebook, scoring=(dist, colv, rowv), tau=tau1, lse=lse, xoff=xoff,
                    v_start=0, v_stop=V, counts=counts)
    return y, lse, indices, counts


@triton.jit
def _ds_tile(x_ptr, c_ptr, g_ptr, colv_ptr, rowv_ptr, lse_ptr, xoff_ptr, delta_ptr, gamma_ptr, gn_ptr,
             inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c, stride_g,
             DIST: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_GN: tl.constexpr, WITH_DS: tl.constexpr,
             PREC_S: tl.constexpr, PREC_DP: tl.constexpr, ACC: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
             x_desc, c_desc, g_desc, row0, col0, TMA: tl.constexpr):
    """(ok, s, p, ds) of one (BLOCK_T, BLOCK_V) tile: the true scores s (0 outside the tile's real rows /
    columns), p = exp(s - lse) from the saved lse and
    ds = p (<g, c> + gn - delta'), gl where p == 1 (0 outside the tile's real rows / columns).
    2 BLOCK_T BLOCK_V d FLOPs for the scores, as many again for dp (WITH_DS).
    TMA: the x, c and g tiles come from tensor descriptors (blocks (BLOCK_T | BLOCK_V, BLOCK_K)) whose tile
    starts are row0 / col0 (KernelConfig.tma); the pointers are not read then."""
    if TMA:
        a = score_tile_tma(x_desc, c_desc, colv_ptr, rowv_ptr, inv_tau, row0, col0, rows, cols, row_ok, col_ok, D,
                           DIST, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K)
    else:
        a = score_tile(x_ptr, c_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c,
                       DIST, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, x_ptr, 0, 0, False)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if DIST == 1:
        a = a - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    log_p = tl.where(ok, a - lse[:, None], float("-inf"))
    p = tl.exp(log_p)
    ds = p
    if WITH_DS:
        dp = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            if TMA:
                gt = g_desc.load([row0, k0])
                ct = tma_transpose(c_desc.load([col0, k0]), BLOCK_V, BLOCK_K)
            else:
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                gt = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                ct = tl.load(c_ptr + cols[None, :] * stride_c + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            dp = mma(gt, ct, dp, PREC_DP)
        if HAS_GN:
            dp = dp + tl.load(gn_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        else:
            gamma = tl.zeros((BLOCK_T,), dtype=ACC)
        ds = tl.where(p == 1.0, gamma[:, None], p * (dp - delta[:, None]))
        ds = tl.where(ok, ds, 0.0)
    return ok, tl.where(ok, a, 0.0), p, ds


@triton.jit
def _counts_gradient_kernel(x_ptr, c_ptr, colv_ptr, rowv_ptr, tau_ptr, lse_ptr, xoff_ptr, gn_ptr, delta_ptr,
                            T, V, D, stride_x, stride_c,
                            DIST: tl.constexpr, PREC_S: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            TMA: tl.constexpr = False):
    """delta_t += sum_v p_tv gn_v for BLOCK_T rows over the whole vocabulary: the one scores pass
    (2 T V d FLOPs) a gradient on code_counts costs, since every ds needs it."""
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[stride_x, 1], block_shape=[BLOCK_T, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, BLOCK_K])
    else:
        x_desc = x_ptr
        c_desc = c_ptr
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    total = tl.zeros((BLOCK_T,), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok, _, p, _ = _ds_tile(x_ptr, c_ptr, x_ptr, colv_ptr, rowv_ptr, lse_ptr, xoff_ptr, lse_ptr, lse_ptr,
                                   gn_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c, 0,
                                   DIST, False, False, False, PREC_S, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K,
                                   x_desc, c_desc, x_desc, tl.program_id(0) * BLOCK_T, v0, TMA)
        gn = tl.load(gn_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        total += tl.sum(p * gn[None, :], 1)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    tl.store(delta_ptr + rows, delta + total, mask=row_ok)


@triton.jit
def _codebook_grad_kernel(x_ptr, c_ptr, g_ptr, colv_ptr, rowv_ptr, tau_ptr, lse_ptr, xoff_ptr, delta_ptr,
                          gamma_ptr, gn_ptr, grad_c_ptr, colsum_ptr,
                          T, V, D, stride_x, stride_c, stride_g, stride_gc,
                          DIST: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_GN: tl.constexpr,
                          PREC_S: tl.constexpr, PREC_DP: tl.constexpr, PREC_PG: tl.constexpr,
                          PREC_DSX: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          TMA: tl.constexpr = False):
    """Program (v-block, d-block): BLOCK_V codebook rows and BLOCK_D of their columns, looping over all frames
    with a (BLOCK_V, BLOCK_D) accumulator on chip: grad_codebook_v = sum_t p_tv g_t + kappa_v sum_t ds_tv r_t x_t
    (both roles), and (d-block 0) the column sums ds_cols (l2: sum_t ds) or ds_s_cols (cosine: sum_t ds s).
    Each d-block recomputes the scores and dp over the whole d: 8 T V d FLOPs over the grid with one d-block,
    + 4 T V d per further one. The d-blocks exist because a (BLOCK_V, 256) fp32 accumulator next to the
    score, dp and ds tiles spills on sm_90 under every tile shape (softvq_kernels.triton.static_check).
    TMA (KernelConfig.tma): every x, c and g tile through tensor descriptors (the (BLOCK_T, BLOCK_D) ones too)."""
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[stride_x, 1], block_shape=[BLOCK_T, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, BLOCK_K])
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[T, D], strides=[stride_g, 1], block_shape=[BLOCK_T, BLOCK_K])
        gd_desc = tl.make_tensor_descriptor(g_ptr, shape=[T, D], strides=[stride_g, 1], block_shape=[BLOCK_T, BLOCK_D])
        xd_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[stride_x, 1], block_shape=[BLOCK_T, BLOCK_D])
    else:
        x_desc = x_ptr
        c_desc = c_ptr
        g_desc = g_ptr
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    d_block = tl.program_id(1)
    dcols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=ACC)
    colsum = tl.zeros((BLOCK_V,), dtype=ACC)
    if DIST == 2:
        key_scale = tl.load(colv_ptr + cols, mask=col_ok, other=0.0).to(ACC) * inv_tau
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        ok, s, p, ds = _ds_tile(x_ptr, c_ptr, g_ptr, colv_ptr, rowv_ptr, lse_ptr, xoff_ptr, delta_ptr, gamma_ptr,
                                gn_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c, stride_g,
                                DIST, HAS_GAMMA, HAS_GN, True, PREC_S, PREC_DP, ACC, BLOCK_T, BLOCK_V, BLOCK_K,
                                x_desc, c_desc, g_desc, t0, tl.program_id(0) * BLOCK_V, TMA)
        if TMA:
            gt = gd_desc.load([t0, d_block * BLOCK_D])
            xt = xd_desc.load([t0, d_block * BLOCK_D])
        else:
            tile_ok = row_ok[:, None] & d_ok[None, :]
            gt = tl.load(g_ptr + rows[:, None] * stride_g + dcols[None, :], mask=tile_ok, other=0.0)
            xt = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=tile_ok, other=0.0)
        acc = mma(tl.trans(p).to(gt.dtype), gt, acc, PREC_PG)
        if DIST == 1:
            colsum += tl.sum(ds, 0)
            ds_k = ds * (2.0 * inv_tau)
        elif DIST == 2:
            colsum += tl.sum(ds * s, 0)
            r = tl.load(rowv_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            ds_k = ds * key_scale[None, :] * r[:, None]
        else:
            ds_k = ds * inv_tau
        acc = mma(tl.trans(ds_k).to(xt.dtype), xt, acc, PREC_DSX)
    tl.store(grad_c_ptr + cols[:, None] * stride_gc + dcols[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])
    if DIST != 0:
        tl.store(colsum_ptr + cols, colsum, mask=col_ok & (d_block == 0))  # every d-block has the same sums


@triton.jit
def _frame_grad_kernel(x_ptr, c_ptr, g_ptr, colv_ptr, rowv_ptr, tau_ptr, lse_ptr, xoff_ptr, delta_ptr,
                       gamma_ptr, gn_ptr, grad_x_ptr, ds_rows_ptr, ds_u_ptr, p_u_ptr,
                       T, V, D, stride_x, stride_c, stride_g, stride_gx, log_v,
                       DIST: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_GN: tl.constexpr,
                       PREC_S: tl.constexpr, PREC_DP: tl.constexpr, PREC_DSC: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
                       TMA: tl.constexpr = False):
    """Program: BLOCK_T frames, looping over the vocabulary with a (BLOCK_T, d) accumulator on chip:
    grad_x_raw_t = sum_v ds_tv kappa_v c_v and the row sums ds_rows, ds_u_rows, p_u_rows
    (u = s - (lse - log V), backends.score_centre). 6 T V d FLOPs over the grid (scores, dp, dS C).
    TMA (KernelConfig.tma): every x, c and g tile through tensor descriptors (the (BLOCK_V, D_PAD) one too)."""
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[stride_x, 1], block_shape=[BLOCK_T, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, BLOCK_K])
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[T, D], strides=[stride_g, 1], block_shape=[BLOCK_T, BLOCK_K])
        cd_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, D_PAD])
    else:
        x_desc = x_ptr
        c_desc = c_ptr
        g_desc = g_ptr
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    dcols = tl.arange(0, D_PAD)
    d_ok = dcols < D
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    acc = tl.zeros((BLOCK_T, D_PAD), dtype=ACC)
    ds_rows = tl.zeros((BLOCK_T,), dtype=ACC)
    ds_u = tl.zeros((BLOCK_T,), dtype=ACC)
    p_u = tl.zeros((BLOCK_T,), dtype=ACC)
    centre = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC) - log_v
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok, s, p, ds = _ds_tile(x_ptr, c_ptr, g_ptr, colv_ptr, rowv_ptr, lse_ptr, xoff_ptr, delta_ptr, gamma_ptr,
                                gn_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_c, stride_g,
                                DIST, HAS_GAMMA, HAS_GN, True, PREC_S, PREC_DP, ACC, BLOCK_T, BLOCK_V, BLOCK_K,
                                x_desc, c_desc, g_desc, tl.program_id(0) * BLOCK_T, v0, TMA)
        u = tl.where(ok, s - centre[:, None], 0.0)
        ds_rows += tl.sum(ds, 1)
        ds_u += tl.sum(ds * u, 1)
        p_u += tl.sum(p * u, 1)
        if DIST == 1:
            ds_k = ds * (2.0 * inv_tau)
        elif DIST == 2:
            ds_k = ds * (tl.load(colv_ptr + cols, mask=col_ok, other=0.0).to(ACC) * inv_tau)[None, :]
        else:
            ds_k = ds * inv_tau
        if TMA:
            ct = cd_desc.load([v0, 0])
        else:
            ct = tl.load(c_ptr + cols[:, None] * stride_c + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(ds_k.to(x_ptr.dtype.element_ty), ct, acc, PREC_DSC)
    tl.store(grad_x_ptr + rows[:, None] * stride_gx + dcols[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(ds_rows_ptr + rows, ds_rows, mask=row_ok)
    tl.store(ds_u_ptr + rows, ds_u, mask=row_ok)
    tl.store(p_u_ptr + rows, p_u, mask=row_ok)


def backward(cfg, g, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts) -> BackwardPieces:
    """Rows-contiguous g, x (T, d), T > 0, codebook (V, d), y (T, d), lse (T,) -> ``BackwardPieces``, every
    element written by a kernel (no zero fills). 14 T V d FLOPs (+ 2 T V d for a counts gradient)."""
    T, d = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    tau1 = tau.reshape(1)
    gamma = None if grad_lse is None else grad_lse.contiguous()
    gn = None if grad_counts is None else grad_counts.contiguous()
    delta = torch.empty(T, dtype=acc, device=device)
    (dist, colv, rowv), xoff = prologue(x, codebook, tau1, scoring, g=g, y=y, gamma=gamma, delta=delta)
    dummy = tau1
    colv, rowv, xoff_arg = (dummy if t is None else t for t in (colv, rowv, xoff))
    prec_s = dot_precision(x.dtype, codebook.dtype)
    prec_dp = dot_precision(g.dtype, codebook.dtype)
    # The backward's own tile rows / columns (KernelConfig.fused_bwd_*; 0: the forward's). BLOCK_K is always the
    # forward's: the k-step order is what fixes the bits of a score, so p is still exactly 1 at a one-hot argmax.
    block_t, block_v = cfg.fused_bwd_block_t or cfg.block_t, cfg.fused_bwd_block_v or cfg.block_v
    d_pad = padded_d(d)
    block_d = min(d_pad, cfg.fused_bwd_block_d or d_pad)
    bk = cfg.block_k
    if cfg.tma and tma_fallback_reason((x, codebook), ([], []), device) is None:
        g = tma_aligned_rows(g)  # x and codebook qualify: do not let autograd's contiguous odd-d g cost TMA
    tma = use_tma(cfg, (x, codebook, g), ([(block_t, bk), (block_t, block_d)], [(block_v, bk), (block_v, d_pad)],
                                          [(block_t, bk), (block_t, block_d)]), device)
    common = dict(DIST=dist, ACC=tl_acc(acc), BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=cfg.block_k, TMA=tma,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if gn is not None:
        _counts_gradient_kernel[(triton.cdiv(T, block_t),)](
            x, codebook, colv, rowv, tau1, lse, xoff_arg, gn, delta, T, V, d, x.stride(0), codebook.stride(0),
            PREC_S=prec_s, **common,
        )
    pieces = BackwardPieces(
        grad_x_raw=torch.empty(T, d, dtype=acc, device=device),
        grad_codebook=torch.empty(V, d, dtype=acc, device=device),
        ds_rows=torch.empty(T, dtype=acc, device=device),
        ds_u_rows=torch.empty(T, dtype=acc, device=device),
        p_u_rows=torch.empty(T, dtype=acc, device=device),
        ds_cols=torch.empty(V, dtype=acc, device=device) if dist == DIST_L2 else None,
        ds_s_cols=torch.empty(V, dtype=acc, device=device) if dist == DIST_COSINE else None,
    )
    colsum = pieces.ds_cols if dist == DIST_L2 else pieces.ds_s_cols
    operands = (x, codebook, g, colv, rowv, tau1, lse, xoff_arg, delta, dummy if gamma is None else gamma,
                dummy if gn is None else gn)
    flags = dict(HAS_GAMMA=gamma is not None, HAS_GN=gn is not None, PREC_S=prec_s, PREC_DP=prec_dp)
    _codebook_grad_kernel[(triton.cdiv(V, block_v), d_pad // block_d)](
        *operands, pieces.grad_codebook, dummy if colsum is None else colsum,
        T, V, d, x.stride(0), codebook.stride(0), g.stride(0), pieces.grad_codebook.stride(0),
        PREC_PG=dot_precision(g.dtype), PREC_DSX=dot_precision(x.dtype), BLOCK_D=block_d, **flags, **common,
    )
    _frame_grad_kernel[(triton.cdiv(T, block_t),)](
        *operands, pieces.grad_x_raw, pieces.ds_rows, pieces.ds_u_rows, pieces.p_u_rows,
        T, V, d, x.stride(0), codebook.stride(0), g.stride(0), pieces.grad_x_raw.stride(0), math.log(centre_vocab(scoring, V)),
        PREC_DSC=dot_precision(x.dtype, codebook.dtype), D_PAD=d_pad, **flags, **common,
    )
    return pieces
