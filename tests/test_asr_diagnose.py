"""asr_reference.diagnose: the greedy CTC collapse by hand, and the per-stage numbers of tiny trained runs
checked against evaluate() and against the model's own collapse (about half a minute on a 2-core CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from asr_reference.data import espeak_available
from asr_reference.diagnose import batch_ctc_greedy, ctc_greedy, diagnose, diagnose_run, format_table

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")


def test_ctc_greedy_by_hand():
    assert ctc_greedy([], 0) == []
    assert ctc_greedy([0, 0, 0], 0) == []
    assert ctc_greedy([0, 3, 3, 0, 5, 5, 5, 0], 0) == [3, 5]  # repeats merged, blanks dropped
    assert ctc_greedy([3, 3, 0, 3], 0) == [3, 3]  # a blank between two equal ids keeps both
    assert ctc_greedy([3, 4, 3], 0) == [3, 4, 3]
    assert ctc_greedy([7, 0, 0, 7, 7, 2], 7) == [0, 2]  # the blank is whatever id the caller names
    ids = torch.tensor([[1, 1, 0, 1, 2, 2], [4, 0, 4, 4, -1, -1]])
    assert batch_ctc_greedy(ids, torch.tensor([6, 4]), blank=0) == [[1, 1, 2], [4, 4]]  # padding never read
    assert batch_ctc_greedy(ids, torch.tensor([2, 1]), blank=0) == [[1], [4]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: the system (soft VQ, token CTC + collapse, character CTC; LoRA so that the LLM writes
    words, not only nothing) trained until its token CTC reads the six training sentences, and soft VQ
    without any CTC (no collapse: the LLM reads every projector frame) trained a few steps."""
    if not espeak_available():
        pytest.skip("espeak-ng not installed")
    from asr_reference.model import ASRConfig
    from asr_reference.testing import make_tiny_data, make_tiny_lm, tiny_config
    from asr_reference.train import TrainArgs, train

    root = tmp_path_factory.mktemp("diagnose")
    data = make_tiny_data(root / "data")
    lm = make_tiny_lm(root / "lm")
    # 150 steps (~8 s): after a few dozen nearly every frame is still the blank (nothing for the LLM to read)
    rows = {"soft": ({"lora_rank": 4}, 150),
            "soft-no-ctc": ({"token_ctc_weight": 0.0, "compress": False, "ctc_weight": 0.0}, 4)}
    for name, (over, steps) in rows.items():
        cfg = ASRConfig(**{**tiny_config(lm, "soft").to_dict(), **over})
        train(cfg, TrainArgs(train=str(data["train"]), run=str(root / name), steps=steps, batch_size=3, warmup=1,
                             lr=3e-3, save_every=100, device="cpu", quiet=True))
    return {"root": root, **data}


def _frames_and_tokens(model, manifest):
    """Per utterance of the manifest: (frames embed_audio hands the LLM, projector frames, argmax code ids
    per real projector frame or None, reference BPE tokens). One batch of the whole set, as diagnose()
    makes it (padding changes the encoder's last frames, so the batch matters)."""
    from asr_reference.dataset import AudioDataset
    from asr_reference.lm import encode

    data = AudioDataset(manifest)
    wav, lens, texts = data.batch(list(range(len(data))))
    with torch.no_grad():
        _, alens, aux = model.embed_audio(wav, lens)
    out = []
    for i, text in enumerate(texts):
        n = int(aux["proj_lens"][i])
        ids = aux["token_ids"][i, :n].tolist() if "token_ids" in aux else None
        out.append((int(alens[i]), n, ids, len(encode(model.tokenizer, text))))
    return out


def _kept_log_probs(model, manifest):
    """(kept frames, V) log-probabilities from aux["token_logits"] of one batch of the whole set; kept =
    real projector frames whose argmax code is not the blank."""
    from asr_reference.dataset import AudioDataset
    from asr_reference.model import lengths_to_mask

    data = AudioDataset(manifest)
    wav, lens, _ = data.batch(list(range(len(data))))
    with torch.no_grad():
        _, _, aux = model.embed_audio(wav, lens)
        logits = aux["token_logits"]
    keep = lengths_to_mask(aux["proj_lens"], logits.shape[1]) & (aux["token_ids"] != model.blank_id)
    return logits[keep].log_softmax(-1)


