"""``soft_vq``: argument checks (every error message lives here), flattening and dispatch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from softvq_kernels import backends
from softvq_kernels.op import soft_vq_op
from softvq_kernels.reference import accumulation_dtype, scores, soft_vq_reference

DISTANCES = ("l2", "cosine", "dot")


class SoftVQAux(NamedTuple):
    """Side outputs of one soft VQ call (none of them carries gradient).

    lse: (...,) fp32 log-sum-exp of the true scores per frame (0 for masked frames).
    indices: (...,) int64 argmax code per frame, the hard-VQ code (-1 for masked frames).
    code_counts: (V,) fp32 soft counts sum_t p_tv over real frames.
    """

    lse: torch.Tensor
    indices: torch.Tensor
    code_counts: torch.Tensor


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(x, codebook, distance, mask, backend) -> None:
    _check_tensor("x", x)
    _check_tensor("codebook", codebook)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d), got a 0-dim tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (V, d), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
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


def _temperature_tensor(temperature, x: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on x's device; keeps the autograd link when a tensor was passed."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"temperature must be a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got dtype {temperature.dtype}")
        if not torch.compiler.is_compiling():  # a value check would break a compiled graph
            value = float(temperature.detach())
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature must be positive and finite, got {value}")
        return temperature.reshape(()).to(x.device)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float or a 0-dim tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.tensor(float(temperature), dtype=dtype, device=x.device)


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
    probs = scores(frames.to(acc), codebook.to(acc), tau.to(acc), distance).softmax(dim=-1)
    if mask is not None:
        probs = probs * mask[:, None]
    return (probs.T @ frames.to(acc)).float()


def _quantize(x, codebook, temperature, distance, mask, backend, need_counts, need_sums, *, positive_tau=False):
    """Checks, flattening and dispatch shared by ``soft_vq`` and ``SoftVQ``.

    positive_tau=True: temperature is a 0-dim float tensor known to be positive (SoftVQ's exp(log tau)),
    so its value check, a host sync on GPUs, is skipped.
    Returns y (..., d), lse (...,) fp32, indices (...,) int64, counts (V,) fp32 (zeros unless
    need_counts), sums (V, d) fp32 (shape (0, d) unless need_sums); only y carries gradient.
    """
    x, codebook = _autocast_inputs(x, codebook)
    _check_inputs(x, codebook, distance, mask, backend)
    tau = temperature.reshape(()).to(x.device) if positive_tau else _temperature_tensor(temperature, x)
    name = _resolve_backend(backend, x.device)
    d = x.shape[-1]
    frames = x.reshape(-1, d)
    flat_mask = None if mask is None else mask.reshape(-1)
    if name == "reference":
        with torch.autocast(x.device.type, enabled=False):
            y, lse, indices, counts = soft_vq_reference(frames, codebook, tau, distance, flat_mask)
            if need_sums:
                sums = _reference_sums(frames.detach(), codebook.detach(), tau.detach(), distance, flat_mask)
            else:
                sums = counts.new_zeros(0, d, dtype=torch.float32)
        lse, counts = lse.detach(), counts.detach().float()
    else:
        y, lse, indices, counts, sums = soft_vq_op(
            frames, codebook, tau, flat_mask, distance, name, need_counts, need_sums
        )
        y = y.to(frames.dtype)  # the op keeps the full-precision y for its backward
    lead = x.shape[:-1]
    return y.reshape(x.shape), lse.float().reshape(lead), indices.reshape(lead), counts, sums


def soft_vq(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    *,
    distance: str = "l2",
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    return_aux: bool = False,
):
    """Soft vector quantisation: y = softmax(scores(x, codebook) / temperature) @ codebook.

    x: (..., d) floating; codebook: (V, d), same dtype and device; temperature: positive float or
    0-dim tensor (gets a gradient when it requires one); mask: (...) bool, True = real frame
    (masked frames output zeros and add nothing to any gradient or to code_counts).
    distance: "l2" (-||x - c||^2), "cosine" (<x/|x|, c/|c|>) or "dot" (<x, c>); the weighted sum
    always uses the raw codebook rows. backend: "auto" | "reference" | "chunked" | "triton" | "cuda".

    Returns y (..., d) in x's dtype, and with return_aux=True also ``SoftVQAux(lse, indices, code_counts)``.
    Low-precision inputs accumulate in fp32. NaN in a frame makes that frame's outputs NaN; NaN in the
    codebook makes every output NaN (nothing is silently dropped).
    Under ``torch.autocast`` x and codebook run in the autocast dtype (an fp32 codebook is fine).
    The fused backends run as the custom op ``softvq::soft_vq`` (one node for ``torch.compile``).
    """
    y, lse, indices, counts, _ = _quantize(x, codebook, temperature, distance, mask, backend, return_aux, False)
    if not return_aux:
        return y
    return y, SoftVQAux(lse, indices, counts)
