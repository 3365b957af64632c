"""The surface beyond soft_vq itself, held exact: losses on the code distribution (code_scores,
code_ctc_loss) with NaN in frames no loss reads, ties between identical codebook rows, NaN frames' index,
empty batches and bad arguments. Every value is compared with an fp64 oracle built here from the formulas
(direct distances, F.cross_entropy / F.ctc_loss on the materialised log-softmax), never with a backend.
The sharded op's side of the same promises runs in a gloo group: tests/test_distributed_exactness.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import softvq_kernels as sk
from softvq_kernels import backends, planning
from tests.conftest import DEVICE

TRITON_REASON = backends.unavailable_reason("triton", DEVICE)
TINY_TRITON = dict(block_t=16, block_v=16, block_k=16, mm_block_m=16, mm_block_n=16, mm_block_k=16)
DISTANCES = ["l2", "cosine", "dot"]


def formula_scores(x, codebook, tau, distance):
    """(T, d), (V, d) -> (T, V) scores from the definitions: -||x - c||^2 / tau (direct differences),
    <x/|x|, c/|c|> / tau (norms clamped at 1e-8), <x, c> / tau."""
    if distance == "l2":
        return -(x[:, None, :] - codebook[None, :, :]).pow(2).sum(-1) / tau
    if distance == "cosine":
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        codebook = codebook / codebook.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (x[:, None, :] * codebook[None, :, :]).sum(-1) / tau


def backend_cases():
    """(backend, context manager factory) for every backend that runs on this machine's CPU."""
    triton_skip = pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
    yield pytest.param("reference", contextlib.nullcontext, id="reference")
    yield pytest.param("chunked", contextlib.nullcontext, id="chunked")
    yield pytest.param("chunked", lambda: planning.options(chunk_size=64), id="chunked-64")
    yield pytest.param("triton", _tiny_triton, id="triton", marks=triton_skip)


def _tiny_triton():
    from softvq_kernels.triton import configs

    return configs.override(**TINY_TRITON)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ---------------------------------------------------------------- NaN in frames no loss reads


