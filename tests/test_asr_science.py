"""The science parts of the ASR reference: paired bootstrap, the compare rows (plain, soft-no-ctc,
hard-soft), seeds, fixed step counts (no time-budget fitting), tau schedule, extra OOD conditions,
multi-manifest eval and the corpus templates as data. Tiny configs; the whole file runs in well under
a minute on a 2-core CPU."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from asr_reference.data import espeak_available
from asr_reference.significance import paired_bootstrap, read_errors, seed_errors, wer_interval

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")


# ------------------------------------------------------------------------------------------ bootstrap
def _synthetic(n: int, p_a: float, p_b: float, seed: int = 0):
    """n utterances of 8 words; each word wrong with probability p_a (system a) or p_b (system b)."""
    rng = np.random.default_rng(seed)
    words = np.full(n, 8.0)
    return rng.binomial(8, p_a, n).astype(float), rng.binomial(8, p_b, n).astype(float), words


def test_bootstrap_finds_a_real_difference():
    ea, eb, w = _synthetic(300, 0.10, 0.20)
    r = paired_bootstrap(ea, eb, w)
    assert r["significant"] and r["hi"] < 0 and r["lo"] < r["diff"] < r["hi"]
    assert r["diff"] == pytest.approx((ea.sum() - eb.sum()) / w.sum(), abs=1e-4)
    assert -0.13 < r["diff"] < -0.07  # the true difference is -0.10
    assert r["resamples"] == 1000 and r["n"] == 300
    # swapping the systems flips the sign and the interval
    s = paired_bootstrap(eb, ea, w)
    assert s["diff"] == pytest.approx(-r["diff"]) and s["lo"] == pytest.approx(-r["hi"], abs=2e-3)


def test_bootstrap_no_difference_is_not_significant():
    hits = 0
    for seed in range(10):  # same error rate: the 95% interval should contain 0 about 95% of the time
        ea, eb, w = _synthetic(120, 0.2, 0.2, seed)
        r = paired_bootstrap(ea, eb, w, seed=seed)
        hits += r["significant"]
        assert r["lo"] <= r["diff"] <= r["hi"]
    assert hits <= 2
    ea, _, w = _synthetic(50, 0.3, 0.3)
    same = paired_bootstrap(ea, ea, w)  # identical systems: a zero-width interval at 0, not significant
    assert same["diff"] == same["lo"] == same["hi"] == 0 and not same["significant"]


def test_bootstrap_is_paired():
    # b = a + 1 error on every utterance: a tiny, perfectly consistent difference. Pairing makes it
    # significant although the two systems' own WER intervals overlap widely.
    rng = np.random.default_rng(0)
    w = np.full(100, 20.0)
    ea = rng.integers(0, 15, 100).astype(float)
    eb = ea + 1
    r = paired_bootstrap(ea, eb, w)
    assert r["significant"] and r["lo"] == pytest.approx(-0.05) and r["hi"] == pytest.approx(-0.05)
    lo_a, hi_a = wer_interval(ea, w)
    lo_b, hi_b = wer_interval(eb, w)
    assert lo_b < hi_a  # unpaired intervals overlap


def test_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1], [3, 3])


def test_read_and_seed_errors(tmp_path):
    rows = [{"audio_filepath": "a.wav", "ref": "a b c", "hyp": "a b", "word_errors": 1, "ref_words": 3},
            {"audio_filepath": "b.wav", "ref": "d e", "hyp": "x y", "word_errors": 2, "ref_words": 2}]
    f1, f2 = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    f1.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f2.write_text("".join(json.dumps(dict(r, word_errors=0)) + "\n" for r in rows))
    paths, err, words = read_errors(f1)
    assert paths == ["a.wav", "b.wav"] and list(err) == [1, 2] and list(words) == [3, 2]
    err, words = seed_errors([f1, f2])
    assert err.tolist() == [[1, 2], [0, 0]] and list(words) == [3, 2]
    f3 = tmp_path / "3.jsonl"
    f3.write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="not the same utterances"):
        seed_errors([f1, f3])


def test_bootstrap_with_seeds_covers_the_seed_spread():
    """Seed means 5 points apart, but seeds that scatter by +-15 points: resampling utterances of the seed
    means alone calls it significant; resampling seeds too does not. With seeds that agree it does."""
    rng = np.random.default_rng(7)
    n = 400
    words = rng.integers(5, 15, n).astype(float)
    base = rng.uniform(0.2, 0.6, n)

    def system(offsets):
        return np.stack([rng.binomial(words.astype(int), np.clip(base + o, 0, 1)).astype(float) for o in offsets])

    a, b = system([-0.10, 0.05, 0.20]), system([-0.10, 0.0, 0.05])
    assert paired_bootstrap(a.mean(0), b.mean(0), words, 500)["significant"]
    res = paired_bootstrap(a, b, words, 500)
    assert not res["significant"] and res["seeds"] == [3, 3]
    assert res["diff"] == pytest.approx(paired_bootstrap(a.mean(0), b.mean(0), words, 500)["diff"], abs=1e-4)
    steady_a, steady_b = system([0.05, 0.05, 0.05]), system([0.0, 0.0, 0.0])
    assert paired_bootstrap(steady_a, steady_b, words, 500)["significant"]
    lo, hi = wer_interval(a, words, 500)
    lo1, hi1 = wer_interval(a.mean(0), words, 500)
    assert hi - lo > 2 * (hi1 - lo1)  # the seed spread widens a system's own interval too


# ------------------------------------------------------------------------------------ compare tables
def _fake_results(tmp_path, rows, seeds, n=60):
    """results[row][seed][set] as demo --compare makes them, with hypotheses files: soft makes half the
    errors of none on every set; plain equals none."""
    rng = np.random.default_rng(1)
    words = rng.integers(4, 10, n)
    rate = {"soft": 0.1, "none": 0.2, "plain": 0.2, "hard": 0.21, "soft-no-ctc": 0.2}
    out = {}
    for row in rows:
        out[row] = []
        for k in range(seeds):
            res = {}
            for s in ("test_in", "test_ood_noise"):
                err = rng.binomial(words, rate[row] * (2 if s != "test_in" else 1))
                f = tmp_path / f"{row}_{k}_{s}.jsonl"
                f.write_text("".join(json.dumps({"audio_filepath": f"{i}.wav", "ref": "x", "hyp": "y",
                                                 "word_errors": int(e), "ref_words": int(w)}) + "\n"
                                     for i, (e, w) in enumerate(zip(err, words))))
                res[s] = {"wer": round(float(err.sum() / words.sum()), 4), "cer": 0.1, "n": n, "hypotheses": str(f)}
            out[row].append(res)
    return out


def test_analyse_and_markdown(tmp_path):
    from asr_reference.compare import analyse, markdown, write_compare

    results = _fake_results(tmp_path, ["none", "hard", "soft", "plain"], seeds=2)
    a = analyse(results, n_resamples=200)
    c = a["cells"]["soft"]["test_in"]
    assert c["wer"] == pytest.approx(np.mean([r["test_in"]["wer"] for r in results["soft"]]), abs=1e-4)
    assert "wer_std" in c and len(c["wer_seeds"]) == 2
    assert set(a["pairs"]) == {"soft vs none", "soft vs plain", "hard vs none"}  # only pairs whose rows ran
    assert a["pairs"]["soft vs none"]["test_in"]["significant"]
    assert a["pairs"]["soft vs none"]["test_in"]["diff"] < 0
    assert not a["pairs"]["hard vs none"]["test_in"]["significant"]  # 0.21 vs 0.20: no real difference
    assert "ood_pooled" in a["pairs"]["soft vs plain"]
    meta = {"command": "python -m asr_reference demo --compare", "machine": "test", "load_before": "0",
            "minutes": 1.0, "seeds": 2, "setup": "tiny", "train": [{"run": "r/vq_soft", "steps": 5, "trained_steps": 5,
                                                                    "seconds": 1.0, "loss": 1, "ce": 1}]}
    md = markdown(a, meta)
    soft_none = [ln for ln in md.splitlines() if ln.startswith("| soft vs none | test_in")][0]
    hard_none = [ln for ln in md.splitlines() if ln.startswith("| hard vs none | test_in")][0]
    assert "**significant**" in soft_none and "not significant" in hard_none
    assert " ± " in md and "mean ± std over 2 seeds" in md
    write_compare(results, meta["train"], {k: v for k, v in meta.items() if k != "train"}, tmp_path / "out",
                  log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["pairs"]["soft vs none"]["test_in"]["resamples"] == 1000
    assert (tmp_path / "out" / "compare.md").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000


def test_resolve_rows():
    from asr_reference.compare import resolve_rows

    assert resolve_rows(None) == ["soft", "plain", "none", "hard", "soft-no-ctc"]
    assert resolve_rows(None, hard_soft=True)[-1] == "hard-soft"
    assert resolve_rows(["soft"], hard_soft=True) == ["soft", "hard", "hard-soft"]
    assert resolve_rows(["hard-soft", "hard"]) == ["hard", "hard-soft"]


def test_rows_define_the_baselines():
    from asr_reference.compare import DEFAULT_ROWS, ROWS
    from asr_reference.model import ASRConfig

    assert DEFAULT_ROWS == ("soft", "plain", "none", "hard", "soft-no-ctc")
    plain = ASRConfig(**{**ASRConfig().to_dict(), **ROWS["plain"]})
    assert (plain.vq, plain.token_ctc_weight, plain.compress, plain.ctc_weight) == ("none", 0.0, False, 0.0)
    snc = ASRConfig(**{**ASRConfig().to_dict(), **ROWS["soft-no-ctc"]})
    assert (snc.vq, snc.token_ctc_weight, snc.compress, snc.ctc_weight) == ("soft", 0.0, False, 0.0)
    for row in ("none", "hard", "soft"):  # the like-for-like rows keep the token CTC and the collapse
        cfg = ASRConfig(**{**ASRConfig().to_dict(), **ROWS[row]})
        assert cfg.token_ctc_weight > 0 and cfg.compress and cfg.vq == row


# --------------------------------------------------------------------------------- training pieces
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not espeak_available():
        pytest.skip("espeak-ng not installed")
    from asr_reference.testing import make_tiny_data, make_tiny_lm

    root = tmp_path_factory.mktemp("science")
    paths = make_tiny_data(root / "data")
    return {"root": root, "lm": make_tiny_lm(root / "lm"), **paths}


def _train(tiny, run, row, steps=3, **kw):
    from asr_reference.compare import ROWS
    from asr_reference.model import ASRConfig
    from asr_reference.testing import tiny_config
    from asr_reference.train import TrainArgs, train

    cfg = ASRConfig(**{**tiny_config(tiny["lm"]).to_dict(), **ROWS[row]})
    logs = []
    summary = train(cfg, TrainArgs(train=str(tiny["train"]), run=str(run), steps=steps, batch_size=4, warmup=1,
                                   device="cpu", save_every=100, **kw), log=logs.append)
    return summary, logs


@needs_espeak
@pytest.mark.parametrize("row", ["plain", "soft-no-ctc"])
def test_new_rows_train_and_have_no_ctc(tiny, tmp_path, row):
    import torch

    from asr_reference.train import load_run

    summary, _ = _train(tiny, tmp_path / row, row)
    assert summary["steps"] == 3 and summary["tctc"] is None and summary["ctc"] is None
    assert (summary["vq_loss"] is not None) == (row == "soft-no-ctc")
    model = load_run(tmp_path / row)
    assert model.ctc_head is None and not model.token_scores
    assert (model.vq is None) == (row == "plain")
    wav = torch.randn(1, 16000) * 0.1
    audio, lens, aux = model.embed_audio(wav, torch.tensor([16000]))
    assert int(lens[0]) == int(aux["proj_lens"][0])  # no collapse: every projector frame reaches the LLM


@needs_espeak
def test_time_budget_never_changes_the_step_count(tiny, tmp_path):
    summary, logs = _train(tiny, tmp_path / "b", "soft", steps=3, time_budget=1e-3)
    assert summary["steps"] == 3  # before: shrunk to fit the budget
    eta = [ln for ln in logs if "s/step measured" in ln]
    assert eta and "WARNING" in eta[0] and "time budget" in eta[0]


@needs_espeak
def test_tau_schedule_and_init_from(tiny, tmp_path):
    import torch

    from asr_reference.train import load_run, read_checkpoint, tau_at

    assert tau_at((1.0, 0.1), 0, 5) == pytest.approx(1.0) and tau_at((1.0, 0.1), 4, 5) == pytest.approx(0.1)
    assert tau_at((1.0, 0.01), 2, 5) == pytest.approx(0.1)  # geometric
    _train(tiny, tmp_path / "hard", "hard", steps=2, seed=5)
    hard = load_run(tmp_path / "hard").state_dict()
    summary, logs = _train(tiny, tmp_path / "hs", "hard-soft", steps=3, init_from=str(tmp_path / "hard"),
                           tau_schedule="1.0:0.2")
    assert any("initialised from" in ln for ln in logs)
    model = load_run(tmp_path / "hs")
    assert model.cfg.vq == "soft"
    # the schedule's last value (set before the last step; one optimiser step on log tau after it)
    assert float(model.vq.temperature.detach()) == pytest.approx(0.2, rel=0.02)
    # started from the hard run (seed 5): 3 AdamW steps of lr <= 2e-3 move no weight by more than ~0.01,
    # while a fresh seed-0 initialisation is far from the seed-5 one
    _train(tiny, tmp_path / "fresh", "soft", steps=3)
    fresh = load_run(tmp_path / "fresh").state_dict()
    key = "projector.mlp.0.weight"
    assert (model.state_dict()[key] - hard[key]).abs().max() < 0.02
    assert (fresh[key] - hard[key]).abs().max() > 0.05
    with pytest.raises(ValueError, match="START:END"):
        from asr_reference.train import parse_tau_schedule

        parse_tau_schedule("0.5")


def _short_decoding(monkeypatch):
    """8 new tokens per utterance: the untrained tiny LM would otherwise run to the 48-token budget."""
    from asr_reference import model

    monkeypatch.setattr(model, "TOKENS_PER_SECOND", 0)
    monkeypatch.setattr(model, "MIN_NEW_TOKENS", 8)


@needs_espeak
def test_demo_compare_tiny(tiny, tmp_path, monkeypatch):
    """The whole demo --compare path on the tiny data: two rows, two seeds; fixed steps, the
    estimate printed first, mean ± std and bootstrap lines in the markdown."""
    import shutil

    from asr_reference import cli
    from asr_reference.cli import common

    data = tmp_path / "data"
    shutil.copytree(tiny["root"] / "data", data)
    (data / "test_ood_noise.jsonl").rename(data / "test_in.jsonl")  # a set named test_in, as demo expects
    shutil.copy(data / "test_in.jsonl", data / "test_ood_noise.jsonl")
    monkeypatch.setitem(common.DEFAULTS, "cpu", {**common.DEFAULTS["cpu"], "batch_size": 4, "enc_steps": 2, "enc_batch": 4, "scratch_batch": 4})
    _short_decoding(monkeypatch)
    lines = []
    monkeypatch.setattr(common, "log", lambda m: lines.append(m))
    out = tmp_path / "results"
    cli.main(["demo", "--compare", "--rows", "plain", "soft", "--seeds", "2", "--steps", "1", "--data", str(data), "--runs", str(tmp_path / "runs"),
              "--llm", str(tiny["lm"]), "--results", str(out), "--device", "cpu", "--warmup", "1",
              "--enc-dim", "32", "--enc-layers", "1", "--time-budget", "0.0001", "--jobs", "1"])
    assert "expect about" in lines[0] and "step count is fixed" in lines[0]
    assert any("WARNING" in ln and "nothing is shortened" in ln for ln in lines)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == ["plain", "soft"] and saved["seeds"] == 2
    assert {s["steps"] for s in saved["train"]} == {1}
    assert [s["seed"] for s in saved["train"] if s["row"] == "soft"] == [0, 1]
    assert (tmp_path / "runs" / "vq_plain_s1" / "checkpoint.pt").is_file()
    md = (out / "compare.md").read_text()
    assert "frozen, its outputs cached" in md and "(trains: projector, VQ codebook + tau)" in md
    assert (tmp_path / "runs" / "encoder" / "builtin_encoder.json").is_file()
    assert "| soft vs plain | test_in |" in md and "mean ± std over 2 seeds" in md
    assert "--seeds 2" in md
    # a rerun reuses every finished run (nothing retrained)
    lines.clear()
    cli.main(["demo", "--compare", "--rows", "plain", "--seeds", "1", "--steps", "1", "--data", str(data),
              "--runs", str(tmp_path / "runs"), "--llm", str(tiny["lm"]), "--results", str(out), "--device", "cpu",
              "--warmup", "1", "--enc-dim", "32", "--enc-layers", "1", "--jobs", "1"])
    assert not any("starting it again" in ln for ln in lines)
    assert json.loads((out / "compare.json").read_text())["train"][0]["trained_steps"] == 0


@needs_espeak
def test_demo_compare_parallel_jobs(tiny, tmp_path, monkeypatch, capfd):
    """--jobs 2: the runs train in two spawned processes (prefixed log lines, one progress bar) and
    give the same table as one process would: the same runs, steps and seeds."""
    import shutil

    from asr_reference import cli
    from asr_reference.cli import common

    data = tmp_path / "data"
    shutil.copytree(tiny["root"] / "data", data)
    (data / "test_ood_noise.jsonl").rename(data / "test_in.jsonl")
    monkeypatch.setitem(common.DEFAULTS, "cpu", {**common.DEFAULTS["cpu"], "batch_size": 4, "enc_steps": 2, "enc_batch": 4, "scratch_batch": 4})
    lines = []
    monkeypatch.setattr(common, "log", lambda m: lines.append(m))
    out = tmp_path / "results"
    cli.main(["demo", "--compare", "--rows", "plain", "hard", "--steps", "2", "--scratch-encoder", "--data", str(data),
              "--runs", str(tmp_path / "runs"), "--llm", str(tiny["lm"]), "--results", str(out), "--device", "cpu",
              "--warmup", "1", "--enc-dim", "32", "--enc-layers", "1", "--jobs", "2"])
    assert "2 in parallel" in lines[0] and "encoder pretraining" not in lines[0]  # --scratch-encoder: no stage
    printed = capfd.readouterr()
    assert "[plain] train: done" in printed.out and "[hard] train: done" in printed.out
    assert "demo: 100%" in printed.err  # the parent's one bar over both runs' steps
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == ["plain", "hard"] and [s["steps"] for s in saved["train"]] == [2, 2]
    for row in ("plain", "hard"):
        assert (tmp_path / "runs" / f"vq_{row}" / "checkpoint.pt").is_file()
        assert (tmp_path / "runs" / f"vq_{row}" / "hyp_test_in_b1.jsonl").is_file()


def test_estimate_schedules_parallel_runs():
    from asr_reference.compare import REFERENCE_CPU, estimate_seconds

    one = estimate_seconds(["soft"], 100, 1, False, False)
    assert one == pytest.approx(100 * REFERENCE_CPU["step"]["soft"] + REFERENCE_CPU["eval"])
    par = REFERENCE_CPU["step_parallel"]["soft"] * 100 + REFERENCE_CPU["eval"]
    # three equal runs sharing the reference machine's two cores: one and a half runs' time
    assert estimate_seconds(["soft"], 100, 3, False, False, jobs=3) == pytest.approx(1.5 * par)
    assert estimate_seconds(["soft"], 100, 3, True, True, jobs=3) == pytest.approx(
        1.5 * par + REFERENCE_CPU["prepare"] + REFERENCE_CPU["lm"])
    assert estimate_seconds(["soft"], 100, 1, False, False, jobs=3) == pytest.approx(par)  # one run: one core
    # a finished run only decodes; a half-trained one trains its remaining steps
    assert estimate_seconds(["soft"], 100, 1, False, False, done={("soft", 0): 100}) == REFERENCE_CPU["eval"]
    assert estimate_seconds(["soft"], 100, 1, False, False, done={("soft", 0): 40}) == pytest.approx(
        60 * REFERENCE_CPU["step"]["soft"] + REFERENCE_CPU["eval"])


def test_estimate_counts_the_encoder_stage_and_the_bridge_steps():
    from asr_reference.compare import REFERENCE_CPU as R, estimate_seconds

    bridge = estimate_seconds(["soft"], 100, 1, False, False, frozen_encoder=True, batch_size=16)
    assert bridge == pytest.approx(100 * 16 * R["bridge_step"] + R["eval"] + R["encoder_cache"])
    # encoder pretraining: after the LM, or beside it on the other core
    enc = 1000 * R["encoder_step"]
    after = estimate_seconds(["soft"], 100, 1, False, True, encoder_steps=1000, frozen_encoder=True, batch_size=16)
    beside = estimate_seconds(["soft"], 100, 1, False, True, encoder_steps=1000, frozen_encoder=True, batch_size=16,
                              side_by_side=True)
    assert after == pytest.approx(bridge + R["lm"] + enc)
    assert beside == pytest.approx(bridge + max(R["lm"], enc, (R["lm"] + enc) / R["cores"]))


def test_stale_data_and_lm_are_detected(tmp_path):
    from asr_reference.compare import data_is_stale, lm_is_stale, mark_lm
    from asr_reference.data import IN_DOMAIN, OUT_OF_DOMAIN

    data, lm = tmp_path / "data", tmp_path / "lm"
    data.mkdir()
    assert data_is_stale(data) == "missing"
    (data / "test_in.jsonl").write_text("")
    assert data_is_stale(data) is None  # the user's own manifests: used as they are
    splits = {"in_domain": [v.__dict__ for v in IN_DOMAIN[:2]],
              "out_of_domain": {k: [v.__dict__ for v in vs] for k, vs in OUT_OF_DOMAIN.items()}}
    (data / "splits.json").write_text(json.dumps(splits))
    assert "training voices" in data_is_stale(data)  # made by an older prepare: rebuilt
    splits["in_domain"] = [v.__dict__ for v in IN_DOMAIN]
    (data / "splits.json").write_text(json.dumps(splits))
    assert "manifests missing" in data_is_stale(data)
    for name in ("train", "dev", *OUT_OF_DOMAIN):
        (data / f"{name}.jsonl").write_text("")
    assert data_is_stale(data) is None
    (data / "lm_train.txt").write_text("a b c\n")
    assert lm_is_stale(lm, data) == "missing"
    lm.mkdir()
    (lm / "config.json").write_text("{}")
    assert "not pretrained on" in lm_is_stale(lm, data)
    mark_lm(lm, data)
    assert lm_is_stale(lm, data) is None
    (data / "lm_train.txt").write_text("other text\n")
    assert "not pretrained on" in lm_is_stale(lm, data)


# ------------------------------------------------------------------------------ data: OOD, eval, corpus
def test_parse_condition():
    from asr_reference.data import parse_condition

    name, voices = parse_condition("phone=en-us+m3,en-us+f2:sox=telephone+reverb:snr=10:rate=200")
    assert name == "test_ood_phone" and [v.name for v in voices] == ["en-us+m3", "en-us+f2"]
    assert voices[0].sox == "telephone+reverb" and voices[0].snr_db == 10 and voices[0].rate == 200
    assert parse_condition("speed=en-us+f2:sox=speed 1.2")[1][0].sox == "speed 1.2"
    for bad in ("novoice", "x=", "x=en-us:rate=fast", "x=en-us:volume=3", "x y=en-us", "x=en-us:pitch=300"):
        with pytest.raises(ValueError):
            parse_condition(bad)


@needs_espeak
def test_prepare_ood_and_multi_manifest_eval(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    import torch

    from asr_reference.__main__ import main
    from asr_reference.data import read_manifest, read_wav, sox_available, test_sets

    data = tmp_path / "data"
    shutil.copytree(tiny["root"] / "data", data)
    shutil.copy(data / "test_ood_noise.jsonl", data / "test_in.jsonl")
    specs = ["fast=en-us+m3:rate=300"]
    if sox_available():
        specs += ["phone=en-us+f2:sox=telephone", "slow=en-us+m3:sox=slow", "echo=en-us+f2:sox=reverb:snr=10"]
    main(["prepare", "--out", str(data), "--ood", *specs])
    sets = test_sets(data)
    assert list(sets)[:2] == ["test_in", "test_ood_noise"]  # the default sets first, then the new ones
    assert "test_ood_fast" in sets
    base = read_manifest(data / "test_in.jsonl")
    fast = read_manifest(sets["test_ood_fast"])
    assert [r["text"] for r in fast] == [r["text"] for r in base]
    if sox_available():
        slow = read_manifest(sets["test_ood_slow"])
        assert slow[0]["duration"] > 1.15 * fast[0]["duration"]
        phone, _ = read_wav(read_manifest(sets["test_ood_phone"])[0]["audio_filepath"])
        spec = torch.fft.rfft(phone).abs()
        assert spec[int(len(spec) * 4200 / 8000):].pow(2).sum() < 1e-3 * spec.pow(2).sum()  # band-limited
    # eval takes several manifests and prints one JSON line each
    _short_decoding(monkeypatch)
    run = tmp_path / "run"
    main(["train", "--train", str(data / "train.jsonl"), "--llm", str(tiny["lm"]), "--run", str(run), "--steps", "1",
          "--enc-dim", "32", "--enc-layers", "1", "--batch-size", "4", "--device", "cpu"])
    capsys.readouterr()
    main(["eval", "--run", str(run), "--manifest", *map(str, sets.values()), "--device", "cpu", "--limit", "1"])
    out = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert [o["manifest"] for o in out] == [str(p) for p in sets.values()]
    assert all((run / f"hyp_{name}_b1.jsonl").is_file() for name in sets)


def test_corpus_templates_are_data_and_the_corpus_is_unchanged():
    from asr_reference import corpus

    # hashes of the corpus made by the earlier if/elif code (same seeds): the move to data changed nothing
    for seed, n, digest in [(0, 5000, "25e746ddb9bfff3d28aaa8ad01ac714c847bb9c2387be9194bc93410bccb8d91"),
                            (1, 2000, "9c18f12b6a7baae3e878190170265bfa6ec6aed4b896da4d011988d42ff5cce0"),
                            (7, 300, "1aa7a6eccdba8e8bd2137f56630fee8677822340e7a4a952d6c7cc4e643400cc")]:
        assert hashlib.sha256("\n".join(corpus.generate(n, seed)).encode()).hexdigest() == digest
    committed = [ln for ln in corpus.CORPUS_FILE.read_text().splitlines() if not ln.startswith("#")]
    assert committed == corpus.generate()
    assert len(corpus.TEMPLATES) == 12 and corpus.TEMPLATES_FILE.suffix == ".txt"
    assert "if t ==" not in open(corpus.__file__).read()
    r = random.Random(0)
    assert corpus.fill("{who} {be} at {place}", r, past=True).split()[-2:-1] != []
    with pytest.raises(ValueError, match="unknown slot"):
        corpus.fill("{nothing}", random.Random(0), past=False)
    # a different template table gives different sentences (the table is what drives the output)
    assert corpus.sentence(random.Random(3), ["hello {place}"]).startswith("Hello the ")


def test_pooled_ood_resamples_sentences_not_correlated_utterances():
    """Seven renderings of the same sentences are not seven independent samples: pooled by sentence, the
    interval is as wide as the data supports (up to sqrt(7) wider than treating utterances as independent)."""
    from asr_reference.significance import paired_bootstrap, pool_by_sentence

    rng = np.random.default_rng(3)
    n = 120
    words = rng.integers(4, 12, n).astype(float)
    hard = rng.uniform(0, 1, n)  # a per-sentence difficulty every condition shares
    gain = rng.uniform(0.5, 1.3, n)  # and a per-sentence advantage of b over a
    refs = [f"s{i}" for i in range(n)]
    sets = []
    for _ in range(7):
        ea = np.round(words * np.clip(hard + rng.normal(0, 0.05, n), 0, 1))
        eb = np.round(words * np.clip(hard * gain + rng.normal(0, 0.05, n), 0, 1))
        sets.append((ea, eb, words, refs))
    ea, eb, w, unit = pool_by_sentence(sets)
    assert unit == "sentence" and ea.shape == (n,) and w.sum() == 7 * words.sum()
    clustered = paired_bootstrap(ea, eb, w, 500)
    flat = paired_bootstrap(*(np.concatenate([s[k] for s in sets]) for k in range(3)), 500)
    assert clustered["diff"] == pytest.approx(flat["diff"], abs=1e-4)  # the same point estimate
    assert (clustered["hi"] - clustered["lo"]) > 1.6 * (flat["hi"] - flat["lo"])
    # sets of different sentences are independent: concatenated
    other = [(sets[0][0], sets[0][1], words, refs), (sets[1][0], sets[1][1], words, [r + "x" for r in refs])]
    assert pool_by_sentence(other)[3] == "utterance" and pool_by_sentence(other)[0].shape == (2 * n,)


def test_report_rerenders_from_compare_json(tmp_path, capsys):
    from asr_reference.__main__ import main
    from asr_reference.compare import write_compare

    results = _fake_results(tmp_path, ["none", "soft"], seeds=1)
    meta = {"command": "python -m asr_reference demo --compare", "machine": "test", "load_before": "0",
            "minutes": 12.5, "seeds": 1, "steps": 5, "rows": ["none", "soft"], "setup": "tiny setup"}
    train = [{"run": "r/vq_soft", "steps": 5, "trained_steps": 5, "seconds": 1.0, "loss": 1, "ce": 1}]
    out = tmp_path / "out"
    write_compare(results, train, meta, out, log=lambda *_: None)
    (out / "compare.md").write_text("stale")
    main(["report", "--results", str(out)])
    md = (out / "compare.md").read_text()
    assert "12.5 min wall time" in md and "tiny setup" in md and "| soft vs none | test_in |" in md
    Path(results["soft"][0]["test_in"]["hypotheses"]).unlink()
    with pytest.raises(SystemExit) as exc:
        main(["report", "--results", str(out)])
    assert exc.value.code == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", "--results", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err


def test_parallel_workers_stop_when_the_demo_process_is_killed(tmp_path):
    """A killed demo must not leave its training workers running as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from asr_reference.compare import _exit_with_parent\n"
        "def work(_):\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=_exit_with_parent, initargs=(os.getpid(),))\n"
        "    pool.submit(work, 0)\n"
        "    time.sleep(1)\n"
        "    print(*[p.pid for p in pool._processes.values()], flush=True)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        # a zombie (dead, not yet reaped by init) counts as stopped
        with open(f"/proc/{worker}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.5)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its parent by 20 s")
