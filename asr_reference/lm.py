"""The small causal LM: a byte-level BPE tokenizer trained with ``tokenizers`` and a Llama-style model
built with ``transformers``, pretrained here on the text side of the corpus.

The result is an ordinary Hugging Face folder (``config.json``, weights, tokenizer), so ``--llm PATH``
can point at this or at any other local causal-LM checkpoint.

Pretraining mixes two kinds of sequences from the same training sentences:
plain text ``<s> sentence </s>`` and, with probability ``copy_frac``, the repeat format
``<s> sentence transcript: sentence </s>``. The second gives a model this small the in-context
copying skill that real LLMs have (and that the ASR format ``<s> [audio] transcript: text </s>``
relies on); it uses no audio and no dev/test text.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

PROMPT = " transcript:"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(sentences: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``sentences`` (and the prompt), wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(sentences) + [PROMPT.strip()] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_lm(vocab_size: int, hidden: int = 192, layers: int = 3, heads: int = 4, max_pos: int = 512,
             pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_pos, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    return LlamaForCausalLM(config)


def special_ids(tokenizer) -> tuple[int | None, int]:
    """(bos id or None when the tokenizer has none, eos id)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the LLM's tokenizer has no eos token; ASR decoding needs one")
    return tokenizer.bos_token_id, eos


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(" " + text if not text.startswith(" ") else text, add_special_tokens=False)


def lm_sequence(tokenizer, sentence: str, copy: bool) -> list[int]:
    bos, eos = special_ids(tokenizer)
    ids = ([bos] if bos is not None else []) + encode(tokenizer, sentence)
    if copy:
        ids += tokenizer.encode(PROMPT, add_special_tokens=False) + encode(tokenizer, sentence)
    return ids + [eos]


def pretrain_lm(text_file: str | Path, out_dir: str | Path, steps: int = 300, batch_size: int = 48,
                lr: float = 3e-3, hidden: int = 192, layers: int = 3, heads: int = 4, vocab_size: int = 512,
                copy_frac: float = 0.5, seed: int = 0, device: str = "cpu", log=print) -> Path:
    """Train tokenizer + LM on the sentences of ``text_file`` and save an HF folder to ``out_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    sentences = [s for s in Path(text_file).read_text(encoding="utf-8").splitlines() if s.strip()]
    tokenizer = train_tokenizer(sentences, vocab_size)
    model = build_lm(len(tokenizer), hidden, layers, heads, pad_id=tokenizer.pad_token_id,
                     bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretrain-lm: {len(sentences)} sentences, vocab {len(tokenizer)}, {n_params / 1e6:.2f} M params, "
        f"{steps} steps x {batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain-lm", mininterval=5, disable=None)
    for step in bar:
        seqs = [lm_sequence(tokenizer, rng.choice(sentences), rng.random() < copy_frac) for _ in range(batch_size)]
        n = max(map(len, seqs))
        ids = torch.full((batch_size, n), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        attn = (labels != -100).long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"pretrain-lm: final loss {loss.item():.3f} in {time.time() - t0:.0f} s")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    log(f"pretrain-lm: saved to {out_dir}")
    return out_dir


def load_lm(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from any local HF causal-LM folder: bf16 on a GPU (the LLM is frozen, so its
    weights need no fp32 master copy), fp32 on the CPU. A tokenizer without a pad token is left so: the
    ASR model gives the CTC blank a row of its own instead of aliasing eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asr_reference.encoders import _load_pretrained, check_model_folder

    path = check_model_folder(path, "LLM")
    tokenizer = _load_pretrained(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(path, local_files_only=True))
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = _load_pretrained(path, "causal LM", lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True)).to(device)
    if tokenizer.eos_token_id is None:
        from asr_reference.errors import ModelLoadError

        raise ModelLoadError(f"{path}: the tokenizer has no eos token; ASR decoding needs one")
    return model, tokenizer
