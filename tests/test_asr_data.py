"""ASR data: normalisation, espeak-ng synthesis, noise, manifests and their error messages."""

from __future__ import annotations

import json

import pytest
import torch

from asr_reference.data import (SAMPLE_RATE, ManifestError, Voice, add_noise, espeak_available, normalize_text,
                                read_manifest, read_sentences, read_wav, snr_check, split_sentences, write_wav)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")


def test_normalize_text():
    assert normalize_text("Hello,  World!  It's the Mid-Day SUN.") == "hello world it's the mid day sun"
    assert normalize_text("'quoted' words?") == "quoted words"
    assert normalize_text(" ... ") == ""


def test_read_and_split_sentences(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\nThe cat sat.\nA dog ran away!\nThe cat sat.\nOne\nBirds fly high in the sky?\n")
    s = read_sentences(f)
    assert s == ["the cat sat", "a dog ran away", "birds fly high in the sky"]
    train, dev, test = split_sentences(s, 1, 1)
    assert len(train) == 1 and not (set(train) & set(dev)) and not (set(dev) & set(test))
    with pytest.raises(ValueError, match="need more than"):
        split_sentences(s, 2, 1)


def test_noise_snr():
    gen = torch.Generator().manual_seed(0)
    clean = torch.sin(torch.arange(16000) * 0.05)
    for snr in (20.0, 5.0):
        assert abs(snr_check(clean, add_noise(clean, snr, gen)) - snr) < 0.5


@needs_espeak
def test_prepare_handful(tmp_path):
    from asr_reference.testing import SENTENCES, make_tiny_data

    paths = make_tiny_data(tmp_path)
    rows = read_manifest(paths["train"])
    assert [r["text"] for r in rows] == SENTENCES
    for r in rows:
        wav, sr = read_wav(r["audio_filepath"])
        assert sr == SAMPLE_RATE and abs(wav.numel() / sr - r["duration"]) < 1e-2
        assert 0.5 < r["duration"] < 5 and wav.abs().max() <= 1.0
    raw = [json.loads(l) for l in paths["train"].read_text().splitlines()]
    assert set(raw[0]) == {"audio_filepath", "text", "duration"} and not raw[0]["audio_filepath"].startswith("/")
    noisy = read_manifest(paths["test_ood_noise"])
    assert len(noisy) == 2  # one condition per sentence, round robin over the noise levels


def _wav(path, sr=SAMPLE_RATE):
    write_wav(path, torch.zeros(sr // 10), sr)
    return path


@pytest.mark.parametrize("case,line,msg", [
    ("missing", 2, "audio file not found"),
    ("rate", 2, "sample rate 8000 Hz, expected 16000"),
    ("empty", 2, "empty text"),
    ("json", 2, "not valid JSON"),
    ("key", 2, "missing key 'text'"),
])
def test_bad_manifest_names_the_line(tmp_path, case, line, msg):
    good = {"audio_filepath": str(_wav(tmp_path / "a.wav")), "text": "hello there", "duration": 0.1}
    bad = dict(good)
    if case == "missing":
        bad["audio_filepath"] = str(tmp_path / "nope.wav")
    elif case == "rate":
        bad["audio_filepath"] = str(_wav(tmp_path / "b.wav", 8000))
    elif case == "empty":
        bad["text"] = " ?! "
    elif case == "key":
        del bad["text"]
    m = tmp_path / "m.jsonl"
    second = "{oops" if case == "json" else json.dumps(bad)
    m.write_text(json.dumps(good) + "\n" + second + "\n")
    with pytest.raises(ManifestError, match=msg) as info:
        read_manifest(m)
    assert f"{m}:{line}:" in str(info.value)


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no entries"):
        read_manifest(tmp_path / "e.jsonl")


def test_voice_is_hashable_config():
    assert Voice("en-us+m3") == Voice("en-us+m3", 165, 50, None)
