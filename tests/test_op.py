"""The torch.library op ``softvq::soft_vq``: registration checks, one node under torch.compile, profiler
name, autocast, and the soft sums (codebook statistics for EMA) against the reference."""

from __future__ import annotations

import pytest
import torch

from softvq_kernels import backends, chunked, soft_vq
from softvq_kernels.autograd import fused_forward
from softvq_kernels.op import soft_vq_op
from softvq_kernels.reference import scores
from tests.conftest import DEVICE

DISTANCES = ["l2", "cosine", "dot"]


def _inputs(dtype=torch.float64, requires_grad=True, T=7, V=11, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    codebook = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    tau = torch.tensor(0.5, dtype=dtype).requires_grad_(requires_grad)
    mask = torch.rand(T, generator=g) > 0.3
    return x, codebook, tau, mask


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(distance, masked):
    x, codebook, tau, mask = _inputs()
    args = (x, codebook, tau, mask if masked else None, distance, "chunked", True, masked)
    torch.library.opcheck(soft_vq_op, args)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck_through_the_op(distance):
    x, codebook, tau, mask = _inputs(T=4, V=5, d=3)
    fn = lambda x, c, t: soft_vq(x, c, t, distance=distance, mask=mask, backend="chunked")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, codebook, tau))


def _fused_backend_params():
    params = []
    for name in ("chunked", "triton", "cuda"):
        reason = backends.unavailable_reason(name, DEVICE)
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.mark.parametrize("backend", _fused_backend_params())
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("masked", [False, True])
def test_soft_sums_match_reference(backend, distance, masked):
    """Soft sums through the backward's value-role gradient (or the backend's own hook), every backend."""
    x, codebook, tau, mask = (t.to(DEVICE) for t in _inputs(dtype=torch.float32, requires_grad=False))
    mask = mask if masked else None
    probs = scores(x.double(), codebook.double(), tau.double(), distance).softmax(-1)
    if mask is not None:
        probs = probs * mask[:, None]
    expected = (probs.T @ x.double()).float()
    *_, counts, sums = fused_forward(x, codebook, tau, mask, distance, backend, True, True)
    torch.testing.assert_close(sums, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(counts, probs.sum(0).float(), rtol=1e-4, atol=1e-4)


def test_compile_sees_one_op_and_no_graph_break():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    x, codebook, tau, mask = _inputs(dtype=torch.float32)
    fn = torch.compile(lambda x, c, t: soft_vq(x, c, t, mask=mask), fullgraph=True, backend=capture)
    y = fn(x, codebook, tau)
    (y.square().sum()).backward()
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.softvq.soft_vq.default) == 1
    torch.testing.assert_close(y, soft_vq(x, codebook, tau, mask=mask))


def test_profiler_shows_the_op_by_name():
    x, codebook, tau, mask = _inputs(dtype=torch.float32)
    with torch.profiler.profile() as prof:
        soft_vq(x, codebook, tau, mask=mask).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"softvq::soft_vq", "softvq::soft_vq_backward"} <= names


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_inputs_and_accumulates_in_fp32(backend, dtype):
    x, codebook, tau, mask = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = soft_vq(x, codebook, tau, mask=mask, backend=backend)  # fp32 x and codebook both work
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == codebook.grad.dtype == torch.float32
    # The result is the fp32-accumulated op on the rounded inputs, not a low-precision matmul.
    exact = soft_vq(x.detach().to(dtype).double(), codebook.detach().to(dtype).double(), 0.5, mask=mask)
    eager_low = soft_vq(x.detach().to(dtype), codebook.detach().to(dtype), 0.5, mask=mask, backend=backend)
    torch.testing.assert_close(y, eager_low)
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["transposed_codebook", "permuted_x", "both"])
def test_compiled_op_accepts_any_strides(layout):
    """The fake backward must promise what the real one returns (contiguous gradients) for strided inputs,
    e.g. a codebook that is W.T of a (d, V) weight or a permuted activation."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 30, generator=g, requires_grad=True)  # (d, V): codebook = weight.T
    dense = torch.randn(30, 6, generator=g, requires_grad=True)
    x_src = torch.randn(6, 2, 5, generator=g, requires_grad=True)  # (d, b, n): x = permute -> (b, n, d)

    def run(fn):
        codebook = weight.T if layout != "permuted_x" else dense
        x = x_src.permute(1, 2, 0) if layout != "transposed_codebook" else x_src.permute(1, 2, 0).contiguous()
        y, aux = fn(x, codebook)
        loss = y.square().sum() + aux.lse.sum() + aux.code_counts.square().sum()
        return torch.autograd.grad(loss, (x_src, weight if layout != "permuted_x" else dense))

    eager = run(lambda x, c: soft_vq(x, c, 0.5, backend="chunked", return_aux=True))
    compiled_fn = torch.compile(lambda x, c: soft_vq(x, c, 0.5, backend="chunked", return_aux=True),
                                fullgraph=True, backend="aot_eager")
    compiled = run(compiled_fn)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_unused_aux_outputs_cost_no_counts_pass(monkeypatch):
    """A loss on y alone must not trigger the counts-gradient pass (no materialised zero gradients)."""
    calls = []
    real = chunked.expected_counts_gradient
    monkeypatch.setattr(chunked, "expected_counts_gradient", lambda *a: calls.append(1) or real(*a))
    x, codebook, tau, _ = _inputs(dtype=torch.float32)
    y, aux = soft_vq(x, codebook, tau, backend="chunked", return_aux=True)
    y.sum().backward(retain_graph=True)
    assert calls == []
    torch.autograd.grad(aux.code_counts.square().sum(), x)
    assert calls == [1]
