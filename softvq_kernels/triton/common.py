"""Pieces shared by the forward and backward launchers: the score tile, the staging kernel that
writes exact probability (and, in backward, score-gradient) tiles of one vocabulary chunk, the
fp32-accumulating GEMM that consumes those tiles, and a row dot-product kernel (squared norms).

Every score tile in the backend comes from ``score_tile``: the forward's online pass, the staging
kernel and the backward recompute the same scores bit for bit (same BLOCK_K, same expression), so
p = exp((a - x_offset) - lse) is exactly 1 at the argmax when the softmax is one-hot.
"""

from __future__ import annotations

import os
import warnings

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


# TMA (KernelConfig.tma): the kernels that read their tiles through tensor descriptors check these first.
TMA_MAX_BOX = 256  # elements per dimension of one TMA box (cuTensorMapEncodeTiled)


class TMAFallback(UserWarning):
    """KernelConfig.tma was asked for but an input does not qualify: the pointer path ran instead."""


def tma_fallback_reason(tensors, boxes, device: torch.device,
                        names=("frames", "codebook", "upstream gradient")) -> str | None:
    """Why the TMA path cannot read ``tensors`` (2-D, last dim contiguous) in boxes of ``boxes`` (per tensor, a
    list of (rows, cols) box shapes), or None when it can. TMA needs a 16-byte aligned base, 16-byte aligned row
    strides, a unit last stride, boxes of at most 256 elements per dimension with >= 16 bytes in the last one,
    and a GPU that has it (sm_90+); Triton's interpreter (CPU) and meta tensors (static_check) check the same
    layout rules. The pointer path runs when this is not None: never a wrong answer."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            return f"TMA needs sm_90 or newer (this GPU is sm_{major}{minor})"
    for name, t, shapes in zip(names, tensors, boxes):
        size = t.element_size()
        if t.dim() != 2 or t.stride(-1) != 1:
            return f"{name}: last dimension not contiguous"
        if t.device.type != "meta" and t.data_ptr() % 16:
            return f"{name}: base address {t.data_ptr():#x} not 16-byte aligned"
        if (t.stride(0) * size) % 16:
            return (f"{name}: row stride {t.stride(0)} x {size} B = {t.stride(0) * size} B is not a multiple of 16 B "
                    f"(pad rows to a multiple of {16 // size} elements)")
        for box in shapes:
            if max(box) > TMA_MAX_BOX:
                return f"{name}: TMA box {box} has a dimension over {TMA_MAX_BOX} elements"
            if box[-1] * size < 16:
                return f"{name}: TMA box {box} has {box[-1] * size} < 16 B in its last dimension"
    return None


def tma_aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t (rows, d) itself when TMA can address its rows, else a copy whose rows start 16 bytes apart (a view of
    a row-padded buffer): for an operand the launcher makes itself (the backward's upstream gradient, which
    autograd hands over contiguous, so with 2 d-byte rows at odd d), at the cost of one O(T d) copy."""
    size = t.element_size()
    if (t.stride(0) * size) % 16 == 0 and t.stride(-1) == 1 and (t.device.type == "meta" or t.data_ptr() % 16 == 0):
        return t
    width = -(-t.shape[1] * size // 16) * 16 // size
    return torch.empty(t.shape[0], width, dtype=t.dtype, device=t.device)[:, : t.shape[1]].copy_(t)


def _tma_workspace(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors (tl.make_tensor_descriptor) live in a global workspace that Triton gets
    from ``triton.set_allocator``'s allocator at launch. Set one (torch's caching allocator on the current
    device) unless one is already set in this context: a user's allocator is never replaced."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_workspace)


def use_tma(cfg, tensors, boxes, device: torch.device) -> bool:
    """Whether a launch may take its TMA path: cfg.tma and the inputs qualify (else a TMAFallback warning
    naming why, and the pointer path). On a GPU it also makes sure a descriptor workspace allocator is set."""
    if not cfg.tma:
        return False
    reason = tma_fallback_reason(tensors, boxes, device)
    if reason is not None:
        warnings.warn(f"KernelConfig.tma: pointer path instead of TMA: {reason}", TMAFallback, stacklevel=3)
        return False
    if device.type == "cuda":
        ensure_tma_allocator()
    return True


def online_tma(cfg, x: torch.Tensor, codebook: torch.Tensor, acc_y: bool, d_pad: int) -> bool:
    """The TMA constexpr of an ``online_kernel`` launch that computes its own score tiles (not FROM_GEMM)."""
    codebook_boxes = [(cfg.block_v, cfg.block_k)] + ([(cfg.block_v, d_pad)] if acc_y else [])
    return use_tma(cfg, (x, codebook), ([(cfg.block_t, cfg.block_k)], codebook_boxes), x.device)


# Triton's CPU interpreter runs tl.dot as a numpy matmul, whose rounding depends on the output column
# (SIMD edge handling): identical codebook rows then get scores one ulp apart and the argmax's tie rule
# (lowest index) breaks. Under the interpreter ``mma`` therefore sums products column by column in the
# same order for every column, as the GPU's MMA units do.
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b at the precision chosen by ``dot_precision``."""
    if INTERPRETED:
        if PREC == 2:
            out = acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], 1)
        else:
            out = acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)
    elif PREC == 2:
        out = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
    elif PREC == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b.to(a.dtype), acc)
    return out


# Score kinds (the DIST constexpr of every kernel).
DIST_DOT = 0
DIST_L2 = 1
DIST_COSINE = 2
DIST_CODES = {"dot": DIST_DOT, "l2": DIST_L2, "cosine": DIST_COSINE}


@triton.jit
def score_tile(x_ptr, k_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
               DIST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               s_ptr, stride_s, s_col0, FROM_GEMM: tl.constexpr):
    """Shifted scores a_tv for a (BLOCK_T, BLOCK_V) tile; -inf past V.

    l2: (2<x,k> - ||k||^2)/tau (colv = ||k||^2; the true score is a - ||x||^2/tau); dot: <x,k>/tau;
    cosine: <x,k> r_t q_v / tau (rowv = r, colv = q: inverse norms, so no normalised copy exists).
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
    return score_scale(acc, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, DIST, ACC)


@triton.jit
def score_tile_tma(x_desc, k_desc, colv_ptr, rowv_ptr, inv_tau, row0, col0, rows, cols, row_ok, col_ok, D,
                   DIST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``score_tile`` with the frame and codebook tiles read through TMA tensor descriptors (x_desc: (T, D)
    in (BLOCK_T, BLOCK_K) blocks, k_desc: (V, D) in (BLOCK_V, BLOCK_K) blocks; KernelConfig.tma). TMA fills
    the rows / columns past T, V and D with zeros, which is what the pointer path's masked loads give, and the
    products run in the same k order with the same BLOCK_K, so the scores are those of ``score_tile``."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        xt = x_desc.load([row0, k0])
        kt = tma_transpose(k_desc.load([col0, k0]), BLOCK_V, BLOCK_K)
        acc = mma(xt, kt, acc, PREC)
    return score_scale(acc, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, DIST, ACC)


@triton.jit
def tma_transpose(tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    """tile.T of a (ROWS, COLS) tile read by TMA (the codebook tile as the B operand of x c^T). Under the
    interpreter numpy's transpose is a strided view whose sums round in another order than the pointer path's
    freshly gathered tile: lay it out again there, so both paths give the same bits."""
    out = tile.T
    if INTERPRETED:
        out = tl.reshape(tl.reshape(out, [COLS * ROWS]), [COLS, ROWS])
    return out


@triton.jit
def score_scale(acc, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, DIST: tl.constexpr, ACC: tl.constexpr):
    """The shifted scores of ``score_tile`` from the tile's <x, k> products ``acc``; -inf past V."""
    if DIST == 1:
        knorm = tl.load(colv_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        a = acc * (2.0 * inv_tau) - knorm[None, :] * inv_tau
    elif DIST == 2:
        q = tl.load(colv_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        r = tl.load(rowv_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        a = acc * r[:, None] * q[None, :] * inv_tau
    else:
        a = acc * inv_tau
    return tl.where(col_ok[None, :], a, float("-inf"))


@triton.jit
def rowdot_block(a_ptr, b_ptr, rows, row_ok, D, stride_a, stride_b, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """sum_k a[r, k] b[r, k] for BLOCK_R rows. Every squared norm of the backend comes from here with
    BLOCK_R = ROWDOT_BLOCK_R, BLOCK_D = rowdot_block_d(D) and 4 warps, so all launchers get the same bits."""
    total = tl.zeros((BLOCK_R,), dtype=ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (ks < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + rows[:, None] * stride_b + ks[None, :], mask=ok, other=0.0).to(ACC)
        total += tl.sum(a * b, 1)
    return total


ROWDOT_BLOCK_R = 16


def rowdot_block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 256)


@triton.jit
def online_kernel(x_ptr, c_ptr, colv_ptr, rowv_ptr, tau_ptr,
                   m_ptr, l_ptr, idx_ptr, acc_ptr, s_ptr, xoff_ptr, lse_ptr,
                   T, V, D, tiles_per_split, tile0, slot0,
                   stride_x, stride_c, stride_acc_s, stride_acc_t, stride_s,
                   DIST: tl.constexpr, ACC_Y: tl.constexpr, FROM_GEMM: tl.constexpr, FINISH: tl.constexpr,
                   PREC_S: tl.constexpr, PREC_Y: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   D_PAD: tl.constexpr, TMA: tl.constexpr = False):
    """Program (t-block, split): online max m, sum l (relative to m), first argmax, and with ACC_Y the
    unnormalised sum_v exp(a - m) c_v over the split's vocabulary tiles; written to the split's slot.
    FROM_GEMM: the tiles tile0 + [0, tiles_per_split) of one vocabulary chunk whose <x, c> products cuBLAS
    wrote to s_ptr (column tile0 * BLOCK_V first), into slot slot0 + split (V: the chunk's end).
    FINISH (one split only): write the final results instead of partials: idx (T,), the true lse
    m + log l - xoff (T,) (xoff_ptr: ||x||^2 / tau for l2) and y = acc / l (T, d) into acc_ptr.
    TMA (not with FROM_GEMM; the launcher checks ``tma_fallback_reason`` first): the frame and codebook tiles
    (score operands, and with ACC_Y the (BLOCK_V, D_PAD) codebook tile of the output product) are read through
    device-side tensor descriptors (UTMALDG on sm_90; the launcher sets triton's allocator for their workspace).
    FLOPs: 2 T V d for the scores, 2 T V d more with ACC_Y."""
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
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[stride_x, 1], block_shape=[BLOCK_T, BLOCK_K])
        k_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, BLOCK_K])
        if ACC_Y:
            v_desc = tl.make_tensor_descriptor(c_ptr, shape=[V, D], strides=[stride_c, 1], block_shape=[BLOCK_V, D_PAD])
    first = tile0 + split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        if TMA:
            a = score_tile_tma(x_desc, k_desc, colv_ptr, rowv_ptr, inv_tau, pid_t * BLOCK_T, tile * BLOCK_V, rows, cols,
                               row_ok, col_ok, D, DIST, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K)
        else:
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
            if TMA:
                vt = v_desc.load([tile * BLOCK_V, 0])
            else:
                vt = tl.load(c_ptr + cols[:, None] * stride_c + dcols[None, :],
                             mask=col_ok[:, None] & (dcols < D)[None, :], other=0.0)
            acc = mma(p.to(vt.dtype), vt, acc * alpha[:, None], PREC_Y)
        m = m_new
    if FINISH:
        lse = m + tl.log(l)
        if DIST == 1:
            lse = lse - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)
        if ACC_Y:
            ptrs = acc_ptr + rows[:, None] * stride_acc_t + dcols[None, :]
            tl.store(ptrs, acc / l[:, None], mask=row_ok[:, None] & (dcols < D)[None, :])
    else:
        out = (slot0 + split) * T + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, l, mask=row_ok)
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=row_ok)
        if ACC_Y:
            ptrs = acc_ptr + split * stride_acc_s + rows[:, None] * stride_acc_t + dcols[None, :]
            tl.store(ptrs, acc, mask=row_ok[:, None] & (dcols < D)[None, :])


@triton.jit
def _rowdot_kernel(a_ptr, b_ptr, out_ptr, R, D, stride_a, stride_b,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    total = rowdot_block(a_ptr, b_ptr, rows, row_ok, D, stride_a, stride_b, ACC, BLOCK_R, BLOCK_D)
    tl.store(out_ptr + rows, total, mask=row_ok)


def rowdot(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k a[r, k] * b[r, k] per row in the accumulation dtype (b defaults to a: squared norms)."""
    b = a if b is None else b
    R, D = a.shape
    acc = acc_dtype(a.dtype if a.dtype == torch.float64 else b.dtype)
    out = torch.empty(R, dtype=acc, device=a.device)
    if R == 0:
        return out
    _rowdot_kernel[(triton.cdiv(R, ROWDOT_BLOCK_R),)](
        a, b, out, R, D, a.stride(0), b.stride(0), ACC=tl_acc(acc), BLOCK_R=ROWDOT_BLOCK_R, BLOCK_D=rowdot_block_d(D),
        num_warps=4,
    )
    return out


@triton.jit
def _stage_kernel(x_ptr, k_ptr, colv_ptr, rowv_ptr, tau_ptr, lse_ptr, xoff_ptr,
                  p_ptr, counts_ptr, w_ptr, wsum_ptr,
                  g_ptr, delta_ptr, gamma_ptr, gn_ptr, ds_ptr,
                  colsum_ptr, rowsum_ptr, ds_u_ptr, p_u_ptr, ds_s_ptr,
                  s_ptr, dp_ptr,
                  T, D, v_start, v_stop, log_v,
                  stride_x, stride_k, stride_g, stride_p, stride_ds, stride_s,
                  DIST: tl.constexpr, STORE_P: tl.constexpr, COUNTS: tl.constexpr, ROW_WEIGHTED: tl.constexpr,
                  BACKWARD: tl.constexpr, HAS_GN: tl.constexpr, FROM_GEMM: tl.constexpr,
                  PREC_S: tl.constexpr, PREC_DP: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_T, BLOCK_V) tile of the chunk [v_start, v_stop): exact p = exp(s - lse) from the
    final lse; optionally stores p (column v - v_start of the workspace), adds the column sums of p to
    counts, and (ROW_WEIGHTED) sum_v p_tv w_v to wsum_t (the counts-gradient term). BACKWARD:
    ds = p (<g, c> + gn_v - delta'_t), or gamma_t where p is exactly 1 (one-hot rows: what a delta
    formed from the same dp gives, exactly); stores ds * kappa_v (kappa = (2 if l2 else 1) / tau, times
    q_v for cosine) and adds with atomics: row sums of ds, ds * u and p * u (u = s - (lse - log V)), column
    sums of ds (l2) or ds * s (cosine). FROM_GEMM: <x, k> and <g, c> are read from cuBLAS products of
    the chunk (s_ptr, dp_ptr: (T, chunk) fp32, row stride stride_s)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < v_stop
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
    a = score_tile(x_ptr, k_ptr, colv_ptr, rowv_ptr, inv_tau, rows, cols, row_ok, col_ok, D, stride_x, stride_k,
                   DIST, PREC_S, ACC, BLOCK_T, BLOCK_V, BLOCK_K, s_ptr, stride_s, v_start, FROM_GEMM)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    if DIST == 1:
        a = a - tl.load(xoff_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    log_p = tl.where(ok, a - lse[:, None], float("-inf"))
    p = tl.exp(log_p)
    wcols = cols - v_start
    if STORE_P:
        tl.store(p_ptr + rows[:, None] * stride_p + wcols[None, :], p.to(p_ptr.dtype.element_ty), mask=ok)
    if COUNTS:
        tl.atomic_add(counts_ptr + cols, tl.sum(p, 0), mask=col_ok)
    if ROW_WEIGHTED:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        tl.atomic_add(wsum_ptr + rows, tl.sum(p * w[None, :], 1), mask=row_ok)
    if BACKWARD:
        if FROM_GEMM:
            dp = tl.load(dp_ptr + rows[:, None] * stride_s + wcols[None, :], mask=ok, other=0.0).to(ACC)
        else:
            dp = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                gt = tl.load(g_ptr + rows[:, None] * stride_g + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                vt = tl.load(k_ptr + cols[None, :] * stride_k + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                dp = mma(gt, vt, dp, PREC_DP)
        if HAS_GN:
            dp = dp + tl.load(gn_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        gamma = tl.load(gamma_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        ds = tl.where(p == 1.0, gamma[:, None], p * (dp - delta[:, None]))
        ds = tl.where(ok, ds, 0.0)
        u = tl.where(ok, a - (lse - log_v)[:, None], 0.0)  # one rounding from the true score (score_centre)
        tl.atomic_add(rowsum_ptr + rows, tl.sum(ds, 1), mask=row_ok)
        tl.atomic_add(ds_u_ptr + rows, tl.sum(ds * u, 1), mask=row_ok)
        tl.atomic_add(p_u_ptr + rows, tl.sum(p * u, 1), mask=row_ok)
        if DIST == 1:
            tl.atomic_add(colsum_ptr + cols, tl.sum(ds, 0), mask=col_ok)
            kappa = 2.0 * inv_tau
            ds_k = ds * kappa
        elif DIST == 2:
            s_true = tl.where(ok, a, 0.0)
            tl.atomic_add(ds_s_ptr + cols, tl.sum(ds * s_true, 0), mask=col_ok)
            q = tl.load(colv_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            ds_k = ds * (q * inv_tau)[None, :]
        else:
            ds_k = ds * inv_tau
        tl.store(ds_ptr + rows[:, None] * stride_ds + wcols[None, :], ds_k.to(ds_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr,
               M, N, K,
               s_am, s_ak, s_bk, s_bn, s_a2m, s_a2k, s_b2k, s_b2n, s_cm,
               HAS_SECOND: tl.constexpr, ACCUMULATE: tl.constexpr,
               PREC1: tl.constexpr, PREC2: tl.constexpr, ACC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (+)= A @ B [+ A2 @ B2]: fp32 (fp64) accumulation, stored in C's dtype."""
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PREC1)
        if HAS_SECOND:
            a2 = tl.load(a2_ptr + rm[:, None] * s_a2m + rk[None, :] * s_a2k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptr + rk[:, None] * s_b2k + rn[None, :] * s_b2n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a2, b2, acc, PREC2)
    ok = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0).to(ACC)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)


