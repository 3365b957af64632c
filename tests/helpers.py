"""Comparison helpers shared by the test modules."""

from __future__ import annotations

import torch

import softvq_kernels as sk
from softvq_kernels.reference import scores

# Norm-relative error allowed per input dtype against the fp64 reference on the same (rounded) inputs.
# fp32 leaves room for TF32 matrix units on GPUs; low precision is dominated by rounding the outputs.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, with the norm floored at 0.1 per element so that an
    exactly-zero expectation (one code, one-hot softmax) is compared against unit-scale rounding."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    floor = 0.1 * max(expected.numel(), 1) ** 0.5
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def random_problem(T_shape, V, d, dtype, device, *, scale=1.0, masked=False, requires_grad=True):
    """Random x (*T_shape, d), codebook (V, d) and a learnable temperature, never zeros."""
    x = (torch.randn(*T_shape, d, device=device) * scale).to(dtype).requires_grad_(requires_grad)
    codebook = (torch.randn(V, d, device=device) * scale).to(dtype).requires_grad_(requires_grad)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    temperature = torch.tensor(0.5 + torch.rand(()).item(), dtype=tau_dtype, device=device, requires_grad=requires_grad)
    mask = None
    if masked:
        mask = torch.rand(*T_shape, device=device) > 0.35
        mask.view(-1)[0] = True  # at least one real frame
    return x, codebook, temperature, mask


def run_with_grads(x, codebook, temperature, *, distance, mask, backend, upstream, upstream_lse=None,
                   upstream_counts=None):
    """Forward with aux, then gradients of <upstream, y> + <upstream_lse, lse> + <upstream_counts, counts>
    for x, codebook and temperature (every differentiable output at once)."""
    y, aux = sk.soft_vq(
        x, codebook, temperature, distance=distance, mask=mask, backend=backend, return_aux=True
    )
    loss = (y.double() * upstream.double()).sum()
    if upstream_lse is not None:
        loss = loss + (aux.lse.double() * upstream_lse.double()).sum()
    if upstream_counts is not None:
        loss = loss + (aux.code_counts.double() * upstream_counts.double()).sum()
    grads = torch.autograd.grad(loss, (x, codebook, temperature))
    return y, aux, grads


def fp64_oracle(x, codebook, temperature, *, distance, mask, upstream, upstream_lse=None, upstream_counts=None):
    """The reference on the same values in fp64 (inputs already rounded to the tested dtype)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, codebook, temperature)]
    return run_with_grads(*leaves, distance=distance, mask=mask, backend="reference", upstream=upstream,
                          upstream_lse=upstream_lse, upstream_counts=upstream_counts)


def assert_indices_are_argmax(indices, x, codebook, temperature, distance, mask, atol):
    """An index is right when its reference score is the max up to rounding (ties may differ)."""
    s = scores(x.detach().double().reshape(-1, x.shape[-1]), codebook.detach().double(), temperature.detach().double(), distance)
    flat = indices.reshape(-1)
    real = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    assert (flat[~real] == -1).all()
    picked = s[real].gather(1, flat[real, None]).squeeze(1)
    assert (picked >= s[real].max(dim=1).values - atol).all()


def assert_grads_close(grads, grads_ref, eager_grads, tol):
    """Each gradient within tol of the fp64 oracle, or within 3x the error that eager PyTorch makes
    in the same dtype (the bar for low precision: e.g. autograd rounds grad_y to fp16 for everyone)."""
    for name, grad, grad_ref, grad_eager in zip(("x", "codebook", "temperature"), grads, grads_ref, eager_grads):
        err = rel_err(grad, grad_ref)
        assert err < max(2 * tol, 3 * rel_err(grad_eager, grad_ref)), f"gradient for {name}: {err:.2e}"


def free_port() -> int:
    """A free TCP port on the loopback interface (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, args_for_rank, timeout_s: float):
    """Start ``target(*args_for_rank(rank, port))`` in ``world`` spawned processes on one free port, wait
    at most ``timeout_s`` for each, and fail the test if any hung. Returns the finished processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=args_for_rank(rank, port)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    assert not hung, f"workers did not finish within {timeout_s}s"
    return procs
