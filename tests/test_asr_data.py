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


def _wav(path, sr=SAMPLE_RATE, seconds=0.1):
    write_wav(path, torch.zeros(int(sr * seconds)), sr)
    return path


@pytest.mark.parametrize("case,line,msg", [
    ("missing", 2, "audio file not found"),
    ("empty", 2, "empty text"),
    ("json", 2, "not valid JSON"),
    ("key", 2, "missing key 'text'"),
    ("path_number", 2, "audio_filepath must be a non-empty path string, got 12"),
    ("path_null", 2, "audio_filepath must be a non-empty path string, got None"),
    ("duration_text", 2, "duration must be a positive number of seconds, got 'abc'"),
    ("duration_null", 2, "duration must be a positive number of seconds, got None"),
    ("text_number", 2, "text must be a string, got 5"),
    ("latin1", 2, "not UTF-8 \\(byte 0xe9"),
    ("not_audio", 2, "cannot read audio \\(Format not recognised\\)"),
    ("truncated", 2, "is 0.25 s long but the manifest says 1.00 s \\(truncated"),
])
def test_bad_manifest_names_the_line(tmp_path, case, line, msg):
    good = {"audio_filepath": str(_wav(tmp_path / "a.wav")), "text": "hello there", "duration": 0.1}
    bad = dict(good)
    if case == "missing":
        bad["audio_filepath"] = str(tmp_path / "nope.wav")
    elif case == "empty":
        bad["text"] = " ?! "
    elif case == "key":
        del bad["text"]
    elif case.startswith("path_"):
        bad["audio_filepath"] = 12 if case == "path_number" else None
    elif case.startswith("duration_"):
        bad["duration"] = "abc" if case == "duration_text" else None
    elif case == "text_number":
        bad["text"] = 5
    elif case == "not_audio":
        (tmp_path / "junk.wav").write_bytes(b"this is not audio" * 20)
        bad["audio_filepath"] = str(tmp_path / "junk.wav")
    elif case == "truncated":  # a 1 s file cut off after 0.25 s (its header still says 1 s)
        (tmp_path / "cut.wav").write_bytes(_wav(tmp_path / "long.wav", seconds=1.0).read_bytes()[:44 + 8000])
        bad.update(audio_filepath=str(tmp_path / "cut.wav"), duration=1.0)
    m = tmp_path / "m.jsonl"
    second = ("{oops" if case == "json" else json.dumps(bad)).encode()
    if case == "latin1":  # "café" written by a Latin-1 editor
        second = json.dumps(dict(good, text="cafe")).replace("cafe", "caf\xe9").encode("latin-1")
    m.write_bytes(json.dumps(good).encode() + b"\n" + second + b"\n")
    with pytest.raises(ManifestError, match=msg) as info:
        read_manifest(m)
    assert f"{m}:{line}:" in str(info.value)


@pytest.mark.parametrize("subtype,channels,rate", [("PCM_U8", 1, 16000), ("PCM_24", 2, 44100), ("PCM_32", 1, 8000),
                                                   ("FLOAT", 2, 22050)])
