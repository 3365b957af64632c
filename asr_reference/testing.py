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
