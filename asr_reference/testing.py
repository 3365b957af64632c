"""Tiny data, LM and model configs for the tests (seconds on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

from asr_reference.data import IN_DOMAIN, OUT_OF_DOMAIN, render_set
from asr_reference.model import ASRConfig

SENTENCES = ["the dog runs to the park", "anna opens the red door", "it is raining today",
             "the old man sees a cat", "ben drops the blue cup", "there are two ducks in the river"]


def make_tiny_data(out_dir: str | Path) -> dict[str, Path]:
    """Six training utterances (in-domain voices) and a noisy copy as a 'test' set."""
    out_dir = Path(out_dir)
    render_set(SENTENCES, IN_DOMAIN, out_dir, "train", workers=2)
    render_set(SENTENCES[:2], OUT_OF_DOMAIN["test_ood_noise"], out_dir, "test_ood_noise", workers=2)
    (out_dir / "lm_train.txt").write_text("\n".join(SENTENCES) + "\n")
    return {"train": out_dir / "train.jsonl", "test_ood_noise": out_dir / "test_ood_noise.jsonl"}


def make_tiny_lm(out_dir: str | Path) -> Path:
    """An untrained 1-layer Llama with a BPE tokenizer trained on the tiny sentences (HF folder)."""
    import torch

    from asr_reference.lm import build_lm, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(SENTENCES * 5, vocab_size=300)
    model = build_lm(len(tok), hidden=32, layers=1, heads=2, max_pos=256, pad_id=tok.pad_token_id,
                     bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_config(llm: str | Path, vq: str = "soft") -> ASRConfig:
    return ASRConfig(llm=str(llm), vq=vq, n_mels=40, enc_dim=32, enc_layers=1, enc_heads=2, enc_kernel=7,
                     sub_channels=8, dropout=0.0, stack=2, proj_hidden=64, ctc_weight=0.3)


def make_tiny_lm_without_pad(out_dir: str | Path, chat_template: bool = True) -> Path:
    """Like :func:`make_tiny_lm` but the tokenizer has no pad token (as Llama 3's has none) and, with
    ``chat_template``, a minimal chat template."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from asr_reference.lm import build_lm, train_tokenizer

    torch.manual_seed(0)
    trained = train_tokenizer(SENTENCES * 5, vocab_size=300)
    tok = PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    assert tok.pad_token_id is None
    if chat_template:
        tok.chat_template = ("{% for m in messages %}{{ bos_token }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %} assistant:{% endif %}")
    model = build_lm(len(tok), hidden=32, layers=1, heads=2, max_pos=256, pad_id=None,
                     bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_whisper(out_dir: str | Path, window_seconds: int = 6) -> Path:
    """A random-initialised 1-layer, 32-wide Whisper (encoder + decoder) with its feature extractor; the
    encoder's window is ``window_seconds`` (Whisper's own is 30 s)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           suppress_tokens=[], begin_suppress_tokens=[], num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=window_seconds * 50, max_target_positions=32)
    WhisperModel(config).save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80, chunk_length=window_seconds).save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_wav2vec2(out_dir: str | Path) -> Path:
    """A random-initialised 1-layer, 32-wide wav2vec2 (the full 7-convolution front end, 20 ms frames)
    with its feature extractor (HuBERT and WavLM folders load the same way)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2Model(config).save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(out_dir)
    return Path(out_dir)


def convert_manifest(manifest: str | Path, out_dir: str | Path, suffix: str, subtype: str | None = None,
                     sample_rate: int | None = None, channels: int = 1) -> Path:
    """A copy of ``manifest`` with its audio rewritten by soundfile (e.g. ".flac", or ".wav" with subtype
    "PCM_24"), optionally at another sample rate and duplicated to ``channels`` channels."""
    import json

    import soundfile
    import torchaudio.functional as AF

    from asr_reference.data import read_manifest, write_manifest
    from asr_reference.audio import read_audio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, row in enumerate(read_manifest(manifest)):
        audio, sr = read_audio(row["audio_filepath"])
        if sample_rate and sample_rate != sr:
            audio, sr = AF.resample(audio, sr, sample_rate), sample_rate
        frames = audio[:, None].repeat(1, channels).numpy() if channels > 1 else audio.numpy()
        name = f"{k:04d}{suffix}"
        soundfile.write(out_dir / name, frames, sr, subtype=subtype)
        rows.append({"audio_filepath": name, "text": row["text"], "duration": round(audio.numel() / sr, 3)})
    write_manifest(out_dir / Path(manifest).with_suffix(".jsonl").name, rows)
    json.dumps(rows)  # rows are plain JSON
    return out_dir / Path(manifest).with_suffix(".jsonl").name
