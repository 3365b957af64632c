"""Audio files in, mono float32 at the encoder's sample rate out.

soundfile (libsndfile) reads WAV of any bit depth (8/16/24/32-bit PCM, float), FLAC, OGG and MP3;
without it only 16-bit PCM WAV is readable (the standard library's ``wave``). torchaudio 2.11's
``torchaudio.load`` needs torchcodec, so it is not used. Every error names the file.
"""

from __future__ import annotations

import wave
from pathlib import Path

import torch
import torchaudio.functional as AF

from asr_reference.errors import AudioError

try:
    import soundfile
except ImportError:  # pragma: no cover - soundfile is in the asr extra
    soundfile = None


def audio_info(path: str | Path) -> tuple[int, int]:
    """(sample rate, number of frames) from the file header, without decoding the samples."""
    path = str(path)
    if soundfile is not None:
        try:
            info = soundfile.info(path)
        except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError with a readable message
            raise AudioError(f"{path}: cannot read audio ({_short(exc)})") from None
        return int(info.samplerate), int(info.frames)
    try:
        with wave.open(path, "rb") as f:
            return f.getframerate(), f.getnframes()
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"{path}: cannot read audio ({exc}; install soundfile for formats other than "
                         f"16-bit WAV)") from None


def read_audio(path: str | Path, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """(samples,) mono float32 waveform in [-1, 1] and its sample rate.

    Multi-channel audio is averaged to mono; with ``sample_rate`` the waveform is resampled to it
    (torchaudio's windowed-sinc resampler) and that rate is returned.
    """
    path = str(path)
    if soundfile is not None:
        try:
            data, sr = soundfile.read(path, dtype="float32", always_2d=True)  # (frames, channels)
        except Exception as exc:
            raise AudioError(f"{path}: cannot read audio ({_short(exc)})") from None
        audio = torch.from_numpy(data).mean(1) if data.shape[1] > 1 else torch.from_numpy(data[:, 0].copy())
    else:
        audio, sr = _read_wav16(path)
    if audio.numel() == 0:
        raise AudioError(f"{path}: audio has no samples")
    if sample_rate is not None and sr != sample_rate:
        audio, sr = AF.resample(audio, sr, sample_rate), sample_rate
    return audio, int(sr)


def _read_wav16(path: str) -> tuple[torch.Tensor, int]:
    try:
        with wave.open(path, "rb") as f:
            sr, ch, width, n = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
            data = f.readframes(n)
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from None
    if width != 2:
        raise AudioError(f"{path}: {8 * width}-bit WAV needs soundfile (pip install soundfile)")
    whole = len(data) // (2 * ch) * 2 * ch  # a truncated file ends mid-sample: keep the whole frames
    audio = torch.frombuffer(bytearray(data[:whole]), dtype=torch.int16).float() / 32768.0
    return (audio.view(-1, ch).mean(1) if ch > 1 else audio), sr


def _short(exc: Exception) -> str:
    """libsndfile messages repeat the path ("Error opening 'x.wav': Format not recognised."): keep the reason."""
    msg = str(exc)
    return msg.split("': ", 1)[1].rstrip(".") if "': " in msg else msg
