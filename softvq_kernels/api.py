"""``soft_vq``: argument checks (every error message lives here), flattening and dispatch."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad

from softvq_kernels import backends
from softvq_kernels.op import lse_argmax_op, soft_vq_op
from softvq_kernels.reference import accumulation_dtype, scores, soft_vq_reference
from softvq_kernels.ties import first_identical_rows

DISTANCES = ("l2", "cosine", "dot")


class SoftVQAux(NamedTuple):
    """Side outputs of one soft VQ call.

    lse: (...,) log-sum-exp of the true scores per frame (0 for masked frames); differentiable, so
        log p_tv = s_tv - lse_t gives losses on the code distribution.
    indices: (...,) int64 first argmax code per frame, the hard-VQ code (-1 for masked frames); no gradient.
    code_counts: (V,) soft counts sum_t p_tv over real frames; differentiable.
    lse and code_counts are fp32 (fp64 for fp64 inputs).
    """

    lse: torch.Tensor
    indices: torch.Tensor
    code_counts: torch.Tensor


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(x, codebook, distance, mask, backend, *, sharded=False) -> None:
    _check_tensor("x", x)
    _check_tensor("codebook", codebook)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d), got a 0-dim tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (V, d), got shape {tuple(codebook.shape)}")
    if (codebook.shape[0] == 0 and not sharded) or codebook.shape[1] == 0:
        # a rank's shard of a sharded codebook may hold no rows (V < world size); the whole codebook may not
        raise ValueError(f"codebook must be non-empty, got shape {tuple(codebook.shape)}")
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal codebook's d ({codebook.shape[1]})"
        )
    if x.dtype != codebook.dtype:
        raise TypeError(f"codebook dtype {codebook.dtype} must match x dtype {x.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"codebook is on {codebook.device} but x is on {x.device}")
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if not isinstance(backend, str) or backend not in backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {backends.BACKEND_NAMES}, got {backend!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = real frame), got {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal x.shape[:-1] = {tuple(x.shape[:-1])}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


def _temperature_floor(dtype: torch.dtype) -> float:
    """The smallest temperature whose reciprocal is finite in the accumulation dtype: below it every
    score overflows (inf - inf = NaN), so no finite answer exists."""
    return torch.finfo(accumulation_dtype(dtype)).tiny


def _check_temperature_value(value: float, x: torch.Tensor) -> None:
    floor = _temperature_floor(x.dtype)
    if not (math.isfinite(value) and value >= floor):
        raise ValueError(
            f"temperature must be positive and finite, at least {floor:.3g} (the smallest normal "
            f"{accumulation_dtype(x.dtype)}: below it every score overflows), got {value}"
        )


def _assert_temperature_async(tau: torch.Tensor, x: torch.Tensor) -> None:
    """The same check without a host sync (inside torch.compile graphs and SoftVQ's hot path)."""
    floor = _temperature_floor(x.dtype)
    ok = torch.isfinite(tau) & (tau >= floor)
    torch._assert_async(ok, f"temperature must be positive and finite, at least {floor:.3g}")


def _temperature_tensor(temperature, x: torch.Tensor, *, checked_on_device: bool = False) -> torch.Tensor:
    """A 0-dim tensor on x's device; keeps the autograd link when a tensor was passed.

    checked_on_device: check the value with a device-side assert instead of reading it on the host
    (SoftVQ's exp(log tau), which is positive by construction; compiled graphs always do this)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"temperature must be a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got dtype {temperature.dtype}")
        if temperature.device != x.device and temperature.device.type != "cpu":  # a CPU scalar is moved
            raise ValueError(
                f"temperature is on {temperature.device} but x is on {x.device}: pass a float or a "
                f"tensor on x's device"
            )
        tau = temperature.reshape(()).to(x.device)
        if checked_on_device or torch.compiler.is_compiling():
            _assert_temperature_async(tau, x)
        elif tau.device.type != "meta":
            _check_temperature_value(float(tau.detach()), x)
        return tau
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive float or a 0-dim tensor, got {type(temperature).__name__}")
    _check_temperature_value(float(temperature), x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor(float(temperature), dtype=dtype, device=x.device)


def _refuse_forward_ad(backend: str, *tensors) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) would see the fused op as a constant
    and return a zero tangent: refuse it by name instead."""
    if torch.compiler.is_compiling():
        return
    if any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
            f"supported by soft_vq's fused backend {backend!r}; use backend='reference' (plain PyTorch, "
            f"materialises the (T, V) scores) or reverse mode (backward / torch.func.vjp)"
        )


