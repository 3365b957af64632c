"""The shared correctness suite: every fused backend against the fp64 reference.

A new backend is tested here as soon as it is registered in softvq_kernels.backends. Backends that cannot run on this machine's device are
skipped with the registry's reason (the CUDA backend without a GPU); Triton runs in its CPU
interpreter when there is no GPU (tests/conftest.py).
"""

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends
from tests.conftest import DEVICE
from tests.helpers import (
    REL_TOL,
    assert_grads_close,
    assert_indices_are_argmax,
    fp64_oracle,
    random_problem,
    rel_err,
    run_with_grads,
)

# Every registered backend but the spec itself: registering a backend (softvq_kernels.backends) adds it here.
FUSED_BACKENDS = [name for name in backends.REGISTRY if name != "reference"]
DISTANCES = ["l2", "cosine", "dot"]


def _backend_param(name):
    reason = backends.unavailable_reason(name, DEVICE)
    return pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKEND_PARAMS = [_backend_param(name) for name in FUSED_BACKENDS]


def _dtypes_for(backend):
    supported = backends.REGISTRY[backend].dtypes
    dtypes = [torch.float32, torch.float16]
    if DEVICE.type == "cuda" or backend == "chunked":
        dtypes.append(torch.bfloat16)  # the Triton interpreter's bf16 dot is wrong; GPUs test it
    return [dt for dt in dtypes if supported is None or dt in supported]