def matmul_into(c, a, b, cfg, *, second=None, accumulate=False):
    """c (M, N) (+)= a @ b [+ a2 @ b2] with second = (a2, b2); a, b may be transposed views; c must be
    rows-contiguous. cuBLAS (fp32 output) takes 16-bit CUDA tiles when the config says so."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if cfg.gemm == "cublas" and cublas_can_take(c, a, b, *(second or ())):
        if c.dtype == torch.float32:  # cuBLAS adds into the fp32 c itself: no temporary
            if not accumulate:
                c.copy_(_mm_fp32(a, b))
            else:
                addmm_acc(c, a, b)
            if second is not None:
                addmm_acc(c, *second)
            return c
        out = _mm_fp32(a, b)
        if second is not None:
            addmm_acc(out, *second)
        return c.add_(out) if accumulate else c.copy_(out)
    a2, b2 = second if second is not None else (a, b)
    grid = (triton.cdiv(M, cfg.mm_block_m) * triton.cdiv(N, cfg.mm_block_n),)
    _mm_kernel[grid](
        a, b, a2, b2, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), c.stride(0),
        HAS_SECOND=second is not None, ACCUMULATE=accumulate,
        PREC1=dot_precision(a.dtype, b.dtype), PREC2=dot_precision(a2.dtype, b2.dtype),
        ACC=tl_acc(acc_dtype(c.dtype)),
        BLOCK_M=cfg.mm_block_m, BLOCK_N=cfg.mm_block_n, BLOCK_K=cfg.mm_block_k, GROUP_M=8,
        num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
    )
    return c


LOW_PRECISION = (torch.float16, torch.bfloat16)


def cublas_can_take(c, *operands) -> bool:
    dtype = operands[0].dtype
    return (c.is_cuda and c.dtype in (torch.float32, dtype) and dtype in LOW_PRECISION
            and all(t.dtype == dtype for t in operands))


def _mm_fp32(a, b):
    """a @ b of 16-bit operands with an fp32 result (cuBLAS accumulates in fp32 either way; this keeps it)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def mm_acc(a, b, acc: torch.dtype) -> torch.Tensor:
    """a @ b in the accumulation dtype: cuBLAS with an fp32 result for 16-bit CUDA operands; otherwise
    the operands cast to acc (fp32 GEMMs stay IEEE fp32: torch does not use TF32 for matmul by default;
    the interpreter tests take this branch)."""
    if a.is_cuda and acc == torch.float32 and a.dtype in LOW_PRECISION and b.dtype == a.dtype:
        return _mm_fp32(a, b)
    return a.to(acc) @ b.to(acc)


