"""``soft_vq``: argument checks (every error message lives here), flattening and dispatch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from softvq_kernels import backends
from softvq_kernels.autograd import SoftVQFunction
from softvq_kernels.reference import soft_vq_reference

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
    """
    _check_inputs(x, codebook, distance, mask, backend)
    tau = _temperature_tensor(temperature, x)
    name = backends.resolve_backend(backend, x.device)
    d = x.shape[-1]
    frames = x.reshape(-1, d)
    flat_mask = None if mask is None else mask.reshape(-1)
    if name == "reference":
        y, lse, indices, counts = soft_vq_reference(frames, codebook, tau, distance, flat_mask)
        lse, counts = lse.detach().float(), counts.detach().float()
    else:
        y, lse, indices, counts = SoftVQFunction.apply(
            frames, codebook, tau, distance, flat_mask, backends.load_backend(name), return_aux
        )
    y = y.reshape(x.shape)
    if not return_aux:
        return y
    return y, SoftVQAux(lse.reshape(x.shape[:-1]), indices.reshape(x.shape[:-1]), counts)
