"""Text normalisation, espeak-ng synthesis, noise, sentence-level splits and NeMo-style manifests.

A manifest is JSON lines: ``{"audio_filepath": "...", "text": "...", "duration": 1.23}``; the audio may be
any file :func:`asr_reference.audio.read_audio` reads (WAV of any bit depth, FLAC, ..., any sample rate,
mono or stereo; it is resampled to the encoder's rate when loaded). Relative paths are resolved against
the manifest's folder. Every command reads manifests through :func:`read_manifest`, which names the
file and line of anything wrong.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio.functional as AF

from asr_reference.audio import audio_info, read_audio
from asr_reference.errors import ASRError, AudioError, ManifestError

SAMPLE_RATE = 16000
# a manifest duration further than 0.1 s + 5% from the file's own length means a truncated or wrong file
DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRACTION = 0.1, 0.05


# ----------------------------------------------------------------------------------------------- text
_PUNCT = re.compile(r"[^a-z0-9' ]+")


def normalize_text(text: str) -> str:
    """ASR normalisation: lower case, hyphens to spaces, punctuation dropped, single spaces."""
    text = text.lower().replace("-", " ").replace("’", "'")
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"\s*'\s*(?![a-z])|(?<![a-z])'", " ", text)  # keep only word-internal apostrophes
    return " ".join(text.split())


def read_sentences(path: str | Path, min_words: int = 2, max_words: int = 14) -> list[str]:
    """Sentences from a text file: one per line if lines look like sentences, else split at . ! ?.

    Lines starting with '#' are comments. Returns normalised, de-duplicated sentences in file order.
    """
    raw = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    body = "\n".join(raw)
    pieces = raw if sum(len(ln) < 200 for ln in raw if ln.strip()) > 0.9 * max(1, sum(1 for ln in raw if ln.strip())) \
        else re.split(r"(?<=[.!?])\s+", body.replace("\n", " "))
    out: dict[str, None] = {}
    for piece in pieces:
        s = normalize_text(piece)
        if min_words <= len(s.split()) <= max_words:
            out.setdefault(s, None)
    return list(out)


def split_sentences(sentences: list[str], n_dev: int, n_test: int, seed: int = 0):
    """Disjoint train/dev/test sentence lists (split by sentence, so no text is shared)."""
    order = list(sentences)
    random.Random(seed).shuffle(order)
    if n_dev + n_test >= len(order):
        raise ValueError(f"need more than {n_dev + n_test} sentences for dev+test, got {len(order)}")
    return order[n_dev + n_test:], order[:n_dev], order[n_dev:n_dev + n_test]


# ---------------------------------------------------------------------------------------------- audio
def write_wav(path: str | Path, audio: torch.Tensor, sr: int = SAMPLE_RATE) -> None:
    pcm = (audio.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm)


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate (any format :func:`read_audio` reads)."""
    return read_audio(path)


def wav_info(path: str | Path) -> tuple[int, int]:
    """(sample rate, number of frames) from the audio header."""
    return audio_info(path)


@dataclass(frozen=True)
class Voice:
    """One espeak-ng rendering condition."""

    name: str  # espeak-ng voice, e.g. "en-us+m3"
    rate: int = 165  # words per minute
    pitch: int = 50  # 0..99
    snr_db: float | None = None  # additive noise, None = clean
    sox: str | None = None  # sox effects applied to the 16 kHz speech before the noise, e.g. "reverb 50"


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


# named sox effect chains for ``prepare --ood`` (anything else after sox= is passed to sox as written)
SOX_PRESETS = {
    "telephone": "highpass 300 lowpass 3400 rate 8000",  # narrow band, 8 kHz, back to 16 kHz after
    "reverb": "reverb 50 50 100",
    "fast": "speed 1.25",
    "slow": "speed 0.8",
}


def sox_available() -> bool:
    return shutil.which("sox") is not None