@needs_espeak
def test_system_run_matches_evaluate_and_collapse(runs, monkeypatch):
    from asr_reference.evaluate import evaluate
    from asr_reference.train import load_run

    model = load_run(runs["root"] / "soft")
    for manifest in (runs["train"], runs["test_ood_noise"]):
        res = diagnose(model, manifest)
        assert set(res) == {"manifest", "n", "wer_llm", "sub", "del", "ins", "wer_encoder_ctc", "wer_token_ctc",
                            "frames_per_token", "vq_max_prob", "vq_entropy", "tau"}
        assert res["wer_llm"] == evaluate(model, manifest)["wer"]
        assert abs(res["sub"] + res["del"] + res["ins"] - res["wer_llm"]) <= 2e-4
        assert res["wer_encoder_ctc"] is not None and res["wer_encoder_ctc"] >= 0
        assert res["wer_token_ctc"] is not None and res["wer_token_ctc"] >= 0
        # the greedy token decoding keeps exactly the codes whose frames the collapse hands the LLM
        per_utt = _frames_and_tokens(model, manifest)
        for llm_frames, _, ids, _ in per_utt:
            assert len(ctc_greedy(ids, model.blank_id)) == llm_frames
        expected = sum(f / t for f, _, _, t in per_utt) / len(per_utt)
        assert res["frames_per_token"] == pytest.approx(expected, abs=1e-4) and res["frames_per_token"] > 0
        vocab = model.vq.codebook_size
        assert 1 / vocab <= res["vq_max_prob"] <= 1 and 0 <= res["vq_entropy"] <= math.log(vocab) + 1e-4
        assert res["tau"] == pytest.approx(float(model.vq.temperature.detach()), rel=1e-5)
        # the sharpness from the model's own full score matrix, over the frames the collapse keeps
        logp = _kept_log_probs(model, manifest)
        assert res["vq_max_prob"] == pytest.approx(float(logp.max(-1).values.exp().mean()), abs=2e-4)
        assert res["vq_entropy"] == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), abs=2e-4)
        if manifest == runs["train"]:
            # the trained token classifier reads its training sentences (a wrong blank or detokenisation
            # would make this ~1; measured 0.06)
            assert res["wer_token_ctc"] < 0.3
    assert res["n"] == 2

    # the score blocks of the sharpness are cut to a few frames each: the same numbers
    monkeypatch.setattr("asr_reference.diagnose._SCORE_ELEMENTS", 3 * model.vq.codebook_size)
    small = diagnose(model, runs["test_ood_noise"])
    assert (small["vq_max_prob"], small["vq_entropy"]) == pytest.approx((res["vq_max_prob"], res["vq_entropy"]),
                                                                        abs=1e-4)

    # an encoder CTC head that only ever emits the blank transcribes nothing: every word is deleted
    with torch.no_grad():
        model.ctc_head.weight.zero_()
        model.ctc_head.bias.fill_(-10.0)
        model.ctc_head.bias[0] = 10.0
    assert diagnose(model, runs["test_ood_noise"])["wer_encoder_ctc"] == 1.0


@needs_espeak
def test_run_without_ctc_and_table(runs):
    from asr_reference.train import load_run

    results = diagnose_run(runs["root"] / "soft-no-ctc", [runs["train"], runs["test_ood_noise"]], log=None)
    assert list(results) == ["train", "test_ood_noise"]
    res = results["train"]
    assert res["n"] == 6
    assert res["wer_token_ctc"] is None  # token_ctc_weight == 0: never trained as a classifier
    assert res["wer_encoder_ctc"] is None  # ctc_weight == 0: no CTC head
    # no collapse: every projector frame reaches the LLM, and the sharpness is over all of them
    model = load_run(runs["root"] / "soft-no-ctc")
    per_utt = _frames_and_tokens(model, runs["train"])
    assert all(f == n for f, n, _, _ in per_utt)
    assert res["frames_per_token"] == pytest.approx(sum(f / t for f, _, _, t in per_utt) / 6, abs=1e-4)
    assert res["vq_max_prob"] is not None and res["vq_entropy"] is not None and res["tau"] > 0

    table = format_table({"soft-no-ctc": results})
    lines = table.splitlines()
    assert len(lines) == 2 + 2 and lines[0].startswith("| run | set |")
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[:3] == ["soft-no-ctc", "train", "6"]
    assert row[3] == f"{100 * res['wer_llm']:.1f}"
    assert row[7] == row[8] == "-"  # the two CTC WERs do not apply


def test_diagnose_cli_writes_the_table_and_refuses_bad_input(runs, tmp_path, capsys):
    from asr_reference.__main__ import main

    out = tmp_path / "diag"
    main(["diagnose", "--run", str(runs["root"] / "soft-no-ctc"), "--manifest", str(runs["test_ood_noise"]),
          "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert list(saved) == ["soft-no-ctc"] and list(saved["soft-no-ctc"]) == ["test_ood_noise"]
    assert out.with_suffix(".md").read_text().startswith("| run | set |")
    with pytest.raises(SystemExit) as exc:  # neither --data nor --manifest: one line, exit 2
        main(["diagnose", "--run", str(runs["root"] / "soft-no-ctc")])
    assert exc.value.code == 2 and "give either --data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio_filepath": "nope.wav", "text": "a"}\n')
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--run", str(runs["root"] / "soft-no-ctc"), "--manifest", str(bad)])
    assert exc.value.code == 2 and f"{bad}:1:" in capsys.readouterr().err
