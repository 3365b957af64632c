"""Backward. Both schedules recompute p = exp(s - lse) from the saved lse and form
ds = p (<g, v> - <g, y>) tile by tile; neither holds a T x V matrix.

- Fused (next_pow2(d) <= fused_bwd_max_d): FlashAttention-2 style, two kernels with on-chip
  accumulators and no workspace. ``_fused_codebook_kernel`` owns BLOCK_V codebook rows and loops over
  all frames (scores, dp, p^T g, ds^T x: 8 T V d FLOPs); ``_fused_frames_kernel`` owns BLOCK_T frames
  and loops over the vocabulary (scores, dp, ds c: 6 T V d FLOPs). 14 T V d in all.
- Staged (large d, where BLOCK x d accumulators do not fit): per vocabulary chunk the staging kernel
  writes p and ds (T x chunk) with their row / column sums, then three GEMMs over the staged tiles give
  dx and the chunk's codebook rows in full. 10 T V d FLOPs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from softvq_kernels.triton import configs
from softvq_kernels.triton.common import (
    acc_dtype,
    check_interpreter_dtypes,
    dot_precision,
    addmm_acc,
    matmul_into,
    mm_acc,
    mma,
    rowdot,
    rows_contiguous,
    score_tile,
    stage_chunk,
    tl_acc,
)
from softvq_kernels.triton.forward import _chunk_width, score_chunks, x_offset


@triton.jit
def _fused_codebook_kernel(x_ptr, k_ptr, v_ptr, g_ptr, knorm_ptr, tau_ptr, lse_ptr, xoff_ptr, delta_ptr,
                           gv_ptr, gk_ptr, dtau_ptr,
                           T, V, D, log_v, stride_x, stride_k, stride_v, stride_g, stride_gv, stride_gk,
                           L2: tl.constexpr, SHARED: tl.constexpr, PREC_S: tl.constexpr, PREC_DP: tl.constexpr,
                           PREC_V: tl.constexpr, PREC_K: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """Program per BLOCK_V codebook rows, looping over every frame block: their complete value-role
    (sum_t p g_t) and key-role gradients in on-chip accumulators, written once; sum ds u added to dtau
    (u = log p + log V, the centred score: see ``backward``)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    dcols = tl.arange(0, D_PAD)
    d_ok = dcols < D
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    vt = tl.load(v_ptr + cols[None, :] * stride_v + dcols[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    scale = (2.0 if L2 else 1.0) * inv_tau
    # One accumulator when keys is values: dc = sum_t p g_t + scale * sum_t ds x_t (ds pre-scaled).
    dc = tl.zeros((BLOCK_V, D_PAD), dtype=ACC)
    if not SHARED:
        dk = tl.zeros((BLOCK_V, D_PAD), dtype=ACC)
    colsum = tl.zeros((BLOCK_V,), dtype=ACC)
    dtau = tl.zeros((BLOCK_V,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        a = score_tile(x_ptr, k_ptr, knorm_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
                       L2, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, x_ptr, 0, 0, False)
        if L2:
            a = a - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        ok = row_ok[:, None] & col_ok[None, :]
        log_p = tl.where(ok, a - tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None], float("-inf"))
        p = tl.exp(log_p)
        xd_ok = row_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + dcols[None, :], mask=xd_ok, other=0.0)
        dp = mma(g, vt, tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC), PREC_DP)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=xd_ok, other=0.0)
        dc = mma(tl.trans(p).to(g.dtype), g, dc, PREC_V)
        if SHARED:
            dc = mma(tl.trans(ds * scale).to(x.dtype), x, dc, PREC_K)
        else:
            dk = mma(tl.trans(ds).to(x.dtype), x, dk, PREC_K)
        colsum += tl.sum(ds, 0)
        dtau += tl.sum(ds * tl.where(ok, log_p + log_v, 0.0), 0)
    vd_ok = col_ok[:, None] & d_ok[None, :]
    if SHARED:
        if L2:
            kt = tl.load(k_ptr + cols[:, None] * stride_k + dcols[None, :], mask=vd_ok, other=0.0).to(ACC)
            dc = dc - (scale * colsum)[:, None] * kt
    else:
        if L2:
            kt = tl.load(k_ptr + cols[:, None] * stride_k + dcols[None, :], mask=vd_ok, other=0.0).to(ACC)
            dk = dk - colsum[:, None] * kt
        tl.store(gk_ptr + cols[:, None] * stride_gk + dcols[None, :], (dk * scale).to(gk_ptr.dtype.element_ty), mask=vd_ok)
    tl.store(gv_ptr + cols[:, None] * stride_gv + dcols[None, :], dc.to(gv_ptr.dtype.element_ty), mask=vd_ok)
    tl.atomic_add(dtau_ptr, tl.sum(dtau, 0))


