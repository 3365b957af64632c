"""The fused backends as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node.

``softvq::soft_vq``          (x, codebook, tau, mask, distance, backend, need_counts, need_sums)
                             -> (y, lse, indices, counts, sums)   (y, lse, counts in the accumulation dtype)
``softvq::soft_vq_backward`` (grad_y, grad_lse?, grad_counts?, x, codebook, tau, mask, y, lse, distance, backend)
                             -> (grad_x, grad_codebook, grad_tau)
``softvq::lse_argmax``       (x, codebook, tau, mask, distance, backend) -> (lse, indices)   (hard mode, no y)
``softvq::snapshot``         (t) -> a copy of t that a compiled graph saves instead of recomputing

Both soft VQ ops run ``softvq_kernels.autograd.fused_forward`` / ``fused_backward`` (the one
implementation); the backward op is what ``register_autograd`` calls, so a compiled graph holds an
opaque backward node too and the profiler shows both by name. Gradients flow from y, lse and
code_counts (indices and sums carry none). Shapes: x (T, d), codebook (V, d), tau 0-dim, mask (T,)
bool or None; ``backend`` is a resolved backend name other than "reference" (which autograd
differentiates). Double backward and forward-mode AD are not supported: both raise (api.py, below).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from softvq_kernels.autograd import fused_backward, fused_forward, fused_lse_argmax
from softvq_kernels.reference import accumulation_dtype

DOUBLE_BACKWARD_MESSAGE = (
    "soft_vq's fused backends do not support double backward (create_graph=True followed by a second "
    "backward, e.g. a gradient penalty or Hessian-vector products); use backend='reference', which "
    "autograd differentiates to any order (it materialises the (T, V) scores)"
)


@torch.library.custom_op("softvq::soft_vq", mutates_args=())
def soft_vq_op(
    x: Tensor,
    codebook: Tensor,
    tau: Tensor,
    mask: Optional[Tensor],
    distance: str,
    backend: str,
    need_counts: bool,
    need_sums: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return fused_forward(x, codebook, tau, mask, distance, backend, need_counts, need_sums)


@soft_vq_op.register_fake
def _soft_vq_fake(x, codebook, tau, mask, distance, backend, need_counts, need_sums):
    T, d = x.shape
    V = codebook.shape[0]
    acc = accumulation_dtype(x.dtype)
    return (
        x.new_empty(T, d, dtype=acc),
        x.new_empty(T, dtype=acc),
        x.new_empty(T, dtype=torch.int64),
        x.new_empty(V, dtype=acc),
        x.new_empty(V if need_sums else 0, d, dtype=torch.float32),
    )


@torch.library.custom_op("softvq::soft_vq_backward", mutates_args=())
def soft_vq_backward_op(
    grad_y: Tensor,
    grad_lse: Optional[Tensor],
    grad_counts: Optional[Tensor],
    x: Tensor,
    codebook: Tensor,
    tau: Tensor,
    mask: Optional[Tensor],
    y: Tensor,
    lse: Tensor,
    distance: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return fused_backward(grad_y, grad_lse, grad_counts, x, codebook, tau, mask, y, lse, distance, backend)


@soft_vq_backward_op.register_fake
def _soft_vq_backward_fake(grad_y, grad_lse, grad_counts, x, codebook, tau, mask, y, lse, distance, backend):
    # The real op returns contiguous tensors whatever the input strides (a W.T codebook, a permuted x).
    return x.new_empty(x.shape), codebook.new_empty(codebook.shape), tau.new_empty(())


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _no_context(ctx, inputs, output):
    pass


soft_vq_backward_op.register_autograd(_refuse_double_backward, setup_context=_no_context)


def _setup_context(ctx, inputs, output):
    x, codebook, tau, mask, distance, backend, _need_counts, _need_sums = inputs
    y, lse = output[0], output[1]
    ctx.save_for_backward(x, codebook, tau, mask, y, lse)
    ctx.distance, ctx.backend = distance, backend
    # Outputs that no loss reached arrive as None, not zeros: no counts-gradient pass for nothing.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_lse, _grad_indices, grad_counts, _grad_sums):
    x, codebook, tau, mask, y, lse = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None, None, None
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y.contiguous()
    grad_x, grad_codebook, grad_tau = soft_vq_backward_op(
        grad_y, grad_lse, grad_counts, x, codebook, tau, mask, y, lse, ctx.distance, ctx.backend
    )
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        grad_codebook if needs[1] else None,
        grad_tau if needs[2] else None,
        None,
        None,
        None,
        None,
        None,
    )


soft_vq_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("softvq::lse_argmax", mutates_args=())
def lse_argmax_op(x: Tensor, codebook: Tensor, tau: Tensor, mask: Optional[Tensor], distance: str,
                  backend: str) -> tuple[Tensor, Tensor]:
    """Hard mode: (lse (T,) acc dtype, indices (T,) int64) without the weighted sum; no gradient."""
    return fused_lse_argmax(x, codebook, tau, mask, distance, backend)


@lse_argmax_op.register_fake
def _lse_argmax_fake(x, codebook, tau, mask, distance, backend):
    T = x.shape[0]
    return x.new_empty(T, dtype=accumulation_dtype(x.dtype)), x.new_empty(T, dtype=torch.int64)


@torch.library.custom_op("softvq::snapshot", mutates_args=())
def snapshot(t: Tensor) -> Tensor:
    """A copy of t. Opaque to the compiler's partitioner, so a compiled graph keeps this copy for its
    backward instead of recomputing it from t, which an in-place update (an EMA codebook) may have
    changed by then: the backward then uses exactly the tensor the forward used."""
    return t.clone()


@snapshot.register_fake
def _snapshot_fake(t):
    return torch.empty_like(t)
