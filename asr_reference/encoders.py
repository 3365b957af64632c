"""Pretrained speech encoders from local Hugging Face folders.

``HFSpeechEncoder(path)`` wraps either

* a Whisper checkpoint (``model_type == "whisper"``): its encoder and its log-mel front end
  (the feature extractor's mel filters, 30 s window, 20 ms frames), or
* a self-supervised waveform encoder (wav2vec2, HuBERT, WavLM, ...): ``AutoModel`` with its
  ``AutoFeatureExtractor``'s normalisation, 20 ms frames.

Both map (b, samples) waveforms at the encoder's own rate to (b, frames, width) hidden states with
frame lengths, like the built-in Conformer, so the projector only needs ``dim`` and ``frame_seconds``.
The encoder is frozen (eval mode, no gradients, not saved in checkpoints) unless ``finetune``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from asr_reference.errors import ModelLoadError


def _load_pretrained(path: str | Path, what: str, loader):
    """Call ``loader()`` and turn any loading failure into one line naming the folder."""
    try:
        return loader()
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: cannot load the {what} ({first})") from None


def check_model_folder(path: str | Path, what: str) -> Path:
    """A local HF folder with a config.json (nothing is ever downloaded)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: {what} folder not found (a local Hugging Face folder is needed)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json: not a Hugging Face model folder")
    return path


class HFSpeechEncoder(nn.Module):
    """(b, samples) waveforms, lengths -> (b, frames, dim) hidden states, frame lengths."""

    def __init__(self, path: str | Path, finetune: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        path = check_model_folder(path, "encoder")
        config = _load_pretrained(path, "encoder config", lambda: AutoConfig.from_pretrained(path, local_files_only=True))
        self.finetune = finetune
        self.kind = "whisper" if config.model_type == "whisper" else "waveform"
        if not (path / "preprocessor_config.json").is_file():
            raise ModelLoadError(f"{path}: no preprocessor_config.json: an encoder folder needs its feature "
                                 f"extractor (save it with feature_extractor.save_pretrained)")
        fe = _load_pretrained(path, "feature extractor",
                              lambda: AutoFeatureExtractor.from_pretrained(path, local_files_only=True))
        self.sample_rate = int(fe.sampling_rate)
        if self.kind == "whisper":
            from transformers import WhisperModel

            # WhisperModel reads both WhisperModel and WhisperForConditionalGeneration folders; keep its encoder
            whole = _load_pretrained(path, "Whisper model",
                                     lambda: WhisperModel.from_pretrained(path, local_files_only=True))
            self.model = whole.get_encoder()
            del whole
            self.dim = int(config.d_model)
            self.hop = int(fe.hop_length)
            self.n_fft = int(fe.n_fft)
            # the encoder takes exactly 2 * max_source_positions mel frames (its fixed window, 30 s for Whisper)
            self.window_frames = 2 * int(config.max_source_positions)
            self.register_buffer("mel_filters", torch.as_tensor(fe.mel_filters, dtype=torch.float32).T.contiguous(),
                                 persistent=False)  # (n_mels, n_fft // 2 + 1)
            self.frame_seconds = 2 * self.hop / self.sample_rate
            self.max_seconds = self.window_frames * self.hop / self.sample_rate
        else:
            model = _load_pretrained(path, "speech encoder", lambda: AutoModel.from_pretrained(path, local_files_only=True))
            if not hasattr(model, "_get_feat_extract_output_lengths"):
                raise ModelLoadError(f"{path}: {config.model_type} is not a waveform speech encoder "
                                     f"(expected whisper, wav2vec2, hubert, wavlm, ...)")
            self.model = model
            self.dim = int(config.hidden_size)
            stride = 1
            for s in config.conv_stride:
                stride *= int(s)
            self.frame_seconds = stride / self.sample_rate
            self.max_seconds = None
            self.normalize = bool(getattr(fe, "do_normalize", True))
            self.use_attention_mask = bool(getattr(fe, "return_attention_mask", False))
        if not finetune:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # a frozen encoder stays in eval mode (no dropout, no SSL time masking)
        super().train(mode and self.finetune)
        return self

    def whisper_features(self, wav: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel (as its feature extractor computes it, batched in torch): (b, n_mels, window)."""
        n = self.window_frames * self.hop
        wav = nn.functional.pad(wav.float(), (0, max(0, n - wav.shape[1])))[:, :n]
        window = torch.hann_window(self.n_fft, device=wav.device)
        stft = torch.stft(wav, self.n_fft, self.hop, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            if self.kind == "whisper":
                feats = self.whisper_features(wav).to(next(self.model.parameters()).dtype)
                hidden = self.model(input_features=feats).last_hidden_state  # (b, window / 2, dim)
                mel_frames = torch.div(lengths, self.hop, rounding_mode="floor") + 1
                out_lens = torch.div(mel_frames + 1, 2, rounding_mode="floor").clamp(1, hidden.shape[1])
            else:
                mask = torch.arange(wav.shape[1], device=wav.device)[None] < lengths[:, None]
                x = wav.float()
                if self.normalize:  # zero mean, unit variance over each utterance's real samples
                    m = mask.float()
                    count = m.sum(1, keepdim=True).clamp_min(1)
                    mean = (x * m).sum(1, keepdim=True) / count
                    var = ((x - mean).pow(2) * m).sum(1, keepdim=True) / count
                    x = (x - mean) / (var + 1e-7).sqrt() * m
                attn = mask.long() if self.use_attention_mask else None
                hidden = self.model(x, attention_mask=attn).last_hidden_state
                out_lens = self.model._get_feat_extract_output_lengths(lengths).clamp(1, hidden.shape[1])
        return hidden[:, : int(out_lens.max())], out_lens.long()
