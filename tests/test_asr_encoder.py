"""The pretrain-encoder stage and systems that train only the bridge on top of it (tiny configs, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from asr_reference.data import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")

TINY_ARCH = dict(n_mels=40, enc_dim=32, enc_layers=1, enc_heads=2, enc_kernel=7, sub_channels=8, dropout=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from asr_reference.pretrain_encoder import EncoderArch, pretrain_encoder
    from asr_reference.testing import make_tiny_data, make_tiny_lm

    root = tmp_path_factory.mktemp("asr_enc")
    paths = make_tiny_data(root / "data")
    lines = []
    meta = pretrain_encoder(paths["train"], root / "encoder", steps=3, batch_size=2, warmup=1,
                            dev=paths["test_ood_noise"], arch=EncoderArch(**TINY_ARCH), log=lines.append,
                            progress_bar=False)
    return {"root": root, "lm": make_tiny_lm(root / "lm"), "encoder": root / "encoder", "meta": meta,
            "log": lines, **paths}


def _cfg(tiny, **kw):
    from asr_reference.model import ASRConfig

    return ASRConfig(llm=str(tiny["lm"]), encoder=str(tiny["encoder"]), stack=2, proj_hidden=64, ctc_weight=0.3,
                     **kw)


def _train(tiny, run, cfg, **kw):
    from asr_reference.train import TrainArgs, train

    return train(cfg, TrainArgs(train=str(tiny["train"]), run=str(run), steps=3, batch_size=2, warmup=1,
                                save_every=3, quiet=True, **kw))


def test_pretrain_encoder_folder_and_reuse(tiny):
    from asr_reference.pretrain_encoder import MARKER, WEIGHTS, pretrain_encoder

    enc = tiny["encoder"]
    assert (enc / MARKER).is_file() and (enc / WEIGHTS).is_file() and not (enc / "checkpoint.pt").exists()
    meta = json.loads((enc / MARKER).read_text())
    assert meta["steps"] == 3 and meta["arch"]["enc_dim"] == 32 and 0 <= meta["dev"]["cer"]
    assert any("s/step measured" in m or "saved" in m for m in tiny["log"])
    lines = []
    from asr_reference.pretrain_encoder import EncoderArch

    again = pretrain_encoder(tiny["train"], enc, steps=3, batch_size=2, warmup=1, arch=EncoderArch(**TINY_ARCH),
                             log=lines.append, progress_bar=False)
    assert "reusing" in lines[0] and again["data"] == meta["data"]


def test_frozen_encoder_trains_the_bridge_from_cached_frames(tiny):
    from asr_reference.checkpoints import load_run
    from asr_reference.dataset import AudioDataset
    from asr_reference.feature_cache import cache_file, padded
    from asr_reference.model import build_model
    from asr_reference.pretrain_encoder import load_encoder

    cfg = _cfg(tiny, vq="none")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not model.encoder_trainable()
    assert model.trained_parts() == ["projector", "VQ codebook + tau"]
    # a step from cached frames is the step from the audio (the frozen encoder is deterministic)
    data = AudioDataset(tiny["train"])
    wav, lens, texts = data.batch([0, 1])
    model.train()
    direct = model(wav, lens, texts)["loss"]
    enc = [model.encode(wav[i: i + 1, : lens[i]], lens[i: i + 1])[0][0] for i in range(2)]
    cached = model(None, None, texts, encoded=padded(enc, [0, 1], "cpu"))["loss"]
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-4)

    run = tiny["root"] / "bridge"
    summary = _train(tiny, run, cfg)
    assert summary["trained"] == ["projector", "VQ codebook + tau"]
    assert cache_file(model, tiny["train"], run).is_file()  # in the encoder folder, shared by every run
    state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert not any(k.startswith(("encoder.", "ctc_head.", "llm.")) for k in state)
    # the encoder did not move, and the run loads with it from its folder
    loaded = load_run(run)
    ref, _ = load_encoder(tiny["encoder"])
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.encoder.model.state_dict()[k], v), k
    # a second system reuses the cached frames
    lines = []
    from asr_reference.train import TrainArgs, train

    train(_cfg(tiny, vq="soft"), TrainArgs(train=str(tiny["train"]), run=str(tiny["root"] / "bridge2"), steps=2,
                                           batch_size=2, warmup=1, progress_bar=False), log=lines.append)
    assert any("from the cache" in m for m in lines)


def test_finetune_encoder_trains_it(tiny):
    cfg = _cfg(tiny, vq="none", finetune_encoder=True)
    run = tiny["root"] / "finetune"
    summary = _train(tiny, run, cfg)
    assert summary["trained"][0] == "encoder (fine-tuned)"
    state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    from asr_reference.pretrain_encoder import load_encoder

    ref, _ = load_encoder(tiny["encoder"])
    w = "encoder.model.encoder.sub.out.weight"
    assert w in state and not torch.equal(state[w], ref.state_dict()["encoder.sub.out.weight"])


def test_pretrain_encoder_cli_errors(tiny, tmp_path, capsys):
    from asr_reference.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_filepath": "x.wav"}\n')
    with pytest.raises(SystemExit) as exc:
        main(["pretrain-encoder", "--train", str(bad), "--out", str(tmp_path / "enc")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "builtin_encoder.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--train", str(tiny["train"]), "--llm", str(tiny["lm"]), "--run", str(tmp_path / "r"),
              "--encoder", str(tmp_path / "broken"), "--steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "builtin_encoder.json" in err[0]