def apply_sox(audio: torch.Tensor, effects: str) -> torch.Tensor:
    """Run a 16 kHz waveform through ``sox in.wav out.wav EFFECTS rate 16000`` (presets by name)."""
    if not sox_available():
        raise ASRError("sox is not installed (needed for sox= conditions): apt-get install -y sox")
    chain = " ".join(SOX_PRESETS.get(e, e) for e in effects.split("+")).split()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        write_wav(src, audio)
        res = subprocess.run(["sox", str(src), str(dst), *chain, "channels", "1", "rate", str(SAMPLE_RATE)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ASRError(f"sox effects {effects!r} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        out, sr = read_wav(dst)
    return out


def parse_condition(spec: str) -> tuple[str, tuple[Voice, ...]]:
    """``NAME=VOICE[,VOICE...][:rate=WPM][:pitch=P][:snr=DB][:sox=EFFECTS]`` -> ("test_ood_NAME", voices).

    EFFECTS: a preset (telephone, reverb, fast, slow) or a sox effect chain as written ("speed 1.1",
    "highpass 300 lowpass 3400"); several joined with "+" ("telephone+reverb"). Each voice gets the
    same rate/pitch/snr/effects; sentences go round robin over the voices.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not rest.strip():
        raise ValueError(f"condition {spec!r}: expected NAME=VOICE[,VOICE...][:key=value...] "
                         f"(NAME of letters, digits, _ or -)")
    voices_part, *opts = rest.split(":")
    voices = [v.strip() for v in voices_part.split(",") if v.strip()]
    if not voices:
        raise ValueError(f"condition {spec!r}: no espeak-ng voice given")
    kw: dict = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key == "rate":
                kw["rate"] = int(value)
            elif key == "pitch":
                kw["pitch"] = int(value)
            elif key == "snr":
                kw["snr_db"] = float(value)
            elif key == "sox" and value:
                kw["sox"] = value
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"condition {spec!r}: bad option {opt!r} (rate=WPM, pitch=0..99, snr=DB, sox=EFFECTS)") from None
    if not 80 <= kw.get("rate", 165) <= 450 or not 0 <= kw.get("pitch", 50) <= 99:
        raise ValueError(f"condition {spec!r}: rate must be 80..450 wpm and pitch 0..99")
    prefix = "" if name.startswith("test_") else "test_ood_"
    return prefix + name, tuple(Voice(v, **kw) for v in voices)


def synthesize(text: str, voice: Voice, seed: int = 0) -> torch.Tensor:
    """espeak-ng speech for ``text`` as a 16 kHz float waveform (noise added when voice.snr_db is set)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(voice.rate), "-p", str(voice.pitch),
                        "-w", tmp.name, text], check=True, capture_output=True)
        audio, sr = read_wav(tmp.name)
    audio = AF.resample(audio, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else audio
    if voice.sox:
        audio = apply_sox(audio, voice.sox)
    if voice.snr_db is not None:
        audio = add_noise(audio, voice.snr_db, torch.Generator().manual_seed(seed))
    peak = audio.abs().max().clamp_min(1e-6)
    return audio * min(1.0, 0.95 / float(peak))


def add_noise(audio: torch.Tensor, snr_db: float, gen: torch.Generator) -> torch.Tensor:
    """White-ish noise (lightly low-passed, so it is not trivially out of band) at ``snr_db``."""
    noise = torch.randn(audio.shape, generator=gen)
    noise = AF.lowpass_biquad(noise, SAMPLE_RATE, 4000.0)
    p_sig = audio.pow(2).mean().clamp_min(1e-10)
    p_noise = noise.pow(2).mean().clamp_min(1e-10)
    return audio + noise * torch.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))


