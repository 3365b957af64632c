"""Lazy audio datasets, length-bucketed batch plans (by utterances or by seconds of audio) and loaders.

Waveforms are read when a batch needs them (by DataLoader workers when ``workers > 0``), so a
LibriSpeech-sized manifest costs only its rows in memory. Batch plans are deterministic functions of
(seed, epoch), which is what makes ``--resume`` exact: the checkpoint stores (epoch, position).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from asr_reference.data import SAMPLE_RATE, load_row_audio, read_manifest


class AudioDataset(Dataset):
    """Rows of a manifest; item ``i`` is ``(waveform (samples,) float32 at sample_rate, text)``.

    ``max_seconds`` drops longer utterances (an encoder with a fixed window, e.g. Whisper's 30 s, cannot
    take them); ``skipped`` says how many.
    """

    def __init__(self, manifest: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
                 rows: list[dict] | None = None):
        rows = read_manifest(manifest) if rows is None else rows  # rows: already read (and checked) by the caller
        self.manifest = Path(manifest)
        self.sample_rate = sample_rate
        self.rows = [r for r in rows if max_seconds is None or r["duration"] <= max_seconds]
        self.skipped = len(rows) - len(self.rows)
        # lengths in samples at the target rate: exact header frame counts when known (they order the
        # length buckets; the manifest's rounded durations could reorder near-equal utterances)
        self.lens = [r["frames"] * sample_rate // r["sample_rate"] if "frames" in r
                     else int(round(r["duration"] * sample_rate)) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        row = self.rows[i]
        return load_row_audio(row, self.sample_rate), row["text"]

    @property
    def seconds(self) -> list[float]:
        return [n / self.sample_rate for n in self.lens]

    def batch(self, idx: list[int], device="cpu"):
        """Padded batch of the given rows: (wav (b, samples), lengths (b,), texts)."""
        wav, lens, texts = collate([self[i] for i in idx])
        return wav.to(device), lens.to(device), texts


# the earlier name (it loaded everything into memory; now lazily)
AudioSet = AudioDataset


def collate(items: list[tuple[torch.Tensor, str]]):
    """[(samples,), text] -> zero-padded wav (b, max samples), lengths (b,), texts."""
    lens = torch.tensor([a.numel() for a, _ in items])
    wav = torch.zeros(len(items), int(lens.max()) if items else 0)
    for j, (audio, _) in enumerate(items):
        wav[j, : audio.numel()] = audio
    return wav, lens, [t for _, t in items]


def epoch_batches(lens: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches of ``batch_size`` utterances in a deterministic order for (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lens)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s: s + chunk], key=lambda i: lens[i])
        batches += [part[k: k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def seconds_batches(seconds: list[float], max_seconds: float, epoch: int, seed: int,
                    bucket: int = 1000) -> list[list[int]]:
    """Length-bucketed batches holding at most ``max_seconds`` of padded audio each.

    Utterances are shuffled, sorted by length within chunks of ``bucket``, then cut greedily so that
    (utterances in the batch) x (longest one) <= max_seconds: the memory a padded batch takes. An
    utterance longer than ``max_seconds`` gets a batch of its own. Deterministic for (seed, epoch).
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(seconds)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for s in range(0, len(order), bucket):
        current: list[int] = []
        for i in sorted(order[s: s + bucket], key=lambda i: seconds[i]):
            # sorted ascending, so seconds[i] is the longest of current + [i]
            if current and (len(current) + 1) * seconds[i] > max_seconds:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def sorted_batches(lens: list[int], batch_size: int) -> list[list[int]]:
    """Batches of ``batch_size`` utterances in length order (decoding: least padding)."""
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    return [order[k: k + batch_size] for k in range(0, len(order), batch_size)]


def make_loader(dataset: AudioDataset, batches: list[list[int]], workers: int = 0) -> DataLoader:
    """A DataLoader over a fixed batch plan; items are (wav, lengths, texts) on the CPU.

    It gets its own generator: creating a DataLoader iterator draws a seed, and from the global RNG
    that draw would shift every later SpecAugment mask and dropout (and break exact resume).
    """
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False,
                      pin_memory=False)
