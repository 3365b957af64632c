"""ASR model, training, checkpoint/resume, evaluation and DDP, on tiny configs (seconds each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr_reference.data import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")
ROOT = Path(__file__).resolve().parents[1]


def _softvq_ready() -> bool:
    try:
        from softvq_kernels import SoftVQ  # noqa: F401
    except ImportError:
        return False
    return True


MODES = ["none", pytest.param("hard", marks=pytest.mark.skipif(not _softvq_ready(), reason="no SoftVQ")),
         pytest.param("soft", marks=pytest.mark.skipif(not _softvq_ready(), reason="no SoftVQ"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from asr_reference.testing import make_tiny_data, make_tiny_lm

    root = tmp_path_factory.mktemp("asr")
    paths = make_tiny_data(root / "data")
    return {"root": root, "lm": make_tiny_lm(root / "lm"), **paths}


def _model(tiny, vq):
    from asr_reference.model import build_model
    from asr_reference.testing import tiny_config

    torch.manual_seed(0)
    return build_model(tiny_config(tiny["lm"], vq))


def _batch(tiny, n=4):
    from asr_reference.train import AudioSet

    data = AudioSet(tiny["train"])
    return data.batch(list(range(n)))


@pytest.mark.parametrize("vq", MODES)
def test_forward_backward(tiny, vq):
    model = _model(tiny, vq).train()
    wav, lens, texts = _batch(tiny)
    out = model(wav, lens, texts)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0
    assert model.encoder.sub.conv[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters()), "the LLM must stay frozen"
    if vq == "soft":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vq.parameters())
    if vq != "none":
        assert "vq" in out and torch.isfinite(out["ppl"])
    hyps = model.eval().transcribe(wav[:2], lens[:2], max_new_tokens=5)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)


def test_ctc_compress_drops_blanks_and_merges_runs():
    from asr_reference.model import ctc_compress

    x = torch.arange(12, dtype=torch.float).view(1, 6, 2).repeat(2, 1, 1).requires_grad_()
    ids = torch.tensor([[0, 5, 5, 0, 5, 7], [3, 3, 3, 0, 0, 0]])
    out, lens = ctc_compress(x, torch.tensor([6, 2]), ids, blank=0)
    assert lens.tolist() == [3, 1]  # "5 5 | 5 | 7" and "3 3" (the third 3 is past the length)
    assert torch.equal(out[0], torch.tensor([[3.0, 4.0], [8.0, 9.0], [10.0, 11.0]]))  # mean of each run
    assert torch.equal(out[1, 0], torch.tensor([1.0, 2.0]))
    out[0].sum().backward()
    assert x.grad[0, :, 0].tolist() == [0.0, 0.5, 0.5, 0.0, 1.0, 1.0] and x.grad[1].abs().sum() == 0
    none, zero = ctc_compress(x, torch.tensor([6, 6]), torch.zeros(2, 6, dtype=torch.long), blank=0)
    assert zero.tolist() == [0, 0]


@pytest.mark.skipif(not _softvq_ready(), reason="no SoftVQ")
def test_token_ctc_is_on_the_vq_distribution(tiny):
    """The token CTC uses exactly the distribution soft VQ mixes the codebook with, and trains it."""
    import torch.nn.functional as F

    from asr_reference.lm import encode

    model = _model(tiny, "soft")
    model.cfg.specaug, model.cfg.compress = False, False
    model.eval()
    wav, lens, texts = _batch(tiny)
    audio, alens, aux = model.embed_audio(wav, lens)
    probs = aux["token_logits"].softmax(-1)
    mixed = probs @ model.vq.codebook
    for i in range(len(texts)):
        n = int(alens[i])
        torch.testing.assert_close(audio[i, :n], mixed[i, :n], rtol=1e-4, atol=1e-4)
    out = model(wav, lens, texts)
    targets = [torch.tensor(encode(model.tokenizer, t)) for t in texts]
    want = F.ctc_loss(aux["token_logits"].log_softmax(-1).transpose(0, 1), torch.cat(targets), alens,
                      torch.tensor([len(t) for t in targets]), blank=model.blank_id, zero_infinity=True)
    torch.testing.assert_close(out["tctc"], want.detach(), rtol=1e-5, atol=1e-5)
    # the token CTC alone moves the codebook, the temperature and the encoder, and goes down when trained
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = None
    for _ in range(20):
        opt.zero_grad()
        _, plen, aux = model.embed_audio(wav, lens)
        loss = F.ctc_loss(aux["token_logits"].log_softmax(-1).transpose(0, 1), torch.cat(targets), plen,
                          torch.tensor([len(t) for t in targets]), blank=model.blank_id, zero_infinity=True)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        assert model.vq.codebook.grad.abs().sum() > 0 and model.vq.log_temperature.grad.abs() > 0
        assert model.encoder.sub.conv[0].weight.grad.abs().sum() > 0
        opt.step()
    assert float(loss.detach()) < 0.8 * first, (first, float(loss.detach()))


@pytest.mark.parametrize("vq", MODES)
def test_compressed_prefix_is_one_frame_per_collapsed_token(tiny, vq):
    model = _model(tiny, vq).eval()
    assert model.cfg.compress and model.cfg.token_ctc_weight > 0  # the defaults
    wav, lens, texts = _batch(tiny)
    audio, alens, aux = model.embed_audio(wav, lens)
    ids = aux["token_logits"].argmax(-1)
    for i in range(len(texts)):
        seq = ids[i, : int(aux["proj_lens"][i])].tolist()
        collapsed = [t for j, t in enumerate(seq) if t != model.blank_id and (j == 0 or t != seq[j - 1])]
        assert int(alens[i]) == len(collapsed)
        if vq == "hard":  # the LLM reads exactly the codes of those tokens
            torch.testing.assert_close(audio[i, : len(collapsed)], model.vq.codebook[collapsed])
    model.train()
    model.cfg.straight_through = False
    out = model(wav, lens, texts)
    out["loss"].backward()
    assert torch.isfinite(out["tctc"]) and model.projector.mlp[0].weight.grad.abs().sum() > 0


def test_lora_adapters_train_and_save(tiny):
    from asr_reference.model import build_model
    from asr_reference.testing import tiny_config

    cfg = tiny_config(tiny["lm"], "none")
    cfg.lora_rank = 4
    model = build_model(cfg)
    wav, lens, texts = _batch(tiny, 2)
    model(wav, lens, texts)["loss"].backward()
    lora = [n for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(model.get_parameter(n).grad is not None for n in lora)
    base = [p for n, p in model.llm.named_parameters() if ".lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)
    assert all(n in model.trainable_state() for n in lora)


def test_training_steps_lower_the_loss(tiny):
    model = _model(tiny, "soft" if _softvq_ready() else "none")
    model.cfg.specaug = False
    wav, lens, texts = _batch(tiny)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.eval()  # no dropout: a deterministic loss to compare
    with torch.no_grad():
        before = float(model(wav, lens, texts)["loss"])
    for _ in range(25):
        loss = model(wav, lens, texts)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model(wav, lens, texts)["loss"])
    assert after < 0.92 * before, (before, after)


def test_greedy_batch_matches_single(tiny):
    """Left-padded batched generation gives what each utterance gives alone."""
    model = _model(tiny, "none").eval()
    wav, lens, _ = _batch(tiny, 3)
    batched = model.transcribe(wav, lens, max_new_tokens=6)
    single = [model.transcribe(wav[i: i + 1, : lens[i]], lens[i: i + 1], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single
    beams = model.transcribe(wav, lens, num_beams=2, max_new_tokens=6)
    assert len(beams) == 3


def _train(tiny, run, **kw):
    from asr_reference.testing import tiny_config
    from asr_reference.train import TrainArgs, train

    cfg = tiny_config(tiny["lm"], "soft" if _softvq_ready() else "none")
    args = TrainArgs(train=str(tiny["train"]), run=str(run), steps=6, batch_size=2, lr=2e-3, warmup=2,
                     save_every=2, quiet=True, **kw)
    return train(cfg, args)


def test_checkpoint_kill_resume_is_exact(tiny):
    root = tiny["root"]
    _train(tiny, root / "straight")
    _train(tiny, root / "killed", stop_after=3)  # "killed" after step 3 (checkpoint at step 3)
    ckpt = root / "killed" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    (root / "killed" / "checkpoint.pt.tmp").write_bytes(b"half-written garbage")  # a crash mid-save
    with pytest.raises(FileExistsError, match="--resume"):
        _train(tiny, root / "killed")
    _train(tiny, root / "killed", resume=True)
    a = torch.load(root / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["step"] == b["step"] == 6 and a["pos"] == b["pos"] and a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert _train(tiny, root / "straight", resume=True)["steps"] == 6  # resuming a finished run is a no-op


def test_eval_cli_prints_wer_cer_last(tiny, capsys):
    from asr_reference.__main__ import main

    run = tiny["root"] / "evalrun"
    _train(tiny, run, stop_after=1)
    main(["eval", "--run", str(run), "--manifest", str(tiny["test_ood_noise"]), "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(line)
    assert list(res)[-2:] == ["wer", "cer"] and res["n"] == 2
    assert res["wer"] >= 0 and res["cer"] >= 0
    assert (run / "hyp_test_ood_noise_b1.jsonl").is_file()


def _free_port() -> int:
    """A port nothing listens on now (a fixed one clashed once with another run on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ddp_two_cpu_processes(tiny):
    run = tiny["root"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "asr_reference", "train", "--train", str(tiny["train"]), "--llm", str(tiny["lm"]),
           "--run-dir", str(run), "--vq", "soft" if _softvq_ready() else "none", "--steps", "3", "--batch-size", "2",
           "--enc-dim", "32", "--enc-layers", "1", "--warmup", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2  # one RNG state per rank