# ------------------------------------------------------------------------------------------ manifests
def write_manifest(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_manifest(path: str | Path, check_audio: bool = True) -> list[dict]:
    """Rows of a JSON-lines manifest, validated; errors say ``FILE:LINE: what is wrong``.

    Each row is ``{"audio_filepath": absolute path, "text", "duration": seconds, "where": "FILE:LINE"}``
    (``where`` lets later audio errors name the line). Relative audio paths are resolved against the
    manifest's folder. With ``check_audio`` each audio header is read: the file must exist, be
    readable, have samples and, when the line gives a duration, be about that long (a truncated file
    is not). Without it a missing duration is an error (it is needed for batching by seconds).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    rows = []
    # bytes, decoded line by line: a line in another encoding is named instead of failing the whole file
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; "
                                f"re-encode the manifest, e.g. iconv -f latin1 -t utf-8)") from None
        if not line.strip():
            continue
        rows.append(_manifest_row(line, where, path.parent, check_audio))
    if not rows:
        raise ManifestError(f"{path}: manifest has no entries")
    return rows


def _manifest_row(line: str, where: str, folder: Path, check_audio: bool) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("audio_filepath", "text"):
        if key not in row:
            raise ManifestError(f"{where}: missing key {key!r}")
    audio_field = row["audio_filepath"]
    if not isinstance(audio_field, str) or not audio_field.strip():
        raise ManifestError(f"{where}: audio_filepath must be a non-empty path string, got {audio_field!r}")
    text = row["text"]
    if not isinstance(text, str):
        raise ManifestError(f"{where}: text must be a string, got {text!r}")
    if not normalize_text(text):
        raise ManifestError(f"{where}: empty text for {audio_field}")
    duration = row.get("duration")
    if "duration" in row:
        # bool is an int subclass; "1.5" as a string is a sign of a broken writer, so refuse it too
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
                or duration <= 0:
            raise ManifestError(f"{where}: duration must be a positive number of seconds, got {duration!r}")
        duration = float(duration)
    audio = Path(audio_field)
    if not audio.is_absolute():
        audio = folder / audio
    if check_audio:
        if not audio.is_file():
            raise ManifestError(f"{where}: audio file not found: {audio}")
        try:
            sr, frames = audio_info(audio)
        except AudioError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if frames == 0:
            raise ManifestError(f"{where}: {audio} has no samples")
        actual = frames / sr
        if duration is not None and abs(actual - duration) > DURATION_TOLERANCE_S + DURATION_TOLERANCE_FRACTION * duration:
            raise ManifestError(f"{where}: {audio} is {actual:.2f} s long but the manifest says {duration:.2f} s "
                                f"(truncated or wrong file?)")
        # the header's frame count (not the rounded manifest duration) orders the length buckets
        return {"audio_filepath": str(audio), "text": text, "duration": actual if duration is None else duration,
                "where": where, "frames": frames, "sample_rate": sr}
    if duration is None:
        raise ManifestError(f"{where}: missing key 'duration' (needed when audio headers are not read)")
    return {"audio_filepath": str(audio), "text": text, "duration": duration, "where": where}


def load_row_audio(row: dict, sample_rate: int) -> torch.Tensor:
    """(samples,) waveform of a manifest row at ``sample_rate``; errors name the manifest line."""
    try:
        audio, _ = read_audio(row["audio_filepath"], sample_rate)
    except AudioError as exc:
        raise AudioError(f"{row.get('where', row['audio_filepath'])}: {exc}") from None
    return audio


# ---------------------------------------------------------------------------------------- conditions
# In-domain (train, dev, test_in): a pool of espeak-ng voices, each training sentence rendered once with
# the next voice of the pool. Diverse enough that out-of-domain tests the speech-to-LLM bridge rather
# than an encoder that has heard two voices: three English varieties x eight voice variants, speaking
# rates 140-195 wpm and pitch 35-65 spread over the pool. No training condition imitates an
# out-of-domain one: no noise, no channel effects, no voice variant or variety the OOD sets use except
# where named below (the accent set keeps its variants m1/f3 with unseen varieties).
TRAIN_VARIETIES = ("en-us", "en-gb", "en-gb-x-gbclan")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")
TRAIN_RATES = (140, 150, 160, 165, 170, 180, 190, 195)
TRAIN_PITCHES = (35, 40, 45, 50, 55, 60, 65)


def _training_pool() -> tuple[Voice, ...]:
    """24 voice identities (variety x variant), each at 7 rate/pitch combinations: 168 voices, used
    round robin over the training sentences."""
    identities = [f"{a}+{b}" for a in TRAIN_VARIETIES for b in TRAIN_VARIANTS]
    return tuple(Voice(name, rate=TRAIN_RATES[(i + 3 * r) % len(TRAIN_RATES)],
                       pitch=TRAIN_PITCHES[(i + r) % len(TRAIN_PITCHES)])
                 for r in range(len(TRAIN_PITCHES)) for i, name in enumerate(identities))


IN_DOMAIN = _training_pool()
# Out of domain: the test sentences under conditions training never sees.
OUT_OF_DOMAIN = {
    # unseen English varieties (Scottish, Caribbean, RP; m7 is an unseen variant too)
    "test_ood_accent": (Voice("en-gb-scotland+m1"), Voice("en-029+f3"), Voice("en-gb-x-rp+m7")),
    # training voices far outside the training rate (140-195 wpm) and pitch (35-65) ranges
    "test_ood_rate": (Voice("en-us+m3", rate=230, pitch=30), Voice("en-us+f2", rate=120, pitch=75)),
    # training voices with additive (low-passed) noise at 20, 10 and 5 dB SNR; training is clean
    "test_ood_noise": (Voice("en-us+m3", snr_db=20), Voice("en-us+f2", snr_db=10), Voice("en-us+m3", snr_db=5)),
    # unseen varieties with unseen variants: West Midlands, New York City
    "test_ood_dialect": (Voice("en-gb-x-gbcwmd+m5"), Voice("en-us-nyc+f5")),
    # unseen voice variants of the training varieties
    "test_ood_voice": (Voice("en-us+m6"), Voice("en-gb+f5"), Voice("en-gb-x-gbclan+m7")),
    # training voices through a telephone channel (300-3400 Hz, 8 kHz); needs sox
    "test_ood_phone": (Voice("en-us+m3", sox="telephone"), Voice("en-gb+f2", sox="telephone")),
    # training voices in a reverberant room; needs sox
    "test_ood_reverb": (Voice("en-us+f1", sox="reverb"), Voice("en-gb-x-gbclan+m4", sox="reverb")),
}


def _render(job):
    text, voice, out, seed = job
    audio = synthesize(text, voice, seed)
    write_wav(out, audio)
    return {"audio_filepath": str(out), "text": text, "duration": round(audio.numel() / SAMPLE_RATE, 3)}


def render_set(sentences: list[str], voices, out_dir: Path, name: str, workers: int = 4,
               all_voices: bool = False, seed: int = 0) -> list[dict]:
    """Synthesise a set: each sentence with one voice (round robin) or with every voice."""
    wav_dir = out_dir / "wav" / name
    wav_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, text in enumerate(sentences):
        chosen = voices if all_voices else (voices[i % len(voices)],)
        for j, v in enumerate(chosen):
            jobs.append((text, v, wav_dir / f"{i:05d}_{j}.wav", seed * 1_000_003 + i * 31 + j))
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(_render, jobs))
    for row in rows:  # paths relative to the manifest's folder: the data folder can be moved
        row["audio_filepath"] = str(Path(row["audio_filepath"]).relative_to(out_dir))
    write_manifest(out_dir / f"{name}.jsonl", rows)
    return rows


def prepare(out_dir: str | Path, text_file: str | Path | None = None, n_train: int = 2400,
            n_dev: int = 100, n_test: int = 120, seed: int = 0, workers: int = 4,
            log=print, extra: dict[str, tuple[Voice, ...]] | None = None) -> dict[str, Path]:
    """Make the whole data set: text splits, in-domain train/dev/test and the out-of-domain tests.

    Writes ``out_dir/{train,dev,test_in,test_ood_*}.jsonl``, ``out_dir/wav/...`` and the text files
    ``lm_train.txt`` (every sentence not in dev/test, for LM pretraining) and ``splits.json``.
    """
    from asr_reference.corpus import CORPUS_FILE

    out_dir = Path(out_dir)
    needs_sox = sorted(n for n, vs in {**OUT_OF_DOMAIN, **(extra or {})}.items() if any(v.sox for v in vs))
    if needs_sox and not sox_available():  # before minutes of synthesis, not after
        raise ASRError(f"sox is not installed; the out-of-domain sets {', '.join(needs_sox)} need it: "
                       f"apt-get install -y sox")
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = read_sentences(text_file or CORPUS_FILE)
    train_all, dev, test = split_sentences(sentences, n_dev, n_test, seed)
    train = train_all[:n_train]
    (out_dir / "lm_train.txt").write_text("\n".join(train_all) + "\n", encoding="utf-8")
    manifests = {}
    log(f"prepare: {len(sentences)} sentences -> train {len(train)} (LM text {len(train_all)}), "
        f"dev {len(dev)}, test {len(test)}; synthesising with espeak-ng")
    render_set(train, IN_DOMAIN, out_dir, "train", workers, seed=seed)
    render_set(dev, IN_DOMAIN, out_dir, "dev", workers, seed=seed + 1)
    render_set(test, IN_DOMAIN, out_dir, "test_in", workers, seed=seed + 2)
    for k, (name, voices) in enumerate(OUT_OF_DOMAIN.items()):
        render_set(test, voices, out_dir, name, workers, seed=seed + 3 + k)
    for name in ("train", "dev", "test_in", *OUT_OF_DOMAIN):
        manifests[name] = out_dir / f"{name}.jsonl"
    if extra:
        manifests.update(render_conditions(out_dir, extra, test, workers, seed, log))
    (out_dir / "splits.json").write_text(json.dumps(
        {"source": str(text_file or CORPUS_FILE), "train": len(train), "dev": len(dev), "test": len(test),
         "in_domain": [v.__dict__ for v in IN_DOMAIN],
         "out_of_domain": {k: [v.__dict__ for v in vs] for k, vs in OUT_OF_DOMAIN.items()}}, indent=1))
    hours = sum(json.loads(l)["duration"] for l in open(manifests["train"])) / 3600
    log(f"prepare: wrote {len(manifests)} manifests to {out_dir} ({hours:.2f} h of training audio)")
    return manifests


def render_conditions(out_dir: str | Path, conditions: dict[str, tuple[Voice, ...]], sentences: list[str] | None = None,
                      workers: int = 4, seed: int = 0, log=print) -> dict[str, Path]:
    """Extra out-of-domain test sets (from :func:`parse_condition`) of the test sentences: given, or
    read back from ``out_dir/test_in.jsonl`` of an already prepared folder."""
    out_dir = Path(out_dir)
    if sentences is None:
        test_in = out_dir / "test_in.jsonl"
        if not test_in.is_file():
            raise ASRError(f"{test_in}: not found (prepare the folder first, or give --ood with the full prepare)")
        sentences = [r["text"] for r in read_manifest(test_in, check_audio=False)]
    if any(v.sox for vs in conditions.values() for v in vs) and not sox_available():
        raise ASRError("sox is not installed (needed for sox= conditions): apt-get install -y sox")
    out = {}
    for k, (name, voices) in enumerate(conditions.items()):
        render_set(sentences, voices, out_dir, name, workers, seed=seed + 100 + k)
        out[name] = out_dir / f"{name}.jsonl"
        log(f"prepare: {name}: {len(sentences)} utterances, " + ", ".join(
            v.name + "".join(f" {k}={val}" for k, val in (("rate", v.rate), ("pitch", v.pitch), ("snr", v.snr_db),
                                                          ("sox", v.sox)) if val is not None) for v in voices))
    conditions_file = out_dir / "conditions.json"
    saved = json.loads(conditions_file.read_text()) if conditions_file.is_file() else {}
    saved.update({name: [v.__dict__ for v in vs] for name, vs in conditions.items()})
    conditions_file.write_text(json.dumps(saved, indent=1))
    return out


def test_sets(data_dir: str | Path) -> dict[str, Path]:
    """The test manifests of a prepared folder: in-domain first, the default out-of-domain sets, then any
    made by ``prepare --ood`` (listed in ``conditions.json``)."""
    data_dir = Path(data_dir)
    names = ["test_in", *OUT_OF_DOMAIN]
    conditions_file = data_dir / "conditions.json"
    if conditions_file.is_file():
        names += [n for n in json.loads(conditions_file.read_text()) if n not in names]
    return {n: data_dir / f"{n}.jsonl" for n in names if (data_dir / f"{n}.jsonl").is_file()}


def snr_check(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """Measured SNR in dB (used by the tests)."""
    noise = noisy - clean
    return 10 * math.log10(float(clean.pow(2).mean()) / max(float(noise.pow(2).mean()), 1e-12))
