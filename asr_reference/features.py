"""Log-mel features (torchaudio) with per-utterance normalisation and SpecAugment-style masking."""

from __future__ import annotations

import torch
import torchaudio.transforms as T
from torch import nn


class LogMel(nn.Module):
    """(b, samples) 16 kHz waveforms + lengths -> (b, frames, n_mels) log-mel, frame lengths.

    25 ms windows, 10 ms hop; each utterance is mean/variance normalised over its real frames.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000):
        super().__init__()
        self.hop = sample_rate // 100
        self.mel = T.MelSpectrogram(sample_rate=sample_rate, n_fft=512, win_length=sample_rate // 40,
                                    hop_length=self.hop, n_mels=n_mels, center=True, power=2.0)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        feats = (self.mel(wav.float()) + 1e-6).log().transpose(1, 2)  # (b, frames, n_mels)
        flen = torch.div(lengths, self.hop, rounding_mode="floor") + 1
        flen = flen.clamp(max=feats.shape[1])
        mask = torch.arange(feats.shape[1], device=wav.device)[None] < flen[:, None]
        m = mask[..., None].float()
        count = m.sum(1, keepdim=True).clamp_min(1)
        mean = (feats * m).sum(1, keepdim=True) / count
        var = ((feats - mean).pow(2) * m).sum(1, keepdim=True) / count
        feats = (feats - mean) / (var + 1e-5).sqrt() * m
        return feats, flen


class SpecAugment(nn.Module):
    """Frequency and time masks (only in training mode); masked values are set to 0 (the mean)."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2, time_width: int = 25):
        super().__init__()
        self.freq = nn.ModuleList(T.FrequencyMasking(freq_width, iid_masks=True) for _ in range(freq_masks))
        self.time = nn.ModuleList(T.TimeMasking(time_width, iid_masks=True, p=0.2) for _ in range(time_masks))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return feats
        x = feats.transpose(1, 2).unsqueeze(1)  # (b, 1, n_mels, frames)
        for m in (*self.freq, *self.time):
            x = m(x)
        return x.squeeze(1).transpose(1, 2)
