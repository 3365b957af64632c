"""Losses on soft VQ's code distribution without a (T, V) matrix.

soft VQ's distribution over codes is p_tv = exp(s_tv - lse_t). ``soft_vq(..., return_aux=True)`` gives
lse_t (differentiable, fused, O(T d) memory); ``code_scores`` gives s_tk for a few chosen codes
(differentiable, O(T K d)). Their difference is an exact log-probability, so any loss that reads a few
columns of log p is exact at vocabulary scale:

    y, aux = sk.soft_vq(x, codebook, tau, distance="cosine", return_aux=True)       # x: (b, n, d)
    # cross-entropy against one target code per frame (targets: (b, n) int64)
    log_p = sk.code_scores(x, codebook, tau, targets[..., None], distance="cosine")[..., 0] - aux.lse
    ce = -log_p.mean()
    # CTC against each utterance's target codes: only the blank and those codes are gathered
    ctc = sk.code_ctc_loss(x, codebook, tau, aux.lse, targets, frame_lens, target_lens, blank=0,
                           distance="cosine")

Both take ``process_group=`` for a row-sharded codebook (softvq_kernels.distributed): codes are then
global indices, each rank scores the codes it owns and one all-reduce of (..., K) scores sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import math
import numbers

from softvq_kernels import distributed
from softvq_kernels.api import DISTANCES
from softvq_kernels.reference import COSINE_EPS, accumulation_dtype


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _temperature(temperature, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor in x's accumulation dtype on x's device (keeps the autograd link of a tensor)."""
    acc = accumulation_dtype(x.dtype)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1 or not temperature.is_floating_point():
            raise ValueError(f"temperature must be a floating 0-dim tensor, got shape {tuple(temperature.shape)} "
                             f"dtype {temperature.dtype}")
        value, tau = float(temperature.detach()), temperature.reshape(()).to(device=x.device, dtype=acc)
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive float or a 0-dim tensor, got {type(temperature).__name__}")
    else:
        value = float(temperature)
        tau = torch.tensor(value, dtype=acc, device=x.device)
    if not (math.isfinite(value) and value >= torch.finfo(acc).tiny):
        raise ValueError(f"temperature must be positive and finite, got {value}")
    return tau