_addmm_out_dtype_works: bool | None = None


def addmm_acc(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a @ b in c's (accumulation) dtype, in place: for 16-bit CUDA operands cuBLAS adds into the fp32 c
    itself (beta = 1, no temporary), else through ``mm_acc``."""
    global _addmm_out_dtype_works
    if a.is_cuda and c.dtype == torch.float32 and a.dtype in LOW_PRECISION and b.dtype == a.dtype:
        if _addmm_out_dtype_works is not False:
            try:
                torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
                _addmm_out_dtype_works = True
                return c
            except (RuntimeError, TypeError):  # a torch without fp32-output addmm: the temporary below
                _addmm_out_dtype_works = False
    return c.add_(mm_acc(a, b, c.dtype))


def stage_chunk(cfg, *, x, codebook, scoring, tau, lse, xoff, v_start, v_stop,
                p_out=None, counts=None, row_weights=None, grad=None, s_chunk=None):
    """Launch ``_stage_kernel`` over rows x chunk columns [v_start, v_stop).

    scoring: (DIST code, colv (V,) or None, rowv (T,) or None) as ``score_operands`` returns.
    row_weights: None or (w (V,), out (T,)): out_t += sum_v p_tv w_v.
    grad: None (forward) or a dict with g, delta, gamma, gn (or None), ds_out, rowsum, ds_u, p_u,
    colsum (l2), ds_s (cosine), log_v, and with s_chunk also dp_chunk (backward).
    s_chunk: None (scores from the kernel's own dot products) or the chunk's <x, k> products
    (T, v_stop - v_start) fp32 from cuBLAS (``mm_acc``).
    """
    T, D = x.shape
    if T == 0 or v_stop <= v_start:
        return
    dist, colv, rowv = scoring
    dummy = lse
    g = grad or {}
    grid = (triton.cdiv(T, cfg.block_t), triton.cdiv(v_stop - v_start, cfg.block_v))
    p_ptr = p_out if p_out is not None else dummy
    ds_ptr = g.get("ds_out", dummy)
    g_ptr = g.get("g", x)
    from_gemm = s_chunk is not None
    s_ptr = s_chunk if from_gemm else dummy
    dp_ptr = g.get("dp_chunk", dummy) if from_gemm else dummy
    if from_gemm and grad is not None and dp_ptr.stride() != s_ptr.stride():
        raise AssertionError("the S and dP chunks must share a layout")
    w, wsum = row_weights if row_weights is not None else (dummy, dummy)
    gn = g.get("gn")
    # The counts-only launch (p's column sums, nothing stored) may run on its own warp count
    # (cfg.counts_num_warps): its p only feeds a sum, so its scores need not share the online kernel's bits.
    counts_only = p_out is None and grad is None and row_weights is None

    def opt(t):
        return dummy if t is None else t

    _stage_kernel[grid](
        x, codebook, opt(colv), opt(rowv), tau, lse, opt(xoff),
        p_ptr, opt(counts), w, wsum,
        g_ptr, g.get("delta", dummy), g.get("gamma", dummy), opt(gn), ds_ptr,
        opt(g.get("colsum")), g.get("rowsum", dummy), g.get("ds_u", dummy), g.get("p_u", dummy), opt(g.get("ds_s")),
        s_ptr, dp_ptr,
        T, D, v_start, v_stop, float(g.get("log_v", 0.0)),
        x.stride(0), codebook.stride(0), g_ptr.stride(0),
        p_ptr.stride(0) if p_out is not None else 0, ds_ptr.stride(0) if grad is not None else 0,
        s_ptr.stride(0) if from_gemm else 0,
        DIST=dist, STORE_P=p_out is not None, COUNTS=counts is not None, ROW_WEIGHTED=row_weights is not None,
        BACKWARD=grad is not None, HAS_GN=gn is not None, FROM_GEMM=from_gemm,
        PREC_S=dot_precision(x.dtype, codebook.dtype),
        PREC_DP=dot_precision(g_ptr.dtype, codebook.dtype), ACC=tl_acc(tau.dtype),
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=counts_only and cfg.counts_num_warps or cfg.num_warps, num_stages=cfg.num_stages,
    )


def score_operands(x, codebook, tau, scoring):
    """(DIST code, colv, rowv) for the kernels, and xoff = ||x||^2 / tau (l2: true score = a - xoff) or None.

    Computed once per call and identically in forward and backward, so scores are bitwise equal."""
    dist = DIST_CODES[scoring.distance]
    if dist == DIST_L2:
        return (dist, rowdot(codebook), None), rowdot(x) / tau
    if dist == DIST_COSINE:
        return (dist, scoring.codebook_inv_norm.contiguous(), scoring.x_inv_norm.contiguous()), None
    return (dist, None, None), None
