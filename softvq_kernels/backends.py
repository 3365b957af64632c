"""Backend registry: the one place that knows which implementations exist and when they can run.

A backend module (``softvq_kernels.chunked``, ``softvq_kernels.triton``, ``softvq_kernels.cuda``) exports

    unavailable_reason(device: torch.device) -> str | None
        None when the backend can run on tensors of ``device``; otherwise a sentence saying why not.
    forward(x, keys, values, tau, l2, need_counts) -> (y, lse, indices, counts)
        x: (T, d), keys/values: (V, d) (the same tensor for "l2"/"dot"; cosine passes normalised keys),
        tau: 0-dim tensor in the accumulation dtype, l2: bool (False means dot-product scores).
        Returns y (T, d) (any floating dtype; it is saved for backward and cast to x's dtype for the
        caller), lse (T,) of the true scores in the accumulation dtype, indices (T,) int64 argmax,
        counts (V,) soft counts or None when need_counts is False.
        Rows are all real frames: masking is done by the caller (rows are compacted before the call).
    backward(grad_y, x, keys, values, tau, l2, y, lse) -> (grad_x, grad_keys | None, grad_values, grad_tau)
        grad_keys may be None only when ``keys is values``; the key-role gradient is then already
        folded into grad_values.

Optional exports:
    SUPPORTED_DTYPES: tuple of input dtypes the backend takes (default: all floating dtypes).
    codebook_stats(x, keys, tau, l2, lse, rows) -> (counts (V,), sums (V, d_rows))
        soft counts sum_t p_tv and soft sums sum_t p_tv rows_t with p recomputed from lse, for EMA
        codebook updates; without it softvq_kernels.autograd derives the sums from ``backward``.

The reference backend is the exception: it is plain PyTorch differentiated by autograd (the spec).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Backends in the order "auto" tries them, per device type. On an H200 (benchmarks/results/h200-*)
# triton ran forward + backward 7-8x faster than chunked at 4096x32000x256 and 8192x128256x2048 bf16,
# and 3-6x faster than the cuda backend, which is therefore never picked by "auto".
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("chunked",),
    "cuda": ("triton", "chunked"),
}

BACKEND_MODULES: dict[str, str] = {
    "reference": "softvq_kernels.reference",
    "chunked": "softvq_kernels.chunked",
    "triton": "softvq_kernels.triton",
    "cuda": "softvq_kernels.cuda",
}

BACKEND_NAMES = ("auto", *BACKEND_MODULES)


def load_backend(name: str) -> ModuleType:
    return importlib.import_module(BACKEND_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why it cannot."""
    try:
        module = load_backend(name)
    except ImportError as exc:
        return f"its module failed to import ({exc})"
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of ``device``, e.g. ``["reference", "chunked"]``."""
    device = torch.device(device)
    return [name for name in BACKEND_MODULES if unavailable_reason(name, device) is None]


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn a requested backend name into a concrete available one; never falls back silently."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("chunked",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(
            f"backend={name!r} is not available for tensors on {device}: {reason}. "
            f"Available here: {available_backends(device)}"
        )
    return name