def _check_against_reference(backend, T_shape, V, d, dtype, distance, masked, scale=1.0, aux_grads=True):
    """Outputs and the gradients of a loss on y, lse and code_counts together, against the fp64 oracle
    (and, for low precision, against eager PyTorch's error in the same dtype)."""
    x, codebook, temperature, mask = random_problem(T_shape, V, d, dtype, DEVICE, scale=scale, masked=masked)
    upstream = torch.randn(*T_shape, d, device=DEVICE)
    extra = {}
    if aux_grads:
        extra = dict(upstream_lse=torch.randn(*T_shape, device=DEVICE), upstream_counts=torch.randn(V, device=DEVICE))
    y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend=backend,
                                   upstream=upstream, **extra)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=mask,
                                            upstream=upstream, **extra)
    tol = REL_TOL[dtype]

    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert aux.lse.dtype == acc and aux.lse.shape == x.shape[:-1]
    assert (aux.lse.double() - aux_ref.lse).abs().max().item() < tol * (1 + aux_ref.lse.abs().max().item())
    assert aux.indices.dtype == torch.int64
    assert_indices_are_argmax(aux.indices, x, codebook, temperature, distance, mask, atol=50 * tol)
    assert aux.code_counts.shape == (V,) and aux.code_counts.dtype == acc
    assert rel_err(aux.code_counts, aux_ref.code_counts) < tol
    *_, eager_grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="reference",
                                     upstream=upstream, **extra)
    assert_grads_close(grads, grads_ref, eager_grads, tol)
    if mask is not None:
        assert (y[~mask] == 0).all() and (grads[0][~mask] == 0).all()
        assert (aux.lse[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_reference_at_odd_shapes(backend, distance, masked):
    for dtype in _dtypes_for(backend):
        _check_against_reference(backend, (2, 9), 37, 19, dtype, distance, masked)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("T_shape, V, d", [((1,), 1, 16), ((3,), 1, 5), ((2, 3, 5), 67, 33), ((70,), 130, 17)])
def test_shapes_single_code_and_leading_dims(backend, T_shape, V, d):
    _check_against_reference(backend, T_shape, V, d, torch.float32, "l2", masked=False)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("regime", ["inputs_x1e3", "tau_1e-30"])
def test_one_hot_regime_is_exact(backend, distance, regime):
    """Inputs x1e3 or tau = 1e-30 make the softmax one-hot: outputs and every gradient must match the
    fp64 reference to fp32 accuracy (no inf/NaN from exp overflow, no rounding noise of
    <g, c> - <g, y> amplified by |x| / tau in the codebook's key role)."""
    scale, tau = (1e3, None) if regime == "inputs_x1e3" else (1.0, 1e-30)
    x, codebook, temperature, mask = random_problem((11,), 29, 13, torch.float32, DEVICE, scale=scale, masked=True)
    if tau is not None:
        temperature = torch.tensor(tau, device=DEVICE, requires_grad=True)
    if distance == "cosine" and tau is None:
        temperature = torch.tensor(1e-6, device=DEVICE, requires_grad=True)  # cosine scores are bounded by 1/tau
    upstream = torch.randn(11, 13, device=DEVICE)
    # a loss on lse too, where its gradient is representable in fp32 (d lse / d tau = -s / tau)
    extra = dict(upstream_counts=torch.randn(29, device=DEVICE))
    if tau is None and distance != "cosine":
        extra["upstream_lse"] = torch.randn(11, device=DEVICE)
    y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend=backend,
                                   upstream=upstream, **extra)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=mask,
                                            upstream=upstream, **extra)
    tol = REL_TOL[torch.float32]
    assert rel_err(y, y_ref) < tol
    assert torch.allclose(aux.lse.double(), aux_ref.lse.double(), rtol=1e-5, atol=1e-3)
    assert_indices_are_argmax(aux.indices, x, codebook, temperature, distance, mask, atol=0)
    assert rel_err(aux.code_counts, aux_ref.code_counts) < tol
    for name, grad, grad_ref in zip(("x", "codebook", "temperature"), grads, grads_ref):
        assert rel_err(grad, grad_ref) < tol, f"gradient for {name}: {rel_err(grad, grad_ref):.2e}"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_huge_l2_inputs_snap_to_nearest_code(backend):
    x = torch.randn(8, 24, device=DEVICE) * 1e3
    codebook = torch.randn(41, 24, device=DEVICE) * 1e3
    y, aux = sk.soft_vq(x, codebook, 1.0, backend=backend, return_aux=True)
    nearest = torch.cdist(x.double(), codebook.double()).argmin(dim=1)
    assert torch.equal(aux.indices, nearest)
    torch.testing.assert_close(y, codebook[nearest], rtol=1e-6, atol=1e-3)
    assert torch.isfinite(aux.lse).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 10, device=DEVICE, requires_grad=True)
    codebook = torch.randn(13, 10, device=DEVICE, requires_grad=True)
    y, aux = sk.soft_vq(x, codebook, 0.7, backend=backend, return_aux=True)
    assert y.shape == (0, 3, 10) and aux.lse.shape == (0, 3) and aux.indices.shape == (0, 3)
    assert torch.equal(aux.code_counts, torch.zeros(13, device=DEVICE))
    y.sum().backward()
    assert torch.equal(codebook.grad, torch.zeros_like(codebook))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_frames_masked(backend):
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    codebook = torch.randn(5, 6, device=DEVICE, requires_grad=True)
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    y, aux = sk.soft_vq(x, codebook, mask=mask, backend=backend, return_aux=True)
    assert (y == 0).all() and (aux.indices == -1).all() and (aux.code_counts == 0).all()
    (y * torch.randn_like(y)).sum().backward()
    assert (x.grad == 0).all() and (codebook.grad == 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_float_and_tensor_temperature_agree(backend):
    x, codebook = torch.randn(7, 12, device=DEVICE), torch.randn(23, 12, device=DEVICE)
    from_float = sk.soft_vq(x, codebook, 0.3, backend=backend)
    from_tensor = sk.soft_vq(x, codebook, torch.tensor(0.3, device=DEVICE), backend=backend)
    torch.testing.assert_close(from_float, from_tensor)


def _fp64_backend_params():
    params = []
    for p in BACKEND_PARAMS:
        (name,) = p.values
        supported = None
        if backends.unavailable_reason(name, DEVICE) is None:
            supported = backends.REGISTRY[name].dtypes
        marks = list(p.marks)
        if supported is not None and torch.float64 not in supported:
            marks.append(pytest.mark.skip(reason=f"{name} does not take float64 (low-precision kernels)"))
        params.append(pytest.param(name, id=name, marks=marks))
    return [pytest.param("reference", id="reference"), *params]


@pytest.mark.parametrize("backend", _fp64_backend_params())
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_fp64_with_mask_and_learnable_temperature(backend, distance):
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    codebook = torch.randn(7, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    temperature = torch.tensor(0.8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)

    def op(x, codebook, temperature):  # every differentiable output at once
        y, aux = sk.soft_vq(x, codebook, temperature, distance=distance, mask=mask, backend=backend, return_aux=True)
        return y, aux.lse, aux.code_counts

    assert torch.autograd.gradcheck(op, (x, codebook, temperature))


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *BACKEND_PARAMS])
@pytest.mark.parametrize("distance", DISTANCES)
def test_nan_and_inf_in_masked_frames_touch_nothing(backend, distance):
    x, codebook, temperature, mask = random_problem((3, 7), 23, 10, torch.float32, DEVICE, masked=True)
    with torch.no_grad():
        x[~mask] = float("nan")
        x[~mask][..., 0] = -float("inf")
    upstream = torch.randn(3, 7, 10, device=DEVICE)
    extra = dict(upstream_lse=torch.randn(3, 7, device=DEVICE), upstream_counts=torch.randn(23, device=DEVICE))
    y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend=backend,
                                   upstream=upstream, **extra)
    for t in (y, aux.lse, aux.code_counts, *grads):
        assert torch.isfinite(t).all()
    assert (y[~mask] == 0).all() and (aux.lse[~mask] == 0).all() and (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *BACKEND_PARAMS])