# Backend resolution imports modules, which torch.compile cannot trace: it runs once at trace time and
# its (string) result is a constant of the graph.
_resolve_backend = torch.compiler.assume_constant_result(backends.resolve_backend)

_AUTOCAST_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_inputs(x, codebook):
    """Under torch.autocast, cast x and codebook to the autocast dtype (fp64 is left alone, as autocast does).

    So an fp32 codebook works with low-precision activations; the backends still accumulate in fp32.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(codebook, torch.Tensor)):
        return x, codebook
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, codebook
    dtype = torch.get_autocast_dtype(device_type)
    if x.dtype in _AUTOCAST_CASTABLE:
        x = x.to(dtype)
    if codebook.dtype in _AUTOCAST_CASTABLE:
        codebook = codebook.to(dtype)
    return x, codebook


def _reference_sums(frames, codebook, tau, distance, mask):
    """Soft sums m_v = sum_t p_tv x_t by the spec (materialises (T, V) like the rest of the reference)."""
    acc = accumulation_dtype(frames.dtype)
    frames = frames.to(acc) if mask is None else torch.where(mask[:, None], frames.to(acc), 0.0)
    probs = scores(frames, codebook.to(acc), tau.to(acc), distance).softmax(dim=-1)
    if mask is not None:
        probs = torch.where(mask[:, None], probs, 0.0)
    return (probs.T @ frames).float()


def _nan_frames_have_no_code(indices: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Index -1 where lse is NaN (NaN in the frame or in the codebook): no code is nearest there. One rule
    for every backend and for the sharded op (an argmax over NaN scores is whatever a kernel's comparisons
    happen to keep)."""
    return torch.where(torch.isnan(lse), -1, indices)


def quantize(x, codebook, temperature, distance, mask, backend, need_counts, need_sums, *, tau_checked_on_device=False,
             process_group=None, shard_offset=None, reduce_x_grad=True, need_indices=True):
    """Checks, flattening and dispatch shared by ``soft_vq`` and ``SoftVQ`` (not part of the public API).

    tau_checked_on_device=True: temperature is a 0-dim float tensor (SoftVQ's exp(log tau)) whose value
    is checked by a device-side assert, not read on the host (no GPU sync per call).
    Returns y (..., d), lse (...,), indices (...,) int64, counts (V,) (zeros unless need_counts),
    sums (V, d) fp32 (shape (0, d) unless need_sums); y, lse and counts carry gradient.
    process_group: codebook is this rank's row shard (softvq_kernels.distributed); counts and sums are
    then the shard's (V_r,), (V_r, d) and indices are global.
    Indices: the first argmax, and among identical codebook rows the lowest index (softvq_kernels.ties;
    skipped with need_indices=False, when the caller drops them); -1 in masked frames and where lse is NaN.
    """
    x, codebook = _autocast_inputs(x, codebook)
    _check_inputs(x, codebook, distance, mask, backend, sharded=process_group is not None)
    if not isinstance(need_counts, bool):
        raise TypeError(f"return_aux must be a bool, got {type(need_counts).__name__}")
    tau = _temperature_tensor(temperature, x, checked_on_device=tau_checked_on_device)
    name = _resolve_backend(backend, x.device)
    if x.dtype not in backends.REGISTRY[name].dtypes:
        raise TypeError(
            f"backend={name!r} takes {[str(t) for t in backends.REGISTRY[name].dtypes]} inputs, got {x.dtype}"
        )
    if name != "reference":
        _refuse_forward_ad(name, x, codebook, tau)
    d = x.shape[-1]
    frames = x.reshape(-1, d)
    flat_mask = None if mask is None else mask.reshape(-1)
    if process_group is not None:
        from softvq_kernels.distributed import vocab_parallel_quantize

        y, lse, indices, counts, sums = vocab_parallel_quantize(
            frames, codebook, tau, flat_mask, distance, name, need_counts, need_sums, process_group,
            shard_offset, reduce_x_grad,
        )
        y = y.to(frames.dtype)
    elif shard_offset is not None:
        raise ValueError("shard_offset is only meaningful with process_group=")
    elif name == "reference":
        with torch.autocast(x.device.type, enabled=False):
            y, lse, indices, counts = soft_vq_reference(frames, codebook, tau, distance, flat_mask)
            if need_sums:
                sums = _reference_sums(frames.detach(), codebook.detach(), tau.detach(), distance, flat_mask)
            else:
                sums = counts.new_zeros(0, d, dtype=torch.float32)
    else:
        y, lse, indices, counts, sums = soft_vq_op(
            frames, codebook, tau, flat_mask, distance, name, need_counts, need_sums
        )
        y = y.to(frames.dtype)  # the op keeps the full-precision y for its backward
    if process_group is None and need_indices:
        indices = first_identical_rows(codebook, indices)
    indices = _nan_frames_have_no_code(indices, lse)
    lead = x.shape[:-1]
    return y.reshape(x.shape), lse.reshape(lead), indices.reshape(lead), counts, sums