def test_any_bit_depth_channels_and_rate_read_as_mono_at_the_target_rate(tmp_path, subtype, channels, rate):
    sf = pytest.importorskip("soundfile")
    import numpy as np

    from asr_reference.audio import read_audio

    t = np.arange(rate // 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype("float32")
    frames = np.stack([tone] * channels, 1) if channels > 1 else tone
    path = tmp_path / f"x_{subtype}.wav"
    sf.write(path, frames, rate, subtype=subtype)
    audio, sr = read_audio(path)
    assert sr == rate and audio.dim() == 1 and audio.numel() == rate // 2
    assert torch.allclose(audio, torch.from_numpy(tone), atol=1e-2)  # 8-bit: 1/128 quantisation
    resampled, sr16 = read_audio(path, SAMPLE_RATE)
    assert sr16 == SAMPLE_RATE and abs(resampled.numel() - SAMPLE_RATE // 2) <= 1


def test_flac_manifest_without_duration_reads_the_header(tmp_path):
    sf = pytest.importorskip("soundfile")
    import numpy as np

    sf.write(tmp_path / "a.flac", np.zeros(8000, dtype="float32"), 8000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio_filepath": "a.flac", "text": "hi there"}) + "\n")
    row, = read_manifest(tmp_path / "m.jsonl")
    assert row["duration"] == 1.0 and row["frames"] == 8000 and row["where"] == f"{tmp_path / 'm.jsonl'}:1"


def test_audio_error_at_load_names_file_and_line(tmp_path):
    from asr_reference.data import load_row_audio
    from asr_reference.errors import AudioError

    (tmp_path / "gone.wav").write_bytes(b"RIFF")
    with pytest.raises(AudioError, match=r"m.jsonl:7: .*gone.wav: cannot read audio"):
        load_row_audio({"audio_filepath": str(tmp_path / "gone.wav"), "where": "m.jsonl:7"}, SAMPLE_RATE)


def test_seconds_batches_cap_padded_audio_and_cover_everything():
    from asr_reference.dataset import seconds_batches

    seconds = [0.5 + (i * 7919 % 100) / 10 for i in range(300)]
    batches = seconds_batches(seconds, 30.0, epoch=0, seed=0, bucket=64)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) == 1 or len(b) * max(seconds[i] for i in b) <= 30.0
    assert batches == seconds_batches(seconds, 30.0, epoch=0, seed=0, bucket=64)
    assert batches != seconds_batches(seconds, 30.0, epoch=1, seed=0, bucket=64)


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no entries"):
        read_manifest(tmp_path / "e.jsonl")


def test_voice_is_hashable_config():
    assert Voice("en-us+m3") == Voice("en-us+m3", 165, 50, None)


def test_training_pool_is_diverse_and_never_imitates_an_ood_condition():
    """Out of domain must test conditions training never saw: no noise or channel effect, no rate or
    pitch inside an OOD set's, no held-out variety, and the held-out variants only where documented."""
    from asr_reference.data import IN_DOMAIN, OUT_OF_DOMAIN, TRAIN_PITCHES, TRAIN_RATES

    identities = {v.name for v in IN_DOMAIN}
    assert len(identities) == 24 and len(IN_DOMAIN) == 168
    for name in identities:  # each voice identity speaks at several rates and pitches
        assert len({v.rate for v in IN_DOMAIN if v.name == name}) >= 5
        assert len({v.pitch for v in IN_DOMAIN if v.name == name}) >= 5
    assert all(v.snr_db is None and v.sox is None for v in IN_DOMAIN)
    lo_rate, hi_rate, lo_pitch, hi_pitch = min(TRAIN_RATES), max(TRAIN_RATES), min(TRAIN_PITCHES), max(TRAIN_PITCHES)
    varieties = {n.split("+")[0] for n in identities}
    variants = {n.split("+")[1] for n in identities}
    for set_name, voices in OUT_OF_DOMAIN.items():
        for v in voices:
            assert v not in IN_DOMAIN, (set_name, v)
            variety, variant = v.name.split("+")
            new_voice = variety not in varieties or variant not in variants
            new_speed = not (lo_rate <= v.rate <= hi_rate and lo_pitch <= v.pitch <= hi_pitch)
            new_channel = v.snr_db is not None or v.sox is not None
            assert new_voice or new_speed or new_channel, (set_name, v)
    assert all(v.name.split("+")[0] not in varieties for v in OUT_OF_DOMAIN["test_ood_accent"])
    assert all(v.name.split("+")[0] not in varieties and v.name.split("+")[1] not in variants
               for v in OUT_OF_DOMAIN["test_ood_dialect"])
    assert all(v.name.split("+")[1] not in variants for v in OUT_OF_DOMAIN["test_ood_voice"])
    assert all(not lo_rate <= v.rate <= hi_rate for v in OUT_OF_DOMAIN["test_ood_rate"])


def test_prepare_refuses_early_without_sox(tmp_path, monkeypatch):
    from asr_reference import data
    from asr_reference.errors import ASRError

    monkeypatch.setattr(data, "sox_available", lambda: False)
    with pytest.raises(ASRError, match="sox is not installed.*test_ood_phone.*test_ood_reverb"):
        data.prepare(tmp_path / "d")
    assert not (tmp_path / "d").exists()  # nothing synthesised first
