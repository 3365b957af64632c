"""SoftVQ module: modes, masks, losses, straight-through gradients, codebook update rules, temperature,
monitoring, state_dict, torch.compile, autocast and constructor errors (CPU, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softvq_kernels import SoftVQ, SoftVQOutput, soft_vq
from softvq_kernels.reference import scores

BACKENDS = ["reference", "chunked"]
V, D = 11, 6


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(V, D, generator=g, dtype=dtype)
    x = torch.randn(2, 5, D, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    return codebook, x, mask


def _probs(x, codebook, tau, distance="l2"):
    """(T, V) reference probabilities in float64."""
    frames = x.reshape(-1, x.shape[-1]).double()
    return scores(frames, codebook.double(), torch.tensor(tau, dtype=torch.float64), distance).softmax(-1)


# ----------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_soft_mode_is_soft_vq(backend, distance):
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.7, distance=distance, backend=backend)
    out = vq(x)
    assert isinstance(out, SoftVQOutput)
    expected, aux = soft_vq(x, codebook, 0.7, distance=distance, backend=backend, return_aux=True)
    torch.testing.assert_close(out.quantized, expected, rtol=1e-5, atol=1e-6)
    assert out.indices.shape == (2, 5) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, aux.indices)
    torch.testing.assert_close(out.code_counts, aux.code_counts)
    assert out.loss.shape == () and out.perplexity.shape == () and out.dead_codes.shape == ()
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(x, expected))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_hard_mode_picks_the_best_code(backend, distance):
    codebook, x, _ = _data()
    vq = SoftVQ(codebook, mode="hard", distance=distance, backend=backend)
    out = vq(x)
    best = scores(x.reshape(-1, D).double(), codebook.double(), torch.tensor(1.0, dtype=torch.float64), distance)
    assert torch.equal(out.indices.reshape(-1), best.argmax(-1))
    torch.testing.assert_close(out.quantized, codebook[out.indices])
    hard_counts = torch.bincount(out.indices.reshape(-1), minlength=V).float()
    torch.testing.assert_close(out.code_counts, hard_counts)


def test_none_mode_passes_through():
    codebook, x, mask = _data()
    out = SoftVQ(codebook, mode="none")(x, mask=mask)
    assert out.quantized is x
    assert (out.indices == -1).all() and out.loss.item() == 0 and out.perplexity.item() == 0


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_masked_frames_pass_through_and_never_count(mode):
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5, mode=mode, ema_decay=0.8)
    out = vq(x, mask=mask)
    assert torch.equal(out.quantized[~mask], x[~mask])
    assert (out.indices[~mask] == -1).all()
    ref = SoftVQ(codebook, 0.5, mode=mode, ema_decay=0.8)
    real = ref(x[mask][None])  # the real frames alone give the same statistics and loss
    torch.testing.assert_close(out.quantized[mask], real.quantized[0])
    torch.testing.assert_close(out.code_counts, real.code_counts)
    torch.testing.assert_close(out.loss, real.loss)
    torch.testing.assert_close(vq.codebook, ref.codebook)
    torch.testing.assert_close(vq.ema_counts, ref.ema_counts)


# ------------------------------------------------------------------------------- hard-mode losses


def test_straight_through_gradients_and_losses():
    codebook, x, mask = _data()
    x = x.requires_grad_()
    vq = SoftVQ(codebook, mode="hard", commitment_weight=0.3)
    out = vq(x, mask=mask)
    codes = codebook[out.indices.clamp_min(0)]
    per_frame = (x.detach() - codes).pow(2).mean(-1)[mask].mean()
    torch.testing.assert_close(out.loss, 1.3 * per_frame)
    weights = torch.randn_like(x)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)  # straight through, masked frames are identity too
    assert vq.codebook.grad is None or vq.codebook.grad.abs().max() == 0
    x.grad = None
    vq(x, mask=mask).loss.backward()
    real = mask[..., None].float() / (mask.sum() * D)
    torch.testing.assert_close(x.grad, 0.3 * 2 * (x.detach() - codes) * real)
    expected_codebook_grad = torch.zeros_like(codebook).index_add_(
        0, out.indices[mask], (-2 * (x.detach() - codes) * real)[mask]
    )
    torch.testing.assert_close(vq.codebook.grad, expected_codebook_grad)


def test_soft_mode_gradients_reach_codebook_and_temperature():
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5, learnable_temperature=True)
    x = x.requires_grad_()
    vq(x, mask=mask).quantized.square().sum().backward()
    tau = torch.tensor(0.5, requires_grad=True)
    cb = codebook.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    soft_vq(x_ref, cb, tau, mask=mask, backend="reference").square().sum().backward()
    torch.testing.assert_close(x.grad[mask], x_ref.grad[mask])
    torch.testing.assert_close(x.grad[~mask], 2 * x.detach()[~mask])  # masked frames pass through
    torch.testing.assert_close(vq.codebook.grad, cb.grad)
    torch.testing.assert_close(vq.log_temperature.grad, tau.grad * 0.5)  # d/dlog(tau) = tau d/dtau


def test_frozen_codebook_gets_no_gradient():
    codebook, x, _ = _data()
    vq = SoftVQ(codebook, learnable_codebook=False)
    assert "codebook" in dict(vq.named_buffers()) and not list(vq.parameters())
    x = x.requires_grad_()
    out = vq(x)
    (out.quantized.sum() + out.loss).backward()
    assert x.grad is not None and torch.equal(vq.codebook, codebook)


# ----------------------------------------------------------------------------------------- EMA


def _ema_expected(codebook, counts, sums, decay, eps=1e-5):
    N = decay * torch.ones(V, dtype=torch.float64) + (1 - decay) * counts
    M = decay * codebook.double() + (1 - decay) * sums
    total = N.sum()
    smoothed = (N + eps) / (total + V * eps) * total
    return N, M, M / smoothed[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_soft_ema_update_matches_formula(backend, distance):
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5, distance=distance, ema_decay=0.9, backend=backend)
    assert not list(vq.parameters())
    out = vq(x, mask=mask)
    p = _probs(x, codebook, 0.5, distance) * mask.reshape(-1, 1)
    counts, sums = p.sum(0), p.T @ x.reshape(-1, D).double()
    N, M, expected = _ema_expected(codebook, counts, sums, 0.9)
    torch.testing.assert_close(vq.ema_counts.double(), N)
    torch.testing.assert_close(vq.ema_sums.double(), M)
    torch.testing.assert_close(vq.codebook.double(), expected, rtol=1e-5, atol=1e-6)
    q = counts / counts.sum()
    torch.testing.assert_close(out.perplexity.double(), torch.exp(-(q * q.log()).sum()), rtol=1e-5, atol=0)
    before = vq.codebook.clone()
    vq.eval()
    vq(x, mask=mask)
    assert torch.equal(vq.codebook, before)  # eval never updates


def test_hard_ema_update_matches_formula():
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, mode="hard", ema_decay=0.8)
    out = vq(x, mask=mask)
    one_hot = F.one_hot(out.indices[mask], V).double()
    counts, sums = one_hot.sum(0), one_hot.T @ x[mask].double()
    _, _, expected = _ema_expected(codebook, counts, sums, 0.8)
    torch.testing.assert_close(vq.codebook.double(), expected)
    torch.testing.assert_close(out.loss, 0.25 * (x - codebook[out.indices.clamp_min(0)]).pow(2).mean(-1)[mask].mean())


def test_soft_ema_backward_after_in_place_update():
    codebook, x, _ = _data()
    encoder = nn.Linear(D, D)
    vq = SoftVQ(codebook, ema_decay=0.9)
    for _ in range(2):
        out = vq(encoder(x))
        (out.quantized.square().sum() + out.loss).backward()
    assert encoder.weight.grad is not None and torch.isfinite(encoder.weight.grad).all()


# ---------------------------------------------------------------------------- temperature, monitoring


def test_temperature_fixed_settable_and_positive():
    codebook, x, _ = _data()
    vq = SoftVQ(codebook, 2.0)
    assert "log_temperature" in dict(vq.named_buffers())
    torch.testing.assert_close(vq.temperature, torch.tensor(2.0))
    vq.temperature = 0.25
    torch.testing.assert_close(vq(x).quantized, soft_vq(x, codebook, 0.25), rtol=1e-5, atol=1e-6)
    vq.temperature = torch.tensor(0.5)
    torch.testing.assert_close(vq.temperature, torch.tensor(0.5))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            vq.temperature = bad
    learn = SoftVQ(codebook, 0.5, learnable_temperature=True)
    with torch.no_grad():
        learn.log_temperature -= 100.0  # any real log_temperature is a positive temperature
    assert learn.temperature.item() > 0


def test_perplexity_and_dead_codes():
    codebook = torch.eye(4) * 10
    vq = SoftVQ(codebook, 0.01, mode="hard", dead_code_threshold=0.5, usage_decay=0.5)
    out = vq(codebook.clone()[None])  # every code used once
    torch.testing.assert_close(out.perplexity, torch.tensor(4.0))
    x = codebook[:2].repeat(3, 1)[None]  # only codes 0 and 1
    for _ in range(3):
        out = vq(x)
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))
    assert out.dead_codes.item() == 2 and vq.dead_codes.item() == 2
    torch.testing.assert_close(vq.perplexity, torch.tensor(2.0))


# --------------------------------------------------------------------------------- state, sharing


def test_state_dict_round_trip():
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5, ema_decay=0.9, learnable_temperature=True)
    vq(x, mask=mask)
    vq(x.flip(0), mask=mask)
    state = vq.state_dict()
    assert {"codebook", "log_temperature", "ema_counts", "ema_sums", "perplexity", "dead_codes"} <= set(state)
    fresh = SoftVQ(torch.zeros(V, D), 1.0, ema_decay=0.9, learnable_temperature=True)
    fresh.load_state_dict(state)
    for name, value in vq.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    vq.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x, mask=mask).quantized, vq(x, mask=mask).quantized)


def test_from_embedding_copies_or_ties():
    emb = nn.Embedding(V, D)
    copied = SoftVQ.from_embedding(emb, mode="hard")
    assert copied.codebook is not emb.weight and torch.equal(copied.codebook, emb.weight)
    tied = SoftVQ.from_embedding(emb, tie=True, temperature=0.5)
    assert tied.codebook is emb.weight
    tied(torch.randn(3, D)).quantized.sum().backward()
    assert emb.weight.grad is not None
    with pytest.raises(ValueError, match="ema_decay"):
        SoftVQ.from_embedding(emb, tie=True, ema_decay=0.9)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(codebook=[[1.0]]), TypeError, "codebook"),
        (dict(codebook=torch.ones(3, 2, dtype=torch.int64)), TypeError, "codebook"),
        (dict(codebook=torch.ones(3)), ValueError, "codebook"),
        (dict(codebook=torch.ones(0, 2)), ValueError, "codebook"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(mode="soft-ish"), ValueError, "mode"),
        (dict(distance="manhattan"), ValueError, "distance"),
        (dict(learnable_codebook=1), TypeError, "learnable_codebook"),
        (dict(learnable_temperature="yes"), TypeError, "learnable_temperature"),
        (dict(ema_decay=1.0), ValueError, "ema_decay"),
        (dict(ema_decay="0.9"), TypeError, "ema_decay"),
        (dict(commitment_weight=-0.1), ValueError, "commitment_weight"),
        (dict(backend="tpu"), ValueError, "backend"),
        (dict(dead_code_threshold=-1.0), ValueError, "dead_code_threshold"),
        (dict(usage_decay=1.5), ValueError, "usage_decay"),
        (dict(eps=0.0), ValueError, "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, name):
    kwargs = {"codebook": torch.randn(V, D), **kwargs}
    with pytest.raises(error, match=name):
        SoftVQ(**kwargs)


def test_bad_forward_arguments_name_the_argument():
    vq = SoftVQ(torch.randn(V, D))
    with pytest.raises(ValueError, match="x's last dimension"):
        vq(torch.randn(2, D + 1))
    with pytest.raises(TypeError, match="mask"):
        vq(torch.randn(2, D), mask=torch.ones(2))


# ---------------------------------------------------------------------------- compile, autocast


def test_compile_fullgraph_matches_eager_in_value_and_gradient():
    """One inductor compile (slow on CPU): soft mode, mask, learnable codebook and temperature."""
    codebook, x, mask = _data()
    eager = SoftVQ(codebook, 0.5, learnable_temperature=True)
    compiled_module = SoftVQ(codebook, 0.5, learnable_temperature=True)
    compiled = torch.compile(compiled_module, fullgraph=True)
    results = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        out = model(xi, mask=mask)
        (out.quantized.square().sum() + out.loss).backward()
        results.append((out, xi.grad))
    (out_e, gx_e), (out_c, gx_c) = results
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_module.codebook.grad, eager.codebook.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_module.log_temperature.grad, eager.log_temperature.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_module.ema_counts, eager.ema_counts)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_compile_fullgraph_ema_updates_buffers_like_eager(mode):
    """aot_eager traces the whole module (fake op, functionalised buffer updates) without inductor."""
    codebook, x, mask = _data()
    eager = SoftVQ(codebook, 0.5, mode=mode, ema_decay=0.9)
    compiled_module = SoftVQ(codebook, 0.5, mode=mode, ema_decay=0.9)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for step in range(2):
        out_e, out_c = eager(x, mask=mask), compiled(x, mask=mask)
        torch.testing.assert_close(out_c.quantized, out_e.quantized)
        eager.temperature = compiled_module.temperature = 0.5 / (step + 2)  # annealing between steps
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[name], value, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_low_precision_with_fp32_codebook(dtype):
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5, learnable_temperature=True)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        h = nn.functional.linear(x, torch.eye(D))  # an autocast producer: h is low precision
        assert h.dtype == dtype
        out = vq(h, mask=mask)
    assert out.quantized.dtype == dtype
    (out.quantized.float().square().sum() + out.loss).backward()
    assert vq.codebook.grad.dtype == torch.float32 and vq.log_temperature.grad.dtype == torch.float32
    expected = soft_vq(x.detach().to(dtype).float(), codebook.to(dtype).float(), 0.5, mask=mask)
    torch.testing.assert_close(out.quantized[mask].float(), expected[mask], rtol=2e-2, atol=2e-2)
    assert torch.equal(out.quantized[~mask], h[~mask])


def test_codebook_is_cast_to_the_activation_dtype():
    codebook, x, mask = _data()
    vq = SoftVQ(codebook, 0.5)
    out = vq(x.double(), mask=mask)
    assert out.quantized.dtype == torch.float64
    out.quantized.sum().backward()
    assert vq.codebook.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_cuda_compile_fullgraph_under_autocast_matches_eager(mode):
    codebook, x, mask = (t.cuda() for t in _data())
    eager = SoftVQ(codebook, 0.5, mode=mode, learnable_temperature=True).cuda()
    compiled_module = SoftVQ(codebook, 0.5, mode=mode, learnable_temperature=True).cuda()
    compiled = torch.compile(compiled_module, fullgraph=True)
    grads = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xi, mask=mask)
        (out.quantized.float().square().sum() + out.loss).backward()
        grads.append((out.quantized.float(), xi.grad))
    (q_e, g_e), (q_c, g_c) = grads
    torch.testing.assert_close(q_c, q_e, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_c, g_e, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled_module.codebook.grad, eager.codebook.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- silent-wrong regressions


def test_compiled_ema_backward_uses_the_codebook_the_forward_used():
    """Inductor's partitioner may recompute a copy of the codebook in the backward from the buffer that the
    EMA update has already rewritten in place: x's gradient was off by ~300x. softvq::snapshot prevents it."""
    grads = []
    for compiled in (False, True):
        codebook, x, mask = _data()
        vq = SoftVQ(codebook, 0.5, ema_decay=0.9).train()
        model = torch.compile(vq, fullgraph=True) if compiled else vq
        xi = x.clone().requires_grad_()
        out = model(xi, mask=mask)
        (out.quantized * torch.arange(D, dtype=torch.float32)).sum().backward()
        grads.append(xi.grad)
        assert not torch.equal(vq.codebook, codebook)  # the EMA update did happen
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("mode", ["soft", "hard", "none"])
@pytest.mark.parametrize("update", ["gradient", "ema"])
def test_nan_in_masked_frames_touches_nothing(backend, mode, update):
    codebook, x, mask = _data()
    x = x.clone()
    x[~mask] = float("nan")
    x[0, 2, 0] = -float("inf")
    vq = SoftVQ(codebook, 0.5, mode=mode, backend=backend, ema_decay=0.9 if update == "ema" else None).train()
    xi = x.clone().requires_grad_()
    out = vq(xi, mask=mask)
    (out.quantized[mask].square().sum() + out.loss).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.perplexity)
    assert torch.isfinite(out.code_counts).all() and torch.isfinite(vq.ema_counts).all()
    assert torch.isfinite(xi.grad[mask]).all() and (xi.grad[~mask] == 0).all()
    assert torch.isfinite(vq.codebook).all()
    if update == "gradient" and mode != "none":
        assert torch.isfinite(vq.codebook.grad).all()
    assert torch.equal(out.quantized[~mask].isnan(), x[~mask].isnan())  # masked frames pass through


@pytest.mark.parametrize("value", [1e-45, 1e-39, 0.0, -1.0, math.inf, math.nan])
def test_temperature_that_cannot_give_a_finite_answer_is_refused(value):
    codebook, _, _ = _data()
    with pytest.raises(ValueError, match="temperature must be positive"):
        SoftVQ(codebook, value)
    vq = SoftVQ(codebook, 0.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        vq.temperature = value


def test_numpy_temperatures_are_numbers():
    np = pytest.importorskip("numpy")
    codebook, _, _ = _data()
    vq = SoftVQ(codebook, np.float32(0.5))
    vq.temperature = np.float64(0.25)
    assert math.isclose(float(vq.temperature), 0.25, rel_tol=1e-6)