def lse_argmax(x, codebook, temperature, distance, mask, backend, *, tau_checked_on_device=False):
    """Hard mode / inference (``SoftVQ(mode="hard")``): (lse (...,), indices (...,)) as ``quantize`` returns
    them, without forming y (the fused backends' online pass alone); no gradient. Not public API."""
    x, codebook = _autocast_inputs(x, codebook)
    _check_inputs(x, codebook, distance, mask, backend)
    tau = _temperature_tensor(temperature, x, checked_on_device=tau_checked_on_device).detach()
    name = _resolve_backend(backend, x.device)
    frames, lead = x.detach().reshape(-1, x.shape[-1]), x.shape[:-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    if name == "reference":
        acc = accumulation_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            s = scores(frames.to(acc), codebook.detach().to(acc), tau.to(acc), distance)
            lse, indices = s.logsumexp(dim=-1), s.argmax(dim=-1)
        if flat_mask is not None:
            lse, indices = torch.where(flat_mask, lse, 0.0), indices.masked_fill(~flat_mask, -1)
    else:
        lse, indices = lse_argmax_op(frames, codebook.detach(), tau, flat_mask, distance, name)
    indices = _nan_frames_have_no_code(first_identical_rows(codebook, indices), lse)
    return lse.reshape(lead), indices.reshape(lead)


def soft_vq(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    *,
    distance: str = "l2",
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_aux: bool = False,
    process_group=None,
    shard_offset: int | None = None,
    reduce_x_grad: bool = True,
):
    """Soft vector quantisation: y = softmax(scores(x, codebook) / temperature) @ codebook.

    x: (..., d) floating; codebook: (V, d), same dtype and device; temperature: positive float or
    0-dim tensor (gets a gradient when it requires one); mask: (...) bool, True = real frame
    (masked frames output zeros and add nothing to any gradient or to code_counts).
    distance: "l2" (-||x - c||^2), "cosine" (<x/|x|, c/|c|>) or "dot" (<x, c>); the weighted sum
    always uses the raw codebook rows. backend: "auto" | "reference" | "chunked" | "triton" | "cuda".

    Returns y (..., d) in x's dtype, and with return_aux=True also ``SoftVQAux(lse, indices, code_counts)``
    (lse and code_counts are differentiable: losses on the code distribution need no (T, V) matrix).
    Low-precision inputs accumulate in fp32. NaN in a frame makes that frame's outputs NaN; NaN in the
    codebook makes every output NaN (nothing is silently dropped).
    Under ``torch.autocast`` x and codebook run in the autocast dtype (an fp32 codebook is fine).
    The fused backends run as the custom op ``softvq::soft_vq`` (one node for ``torch.compile``).

    process_group: a torch.distributed group over which the codebook is sharded by rows (vocabulary
    parallelism): ``codebook`` is then this rank's contiguous block (V_r, d), x/mask/temperature are the
    same on every rank, y, lse and indices (global) come out identical on every rank and code_counts is
    this rank's (V_r,) shard. shard_offset: this rank's first global row (default: one all-gather of the
    shard sizes). reduce_x_grad=False leaves x's gradient as this rank's partial sum (Megatron-style
    reductions). Semantics, gradients and communication cost: ``softvq_kernels.distributed``.
    """
    y, lse, indices, counts, _ = quantize(x, codebook, temperature, distance, mask, backend, return_aux, False,
                                          process_group=process_group, shard_offset=shard_offset,
                                          reduce_x_grad=reduce_x_grad, need_indices=return_aux)
    if not return_aux:
        return y
    return y, SoftVQAux(lse, indices, counts)
