"""The public contract of soft_vq: argument checks, dispatch, output types."""

import dataclasses
import math

import numpy as np

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends

X = torch.randn(4, 6)
CODEBOOK = torch.randn(9, 6)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(x=torch.randn(4, 5)), ValueError, "x's last dimension"),
        (dict(codebook=torch.randn(9)), ValueError, "codebook must be 2-D"),
        (dict(codebook=torch.randn(2, 9, 6)), ValueError, "codebook must be 2-D"),
        (dict(codebook=torch.randn(0, 6)), ValueError, "codebook must be non-empty"),
        (dict(codebook=CODEBOOK.double()), TypeError, "codebook dtype"),
        (dict(x=X.long(), codebook=CODEBOOK.long()), TypeError, "x must be a floating-point"),
        (dict(codebook=CODEBOOK.int()), TypeError, "codebook must be a floating-point"),
        (dict(x=[[1.0] * 6]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(temperature=-1.0), ValueError, "temperature must be positive"),
        (dict(temperature=math.nan), ValueError, "temperature must be positive"),
        (dict(temperature=math.inf), ValueError, "temperature must be positive"),
        (dict(temperature=torch.tensor(-0.5)), ValueError, "temperature must be positive"),
        (dict(temperature=torch.tensor(float("nan"))), ValueError, "temperature must be positive"),
        (dict(temperature=torch.tensor([0.5, 0.5])), ValueError, "temperature must be a 0-dim"),
        (dict(temperature=torch.tensor(2)), TypeError, "temperature must be a floating-point"),
        (dict(temperature="1.0"), TypeError, "temperature must be a positive float"),
        (dict(temperature=True), TypeError, "temperature must be a positive float"),
        (dict(distance="euclid"), ValueError, "distance must be one of"),
        (dict(backend="fastest"), ValueError, "backend must be one of"),
        (dict(mask=torch.ones(4, 1, dtype=torch.bool)), ValueError, "mask shape"),
        (dict(mask=torch.ones(4)), TypeError, "mask must have dtype torch.bool"),
        (dict(mask=[True] * 4), TypeError, "mask must be a bool torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    args = dict(x=X, codebook=CODEBOOK, temperature=1.0)
    args.update(kwargs)
    x, codebook = args.pop("x"), args.pop("codebook")
    with pytest.raises(error, match=words):
        sk.soft_vq(x, codebook, **args)


def test_unavailable_backend_is_an_error_not_a_fallback():
    reason = backends.unavailable_reason("cuda", torch.device("cpu"))
    assert reason is not None
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        sk.soft_vq(X, CODEBOOK, backend="cuda")


def test_available_backends_on_cpu():
    names = sk.available_backends("cpu")
    assert names[:2] == ["reference", "chunked"]
    assert "cuda" not in names


def test_auto_picks_chunked_on_cpu():
    assert backends.resolve_backend("auto", torch.device("cpu")) == "chunked"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_contract(dtype):
    x, codebook = torch.randn(2, 3, 6).to(dtype), torch.randn(9, 6).to(dtype)
    y = sk.soft_vq(x, codebook)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == dtype
    y2, aux = sk.soft_vq(x, codebook, return_aux=True)
    assert isinstance(aux, sk.SoftVQAux)
    torch.testing.assert_close(y, y2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # fp64 stays fp64, the rest is fp32
    assert aux.lse.shape == (2, 3) and aux.lse.dtype == acc
    assert aux.indices.shape == (2, 3) and aux.indices.dtype == torch.int64
    assert aux.code_counts.shape == (9,) and aux.code_counts.dtype == acc
    assert not aux.lse.requires_grad and not aux.code_counts.requires_grad  # no input asked for a gradient
    torch.testing.assert_close(aux.code_counts.sum(), torch.tensor(6.0, dtype=acc), rtol=1e-3, atol=1e-3)


def test_temperature_gets_gradient_only_when_it_asks():
    x, codebook = torch.randn(5, 6, requires_grad=True), torch.randn(9, 6)
    fixed = torch.tensor(0.7)
    sk.soft_vq(x, codebook, fixed).sum().backward()
    assert fixed.grad is None and x.grad is not None
    learnable = torch.tensor(0.7, requires_grad=True)
    sk.soft_vq(x, codebook, learnable).pow(2).sum().backward()
    assert learnable.grad is not None and torch.isfinite(learnable.grad) and learnable.grad != 0


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_nan_in_a_frame_stays_in_that_frame(backend):
    x, codebook = torch.randn(5, 6), torch.randn(9, 6)
    x[2, 3] = float("nan")
    y = sk.soft_vq(x, codebook, backend=backend)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_nan_in_the_codebook_reaches_every_frame(backend):
    x, codebook = torch.randn(5, 6), torch.randn(9, 6)
    codebook[4, 0] = float("nan")
    assert torch.isnan(sk.soft_vq(x, codebook, backend=backend)).all()


def test_temperature_on_cpu_works_with_the_tensors_device():
    x, codebook = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(sk.soft_vq(x, codebook, torch.tensor(2.0)), sk.soft_vq(x, codebook, 2.0))


def test_auto_prefers_triton_on_cuda_tensors():
    if backends.unavailable_reason("triton", torch.device("cuda")) is None:
        assert backends.resolve_backend("auto", torch.device("cuda")) == "triton"
    else:  # no GPU here: the order itself is what "auto" walks on one
        assert backends.AUTO_ORDER["cuda"][0] == "triton"


# ------------------------------------------------------------------------- silent-wrong regressions


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-38])
@pytest.mark.parametrize("distance", ["l2", "dot", "cosine"])
def test_temperature_below_the_fp32_normal_range_is_refused(temperature, distance):
    """Below the smallest normal fp32 every score overflows (inf - inf = NaN): no finite answer exists."""
    with pytest.raises(ValueError, match="temperature must be positive"):
        sk.soft_vq(X, CODEBOOK, temperature, distance=distance)
    with pytest.raises(ValueError, match="temperature must be positive"):
        sk.soft_vq(X, CODEBOOK, torch.tensor(temperature), distance=distance)


def test_smallest_accepted_temperature_gives_finite_answers():
    y, aux = sk.soft_vq(X, CODEBOOK, 1e-30, return_aux=True)
    assert torch.isfinite(y).all() and torch.isfinite(aux.lse).all()


def test_compiled_call_checks_a_tensor_temperature():
    fn = torch.compile(lambda x, c, t: sk.soft_vq(x, c, t), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(fn(X, CODEBOOK, torch.tensor(0.5))).all()
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        fn(X, CODEBOOK, torch.tensor(-1.0))


@pytest.mark.parametrize("make", [lambda: np.float32(0.5), lambda: np.float64(0.5), lambda: np.int64(2)])
def test_numpy_scalar_temperatures(make):
    torch.testing.assert_close(sk.soft_vq(X, CODEBOOK, make()), sk.soft_vq(X, CODEBOOK, float(make())))


def test_meta_and_foreign_device_temperatures_name_the_devices():
    with pytest.raises(ValueError, match="temperature is on meta but x is on cpu"):
        sk.soft_vq(X, CODEBOOK, torch.tensor(0.5, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_temperature_with_cpu_inputs_names_the_devices():
    with pytest.raises(ValueError, match="temperature is on cuda"):
        sk.soft_vq(X, CODEBOOK, torch.tensor(0.5, device="cuda"))


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_return_aux_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="return_aux must be a bool"):
        sk.soft_vq(X, CODEBOOK, return_aux=flag)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_forward_mode_ad_is_refused_by_name(backend):
    x = torch.randn(5, 6)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: sk.soft_vq(x, CODEBOOK, 0.5, backend=backend), (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        sk.soft_vq(fwAD.make_dual(x, torch.ones_like(x)), CODEBOOK, 0.5, backend=backend)


def test_forward_mode_ad_works_on_the_reference():
    x, t = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    c = CODEBOOK.double()
    _, tangent = torch.func.jvp(lambda x: sk.soft_vq(x, c, 0.5, backend="reference"), (x,), (t,))
    jac = torch.autograd.functional.jacobian(lambda x: sk.soft_vq(x, c, 0.5, backend="reference"), x)
    torch.testing.assert_close(tangent, torch.einsum("tdse,se->td", jac, t))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_double_backward_is_refused_by_name(backend):
    x = torch.randn(5, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(sk.soft_vq(x, CODEBOOK, 0.5, backend=backend).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="do not support double backward.*backend='reference'"):
        grad.sum().backward()


def test_double_backward_works_on_the_reference():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: sk.soft_vq(x, CODEBOOK.double(), 0.5, backend="reference"), (x,))


def test_a_dtype_the_backend_does_not_take_is_named(monkeypatch):
    spec = backends.REGISTRY["chunked"]
    monkeypatch.setitem(backends.REGISTRY, "chunked", dataclasses.replace(spec, dtypes=(torch.float32,)))
    with pytest.raises(TypeError, match="backend='chunked' takes .*float32.* got torch.float64"):
        sk.soft_vq(X.double(), CODEBOOK.double(), backend="chunked")


def test_registering_a_backend_checks_the_spec():
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend(backends.BackendSpec("chunked", "softvq_kernels.chunked", ("cpu",)))
    with pytest.raises(TypeError, match="BackendSpec"):
        backends.register_backend({"name": "mine"})
    with pytest.raises(ValueError, match="at least one device"):
        backends.register_backend(backends.BackendSpec("mine", "softvq_kernels.chunked", ()))