@pytest.mark.parametrize("distance", DISTANCES)
def test_ties_go_to_the_first_index(backend, distance):
    """Duplicate codebook rows (spread over vocabulary tiles, splits and chunks): the lowest index wins,
    as torch.argmax's rule on the reference."""
    base = torch.randn(5, 16, device=DEVICE)
    codebook = base.repeat(40, 1)  # row v duplicates rows v + 5, v + 10, ...
    x = torch.randn(33, 16, device=DEVICE)
    _, aux = sk.soft_vq(x, codebook, 0.7, distance=distance, backend=backend, return_aux=True)
    assert (aux.indices < 5).all(), aux.indices
    _, aux_ref = sk.soft_vq(x, codebook, 0.7, distance=distance, backend="reference", return_aux=True)
    assert torch.equal(aux.indices, aux_ref.indices)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_half_precision_cosine_scores_are_not_rounded_to_16_bits(backend):
    """Cosine in fp16 at tau = 0.01: the scores must come from raw 16-bit rows scaled by fp32 inverse norms,
    not from normalised rows rounded to fp16 (which made the lse error ~1000x the reference backend's)."""
    x = torch.randn(64, 48, device=DEVICE).half()
    codebook = torch.randn(300, 48, device=DEVICE).half() * 3
    _, aux = sk.soft_vq(x, codebook, 0.01, distance="cosine", backend=backend, return_aux=True)
    _, aux_half_ref = sk.soft_vq(x, codebook, 0.01, distance="cosine", backend="reference", return_aux=True)
    _, aux_exact = sk.soft_vq(x.double(), codebook.double(), 0.01, distance="cosine", backend="reference",
                              return_aux=True)
    err = (aux.lse.double() - aux_exact.lse).abs().max().item()
    err_ref = (aux_half_ref.lse.double() - aux_exact.lse).abs().max().item()
    assert err <= 10 * err_ref + 1e-5, f"lse error {err:.2e} vs the reference backend's {err_ref:.2e}"
