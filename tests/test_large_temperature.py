"""fp32 gradients stay exact at large temperatures. There the scores are of size 1/tau while lse is about
log V; the backward's centred scores u = s - (lse - log V) must come from the true score in one rounding,
or every u loses the digits of s at the scale of log V (dtau 0.38 off at cosine tau = 1e6 before).

The bar: the gradients for x and the codebook of <w, lse> (and of a mixed loss) within 5x the error
eager fp32 PyTorch makes on the same rounded inputs, dtau within fp32 summation error of its terms, measured against fp64 from the formulas (reference.scores + autograd), for every
CPU-runnable backend (chunked, triton's interpreter on its default and flash schedules)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends
from softvq_kernels.reference import scores
from tests.conftest import DEVICE

TRITON_REASON = backends.unavailable_reason("triton", DEVICE)


def _schedules():
    yield pytest.param("chunked", None, id="chunked")
    triton_skip = pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
    tiny = dict(block_t=16, block_v=16, block_k=16, mm_block_m=16, mm_block_n=16, mm_block_k=16)
    yield pytest.param("triton", tiny, id="triton-staged", marks=triton_skip)
    yield pytest.param("triton", dict(tiny, fused_max_d=64, fused_finish=True, fused_backward=True),
                       id="triton-flash", marks=triton_skip)


def _override(config):
    if config is None:
        return contextlib.nullcontext()
    from softvq_kernels.triton import configs

    return configs.override(**config)


def _eager_grads(x, codebook, tau, distance, up_y, up_lse):
    """The formulas in plain autograd on leaves of the given dtype: y = softmax(s) C, lse = logsumexp(s).
    Returns the gradients for x, codebook, tau and the scale of dtau's summands, sum |dL/ds * s| / tau."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, codebook, tau)]
    s = scores(*leaves, distance)
    loss = (s.logsumexp(-1).double() * up_lse).sum()
    if up_y is not None:
        loss = loss + ((s.softmax(-1) @ leaves[1]).double() * up_y).sum()
    *grads, ds = torch.autograd.grad(loss, [*leaves, s])
    return grads, ((ds * s).abs().sum() / tau).item()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend, config", list(_schedules()))
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("tau_value", [1e4, 1e6])
@pytest.mark.parametrize("with_y", [False, True], ids=["lse", "y+lse"])
def test_fp32_gradients_at_large_temperature(backend, config, distance, tau_value, with_y):
    assert_exact_at_large_temperature(backend, config, distance, tau_value, with_y)


def assert_exact_at_large_temperature(backend, config, distance, tau_value, with_y):
    """The check, for one backend (also the CUDA backend in CPU emulation, tests/test_cuda.py)."""
    T, V, d = 19, 301, 9
    x = torch.randn(T, d, dtype=torch.float64)
    codebook = torch.randn(V, d, dtype=torch.float64)
    up_lse = torch.randn(T, dtype=torch.float64)
    up_y = torch.randn(T, d, dtype=torch.float64) if with_y else None
    x32, c32 = x.float(), codebook.float()
    tau32 = torch.tensor(tau_value, dtype=torch.float32)
    # fp64 from the formulas on the same rounded inputs, and eager fp32's own error against it
    oracle, tau_scale = _eager_grads(x32.double(), c32.double(), tau32.double(), distance, up_y, up_lse)
    eager, _ = _eager_grads(x32, c32, tau32, distance, up_y, up_lse)
    leaves = [t.clone().requires_grad_() for t in (x32, c32, tau32)]
    with _override(config):
        y, aux = sk.soft_vq(*leaves, distance=distance, backend=backend, return_aux=True)
        loss = (aux.lse.double() * up_lse).sum()
        if with_y:
            loss = loss + (y.double() * up_y).sum()
        grads = torch.autograd.grad(loss, leaves)
    for name, got, want, base in zip(("x", "codebook"), grads, oracle, eager):
        err, eager_err = _rel(got, want), _rel(base, want)
        assert err <= max(5 * eager_err, 1e-6), f"grad {name}: {err:.2e} (eager fp32 {eager_err:.2e})"
    # dtau is one sum of terms that cancel: its rounding is bounded by the size of the terms, not of the sum
    # (fp32 summation error ~ 1e-6 of sum |ds s| / tau; the bug this guards against was 1e-1 of dtau itself).
    err, eager_err = abs(grads[2].item() - oracle[2].item()), abs(eager[2].item() - oracle[2].item())
    assert err <= max(5 * eager_err, 2e-6 * tau_scale), f"grad tau: {err:.2e} (eager {eager_err:.2e}, scale {tau_scale:.2e})"