@pytest.mark.parametrize("backend, context", [c for c in backend_cases() if c.values[0] != "reference"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_cross_entropy_over_codes_ignores_nan_in_masked_frames(backend, context, distance):
    b, n, V, d = 2, 7, 13, 5
    x = torch.randn(b, n, d, dtype=torch.float64)
    codebook, tau = torch.randn(V, d, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    mask = torch.rand(b, n) > 0.35
    mask[0, 0], mask[1, -1] = True, False
    targets = torch.randint(0, V, (b, n))
    poisoned = torch.where(mask[..., None], x, torch.nan)
    fp32 = backend == "triton"  # the interpreter's backend takes fp32 / 16-bit inputs
    dtype = torch.float32 if fp32 else torch.float64

    leaves = _leaves(poisoned.to(dtype), codebook.to(dtype), tau.float() if fp32 else tau)
    with context():
        _, aux = sk.soft_vq(*leaves, distance=distance, mask=mask, backend=backend, return_aux=True)
        log_p = sk.code_scores(*leaves, targets[..., None], distance=distance)[..., 0] - aux.lse
        loss = -log_p[mask].mean()
        grads = torch.autograd.grad(loss, leaves)

    ref = _leaves(x.to(dtype).double(), codebook.to(dtype).double(), tau)
    log_probs = formula_scores(ref[0][mask], ref[1], ref[2], distance).log_softmax(-1)
    want = F.cross_entropy(log_probs, targets[mask])
    grads_ref = torch.autograd.grad(want, ref)
    tol = dict(rtol=2e-4, atol=2e-5) if fp32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss.double(), want, **tol)
    for name, got, expected in zip(("x", "codebook", "tau"), grads, grads_ref):
        assert torch.isfinite(got).all(), f"{name}'s gradient holds non-finite values"
        torch.testing.assert_close(got.double(), expected, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("distance", DISTANCES)
def test_code_ctc_loss_ignores_nan_past_input_lengths(distance):
    b, n, V, d = 3, 9, 11, 6
    x = torch.randn(b, n, d, dtype=torch.float64)
    codebook, tau = torch.randn(V, d, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    input_lengths = torch.tensor([9, 6, 4])
    target_lengths = torch.tensor([4, 3, 2])
    targets = torch.randint(1, V, (b, 4))
    valid = torch.arange(n)[None, :] < input_lengths[:, None]
    poisoned = torch.where(valid[..., None], x, torch.nan)

    leaves = _leaves(poisoned, codebook, tau)
    _, aux = sk.soft_vq(*leaves, distance=distance, mask=valid, backend="chunked", return_aux=True)
    loss = sk.code_ctc_loss(*leaves, aux.lse, targets, input_lengths, target_lengths, blank=0, distance=distance)
    grads = torch.autograd.grad(loss, leaves)

    ref = _leaves(torch.where(valid[..., None], x, 0.0), codebook, tau)
    log_probs = formula_scores(ref[0].reshape(-1, d), ref[1], ref[2], distance).log_softmax(-1).reshape(b, n, V)
    want = F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, blank=0)
    grads_ref = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-11)
    for name, got, expected in zip(("x", "codebook", "tau"), grads, grads_ref):
        assert torch.isfinite(got).all(), f"{name}'s gradient holds non-finite values"
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


def test_code_scores_gradients_match_formulas_under_compile():
    """The NaN-safe backward is a custom autograd.Function: it must also hold in a compiled graph."""
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    codebook, tau = torch.randn(9, 4, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    codes = torch.randint(0, 9, (2, 5, 3))
    up = torch.randn(2, 5, 3, dtype=torch.float64)
    for distance in DISTANCES:
        compiled = torch.compile(lambda a, c, t: (sk.code_scores(a, c, t, codes, distance=distance) * up).sum(),
                                 backend="aot_eager")
        leaves = _leaves(x, codebook, tau)
        grads = torch.autograd.grad(compiled(*leaves), leaves)
        ref = _leaves(x, codebook, tau)
        full = formula_scores(ref[0].reshape(-1, 4), ref[1], ref[2], distance).reshape(2, 5, 9)
        grads_ref = torch.autograd.grad((full.gather(-1, codes) * up).sum(), ref)
        for got, expected in zip(grads, grads_ref):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- ties between identical rows


def _tied_problem(dtype):
    """A codebook whose rows 1, 3, 8, 10, 65, 66, 129 are identical (129 in a tail tile and a later
    vocabulary chunk), frames on that row's ray and random frames. At V = 130, d = 513 the GEMMs here
    round identical columns differently (the reference picked 129 for some frames, chunked 129 for others)."""
    V, d = 130, 513
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(V, d, generator=g)
    tied = (1, 3, 8, 10, 65, 66, 129)
    codebook[list(tied)] = codebook[1].clone()
    x = torch.cat([codebook[1][None] * torch.linspace(0.5, 2.0, 6)[:, None], torch.randn(3, d, generator=g)])
    return x.to(dtype), codebook.to(dtype), tied


def _first_argmax(x, codebook, tau, distance):
    s = formula_scores(x.double(), codebook.double(), torch.tensor(tau, dtype=torch.float64), distance)
    return s.argmax(dim=-1)  # the first of equal maxima; identical rows give equal fp64 scores here


@pytest.mark.parametrize("backend, context", list(backend_cases()))
@pytest.mark.parametrize("distance", DISTANCES)
def test_ties_between_identical_rows_go_to_the_lowest_index(backend, context, distance):
    x, codebook, tied = _tied_problem(torch.float32)
    want = _first_argmax(x, codebook, 0.5, distance)
    assert (want[:6] == 1).all()
    with context():
        _, aux = sk.soft_vq(x, codebook, 0.5, distance=distance, backend=backend, return_aux=True)
        vq = sk.SoftVQ(codebook, 0.5, distance=distance, mode="hard", backend=backend).train()
        out = vq(x[None])
    assert aux.indices.tolist() == want.tolist()
    assert out.indices[0].tolist() == want.tolist()  # hard mode: lse_argmax
    counts = torch.bincount(want, minlength=codebook.shape[0]).float()
    torch.testing.assert_close(out.code_counts, counts)  # the hard counts land on the lowest row


def test_ties_are_canonical_whatever_the_backend_returns(monkeypatch):
    """Independent of any BLAS's rounding: a backend that returns a later copy of a row (as a GEMM may)
    still yields the lowest index, and a distinct row is never substituted."""
    from softvq_kernels import chunked

    x, codebook, _ = _tied_problem(torch.float32)
    real_forward = chunked.forward

    def later_copy(frames, book, tau, scoring, need_counts):
        y, lse, indices, counts = real_forward(frames, book, tau, scoring, need_counts)
        return y, lse, torch.where(indices == 1, 129, indices), counts

    monkeypatch.setattr(chunked, "forward", later_copy)
    _, aux = sk.soft_vq(x, codebook, 0.5, backend="chunked", return_aux=True)
    assert aux.indices.tolist() == _first_argmax(x, codebook, 0.5, "l2").tolist()


def test_first_identical_rows_is_exact_on_crafted_tables():
    from softvq_kernels.ties import first_identical_rows

    codebook = torch.randn(40, 7, dtype=torch.float64)
    codebook[[5, 17, 39]] = codebook[2].clone()
    codebook[11] = -0.0 * codebook[11].abs()  # -0.0 ...
    codebook[30] = 0.0 * codebook[30]  # ... equals +0.0
    codebook[21] = codebook[2].clone()
    codebook[21, 3] = torch.nextafter(codebook[2, 3], torch.tensor(torch.inf, dtype=torch.float64))  # one ulp apart
    indices = torch.tensor([[39, 17, 5, 2], [30, 11, 21, -1]])
    assert first_identical_rows(codebook, indices).tolist() == [[2, 2, 2, 2], [11, 11, 21, -1]]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        book = torch.randn(300, 33).to(dtype)
        book[250] = book[7].clone()
        assert first_identical_rows(book, torch.tensor([250, 249, 7])).tolist() == [7, 249, 7]


# ---------------------------------------------------------------- NaN frames, one rule


@pytest.mark.parametrize("backend, context", list(backend_cases()))
@pytest.mark.parametrize("distance", DISTANCES)
def test_a_nan_frame_gets_index_minus_one(backend, context, distance):
    x, codebook = torch.randn(5, 6), torch.randn(17, 6)
    x[2, 4] = torch.nan
    mask = torch.tensor([True, True, True, False, True])
    want = _first_argmax(torch.where(mask[:, None], x, 0.0), codebook, 0.5, distance)
    want[2], want[3] = -1, -1
    with context():
        _, aux = sk.soft_vq(x, codebook, 0.5, distance=distance, mask=mask, backend=backend, return_aux=True)
        hard = sk.SoftVQ(codebook, 0.5, distance=distance, mode="hard", backend=backend).eval()
        out = hard(x, mask=mask)
    assert torch.isnan(aux.lse[2])
    assert aux.indices.tolist() == want.tolist()
    assert out.indices.tolist() == want.tolist()


# ---------------------------------------------------------------- empty batches, bad arguments


def test_code_losses_take_empty_batches():
    codebook = torch.randn(9, 4)
    s = sk.code_scores(torch.randn(0, 5, 4), codebook, 0.5, torch.zeros(0, 3, dtype=torch.int64))
    assert s.shape == (0, 5, 3)
    assert sk.code_scores(torch.randn(2, 0, 4), codebook, 0.5, torch.zeros(2, 3, dtype=torch.int64)).shape == (2, 0, 3)
    x = torch.randn(0, 5, 4, requires_grad=True)
    args = (x, codebook, 0.5, torch.zeros(0, 5), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64))
    assert sk.code_ctc_loss(*args, blank=0, reduction="none").shape == (0,)
    for reduction in ("mean", "sum"):
        loss = sk.code_ctc_loss(*args, blank=0, reduction=reduction)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, x)
        assert grad.shape == x.shape


def test_code_losses_refuse_bad_arguments():
    x, codebook = torch.randn(2, 5, 4), torch.randn(9, 4)
    lse = torch.randn(2, 5)
    lengths = torch.tensor([5, 4])
    with pytest.raises(TypeError, match="codebook dtype"):
        sk.code_scores(x.double(), codebook, 0.5, torch.zeros(2, 5, 1, dtype=torch.int64))
    ctc = dict(blank=0)
    with pytest.raises(TypeError, match="targets must be an integer"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1.7, 2.0], [3.0, 4.0]]), lengths, torch.tensor([2, 2]), **ctc)
    with pytest.raises(TypeError, match="target_lengths must hold integers"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1, 2], [3, 4]]), lengths, torch.tensor([1.5, 2.0]), **ctc)
    with pytest.raises(TypeError, match="input_lengths must hold integers"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1, 2], [3, 4]]), [5.0, 4.0], [2, 2], **ctc)
    with pytest.raises(TypeError, match="lse must be a floating-point tensor"):
        sk.code_ctc_loss(x, codebook, 0.5, lse.long(), torch.tensor([[1, 2], [3, 4]]), lengths, [2, 2], **ctc)
    with pytest.raises(ValueError, match="must not contain the blank"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1, 0], [3, 4]]), lengths, [2, 2], **ctc)
    with pytest.raises(ValueError, match="concatenated targets hold 3 codes"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([1, 2, 3]), lengths, [2, 2], **ctc)
    with pytest.raises(ValueError, match="input_lengths must lie in"):
        sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1, 2], [3, 4]]), [6, 4], [2, 2], **ctc)
    # the padding of padded targets may hold anything (here the blank): only the first target_lengths count
    loss = sk.code_ctc_loss(x, codebook, 0.5, lse, torch.tensor([[1, 2], [3, 0]]), lengths, [2, 1], **ctc)
    assert torch.isfinite(loss)


