"""Backend registry: the one place that knows which implementations exist and when they can run.

A backend is a module plus one ``register_backend(BackendSpec(...))`` line below. The module exports

    unavailable_reason(device: torch.device) -> str | None
        None when the backend can run on tensors of ``device``; otherwise a sentence saying why not.
    forward(x, codebook, tau, scoring, need_counts) -> (y, lse, indices, counts | None)
        x: (T, d) real frames only (the caller compacts masked rows away), codebook: (V, d),
        tau: 0-dim in the accumulation dtype, scoring: ``Scoring`` (distance and, for cosine, the
        fp32 inverse row norms of x and codebook: scores are <x_t, c_v> r_t q_v / tau, no normalised copy).
        Returns y (T, d) (any floating dtype; saved for backward), lse (T,) of the true scores in the
        accumulation dtype, indices (T,) int64 first argmax, counts (V,) soft counts or None.
    backward(grad_y, x, codebook, tau, scoring, y, lse, grad_lse, grad_counts) -> BackwardPieces
        grad_lse (T,) / grad_counts (V,) in the accumulation dtype or None (no gradient reached them).
        The pieces are the O(T V d) sums; softvq_kernels.epilogue turns them into dx, dc, dtau (one
        implementation for every backend). docs/math.md derives each piece.
    codebook_stats(x, codebook, tau, scoring, lse, rows) -> (counts (V,), sums (V, d_rows))
        soft counts sum_t p_tv and soft sums sum_t p_tv rows_t, p recomputed from lse (EMA updates).
    lse_argmax(x, codebook, tau, scoring) -> (lse (T,), indices (T,))      optional (hard mode)
        the forward's lse and indices without the weighted sum; softvq_kernels.autograd falls back to
        ``forward`` for a backend without it.

The reference backend is the exception: it is plain PyTorch differentiated by autograd (the spec).
"""

from __future__ import annotations

import math

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple, Optional

import torch

FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CONTRACT = ("unavailable_reason", "forward", "backward", "codebook_stats")


class Scoring(NamedTuple):
    """How scores are formed. distance: "l2" | "dot" | "cosine"; for cosine x_inv_norm (T,) and
    codebook_inv_norm (V,) are 1 / max(||row||, eps) in the accumulation dtype (None otherwise).
    vocab_size: the whole vocabulary's V when the codebook is one row shard of it (the backward's score
    centre is then lse - log V of the whole vocabulary, see ``score_centre``); None = the codebook's rows."""

    distance: str
    x_inv_norm: Optional[torch.Tensor] = None
    codebook_inv_norm: Optional[torch.Tensor] = None
    vocab_size: Optional[int] = None


class BackwardPieces(NamedTuple):
    """What a fused backward computes in its pass over the vocabulary (accumulation dtype), with
    ds_tv = dL/ds_tv, p_tv, u_tv = s_tv - score_centre(lse, V)_t (one rounding from the true score; in exact
    arithmetic log p_tv + log V), q = codebook_inv_norm, r = x_inv_norm (1 unless cosine),
    kappa_v = (2 if l2 else 1) / tau, times q_v for cosine:

    grad_x_raw (T, d)      sum_v ds_tv kappa_v c_v
    grad_codebook (V, d)   sum_t p_tv g_t + kappa_v sum_t ds_tv r_t x_t   (value role + key role)
    (so a kernel forms ds_tv kappa_v once and uses it in both products)
    ds_rows (T,)           sum_v ds_tv                (= grad_lse_t up to rounding)
    ds_u_rows (T,)         sum_v ds_tv u_tv
    p_u_rows (T,)          sum_v p_tv u_tv
    ds_cols (V,) or None   sum_t ds_tv                (l2 only)
    ds_s_cols (V,) or None sum_t ds_tv s_tv           (cosine only)
    """

    grad_x_raw: torch.Tensor
    grad_codebook: torch.Tensor
    ds_rows: torch.Tensor
    ds_u_rows: torch.Tensor
    p_u_rows: torch.Tensor
    ds_cols: Optional[torch.Tensor]
    ds_s_cols: Optional[torch.Tensor]