@triton.jit
def _fused_frames_kernel(x_ptr, k_ptr, v_ptr, g_ptr, y_ptr, knorm_ptr, tau_ptr, lse_ptr, xoff_ptr, delta_ptr, gx_ptr,
                         dtau_ptr, T, V, D, log_v, stride_x, stride_k, stride_v, stride_g, stride_y, stride_gx,
                         L2: tl.constexpr, PREC_S: tl.constexpr, PREC_DP: tl.constexpr, PREC_X: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                         D_PAD: tl.constexpr):
    """Program per BLOCK_T frames, looping over the vocabulary: dx = k (sum_v ds c_v - y sum_v ds) on chip,
    and the temperature correction -sum_t (sum_v ds)(sum_v p u) added to dtau."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    dcols = tl.arange(0, D_PAD)
    d_ok = dcols < D
    xd_ok = row_ok[:, None] & d_ok[None, :]
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if L2:
        xoff = tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + rows[:, None] * stride_g + dcols[None, :], mask=xd_ok, other=0.0)
    dx = tl.zeros((BLOCK_T, D_PAD), dtype=ACC)
    rowsum = tl.zeros((BLOCK_T,), dtype=ACC)
    p_u = tl.zeros((BLOCK_T,), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        a = score_tile(x_ptr, k_ptr, knorm_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
                       L2, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, x_ptr, 0, 0, False)
        if L2:
            a = a - xoff[:, None]
        ok = row_ok[:, None] & col_ok[None, :]
        log_p = tl.where(ok, a - lse[:, None], float("-inf"))
        p = tl.exp(log_p)
        p_u += tl.sum(p * tl.where(ok, log_p + log_v, 0.0), 1)
        vt = tl.load(v_ptr + cols[None, :] * stride_v + dcols[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        dp = mma(g, vt, tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC), PREC_DP)
        ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
        kt = tl.load(k_ptr + cols[:, None] * stride_k + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        dx = mma(ds.to(kt.dtype), kt, dx, PREC_X)
        rowsum += tl.sum(ds, 1)
    y = tl.load(y_ptr + rows[:, None] * stride_y + dcols[None, :], mask=xd_ok, other=0.0).to(ACC)
    dx = (dx - rowsum[:, None] * y) * ((2.0 if L2 else 1.0) * inv_tau)
    tl.store(gx_ptr + rows[:, None] * stride_gx + dcols[None, :], dx.to(gx_ptr.dtype.element_ty), mask=xd_ok)
    tl.atomic_add(dtau_ptr, -tl.sum(tl.where(row_ok, rowsum * p_u, 0.0), 0))


def backward(grad_y, x, keys, values, tau, l2, y, lse):
    """Backend contract: (grad_x, grad_keys | None, grad_values, grad_tau) of sum(grad_y * y).

    dx_t  = k (sum_v ds_tv c_v - y_t sum_v ds_tv)            (the y term is zero in exact arithmetic and
                                                             cancels rounding noise when p is one-hot)
    dc_v  = sum_t p_tv g_t + k (sum_t ds_tv x_t - c_v sum_t ds_tv)   (l2; dot drops the c_v term)
    dtau  = -(1/tau) sum_tv ds_tv log p_tv                    with k = (2 if l2 else 1) / tau.

    dtau is a covariance under p, often far smaller than its terms (near-uniform p: log p ~ -log V for
    every code), so it is summed as sum_tv ds u - sum_t (sum_v ds_tv)(sum_v p_tv u_tv) with centred
    scores u = log p + log V: exact for any per-row shift since sum_v ds = 0, and the second term takes
    off the part of ds that does not sum to zero in floating point (delta comes from the forward's
    rounded y, ds from the recomputed p). One-hot rows: both terms are ds* u*, so exactly 0.
    """
    check_interpreter_dtypes(grad_y, x, keys, values)
    shared = values is keys
    x, keys, g = rows_contiguous(x), rows_contiguous(keys), rows_contiguous(grad_y)
    values = keys if shared else rows_contiguous(values)
    y, lse = rows_contiguous(y), lse.contiguous()
    T, d = x.shape
    V = keys.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    cfg = configs.get_config(V, d, x.dtype, device)  # the score operands' dtype (fp32 for cosine)
    key_mul = 2.0 if l2 else 1.0
    # Every codebook row is written once, complete (so a shared codebook's gradient is stored in its dtype).
    new = torch.zeros if T == 0 else torch.empty
    grad_values = new(V, d, dtype=values.dtype if shared else acc, device=device)
    grad_keys = None if shared else new(V, d, dtype=acc, device=device)
    if T == 0:
        return torch.zeros(0, d, dtype=acc, device=device), grad_keys, grad_values, torch.zeros((), dtype=acc, device=device)
    tau1 = tau.reshape(1)
    knorm = rowdot(keys) if l2 else None
    xoff = x_offset(x, tau) if l2 else None
    sums = {
        "delta": rowdot(g, y),  # <g_t, y_t> = sum_v p_tv dp_tv
        "dtau": torch.zeros(1, dtype=acc, device=device),
        "log_v": math.log(V),
    }
    d_pad = triton.next_power_of_2(d)
    if d_pad <= cfg.fused_bwd_max_d:
        return _fused_backward(cfg, g, x, keys, values, tau, l2, y, lse, knorm, xoff, sums, grad_keys, grad_values, d_pad)
    sums["rowsum"] = torch.zeros(T, dtype=acc, device=device)
    sums["colsum"] = torch.zeros(V, dtype=acc, device=device)
    sums["p_u"] = torch.zeros(T, dtype=acc, device=device)
    grad_x = torch.zeros(T, d, dtype=acc, device=device)
    if cfg.score_gemm:  # the forward's chunks: the same cuBLAS products, so bitwise the same scores
        chunks = score_chunks(cfg, T, V)
    else:
        width = _chunk_width(cfg, T, V, max(g.element_size(), x.element_size()))
        chunks = [(start, min(start + width, V)) for start in range(0, V, width)]
    width = chunks[0][1] - chunks[0][0]
    p_work = torch.empty(T, width, dtype=g.dtype, device=device)
    ds_work = torch.empty(T, width, dtype=x.dtype, device=device)
    if cfg.score_gemm:
        return _backward_score_gemm(cfg, g, x, keys, values, tau, l2, y, lse, knorm, xoff, sums, chunks,
                                    p_work, ds_work, grad_x, grad_keys, grad_values)
    for start, stop in chunks:
        n = stop - start
        stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau1, lse=lse, xoff=xoff, v_start=start, v_stop=stop,
                    l2=l2, p_out=p_work, grad=dict(sums, g=g, values=values, ds_out=ds_work))
        p, ds = p_work[:, :n], ds_work[:, :n]
        k_rows = keys[start:stop]
        rowsub = (sums["colsum"][start:stop], k_rows) if l2 else None
        matmul_into(grad_x, ds, k_rows, cfg, tau=tau1, accumulate=True)
        if shared:
            matmul_into(grad_values[start:stop], p.T, g, cfg, tau=tau1, second=(ds.T, x), rowsub=rowsub, scale=key_mul)
        else:
            matmul_into(grad_values[start:stop], p.T, g, cfg, tau=tau1)
            matmul_into(grad_keys[start:stop], ds.T, x, cfg, tau=tau1, rowsub=rowsub, scale=key_mul)
    grad_x.sub_(y.to(acc) * sums["rowsum"][:, None]).mul_(key_mul / tau)
    grad_tau = -(sums["dtau"].reshape(()) - torch.dot(sums["rowsum"], sums["p_u"])) / tau
    return grad_x, grad_keys, grad_values, grad_tau


def _backward_score_gemm(cfg, g, x, keys, values, tau, l2, y, lse, knorm, xoff, sums, chunks,
                         p_work, ds_work, grad_x, grad_keys, grad_values):
    """The staged backward with every product on cuBLAS: per chunk S = x K_c^T and dP = g V_c^T (fp32),
    the staging kernel writes p and ds pre-scaled by k = (2 if l2 else 1) / tau (so no GEMM needs an
    epilogue), then dx += ds K_c and the chunk's codebook rows P^T g + ds^T x - k c_v sum_t ds, added by
    cuBLAS into fp32 accumulators. 10 T V d FLOPs, all GEMM."""
    acc = grad_x.dtype
    tau1 = tau.reshape(1)
    key_scale = (2.0 if l2 else 1.0) / tau1  # (1,) on the device: no host sync
    shared = grad_keys is None
    for start, stop in chunks:
        n = stop - start
        grad = dict(sums, g=g, values=values, ds_out=ds_work, scale_ds=True,
                    dp_chunk=mm_acc(g, values[start:stop].T, acc))
        stage_chunk(cfg, x=x, keys=keys, knorm=knorm, tau=tau1, lse=lse, xoff=xoff, v_start=start, v_stop=stop,
                    l2=l2, p_out=p_work, grad=grad, s_chunk=mm_acc(x, keys[start:stop].T, acc))
        p, ds, k_rows = p_work[:, :n], ds_work[:, :n], keys[start:stop]
        addmm_acc(grad_x, ds, k_rows)
        value_rows = mm_acc(p.T, g, acc)
        key_rows = value_rows if shared else mm_acc(ds.T, x, acc)
        if shared:
            addmm_acc(key_rows, ds.T, x)
        if l2:
            key_rows.addcmul_(k_rows, (sums["colsum"][start:stop] * key_scale)[:, None], value=-1.0)
        grad_values[start:stop].copy_(value_rows)
        if not shared:
            grad_keys[start:stop].copy_(key_rows)
    grad_x.sub_(y.to(acc) * (sums["rowsum"] * key_scale)[:, None])
    grad_tau = -(sums["dtau"].reshape(()) - torch.dot(sums["rowsum"], sums["p_u"])) / tau
    return grad_x, grad_keys, grad_values, grad_tau


def _fused_backward(cfg, g, x, keys, values, tau, l2, y, lse, knorm, xoff, sums, grad_keys, grad_values, d_pad):
    T, d = x.shape
    V = keys.shape[0]
    acc = acc_dtype(tau.dtype)
    tau1 = tau.reshape(1)
    knorm = knorm if knorm is not None else tau1
    xoff = xoff if xoff is not None else tau1
    shared = grad_keys is None
    gk = grad_values if shared else grad_keys
    common = dict(L2=l2, PREC_S=dot_precision(x.dtype, keys.dtype), PREC_DP=dot_precision(g.dtype, values.dtype),
                  ACC=tl_acc(acc), BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, D_PAD=d_pad,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _fused_codebook_kernel[(triton.cdiv(V, cfg.block_v),)](
        x, keys, values, g, knorm, tau1, lse, xoff, sums["delta"], grad_values, gk, sums["dtau"],
        T, V, d, sums["log_v"], x.stride(0), keys.stride(0), values.stride(0), g.stride(0), grad_values.stride(0), gk.stride(0),
        SHARED=shared, PREC_V=dot_precision(g.dtype), PREC_K=dot_precision(x.dtype), **common,
    )
    grad_x = torch.empty(T, d, dtype=acc, device=x.device)
    _fused_frames_kernel[(triton.cdiv(T, cfg.block_t),)](
        x, keys, values, g, y, knorm, tau1, lse, xoff, sums["delta"], grad_x,
        sums["dtau"], T, V, d, sums["log_v"], x.stride(0), keys.stride(0), values.stride(0), g.stride(0), y.stride(0), grad_x.stride(0),
        PREC_X=dot_precision(keys.dtype), **common,
    )
    return grad_x, grad_keys, grad_values, -sums["dtau"].reshape(()) / tau
