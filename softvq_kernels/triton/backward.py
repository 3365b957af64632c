"""Backward: per vocabulary chunk, the staging kernel recomputes p = exp(s - lse) from the saved lse and
dp = <g, c>, forms ds (docs/math.md: with the lse / counts gradient terms and the one-hot rule),
writes p and ds * kappa (T x chunk each) and adds the row / column sums of ``BackwardPieces``; then
three products over the staged tiles give dx += ds_k C_chunk and the chunk's codebook rows
P^T g + ds_k^T x_rows in full. 10 T V d FLOPs; the staged tiles cost 10 bytes per 10 d FLOPs.
Nothing of size T x V is ever held: the chunk width comes from the workspace budget.
With KernelConfig.fused_backward (d <= fused_max_d) the FlashAttention-style kernels of flash.py run
instead: no staged tiles at all, three launches.
"""

from __future__ import annotations

import math

import torch
import triton

from softvq_kernels.backends import BackwardPieces, centre_vocab
from softvq_kernels.triton import configs, flash
from softvq_kernels.triton.common import (
    DIST_COSINE,
    DIST_L2,
    acc_dtype,
    addmm_acc,
    check_interpreter_dtypes,
    matmul_into,
    mm_acc,
    rowdot,
    rows_contiguous,
    score_operands,
    stage_chunk,
)
from softvq_kernels.triton.forward import expected_counts_gradient, score_chunks


def backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts):
    """Backend contract: the sums of ``BackwardPieces`` (softvq_kernels.epilogue finishes them)."""
    check_interpreter_dtypes(grad_y, x, codebook)
    x, codebook, g = rows_contiguous(x), rows_contiguous(codebook), rows_contiguous(grad_y)
    y, lse = rows_contiguous(y), lse.contiguous()
    T, d = x.shape
    V = codebook.shape[0]
    acc = acc_dtype(tau.dtype)
    device = x.device
    cfg = configs.get_config(V, d, x.dtype, device)
    if T > 0 and cfg.fused_backward and not cfg.score_gemm and triton.next_power_of_2(d) <= cfg.fused_max_d:
        return flash.backward(cfg, g, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts)
    tau1 = tau.reshape(1)
    operands, xoff = score_operands(x, codebook, tau, scoring)
    dist = operands[0]
    zeros_t = torch.zeros(T, dtype=acc, device=device)
    gamma = grad_lse.contiguous() if grad_lse is not None else zeros_t
    pieces = BackwardPieces(
        grad_x_raw=torch.zeros(T, d, dtype=acc, device=device),
        grad_codebook=(torch.zeros if T == 0 else torch.empty)(V, d, dtype=acc, device=device),
        ds_rows=torch.zeros(T, dtype=acc, device=device),
        ds_u_rows=torch.zeros(T, dtype=acc, device=device),
        p_u_rows=torch.zeros(T, dtype=acc, device=device),
        ds_cols=torch.zeros(V, dtype=acc, device=device) if dist == DIST_L2 else None,
        ds_s_cols=torch.zeros(V, dtype=acc, device=device) if dist == DIST_COSINE else None,
    )
    if T == 0:
        return pieces
    if cfg.score_gemm:  # the forward's chunks: the same cuBLAS products, so bitwise the same scores
        chunks = score_chunks(cfg, T, V)
    else:
        width = configs.chunk_width(cfg, T, V, max(g.element_size(), x.element_size()))
        chunks = [(start, min(start + width, V)) for start in range(0, V, width)]
    delta = rowdot(g, y) - gamma  # delta'_t = <g_t, y_t> + sum_v p_tv gn_v - gl_t
    if grad_counts is not None:
        delta += expected_counts_gradient(cfg, x, codebook, tau1, operands, xoff, lse, grad_counts,
                                          chunks if cfg.score_gemm else None)
    # Frames in the key-role product: raw, or scaled by their inverse norms for cosine (T x d, x's dtype).
    x_rows = x if dist != DIST_COSINE else (x.to(acc) * scoring.x_inv_norm.to(acc)[:, None]).to(x.dtype)
    width = chunks[0][1] - chunks[0][0]
    p_work = torch.empty(T, width, dtype=g.dtype, device=device)
    ds_work = torch.empty(T, width, dtype=x.dtype, device=device)
    sums = dict(g=g, delta=delta, gamma=gamma, gn=None if grad_counts is None else grad_counts.contiguous(),
                ds_out=ds_work, rowsum=pieces.ds_rows, ds_u=pieces.ds_u_rows, p_u=pieces.p_u_rows,
                colsum=pieces.ds_cols, ds_s=pieces.ds_s_cols, log_v=math.log(centre_vocab(scoring, V)))
    for start, stop in chunks:
        n = stop - start
        c_rows = codebook[start:stop]
        if cfg.score_gemm:
            grad = dict(sums, dp_chunk=mm_acc(g, c_rows.T, acc))
            stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau1, lse=lse, xoff=xoff, v_start=start,
                        v_stop=stop, p_out=p_work, grad=grad, s_chunk=mm_acc(x, c_rows.T, acc))
        else:
            stage_chunk(cfg, x=x, codebook=codebook, scoring=operands, tau=tau1, lse=lse, xoff=xoff, v_start=start,
                        v_stop=stop, p_out=p_work, grad=sums)
        p, ds_k = p_work[:, :n], ds_work[:, :n]
        if cfg.score_gemm:
            addmm_acc(pieces.grad_x_raw, ds_k, c_rows)
            rows = pieces.grad_codebook[start:stop]
            rows.copy_(mm_acc(p.T, g, acc))
            addmm_acc(rows, ds_k.T, x_rows)
        else:
            matmul_into(pieces.grad_x_raw, ds_k, c_rows, cfg, accumulate=True)
            matmul_into(pieces.grad_codebook[start:stop], p.T, g, cfg, second=(ds_k.T, x_rows))
    return pieces