def centre_vocab(scoring: Scoring, rows: int) -> int:
    """The V of the backward's score centre: the whole vocabulary's (a shard's scoring says it), else rows."""
    return rows if scoring.vocab_size is None else scoring.vocab_size


def score_centre(lse: torch.Tensor, V: int) -> torch.Tensor:
    """c_t = lse_t - log V (T,): the row centre of u_tv = s_tv - c_t in ``BackwardPieces``; the epilogue
    adds the same c_t back. Subtracting it from the true score in one rounding keeps u accurate where the
    scores are tiny (large tau: s ~ 1/tau while lse ~ log V), which (s - lse) + log V is not; in one-hot
    rows u is the exact difference of two close numbers. V is the whole vocabulary's size, also for a row
    shard: only then is c_t close to the shard's scores at large tau (lse - log V_r is off by log(V / V_r),
    which would multiply every rounding of the shard's ds by O(1) instead of O(1/tau))."""
    return lse - math.log(V) if V > 0 else lse


@dataclass(frozen=True)
class BackendSpec:
    """name: what users pass as ``backend=``; module: the import path implementing the contract above;
    devices: device types it can ever run on; dtypes: input dtypes it takes."""

    name: str
    module: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOATING
    summary: str = ""


REGISTRY: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"register_backend takes a BackendSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY or spec.name == "auto":
        raise ValueError(f"a backend named {spec.name!r} is already registered")
    if not spec.devices or not spec.dtypes:
        raise ValueError(f"backend {spec.name!r} must name at least one device type and one dtype")
    REGISTRY[spec.name] = spec
    return spec


register_backend(BackendSpec("reference", "softvq_kernels.reference", ("cpu", "cuda", "mps", "xpu", "meta"),
                             summary="the spec: plain PyTorch over the (T, V) scores, differentiated by autograd"))
register_backend(BackendSpec("chunked", "softvq_kernels.chunked", ("cpu", "cuda", "mps", "xpu"),
                             summary="vocabulary chunks with an online log-sum-exp, in PyTorch (CPU default)"))
register_backend(BackendSpec("triton", "softvq_kernels.triton", ("cuda", "cpu"),
                             summary="fused Triton kernels (CPU only under TRITON_INTERPRET=1)"))
register_backend(BackendSpec("cuda", "softvq_kernels.cuda", ("cuda",),
                             (torch.float32, torch.float16, torch.bfloat16),
                             summary="CUDA C++ kernels (csrc/)"))

# Backends in the order "auto" tries them, per device type: on CUDA triton is the fastest at every
# reference shape (docs/benchmarks.md), chunked the fallback when triton cannot run.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("chunked",),
    "cuda": ("triton", "chunked"),
}

BACKEND_NAMES = ("auto", *REGISTRY)
_loaded: dict[str, ModuleType] = {}


def load_backend(name: str) -> ModuleType:
    """The backend's module, imported once and checked against the contract."""
    module = _loaded.get(name)
    if module is None:
        module = importlib.import_module(REGISTRY[name].module)
        if name != "reference":
            missing = [f for f in _CONTRACT if not callable(getattr(module, f, None))]
            if missing:
                raise TypeError(f"backend {name!r} ({module.__name__}) does not implement {missing} of the backend contract")
        _loaded[name] = module
    return module


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why it cannot."""
    device = torch.device(device)
    spec = REGISTRY[name]
    if device.type not in spec.devices:
        return f"it runs on {' / '.join(spec.devices)} tensors, not {device.type}"
    try:
        module = load_backend(name)
    except ImportError as exc:
        return f"its module failed to import ({exc})"
    return module.unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of ``device``, e.g. ``["reference", "chunked"]``.

    ``backend="auto"`` picks the first available of ``AUTO_ORDER[device type]`` (CPU: chunked; CUDA:
    triton, then chunked), else the reference."""
    device = torch.device(device)
    return [name for name in REGISTRY if unavailable_reason(name, device) is None]


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
