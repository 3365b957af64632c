"""Pieces shared by the forward and backward launchers: the score tile, the staging kernel that
writes exact probability (and, in backward, score-gradient) tiles of one vocabulary chunk, the
fp32-accumulating GEMM that consumes those tiles, and a row dot-product kernel (squared norms).

Every score tile in the backend comes from ``score_tile``: the forward's online pass, the staging
kernel and the backward recompute the same scores bit for bit (same BLOCK_K, same expression), so
p = exp((a - x_offset) - lse) is exactly 1 at the argmax when the softmax is one-hot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Precision of one tl.dot, chosen on the host from the operand dtypes.
PREC_NATIVE = 0  # both operands share a 16-bit dtype: tensor cores, fp32 accumulator
PREC_FP32 = 1  # any fp32 operand: both cast to fp32, "ieee" (no TF32: fp32 results match eager fp32)
PREC_FP64 = 2  # any fp64 operand (gradcheck): fp64 throughout


def dot_precision(*dtypes: torch.dtype) -> int:
    if torch.float64 in dtypes:
        return PREC_FP64
    if torch.float32 in dtypes or len(set(dtypes)) > 1:
        return PREC_FP32
    return PREC_NATIVE


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_interpreter_dtypes(*tensors: torch.Tensor) -> None:
    """Triton's CPU interpreter computes bf16 tl.dot wrongly (relative error ~1e9 seen with triton 3.6):
    refuse rather than return garbage."""
    if any(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError(
            "backend='triton' on CPU runs Triton's interpreter, whose bfloat16 matrix products are wrong; "
            "use float32/float16 on CPU (or backend='chunked'), or bfloat16 on a CUDA device"
        )


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension has unit stride (row stride may be anything)."""
    return t if t.stride(-1) == 1 and t.stride(0) >= 0 else t.contiguous()


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b at the precision chosen by ``dot_precision``."""
    if PREC == 2:
        out = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
    elif PREC == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b.to(a.dtype), acc)
    return out


@triton.jit
def score_tile(x_ptr, k_ptr, knorm_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
               L2: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               s_ptr, stride_s, s_col0, FROM_GEMM: tl.constexpr):
    """a_tv for a (BLOCK_T, BLOCK_V) tile: l2 (2<x,k> - ||k||^2)/tau, dot <x,k>/tau; -inf past V.

    FROM_GEMM: <x, k> comes from a chunk of the (T, V) product already computed by cuBLAS (fp32, column
    v at v - s_col0) instead of the tile's own dot products (the cuBLAS-scores schedule, large d)."""
    if FROM_GEMM:
        acc = tl.load(s_ptr + rows[:, None] * stride_s + (cols - s_col0)[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            kt = tl.load(k_ptr + cols[None, :] * stride_k + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = mma(xt, kt, acc, PREC)
    if L2:
        knorm = tl.load(knorm_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        a = acc * (2.0 * inv_tau) - knorm[None, :] * inv_tau
    else:
        a = acc * inv_tau
    return tl.where(col_ok[None, :], a, float("-inf"))


@triton.jit
def _rowdot_kernel(a_ptr, b_ptr, out_ptr, R, D, stride_a, stride_b,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    total = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (ks < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + rows[:, None] * stride_b + ks[None, :], mask=ok, other=0.0).to(ACC)
        total += tl.sum(a * b, 1)
    tl.store(out_ptr + rows, total, mask=row_ok)


def rowdot(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k a[r, k] * b[r, k] per row in the accumulation dtype (b defaults to a: squared norms)."""
    b = a if b is None else b
    R, D = a.shape
    acc = acc_dtype(a.dtype if a.dtype == torch.float64 else b.dtype)
    out = torch.empty(R, dtype=acc, device=a.device)
    if R == 0:
        return out
    block_d = min(triton.next_power_of_2(D), 256)
    block_r = 16
    _rowdot_kernel[(triton.cdiv(R, block_r),)](
        a, b, out, R, D, a.stride(0), b.stride(0), ACC=tl_acc(acc), BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out


@triton.jit
def _stage_kernel(x_ptr, k_ptr, knorm_ptr, tau_ptr, lse_ptr, xoff_ptr,
                  p_ptr, counts_ptr,
                  g_ptr, v_ptr, delta_ptr, ds_ptr, colsum_ptr, rowsum_ptr, dtau_ptr, p_u_ptr,
                  s_ptr, dp_ptr,
                  T, D, v_start, v_stop, log_v,
                  stride_x, stride_k, stride_g, stride_v, stride_p, stride_ds, stride_s,
                  L2: tl.constexpr, STORE_P: tl.constexpr, COUNTS: tl.constexpr, BACKWARD: tl.constexpr,
                  FROM_GEMM: tl.constexpr, SCALE_DS: tl.constexpr,
                  PREC_S: tl.constexpr, PREC_DP: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_T, BLOCK_V) tile of the chunk [v_start, v_stop): exact p = exp(s - lse) from the
    final lse; optionally stores p (column v - v_start of the workspace), adds column sums of p to
    counts, and (BACKWARD) stores ds = p (<g, v> - delta), adds its column sums (l2 key term), its
    row sums (dx rewrite), sum ds * u and the row sums of p * u (temperature, u = log p + log V: see
    softvq_kernels.triton.backward.backward) with atomics. FROM_GEMM: <x, k> and <g, v> are read from
    cuBLAS products of the chunk (s_ptr, dp_ptr: (T, chunk) fp32, row stride stride_s)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < v_stop
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    a = score_tile(x_ptr, k_ptr, knorm_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
                   L2, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, s_ptr, stride_s, v_start, FROM_GEMM)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if L2:
        a = a - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    log_p = tl.where(ok, a - lse[:, None], float("-inf"))
    p = tl.exp(log_p)
    wcols = cols - v_start
    if STORE_P:
        tl.store(p_ptr + rows[:, None] * stride_p + wcols[None, :], p.to(p_ptr.dtype.element_ty), mask=ok)
    if COUNTS:
        tl.atomic_add(counts_ptr + cols, tl.sum(p, 0), mask=col_ok)
    if BACKWARD:
        if FROM_GEMM:
            dp = tl.load(dp_ptr + rows[:, None] * stride_s + wcols[None, :], mask=ok, other=0.0).to(ACC)
        else:
            dp = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                gt = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                vt = tl.load(v_ptr + cols[None, :] * stride_v + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                dp = mma(gt, vt, dp, PREC_DP)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        ds = tl.where(ok, p * (dp - delta[:, None]), 0.0)
        if SCALE_DS:  # stored as d a / d<x, k> * ds, so the GEMMs over it need no epilogue scale
            ds_out = ds * ((2.0 if L2 else 1.0) * inv_tau)
        else:
            ds_out = ds
        tl.store(ds_ptr + rows[:, None] * stride_ds + wcols[None, :], ds_out.to(ds_ptr.dtype.element_ty), mask=ok)
        if L2:
            tl.atomic_add(colsum_ptr + cols, tl.sum(ds, 0), mask=col_ok)
        tl.atomic_add(rowsum_ptr + rows, tl.sum(ds, 1), mask=row_ok)
        u = tl.where(ok, log_p + log_v, 0.0)
        tl.atomic_add(p_u_ptr + rows, tl.sum(p * u, 1), mask=row_ok)
        tl.atomic_add(dtau_ptr, tl.sum(tl.sum(ds * u, 1), 0))


@triton.jit
def _mm_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, r_ptr, e_ptr, c_ptr, tau_ptr,
               M, N, K, alpha_mul,
               s_am, s_ak, s_bk, s_bn, s_a2m, s_a2k, s_b2k, s_b2n, s_em, s_cm,
               HAS_SECOND: tl.constexpr, ROWSUB: tl.constexpr, SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
               PREC1: tl.constexpr, PREC2: tl.constexpr, ACC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (+)= A @ B  [+ alpha (A2 @ B2 - r E)]   or, with SCALE and no second product,
    C (+)= alpha (A @ B - r E); alpha = alpha_mul / tau. fp32 (fp64) accumulation, stored in C's dtype."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc1 = mma(a, b, acc1, PREC1)
        if HAS_SECOND:
            a2 = tl.load(a2_ptr + rm[:, None] * s_a2m + rk[None, :] * s_a2k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptr + rk[:, None] * s_b2k + rn[None, :] * s_b2n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = mma(a2, b2, acc2, PREC2)
    ok = m_ok[:, None] & n_ok[None, :]
    alpha = alpha_mul / tl.load(tau_ptr).to(ACC)
    if HAS_SECOND:
        scaled = acc2
    else:
        scaled = acc1
    if ROWSUB:
        r = tl.load(r_ptr + rm, mask=m_ok, other=0.0).to(ACC)
        e = tl.load(e_ptr + rm[:, None] * s_em + rn[None, :], mask=ok, other=0.0).to(ACC)
        scaled = scaled - r[:, None] * e
    if HAS_SECOND:
        out = acc1 + alpha * scaled
    elif SCALE:
        out = alpha * scaled
    else:
        out = scaled
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :]
    if ACCUMULATE:
        out += tl.load(c_ptrs, mask=ok, other=0.0).to(ACC)
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=ok)


def matmul_into(c, a, b, cfg, *, tau, second=None, rowsub=None, scale=None, accumulate=False):
    """c (M, N) (+)= a @ b [+ alpha (a2 @ b2 - r e)] with alpha = scale / tau; a, b may be transposed views.

    second: (a2, b2) or None; rowsub: (r (M,), e (M, N) rows-contiguous) or None; scale: float or None
    (None and no second product: plain a @ b). c must be rows-contiguous.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if cfg.gemm == "cublas" and _cublas_can_take(c, a, b, *(second or ())):
        return _cublas_matmul_into(c, a, b, tau=tau, second=second, rowsub=rowsub, scale=scale, accumulate=accumulate)
    a2, b2 = second if second is not None else (a, b)
    r, e = rowsub if rowsub is not None else (c, c)
    grid = (triton.cdiv(M, cfg.mm_block_m) * triton.cdiv(N, cfg.mm_block_n),)
    _mm_kernel[grid](
        a, b, a2, b2, r, e, c, tau, M, N, K, float(scale or 1.0),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), e.stride(0), c.stride(0),
        HAS_SECOND=second is not None, ROWSUB=rowsub is not None, SCALE=scale is not None,
        ACCUMULATE=accumulate,
        PREC1=dot_precision(a.dtype, b.dtype), PREC2=dot_precision(a2.dtype, b2.dtype),
        ACC=tl_acc(tau.dtype),
        BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k, GROUP_M=8,
        num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
    )
    return c


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cublas_can_take(c, *operands) -> bool:
    dtype = operands[0].dtype
    return (c.is_cuda and c.dtype in (torch.float32, dtype) and dtype in _LOW_PRECISION
            and all(t.dtype == dtype for t in operands))


def _mm_fp32(a, b):
    """a @ b of 16-bit operands with an fp32 result (cuBLAS accumulates in fp32 either way; this keeps it)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def mm_acc(a, b, acc: torch.dtype) -> torch.Tensor:
    """a @ b in the accumulation dtype: cuBLAS with an fp32 result for 16-bit CUDA operands; otherwise
    the operands cast to acc (fp32 GEMMs stay IEEE fp32: torch does not use TF32 for matmul by default;
    the interpreter tests take this branch)."""
    if a.is_cuda and acc == torch.float32 and a.dtype in _LOW_PRECISION and b.dtype == a.dtype:
        return _mm_fp32(a, b)
    return a.to(acc) @ b.to(acc)


_addmm_out_dtype_works: bool | None = None


def addmm_acc(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in c's (accumulation) dtype, in place: for 16-bit CUDA operands cuBLAS adds into the fp32 c
    itself (beta = 1, no temporary), else through ``mm_acc``."""
    global _addmm_out_dtype_works
    if a.is_cuda and c.dtype == torch.float32 and a.dtype in _LOW_PRECISION and b.dtype == a.dtype:
        if _addmm_out_dtype_works is not False:
            try:
                torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
                _addmm_out_dtype_works = True
                return c
            except (RuntimeError, TypeError):  # a torch without fp32-output addmm: the temporary below
                _addmm_out_dtype_works = False
    return c.add_(mm_acc(a, b, c.dtype))


def _cublas_matmul_into(c, a, b, *, tau, second, rowsub, scale, accumulate):
    """``matmul_into``'s contract on cuBLAS: fp32 products of 16-bit tiles, epilogue as tensor ops
    (alpha = scale / tau stays on the device: no host sync)."""
    if accumulate and second is None and scale is None and c.dtype == torch.float32:
        return addmm_acc(c, a, b)  # cuBLAS adds into c itself: no temporary
    out = _mm_fp32(a, b)
    if second is not None or scale is not None:
        scaled = _mm_fp32(*second) if second is not None else out
        if rowsub is not None:
            r, e = rowsub
            scaled.addcmul_(r[:, None], e, value=-1.0)
        scaled.mul_(float(scale or 1.0) / tau)
        if second is not None:
            out.add_(scaled)
    if accumulate:
        c.add_(out)
    else:
        c.copy_(out)
    return c


def stage_chunk(cfg, *, x, keys, knorm, tau, lse, xoff, v_start, v_stop, l2,
                p_out=None, counts=None, grad=None, s_chunk=None):
    """Launch ``_stage_kernel`` over rows x chunk columns [v_start, v_stop).

    grad: None (forward) or a dict with g, values, delta, ds_out, colsum, rowsum, dtau, p_u, log_v,
    optionally scale_ds (store ds times (2 if l2 else 1) / tau; the sums stay unscaled) (backward), and
    with s_chunk also dp_chunk. s_chunk: None (scores from the kernel's own dot
    products) or the chunk's <x, k> products (T, v_stop - v_start) fp32 from cuBLAS (``mm_acc``).
    """
    T, D = x.shape
    if T == 0 or v_stop <= v_start:
        return
    dummy = lse
    g = grad or {}
    values = g.get("values", keys)
    grid = (triton.cdiv(T, cfg.block_t), triton.cdiv(v_stop - v_start, cfg.block_v))
    p_ptr = p_out if p_out is not None else dummy
    ds_ptr = g.get("ds_out", dummy)
    g_ptr = g.get("g", x)
    from_gemm = s_chunk is not None
    s_ptr = s_chunk if from_gemm else dummy
    dp_ptr = g.get("dp_chunk", dummy) if from_gemm else dummy
    if from_gemm and grad is not None:
        assert dp_ptr.stride() == s_ptr.stride(), "the S and dP chunks must share a layout"
    _stage_kernel[grid](
        x, keys, knorm if knorm is not None else dummy, tau, lse, xoff if xoff is not None else dummy,
        p_ptr, counts if counts is not None else dummy,
        g_ptr, values, g.get("delta", dummy), ds_ptr,
        g.get("colsum", dummy), g.get("rowsum", dummy), g.get("dtau", dummy), g.get("p_u", dummy),
        s_ptr, dp_ptr,
        T, D, v_start, v_stop, float(g.get("log_v", 0.0)),
        x.stride(0), keys.stride(0), g_ptr.stride(0), values.stride(0),
        p_ptr.stride(0) if p_out is not None else 0, ds_ptr.stride(0) if grad is not None else 0,
        s_ptr.stride(0) if from_gemm else 0,
        L2=l2, STORE_P=p_out is not None, COUNTS=counts is not None, BACKWARD=grad is not None,
        FROM_GEMM=from_gemm, SCALE_DS=bool(g.get("scale_ds", False)),
        PREC_S=dot_precision(x.dtype, keys.dtype),
        PREC_DP=dot_precision(g_ptr.dtype, values.dtype), ACC=tl_acc(tau.dtype),
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
