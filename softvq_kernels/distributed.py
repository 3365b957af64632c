"""Vocabulary-parallel soft VQ over ``torch.distributed``: the codebook is sharded by rows across a
process group (tensor parallelism: Megatron's VocabParallelEmbedding, an FSDP/DTensor row shard) and
never gathered.

    y, aux = sk.soft_vq(x, codebook_shard, tau, process_group=pg, return_aux=True)

Layout. Rank r of ``pg`` holds rows [offset_r, offset_r + V_r) of the full (V, d) codebook, ranks in
order, blocks contiguous and possibly uneven. ``offset_r`` is found with one all-gather of the shard
sizes per call, or passed as ``shard_offset=`` (SoftVQ caches it). ``x`` (T, d), ``mask`` and the
temperature must be identical on every rank, as in tensor parallelism.

Forward. Each rank runs the fused backend on its shard: y_r (T, d), lse_r (T,) and the local argmax.
The partials merge exactly by their log-sum-exp:

    m_t   = max_r lse_r,t                       all-reduce MAX #1 (packed with the best local score)
    S_t   = sum_r exp(lse_r,t - m_t)            all-reduce SUM #2 (packed: S, S*y, argmax slots)
    lse_t = m_t + log S_t,   y_t = sum_r exp(lse_r,t - m_t) y_r,t / S_t

``indices`` is the global argmax (ties: the lowest global index, i.e. the lowest rank holding a best
code). ``y``, ``lse`` and ``indices`` are identical on every rank; ``code_counts`` (V_r,) is this rank's
own shard of the global soft counts n_v = sum_t exp(s_tv - lse_t) (a second pass over the shard with
the global lse, as the unsharded op does for counts).

Backward. Each rank runs the backend's backward on its shard with the global y and lse, so every
dL/ds_tv is the unsharded one; the shard's codebook gradient stays local. The x gradient is the sum
over ranks of the shard contributions: all-reduced by default (``reduce_x_grad=True``); with
``reduce_x_grad=False`` each rank keeps its partial sum (for Megatron-style code that reduces the
input gradient itself, e.g. in its ``copy_to_tensor_model_parallel_region``). The temperature's
gradient is always the group sum. Gradients through ``lse`` and ``code_counts`` are exact too.

Gradient convention. Losses on replicated outputs (y, lse, indices) are computed identically on
every rank and count once (as Megatron's vocab-parallel cross-entropy); a loss on ``code_counts`` is
each rank's own term and the terms add up over ranks. So the gradients equal those of the unsharded op
for L = f(y, lse) + sum_r g_r(counts_r).

Communication per call (T real frames, d features, R ranks, b = 4 bytes in fp32, 8 in fp64):

    all-gather   R int64 shard sizes (skipped with shard_offset=)
    forward      all-reduce MAX  2 T b             (lse_r, best local score)
                 all-reduce SUM  (2 + d + 2R) T b  (S, S*y, argmax slots of 2 numbers per rank, shard size)
    backward     all-reduce SUM  T b               (the counts-gradient term; zeros where no loss reaches counts)
                 all-reduce SUM  (T d + 1) b       (x gradient and tau gradient; 1 b with reduce_x_grad=False)

e.g. T = 8192 frames, d = 4096, R = 8 in fp32: 64 KiB + 128.7 MiB forward, 128 MiB + 32 KiB backward,
independent of the vocabulary size. The (V, d) codebook never moves.

Backends: any fused backend (chunked with gloo on CPU, triton or cuda with NCCL). The reference
backend (which autograd differentiates over a (T, V) matrix) is not available here.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from softvq_kernels import backends, chunked
from softvq_kernels.autograd import PreparedCall
from softvq_kernels.reference import COSINE_EPS, accumulation_dtype
from softvq_kernels.ties import first_identical_rows

# Argmax slots travel in the float SUM all-reduce as two halves of (index + 1) below this base, each
# exact in fp32 (< 2^24), so indices up to 2^36 survive the float transport.
_SLOT_BASE = 4096


def check_process_group(process_group) -> None:
    """Raise a clear error unless ``process_group`` is a usable torch.distributed group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")


def shard_layout(rows: int, process_group, device) -> tuple[int, int]:
    """(offset of this rank's first row, total rows V) from one all-gather of the R shard sizes."""
    world = dist.get_world_size(process_group)
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=process_group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(process_group)
    return sum(sizes[:rank]), sum(sizes)


