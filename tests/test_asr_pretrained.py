"""Real parts, tiny: pretrained HF encoders (Whisper, wav2vec2), an LLM without a pad token, FLAC and
24-bit WAV manifests, dev evaluation. Every model is random-initialised from a config into tmp_path."""

from __future__ import annotations

import json

import pytest
import torch

from asr_reference.data import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")
soundfile = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from asr_reference import testing as T

    root = tmp_path_factory.mktemp("parts")
    data = T.make_tiny_data(root / "data")
    return {
        "root": root, **data,
        "flac": T.convert_manifest(data["train"], root / "flac", ".flac"),
        # 24-bit stereo at 44.1 kHz: read as mono, resampled to 16 kHz on load
        "wav24": T.convert_manifest(data["train"], root / "wav24", ".wav", subtype="PCM_24", sample_rate=44100,
                                    channels=2),
        "lm": T.make_tiny_lm(root / "lm"),
        "lm_nopad": T.make_tiny_lm_without_pad(root / "lm_nopad"),
        "whisper": T.make_tiny_whisper(root / "whisper"),
        "wav2vec2": T.make_tiny_wav2vec2(root / "wav2vec2"),
    }


TINY = ["--enc-dim", "32", "--enc-layers", "1", "--vq", "soft", "--warmup", "1", "--device", "cpu",
        "--batch-size", "2", "--steps", "3"]


@pytest.mark.parametrize("encoder,llm,manifest", [
    ("builtin", "lm", "flac"),
    ("whisper", "lm", "wav24"),
    ("wav2vec2", "lm", "flac"),
    ("builtin", "lm_nopad", "wav24"),
    ("whisper", "lm_nopad", "flac"),
])
def test_train_three_steps_and_eval(parts, encoder, llm, manifest, capsys):
    from asr_reference.__main__ import main

    run = parts["root"] / f"run_{encoder}_{llm}_{manifest}"
    enc = [] if encoder == "builtin" else ["--encoder", str(parts[encoder])]
    main(["train", "--train", str(parts[manifest]), "--llm", str(parts[llm]), "--run", str(run), *TINY, *enc])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    if encoder != "builtin":  # frozen: reloaded from its folder, not saved
        assert not any(k.startswith("encoder.model.") for k in state["model"])
        assert state["config"]["stack"] == 0 and state["config"]["encoder"] == str(parts[encoder])
    capsys.readouterr()
    main(["eval", "--run", str(run), "--manifest", str(parts[manifest]), "--device", "cpu", "--max-new-tokens", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 6 and list(res)[-2:] == ["wer", "cer"]
    hyps = [json.loads(line) for line in open(res["hypotheses"])]
    assert len(hyps) == 6 and {"audio_filepath", "ref", "hyp", "word_errors"} <= set(hyps[0])


def test_blank_is_a_dedicated_code_without_pad_token(parts):
    from asr_reference.model import build_model
    from asr_reference.testing import tiny_config

    model = build_model(tiny_config(parts["lm_nopad"]))
    n_vocab = model.llm.get_input_embeddings().weight.shape[0]
    assert model.tokenizer.pad_token_id is None
    assert model.blank_id == n_vocab != model.eos_id and model.vq.codebook.shape[0] == n_vocab + 1
    with_pad = build_model(tiny_config(parts["lm"]))
    assert with_pad.blank_id == with_pad.tokenizer.pad_token_id and with_pad.vq.codebook.shape[0] == n_vocab


def test_llm_dtype_and_prompt_templates(parts):
    from asr_reference.lm import PROMPT, load_lm
    from asr_reference.model import build_model, prompt_token_ids
    from asr_reference.testing import tiny_config

    llm, tok = load_lm(parts["lm"], "cpu")
    assert llm.dtype == torch.float32  # bf16 only on a GPU
    before, after = prompt_token_ids(tok, "{audio} transcript:", chat=False)
    assert before == [tok.bos_token_id] and after == tok.encode(PROMPT, add_special_tokens=False)  # as before
    cfg = tiny_config(parts["lm_nopad"])
    cfg.chat_template, cfg.prompt = True, "listen: {audio}"
    model = build_model(cfg)
    assert model.tokenizer.decode(model.prefix_ids).strip() == "<s> user: listen:"
    assert model.tokenizer.decode(model.prompt_ids).strip() == "assistant:"
    wav = torch.randn(1, 16000) * 0.1
    model(wav, torch.tensor([16000]), ["the dog runs"])["loss"].backward()


def test_finetune_encoder_trains_and_saves_it(parts):
    from asr_reference.model import build_model
    from asr_reference.testing import tiny_config

    cfg = tiny_config(parts["lm"])
    cfg.encoder, cfg.stack = str(parts["wav2vec2"]), 0
    frozen = build_model(cfg).train()
    assert not frozen.encoder.training and frozen.projector.k == 4  # 20 ms frames -> 80 ms
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    cfg.finetune_encoder = True
    model = build_model(cfg).train()
    wav = torch.randn(2, 24000) * 0.1
    model(wav, torch.tensor([24000, 16000]), ["the dog runs", "a cat"])["loss"].backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert any(k.startswith("encoder.model.") for k in model.trainable_state())


def test_decoding_budget_follows_the_audio_length(parts):
    from asr_reference.model import MIN_NEW_TOKENS, build_model
    from asr_reference.testing import tiny_config

    model = build_model(tiny_config(parts["lm"]))
    assert model.token_budget(torch.tensor([16000])) == MIN_NEW_TOKENS  # short: the earlier 48
    assert model.token_budget(torch.tensor([16000 * 30])) == 308  # 30 s: 10 tokens/s + 8


def test_dev_eval_keeps_best_checkpoint_with_seconds_batches_and_accumulation(parts, capsys):
    from asr_reference.__main__ import main

    run = parts["root"] / "dev_run"
    args = [a for a in TINY if a not in ("--batch-size", "2")]
    main(["train", "--train", str(parts["flac"]), "--dev", str(parts["test_ood_noise"]), "--llm", str(parts["lm"]),
          "--run", str(run), *args, "--batch-seconds", "6", "--grad-accum", "2", "--workers", "1",
          "--eval-every", "2", "--dev-limit", "1"])
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    dev = [r for r in log if "dev_wer" in r]
    assert [r["step"] for r in dev] == [2, 3]
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["dev_wer"] == min(r["dev_wer"] for r in dev)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["best_dev_wer"] == best["dev_wer"]
    capsys.readouterr()
    main(["eval", "--run", str(run), "--manifest", str(parts["test_ood_noise"]), "--checkpoint", "best",
          "--device", "cpu", "--max-new-tokens", "3"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 2 and res["hypotheses"].endswith("hyp_test_ood_noise_best_b1.jsonl")