def _check_codes(codes, x: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be an int64 torch.Tensor (..., K), got {type(codes).__name__}")
    if codes.dtype != torch.int64:
        raise TypeError(f"codes must have dtype torch.int64, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (..., K), got a 0-dim tensor")
    lead = codes.shape[:-1]
    if codes.dim() > x.dim() or tuple(x.shape[: len(lead)]) != tuple(lead):
        raise ValueError(
            f"codes shape {tuple(codes.shape)} must be (*B, K) with B a leading part of x.shape[:-1] = "
            f"{tuple(x.shape[:-1])} (per frame: B = x.shape[:-1]; per sequence: B = (batch,))"
        )
    if codes.device != x.device:
        raise ValueError(f"codes is on {codes.device} but x is on {x.device}")


class _ScoresOfCodes(torch.autograd.Function):
    """s (S, F, K) = score(frames (S, F, d), rows (S, K, d)) / tau, with a backward in which a frame whose
    scores no loss reads (all-zero incoming gradient: a masked frame, a frame past a sequence's length)
    contributes nothing, not even 0 * NaN: whatever such a frame holds, the codebook and tau gradients
    stay those of the frames that are read. Inputs in the accumulation dtype; tau 0-dim."""

    @staticmethod
    def forward(ctx, frames, rows, tau, distance):
        ctx.distance = distance
        ctx.save_for_backward(frames, rows, tau)
        return _scores(frames, rows, tau, distance)[0]

    @staticmethod
    def backward(ctx, grad):
        frames, rows, tau = ctx.saved_tensors
        read = (grad != 0).any(dim=-1, keepdim=True)  # (S, F, 1)
        frames = torch.where(read, frames, 0.0)
        s, f, r, f_norm, r_norm = _scores(frames, rows, tau, ctx.distance)
        grad_tau = -(grad * s).sum() / tau
        grad_f = torch.bmm(grad, r) / tau  # d s / d (scored frame), (S, F, d)
        grad_r = torch.bmm(grad.transpose(1, 2), f) / tau  # d s / d (scored row), (S, K, d)
        if ctx.distance == "l2":  # s = -(|f|^2 - 2 <f, r> + |r|^2) / tau
            grad_f = 2 * grad_f - (2 / tau) * grad.sum(-1, keepdim=True) * frames
            grad_r = 2 * grad_r - (2 / tau) * grad.sum(1)[..., None] * rows
        elif ctx.distance == "cosine":  # through f / max(|f|, eps): the normalisation's Jacobian
            grad_f = _normalise_backward(grad_f, f, f_norm)
            grad_r = _normalise_backward(grad_r, r, r_norm)
        return torch.where(read, grad_f, 0.0), grad_r, grad_tau, None


def _scores(frames, rows, tau, distance):
    """(s, scored frames, scored rows, frame norms, row norms): the spec's formulas (reference.scores)."""
    f, r, f_norm, r_norm = frames, rows, None, None
    if distance == "cosine":
        f_norm = torch.linalg.vector_norm(frames, dim=-1, keepdim=True)
        r_norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        f, r = frames / f_norm.clamp_min(COSINE_EPS), rows / r_norm.clamp_min(COSINE_EPS)
    inner = torch.bmm(f, r.transpose(1, 2))  # (S, F, K)
    if distance == "l2":  # the spec's expansion (reference.scores), so values agree to rounding
        s = -(f.pow(2).sum(-1, keepdim=True) - 2 * inner + r.pow(2).sum(-1)[:, None, :]) / tau
    else:
        s = inner / tau
    return s, f, r, f_norm, r_norm


def _normalise_backward(grad_unit, unit, norm):
    """Gradient through t / max(|t|, eps) given the gradient for the unit vector: (g - u <u, g>) / |t| above
    eps, g / eps below (where the clamp holds the divisor constant)."""
    live = norm > COSINE_EPS
    projected = grad_unit - unit * (unit * grad_unit).sum(-1, keepdim=True)
    return torch.where(live, projected / norm.clamp_min(COSINE_EPS), grad_unit / COSINE_EPS)


def _check_code_range(codes, rows_here, offset, total, process_group):
    """Every code must name a row of the (possibly sharded) codebook. With shard_offset= the total is unknown
    here: one all-reduce counts each code's owners instead, so every rank raises the same error."""
    if process_group is not None and total is None:
        local = codes - offset
        owners = ((local >= 0) & (local < rows_here)).to(torch.int32)
        distributed.all_reduce_sum_(owners, process_group)
        bad = owners != 1
        if bool(bad.any()):
            raise ValueError(f"codes must lie in [0, V) of the sharded codebook: {int(bad.sum())} of them name no "
                             f"row (values such as {int(codes[bad][0])}; check codes and shard_offset)")
        return
    if codes.numel():
        lowest, highest = int(codes.min()), int(codes.max())
        if lowest < 0 or highest >= total:
            raise ValueError(f"codes must lie in [0, {total}), got values in [{lowest}, {highest}]")


def _integer_tensor(name: str, value, device) -> torch.Tensor:
    """A length vector as int64: int tensors, lists/tuples of ints; floats (even 3.0) and bools refused."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (an int tensor or a list of ints), got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def code_scores(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float | torch.Tensor,
    codes: torch.Tensor,
    *,
    distance: str = "l2",
    process_group=None,
    shard_offset: int | None = None,
    reduce_x_grad: bool = True,
) -> torch.Tensor:
    """Scores s_tk = score(x_t, codebook[codes_k]) / temperature of chosen codes, as soft_vq forms them.

    x: (*B, *T, d) floating; codebook: (V, d), same dtype (this rank's row shard with process_group, which
    may hold no rows); codes: (*B, K) int64 global code indices, where B is a leading part of x's frame dims:
    per-frame codes have B = x.shape[:-1], per-sequence codes (one list shared by a sequence's frames, e.g.
    CTC targets) have B = (batch,). Returns (*B, *T, K) in the accumulation dtype (fp32; fp64 for fp64 x),
    differentiable in x, codebook and temperature. Cost O(prod(B) K d + T K d); no (T, V) tensor.

    log p_tk = code_scores(...) - lse_t with lse from ``soft_vq(..., return_aux=True)`` (same distance,
    temperature and codebook) is the exact log-probability soft VQ gives code k at frame t.
    A frame whose scores no loss reads (masked away after the call, past a sequence's length) touches no
    gradient, even when it holds NaN or inf.
    With process_group, each rank scores the codes its shard holds and the (*B, *T, K) scores are summed
    over the group (identical on every rank); x's and tau's gradients are all-reduced (x's left partial
    with reduce_x_grad=False, as in soft_vq).
    """
    _check_tensor("x", x)
    _check_tensor("codebook", codebook)
    sharded = process_group is not None
    if x.dim() < 1 or codebook.dim() != 2 or (codebook.shape[0] == 0 and not sharded):
        raise ValueError(f"x must be (..., d) and codebook a non-empty (V, d), got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal codebook's d ({codebook.shape[1]})")
    if x.dtype != codebook.dtype:
        raise TypeError(f"codebook dtype {codebook.dtype} must match x dtype {x.dtype} (as in soft_vq)")
    if x.device != codebook.device:
        raise ValueError(f"codebook is on {codebook.device} but x is on {x.device}")
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    _check_codes(codes, x)
    if not isinstance(reduce_x_grad, bool):
        raise TypeError(f"reduce_x_grad must be a bool, got {type(reduce_x_grad).__name__}")
    acc = accumulation_dtype(x.dtype)
    tau = _temperature(temperature, x)
    rows_here = codebook.shape[0]
    if not sharded:
        if shard_offset is not None:
            raise ValueError("shard_offset is only meaningful with process_group=")
        offset, total = 0, rows_here
    else:
        distributed.check_process_group(process_group)
        if shard_offset is None:
            offset, total = distributed.shard_layout(rows_here, process_group, x.device)
            if total == 0:
                raise ValueError("the sharded codebook holds no rows on any rank")
        else:
            offset, total = distributed.check_shard_offset(shard_offset), None
        x = distributed.reduce_grad_over_group(x, process_group) if reduce_x_grad else x
        tau = distributed.reduce_grad_over_group(tau, process_group)
    _check_code_range(codes, rows_here, offset, total, process_group)

    n_seq = codes.shape[:-1].numel()
    K, d = codes.shape[-1], x.shape[-1]
    per_seq = x.shape[codes.dim() - 1 : -1].numel()  # F frames share each sequence's codes
    frames = x.to(acc).reshape(n_seq, per_seq, d)
    local = codes.reshape(n_seq, K) - offset
    owned = (local >= 0) & (local < rows_here)
    if rows_here > 0:
        rows = codebook.to(acc)[local.clamp(0, rows_here - 1)]  # (S, K, d)
    else:  # an empty shard owns no code; zero rows keep the scores finite before the mask below
        rows = codebook.new_zeros(n_seq, K, d, dtype=acc)
    s = _ScoresOfCodes.apply(frames, rows, tau, distance)
    if sharded:
        s = torch.where(owned[:, None, :], s, 0.0)  # another rank owns the code: it adds the score
        s = distributed.sum_over_group(s, process_group)
    return s.reshape(*x.shape[:-1], K)


def code_ctc_loss(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float | torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int,
    distance: str = "l2",
    reduction: str = "mean",
    zero_infinity: bool = False,
    process_group=None,
    shard_offset: int | None = None,
) -> torch.Tensor:
    """CTC on soft VQ's code distribution, equal to ``F.ctc_loss(log_softmax(scores), ...)`` over all V
    codes, with only the blank and each utterance's target codes gathered (CTC reads no other column).

    x: (b, n, d) frames (batch first); lse: (b, n) from ``soft_vq(x, codebook, temperature, distance=...,
    return_aux=True)`` (differentiable: the loss's gradient reaches x, codebook and tau through it too);
    targets: (b, S) padded or 1-D concatenated int64 code indices; input_lengths, target_lengths: (b,);
    blank: the blank's code index, which targets must not contain. reduction / zero_infinity as in
    ``F.ctc_loss``; an empty batch gives 0 ("mean", "sum") or an empty (0,) tensor ("none"). Frames past a
    sequence's input length touch nothing, whatever they hold (NaN included).
    Memory O(b n K + b K d) with K = 1 + the most distinct target codes of an utterance.
    """
    _check_tensor("x", x)
    _check_tensor("lse", lse)
    if x.dim() != 3 or lse.shape != x.shape[:2]:
        raise ValueError(f"x must be (b, n, d) and lse (b, n), got {tuple(x.shape)} and {tuple(lse.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(blank, bool) or not isinstance(blank, int) or blank < 0:
        raise ValueError(f"blank must be a non-negative int code index, got {blank!r}")
    b, n, _ = x.shape
    device = x.device
    input_lengths = _integer_tensor("input_lengths", input_lengths, device)
    target_lengths = _integer_tensor("target_lengths", target_lengths, device)
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer torch.Tensor of code indices, got "
                        f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if input_lengths.shape != (b,) or target_lengths.shape != (b,):
        raise ValueError(f"input_lengths and target_lengths must be ({b},), got {tuple(input_lengths.shape)} "
                         f"and {tuple(target_lengths.shape)}")
    if b and (int(input_lengths.min()) < 0 or int(input_lengths.max()) > n or int(target_lengths.min()) < 0):
        raise ValueError(f"input_lengths must lie in [0, {n}] and target_lengths be >= 0, got "
                         f"{input_lengths.tolist()} and {target_lengths.tolist()}")
    longest = int(target_lengths.max()) if b else 0
    position = torch.arange(longest, device=device)
    has_target = position[None, :] < target_lengths[:, None]  # (b, L)
    if targets.dim() == 1:  # concatenated, as F.ctc_loss takes them
        if targets.numel() != int(target_lengths.sum()):
            raise ValueError(f"concatenated targets hold {targets.numel()} codes but target_lengths sum to "
                             f"{int(target_lengths.sum())}")
        padded = torch.full((b, longest), blank, dtype=torch.int64, device=device)
        padded[has_target] = targets.to(device=device, dtype=torch.int64)
    else:
        padded = torch.where(has_target, targets[:, :longest].to(device=device, dtype=torch.int64), blank)
    if bool((padded[has_target] == blank).any()):
        raise ValueError(f"targets must not contain the blank code ({blank}): CTC reserves it for 'no symbol'")
    # Column 0 is the blank, then each distinct target code of the utterance once: a repeated token must
    # map to one column, or CTC would let the alignment skip the blank between the two. Padding columns
    # repeat the blank (never read).
    columns, remapped = [], torch.zeros(b, longest, dtype=torch.int64, device=device)
    for i in range(b):
        length = int(target_lengths[i])
        distinct, inverse = torch.unique(padded[i, :length], return_inverse=True)
        columns.append(distinct)
        remapped[i, :length] = inverse + 1
    width = 1 + max((c.numel() for c in columns), default=0)
    codes = torch.full((b, width), blank, dtype=torch.int64, device=device)
    for i, distinct in enumerate(columns):
        codes[i, 1 : 1 + distinct.numel()] = distinct
    s = code_scores(x, codebook, temperature, codes, distance=distance, process_group=process_group,
                    shard_offset=shard_offset)  # (b, n, K)
    if b == 0:  # F.ctc_loss refuses an empty batch; its loss is empty / 0, still connected to the inputs
        nll = s.sum(dim=(1, 2)) * 0.0 + lse.to(s.dtype).sum(dim=1) * 0.0
        return nll if reduction == "none" else nll.sum()
    valid = torch.arange(n, device=device)[None, :] < input_lengths[:, None]  # (b, n)
    # Frames past a sequence's length are never read by CTC: keep them finite whatever x holds there.
    log_p = torch.where(valid[..., None], s - lse.to(s.dtype)[..., None], 0.0)
    log_p_tbk = log_p.transpose(0, 1)
    nll = F.ctc_loss(log_p_tbk, remapped, input_lengths, target_lengths, blank=0, reduction="none",
                     zero_infinity=zero_infinity)
    # F.ctc_loss's backward returns exp(log_p) - occupancy, the gradient for logits that pass through a
    # log_softmax over the same columns (where the exp term cancels). These K columns are a slice of a V-way
    # softmax, so the exp term is taken back off; its value is 0, only its gradient counts.
    counted = valid[..., None]
    if zero_infinity:
        with torch.no_grad():
            raw = F.ctc_loss(log_p_tbk.detach(), remapped, input_lengths, target_lengths, blank=0, reduction="none")
        counted = counted & torch.isfinite(raw)[:, None, None]
    probs_mass = torch.where(counted, log_p.exp(), 0.0).sum(dim=(1, 2))  # (b,)
    nll = nll + (probs_mass.detach() - probs_mass)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return (nll / target_lengths.clamp_min(1).to(nll.dtype)).mean()