def check_shard_offset(shard_offset) -> int:
    if isinstance(shard_offset, bool) or not isinstance(shard_offset, int) or shard_offset < 0:
        raise ValueError(f"shard_offset must be a non-negative int (this rank's first global row), got {shard_offset!r}")
    return shard_offset


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce SUM. Backward: identity. For partial results whose sum is a replicated
    value that every rank then uses identically (a loss counted once: Megatron's reduce_from region)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceGradOverGroup(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce SUM of the gradient (a replicated input, e.g. x or tau,
    whose per-rank gradients are partial sums: Megatron's copy_to region)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """In-place all-reduce SUM of a tensor that carries no gradient (counts, flags)."""
    dist.all_reduce(t, group=group)
    return t


def sum_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce SUM whose backward is the identity (see ``_SumOverGroup``)."""
    return _SumOverGroup.apply(t, group)


def reduce_grad_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward all-reduces the gradient (see ``_ReduceGradOverGroup``)."""
    if not t.requires_grad:
        return t
    return _ReduceGradOverGroup.apply(t, group)


def _scores_of_codes(frames, codebook, tau, scoring, codes):
    """Scores s_tk of one code per frame, frames (T, d), codes (T,) local rows -> (T,) acc dtype."""
    acc = tau.dtype
    x = frames.to(acc)
    c = codebook.index_select(0, codes).to(acc)
    inner = (x * c).sum(-1)
    if scoring.distance == "l2":
        return -(x.pow(2).sum(-1) - 2 * inner + c.pow(2).sum(-1)) / tau
    if scoring.distance == "cosine":
        return inner * scoring.x_inv_norm.to(acc) * scoring.codebook_inv_norm.index_select(0, codes).to(acc) / tau
    return inner / tau


def _shard_epilogue(pieces, x, codebook, tau, scoring, lse):
    """BackwardPieces of one shard -> (partial grad_x (T, d), grad_codebook (V_r, d), partial grad_tau).

    Unlike softvq_kernels.epilogue (which relies on sum_v ds_tv = dL/dlse_t over the whole vocabulary),
    a shard's row sums are only a part of that, so they are used as computed."""
    acc = tau.dtype
    V = codebook.shape[0]
    ds_rows = pieces.ds_rows
    ds_s_rows = pieces.ds_u_rows + ds_rows * backends.score_centre(lse, backends.centre_vocab(scoring, V))  # sum ds s
    grad_tau = -ds_s_rows.sum() / tau
    x_acc, c_acc = x.to(acc), codebook.to(acc)
    grad_codebook = pieces.grad_codebook.to(acc)
    if scoring.distance == "cosine":
        r, q = scoring.x_inv_norm.to(acc), scoring.codebook_inv_norm.to(acc)
        live_r = torch.where(r < 1 / COSINE_EPS, r * r, 0.0)
        live_q = torch.where(q < 1 / COSINE_EPS, q * q, 0.0)
        grad_x = r[:, None] * pieces.grad_x_raw - (live_r * ds_s_rows)[:, None] * x_acc
        grad_codebook = grad_codebook - (live_q * pieces.ds_s_cols)[:, None] * c_acc
        return grad_x, grad_codebook, grad_tau
    if scoring.distance == "l2":  # d s_tv / d x_t = (2 / tau)(c_v - x_t), d s_tv / d c_v = (2 / tau)(x_t - c_v)
        k = 2.0 / tau
        grad_x = pieces.grad_x_raw - (k * ds_rows)[:, None] * x_acc
        grad_codebook = grad_codebook - (k * pieces.ds_cols)[:, None] * c_acc
        return grad_x, grad_codebook, grad_tau
    return pieces.grad_x_raw, grad_codebook, grad_tau


class _VocabParallelSoftVQ(torch.autograd.Function):
    """(x (T, d), shard (V_r, d), tau 0-dim, mask (T,) or None) -> y (T, d) acc, lse (T,) acc,
    indices (T,) int64 global, counts (V_r,) acc, sums (V_r, d) fp32 (shape (0, d) unless need_sums)."""

    @staticmethod
    def forward(ctx, x, shard, tau, mask, distance, backend_name, group, offset, need_counts, need_sums, reduce_x_grad):
        T, d = x.shape
        V_r = shard.shape[0]
        backend = backends.load_backend(backend_name)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        with torch.autocast(x.device.type, enabled=False):
            prep = PreparedCall(x, shard, tau, mask, distance)
            acc, frames, tau_acc = prep.acc, prep.frames, prep.tau
            R = frames.shape[0]  # real frames, the same on every rank (mask is replicated)
            vocab_size = None  # found in the merge below (no backward pass runs without real frames)
            y_real = torch.zeros(R, d, dtype=acc, device=x.device)
            lse_real = torch.zeros(R, dtype=acc, device=x.device)
            idx_real = torch.zeros(R, dtype=torch.int64, device=x.device)
            counts = torch.zeros(V_r, dtype=acc, device=x.device)
            sums = torch.zeros(V_r if need_sums else 0, d, dtype=torch.float32, device=x.device)
            if R > 0:
                if V_r > 0:
                    y_loc, lse_loc, idx_loc, _ = backend.forward(frames, shard, tau_acc, prep.scoring, False)
                    y_loc, lse_loc = y_loc.to(acc), lse_loc.to(acc)
                    # Identical rows in this shard: the lowest; across shards _scores_of_codes forms their
                    # scores by the same elementwise formula (bitwise equal), so the lowest rank wins below.
                    idx_loc = first_identical_rows(shard, idx_loc)
                    best_loc = _scores_of_codes(frames, shard, tau_acc, prep.scoring, idx_loc)
                else:  # an empty shard (V < world size) scores nothing but joins every collective
                    y_loc = torch.zeros(R, d, dtype=acc, device=x.device)
                    lse_loc = torch.full((R,), -torch.inf, dtype=acc, device=x.device)
                    idx_loc = torch.zeros(R, dtype=torch.int64, device=x.device)
                    best_loc = lse_loc.clone()
                peaks = torch.stack([lse_loc, best_loc], dim=1)
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
                lse_max, best = peaks[:, 0], peaks[:, 1]
                weight = torch.exp(lse_loc - lse_max)
                # Argmax slots: this rank writes (global index + 1), split in two fp32-exact halves, into its
                # own two columns where its best code ties the global best; the lowest such rank wins.
                slots = torch.zeros(R, world, 2, dtype=acc, device=x.device)
                code = torch.where(best_loc == best, idx_loc + offset + 1, 0)
                slots[:, rank, 0] = torch.div(code, _SLOT_BASE, rounding_mode="floor").to(acc)
                slots[:, rank, 1] = (code % _SLOT_BASE).to(acc)
                # The last column sums the shard sizes: the whole vocabulary's V, for the backward's score centre.
                rows_here = torch.full((R, 1), float(V_r), dtype=acc, device=x.device)
                packed = torch.cat([weight[:, None], weight[:, None] * y_loc, slots.reshape(R, 2 * world), rows_here],
                                   dim=1)
                dist.all_reduce(packed, group=group)
                vocab_size = int(packed[0, -1].round())
                total = packed[:, 0]
                y_real = packed[:, 1 : 1 + d] / total[:, None]
                lse_real = lse_max + total.log()
                slots = packed[:, 1 + d : -1].reshape(R, world, 2).round().long()
                merged = slots[..., 0] * _SLOT_BASE + slots[..., 1]  # (R, world), 0 = rank had no best code
                winner = (merged > 0).to(torch.int8).argmax(dim=1)  # first (lowest) rank holding a best code
                idx_real = merged.gather(1, winner[:, None]).squeeze(1) - 1
                if (need_counts or need_sums) and V_r > 0:
                    rows = frames.to(acc) if need_sums else frames.new_zeros(R, 1, dtype=acc)
                    counts, stats_sums = backend.codebook_stats(frames, shard, tau_acc, prep.scoring, lse_real, rows)
                    counts = counts.to(acc)
                    if need_sums:
                        sums = stats_sums.float()
            y = prep.scatter(y_real, T)
            lse = prep.scatter(lse_real, T)
            indices = prep.scatter(idx_real, T, fill=-1)
        ctx.save_for_backward(x, shard, tau, mask, y_real, lse_real)
        ctx.distance, ctx.backend_name, ctx.group, ctx.reduce_x_grad = distance, backend_name, group, reduce_x_grad
        ctx.vocab_size = vocab_size
        ctx.mark_non_differentiable(indices, sums)
        ctx.set_materialize_grads(False)
        return y, lse, indices, counts, sums

    @staticmethod
    def backward(ctx, grad_y, grad_lse, _grad_indices, grad_counts, _grad_sums):
        x, shard, tau, mask, y_real, lse_real = ctx.saved_tensors
        group = ctx.group
        none = (None,) * 8
        if not any(ctx.needs_input_grad[:3]):
            return (None, None, None) + none
        backend = backends.load_backend(ctx.backend_name)
        with torch.autocast(x.device.type, enabled=False):
            prep = PreparedCall(x, shard, tau, mask, ctx.distance)
            scoring = prep.scoring._replace(vocab_size=ctx.vocab_size)  # the centre of the whole vocabulary
            acc, frames, R = prep.acc, prep.frames, prep.frames.shape[0]
            grad_x_real = torch.zeros(R, x.shape[1], dtype=acc, device=x.device)
            grad_shard = torch.zeros(shard.shape, dtype=acc, device=x.device)
            grad_tau = torch.zeros((), dtype=acc, device=x.device)
            if R > 0:
                g = prep.compact(grad_y)
                g = torch.zeros_like(y_real) if g is None else g.to(acc)
                gamma = prep.compact(grad_lse)
                gamma = torch.zeros_like(lse_real) if gamma is None else gamma.to(acc)
                counts_grad = None if grad_counts is None or shard.shape[0] == 0 else grad_counts.to(acc)
                # The backend adds c_t = sum_{v in shard} p_tv gn_v to its per-frame term; the unsharded op adds
                # that sum over the whole vocabulary. Handing it dL/dlse minus the other shards' part makes every
                # ds_tv of this shard the unsharded one. A counts loss is each rank's own term, so some ranks may
                # have none: every rank joins this collective all the same (0 as its own part), or the group
                # would deadlock and those ranks would miss the others' share of c_t.
                if counts_grad is None:
                    local = torch.zeros_like(lse_real)
                else:
                    local = chunked.expected_counts_gradient(frames, shard, prep.tau, scoring, lse_real, counts_grad)
                everyone = local.clone()
                dist.all_reduce(everyone, group=group)
                gamma = gamma - (everyone - local)
                if shard.shape[0] > 0:
                    pieces = backend.backward(g, frames, shard, prep.tau, scoring, y_real, lse_real, gamma, counts_grad)
                    grad_x_real, grad_shard, grad_tau = _shard_epilogue(pieces, frames, shard, prep.tau, scoring,
                                                                        lse_real)
            # One collective for the replicated inputs' partial gradients (tau always, x unless told not to).
            if ctx.reduce_x_grad:
                packed = torch.cat([grad_x_real.reshape(-1), grad_tau.reshape(1)])
                dist.all_reduce(packed, group=group)
                grad_x_real, grad_tau = packed[:-1].view_as(grad_x_real), packed[-1]
            else:
                grad_tau = grad_tau.reshape(1).clone()
                dist.all_reduce(grad_tau, group=group)
                grad_tau = grad_tau[0]
            grad_x = prep.scatter(grad_x_real.to(x.dtype), x.shape[0])
        needs = ctx.needs_input_grad
        return (
            grad_x.contiguous() if needs[0] else None,
            grad_shard.to(shard.dtype).contiguous() if needs[1] else None,
            grad_tau.reshape(()).to(tau.dtype) if needs[2] else None,
        ) + none


def vocab_parallel_quantize(x, shard, tau, mask, distance, backend_name, need_counts, need_sums, process_group,
                            shard_offset=None, reduce_x_grad=True):
    """The distributed op on flattened inputs: x (T, d), shard (V_r, d), tau 0-dim, mask (T,) or None.

    Returns y (T, d) in the accumulation dtype, lse (T,), indices (T,) int64 global, counts (V_r,) this
    rank's shard, sums (V_r, d) fp32 or (0, d). Called by ``soft_vq``/``SoftVQ`` after their checks."""
    check_process_group(process_group)
    if backend_name == "reference":
        raise ValueError("backend='reference' does not support process_group= (it builds the (T, V) scores); "
                         "use backend='chunked' (CPU, gloo) or 'triton'/'cuda' (GPU, NCCL)")
    if not isinstance(reduce_x_grad, bool):
        raise TypeError(f"reduce_x_grad must be a bool, got {type(reduce_x_grad).__name__}")
    if shard_offset is None:
        shard_offset, _ = shard_layout(shard.shape[0], process_group, x.device)
    else:
        shard_offset = check_shard_offset(shard_offset)
    if tau.dtype != accumulation_dtype(x.dtype):
        tau = tau.to(accumulation_dtype(x.dtype))
    return _VocabParallelSoftVQ.apply(x, shard, tau, mask, distance, backend_name, process_group, shard_offset,
                                      need_counts, need_sums, reduce_x_grad)