def test_code_ctc_loss_gradients_under_compile():
    """code_ctc_loss in a compiled function (graph breaks allowed: its target bookkeeping is host-side) gives
    the formulas' loss and gradients, NaN past the input lengths included."""
    b, n, V, d = 2, 6, 9, 4
    x = torch.randn(b, n, d, dtype=torch.float64)
    codebook, tau = torch.randn(V, d, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    input_lengths, target_lengths = torch.tensor([6, 4]), torch.tensor([3, 2])
    targets = torch.randint(1, V, (b, 3))
    valid = torch.arange(n)[None, :] < input_lengths[:, None]

    def loss_fn(x, codebook, tau):
        _, aux = sk.soft_vq(x, codebook, tau, distance="cosine", mask=valid, backend="chunked", return_aux=True)
        return sk.code_ctc_loss(x, codebook, tau, aux.lse, targets, input_lengths, target_lengths, blank=0,
                                distance="cosine")

    leaves = _leaves(torch.where(valid[..., None], x, torch.nan), codebook, tau)
    loss = torch.compile(loss_fn, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref = _leaves(torch.where(valid[..., None], x, 0.0), codebook, tau)
    log_probs = formula_scores(ref[0].reshape(-1, d), ref[1], ref[2], "cosine").log_softmax(-1).reshape(b, n, V)
    want = F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, blank=0)
    grads_ref = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-11)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
