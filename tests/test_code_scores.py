"""code_scores + the fused lse reproduce losses over the full (T, V) log-softmax: cross-entropy and CTC,
values and every gradient, in fp64 against the reference scores; and the peak memory stays below one
(T, V) fp32 matrix at V = 32000."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softvq_kernels as sk
from softvq_kernels import planning
from softvq_kernels.reference import scores

DISTANCES = ["l2", "cosine", "dot"]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _problem(b, n, V, d):
    x = torch.randn(b, n, d, dtype=torch.float64)
    codebook = torch.randn(V, d, dtype=torch.float64)
    tau = torch.tensor(0.4 + torch.rand(()).item(), dtype=torch.float64)
    return x, codebook, tau


@pytest.mark.parametrize("distance", DISTANCES)
def test_code_scores_are_the_reference_scores(distance):
    x, codebook, tau = _problem(3, 5, 11, 7)
    codes = torch.randint(0, 11, (3, 5, 4))
    got = sk.code_scores(x, codebook, tau, codes, distance=distance)
    full = scores(x.reshape(-1, 7), codebook, tau, distance).reshape(3, 5, 11)
    torch.testing.assert_close(got, full.gather(-1, codes), rtol=1e-12, atol=1e-12)
    per_sequence = torch.randint(0, 11, (3, 6))  # one code list per sequence, shared by its frames
    got = sk.code_scores(x, codebook, tau, per_sequence, distance=distance)
    torch.testing.assert_close(got, full.gather(-1, per_sequence[:, None, :].expand(3, 5, 6)), rtol=1e-12, atol=1e-12)
    assert sk.code_scores(x.float(), codebook.float(), 0.5, codes, distance=distance).dtype == torch.float32


@pytest.mark.parametrize("distance", DISTANCES)
def test_cross_entropy_over_codes_matches_full_matrix(distance):
    x, codebook, tau = _problem(2, 7, 13, 5)
    targets = torch.randint(0, 13, (2, 7))
    mask = torch.rand(2, 7) > 0.3
    mask[0, 0] = True

    def fused(x, codebook, tau):
        _, aux = sk.soft_vq(x, codebook, tau, distance=distance, mask=mask, backend="chunked", return_aux=True)
        log_p = sk.code_scores(x, codebook, tau, targets[..., None], distance=distance)[..., 0] - aux.lse
        return -log_p[mask].mean()

    def full(x, codebook, tau):
        log_p = scores(x.reshape(-1, 5), codebook, tau, distance).log_softmax(-1).reshape(2, 7, 13)
        return F.cross_entropy(log_p[mask], targets[mask])

    a, b = _leaves(x, codebook, tau), _leaves(x, codebook, tau)
    got, want = fused(*a), full(*b)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(torch.autograd.grad(got, a), torch.autograd.grad(want, b)):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("layout", ["concatenated", "padded"])
def test_ctc_over_gathered_codes_matches_full_matrix(distance, layout):
    b, n, V, d, blank = 3, 9, 17, 6, 4
    x, codebook, tau = _problem(b, n, V, d)
    x = x * 1.5
    input_lengths = torch.tensor([9, 6, 7])
    target_lengths = torch.tensor([3, 2, 0])
    padded = torch.randint(0, V - 1, (b, 4))
    padded[padded >= blank] += 1  # targets are never the blank
    padded[0, 1] = padded[0, 0]  # a repeated token
    concatenated = torch.cat([padded[i, : int(target_lengths[i])] for i in range(b)])
    targets = concatenated if layout == "concatenated" else padded
    mask = torch.arange(n)[None] < input_lengths[:, None]

    def fused(x, codebook, tau):
        _, aux = sk.soft_vq(x, codebook, tau, distance=distance, mask=mask, backend="chunked", return_aux=True)
        return sk.code_ctc_loss(x, codebook, tau, aux.lse, targets, input_lengths, target_lengths, blank=blank,
                                distance=distance, zero_infinity=True)

    def full(x, codebook, tau):
        log_p = scores(x.reshape(-1, d), codebook, tau, distance).log_softmax(-1).reshape(b, n, V)
        return F.ctc_loss(log_p.transpose(0, 1), concatenated, input_lengths, target_lengths, blank=blank,
                          zero_infinity=True)

    a, c = _leaves(x, codebook, tau), _leaves(x, codebook, tau)
    got, want = fused(*a), full(*c)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, ga, gc in zip(("x", "codebook", "tau"), torch.autograd.grad(got, a), torch.autograd.grad(want, c)):
        torch.testing.assert_close(ga, gc, rtol=1e-8, atol=1e-10, msg=lambda m: f"gradient for {name}: {m}")


def test_ctc_impossible_alignment_is_zeroed_like_ctc_loss():
    x, codebook, tau = _problem(2, 3, 8, 4)
    targets = torch.tensor([[1, 2, 3, 5], [2, 2, 0, 0]])  # first: 4 labels in 3 frames; second: "2 2" needs 3
    lengths, tlens = torch.tensor([3, 3]), torch.tensor([4, 2])
    a, c = _leaves(x, codebook, tau), _leaves(x, codebook, tau)
    _, aux = sk.soft_vq(a[0], a[1], a[2], backend="chunked", return_aux=True)
    got = sk.code_ctc_loss(*a[:3], aux.lse, targets, lengths, tlens, blank=0, zero_infinity=True, reduction="none")
    log_p = scores(c[0].reshape(-1, 4), c[1], c[2], "l2").log_softmax(-1).reshape(2, 3, 8)
    want = F.ctc_loss(log_p.transpose(0, 1), targets, lengths, tlens, blank=0, zero_infinity=True, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got[0] == 0
    for ga, gc in zip(torch.autograd.grad(got.sum(), a), torch.autograd.grad(want.sum(), c)):
        torch.testing.assert_close(ga, gc, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(codes=torch.zeros(2, 3, 2, dtype=torch.int32)), TypeError, "codes must have dtype torch.int64"),
        (dict(codes=[[0]]), TypeError, "codes must be an int64 torch.Tensor"),
        (dict(codes=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "codes shape"),
        (dict(codes=torch.full((2, 3, 1), 9, dtype=torch.int64)), ValueError, "codes must lie in [0, 9)"),
        (dict(codes=torch.full((2, 3, 1), -1, dtype=torch.int64)), ValueError, "codes must lie in"),
        (dict(distance="euclid"), ValueError, "distance must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(shard_offset=3), ValueError, "shard_offset is only meaningful"),
    ],
)
def test_code_scores_bad_input(kwargs, error, words):
    args = dict(x=torch.randn(2, 3, 4), codebook=torch.randn(9, 4), temperature=1.0,
                codes=torch.zeros(2, 3, 1, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sk.code_scores(args.pop("x"), args.pop("codebook"), args.pop("temperature"), args.pop("codes"), **args)


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes the CPU allocator held during fn(), above what it held when fn started."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's own allocations are its self usage (dated at its start, which can only overstate the peak);
    # frees are "[memory]" events of their own.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_asr_style_token_ctc_memory_stays_below_one_frames_by_vocabulary_matrix():
    """At V = 32000 the fused lse + gathered-code CTC (forward and backward) peaks below T*V*4 bytes,
    where the full-matrix CTC holds several (T, V) matrices."""
    torch.manual_seed(0)
    b, n, V, d = 2, 150, 32000, 16
    T = b * n
    x = torch.randn(b, n, d, requires_grad=True)
    codebook = torch.randn(V, d, requires_grad=True)
    tau = torch.tensor(0.5, requires_grad=True)
    targets = torch.randint(1, V, (b, 20))
    lengths, tlens = torch.tensor([n, n - 7]), torch.tensor([20, 13])

    def fused():
        _, aux = sk.soft_vq(x, codebook, tau, distance="cosine", backend="chunked", return_aux=True)
        sk.code_ctc_loss(x, codebook, tau, aux.lse, targets, lengths, tlens, blank=0, distance="cosine").backward()

    def full():
        log_p = scores(x.reshape(-1, d), codebook, tau, "cosine").log_softmax(-1).reshape(b, n, V)
        F.ctc_loss(log_p.transpose(0, 1), targets, lengths, tlens, blank=0).backward()

    matrix = T * V * 4
    # The chunked backend's vocabulary chunk comes from a memory budget (larger than this small problem's
    # whole matrix by default): pin it to the chunk a large T would get, 2048 columns.
    with planning.options(chunk_size=2048):
        fused_peak = _peak_cpu_bytes(fused)
    assert fused_peak < matrix, f"fused peak {fused_peak / 2**20:.1f} MiB >= T*V*4 = {matrix / 2**20:.1f} MiB"
    assert _peak_cpu_bytes(full) > 2 * matrix  # the measurement sees what it should


@pytest.mark.parametrize("vq", ["soft", "none"])
def test_asr_token_ctc_equals_the_full_matrix_ctc_with_gradients(tmp_path, vq):
    """The ASR reference's token CTC (fused lse + gathered codes) against the full (b, n, V) log-softmax
    it replaced: same loss and the same gradients for the encoder, the codebook and the temperature."""
    from asr_reference.lm import encode
    from asr_reference.model import build_model
    from asr_reference.testing import make_tiny_lm, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(make_tiny_lm(tmp_path / "lm"), vq)).train()
    model.cfg.specaug = False
    wav, lens = torch.randn(2, 16000), torch.tensor([16000, 11000])
    texts = ["hello world", "a b"]
    params = [model.vq.codebook, model.vq.log_temperature, model.projector.mlp[0].weight]

    audio, plen, aux = model.embed_audio(wav, lens)
    targets = [torch.tensor(encode(model.tokenizer, t)) for t in texts]
    tlens = torch.tensor([len(t) for t in targets])
    got = sk.code_ctc_loss(aux["token_frames"], model.vq.codebook.float(), model.vq.temperature, aux["token_lse"],
                           torch.cat(targets), aux["proj_lens"], tlens, blank=model.blank_id,
                           distance=model.cfg.distance, zero_infinity=True)
    got_grads = torch.autograd.grad(got, params, retain_graph=True)
    want = F.ctc_loss(aux["token_logits"].log_softmax(-1).transpose(0, 1), torch.cat(targets), aux["proj_lens"],
                      tlens, blank=model.blank_id, zero_infinity=True)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("codebook", "log_temperature", "projector"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"gradient for {name}: {m}")  # fp32
    ids = aux["token_logits"].argmax(-1)
    real = aux["token_ids"] >= 0
    assert torch.equal(aux["token_ids"][real], ids[real])
