"""The public contract of soft_vq: argument checks, dispatch, output types."""

import math

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
