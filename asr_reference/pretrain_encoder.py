"""The ``pretrain-encoder`` stage: the built-in log-mel + Conformer encoder trained once, alone, with a
character CTC on the training set (SpecAugment on), and saved as a folder every ASR system then starts
from (``--encoder FOLDER``, frozen unless ``--finetune-encoder``), like a pretrained HF encoder.

Folder layout: ``FOLDER/builtin_encoder.json`` (architecture, training plan, data fingerprint, dev
error rates of its own greedy CTC) and ``FOLDER/encoder.pt`` (weights of the conv subsampling, the
Conformer and the character CTC head). ``FOLDER/checkpoint.pt`` holds the optimiser state while it
trains, so an interrupted stage resumes; it is removed when the stage finishes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asr_reference.errors import ModelLoadError

MARKER = "builtin_encoder.json"
WEIGHTS = "encoder.pt"


@dataclass
class EncoderArch:
    n_mels: int = 80
    enc_dim: int = 144
    enc_layers: int = 3
    enc_heads: int = 4
    enc_kernel: int = 15
    sub_channels: int = 32
    dropout: float = 0.1


def is_builtin_encoder(path: str | Path) -> bool:
    return bool(path) and (Path(path) / MARKER).is_file()


class CTCEncoder(nn.Module):
    """log-mel -> (SpecAugment in training) -> conv subsampling x4 -> Conformer; ``ctc_head`` reads characters."""

    def __init__(self, arch: EncoderArch):
        super().__init__()
        from asr_reference.features import LogMel, SpecAugment
        from asr_reference.model import CTC_CHARS, Encoder

        self.arch = arch
        self.features = LogMel(arch.n_mels)
        self.specaug = SpecAugment()
        self.encoder = Encoder(arch)
        self.ctc_head = nn.Linear(arch.enc_dim, len(CTC_CHARS) + 1)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor, specaug: bool = True):
        feats, flen = self.features(wav, lengths)
        if specaug:
            feats = self.specaug(feats)
        return self.encoder(feats, flen)


class BuiltinEncoder(nn.Module):
    """A ``pretrain-encoder`` folder as an encoder of the ASR model, with the interface of
    :class:`asr_reference.encoders.HFSpeechEncoder` (``dim``, ``frame_seconds``, ``sample_rate``,
    ``max_seconds``, ``model``). Frozen (eval mode, no SpecAugment, not saved in run checkpoints) unless
    ``finetune``; its character CTC head is handed to the ASR model as ``ctc_head``."""

    def __init__(self, path: str | Path, finetune: bool = False, specaug: bool = True):
        super().__init__()
        self.model, meta = load_encoder(path)
        self.finetune, self.use_specaug = finetune, specaug
        self.dim, self.frame_seconds = self.model.arch.enc_dim, 0.04
        self.sample_rate, self.max_seconds = 16000, None
        self.meta = meta
        if not finetune:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        super().train(mode and self.finetune)  # a frozen encoder stays in eval mode (no dropout, no masks)
        return self

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor):
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            return self.model(wav, lengths, specaug=self.training and self.use_specaug)


def load_encoder(path: str | Path, device: str = "cpu") -> tuple[CTCEncoder, dict]:
    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
        arch = EncoderArch(**meta["arch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path / MARKER}: not a pretrain-encoder folder ({type(exc).__name__}: {exc})") from None
    model = CTCEncoder(arch)
    try:
        state = torch.load(path / WEIGHTS, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # missing, damaged or of another architecture
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path / WEIGHTS}: cannot load the encoder weights ({first})") from None
    return model.to(device), meta


def fingerprint_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _greedy_chars(logits: torch.Tensor, lens: torch.Tensor) -> list[str]:
    from asr_reference.model import CTC_CHARS

    out = []
    for row, n in zip(logits.argmax(-1).tolist(), lens.tolist()):
        prev, chars = 0, []
        for u in row[:n]:
            if u != prev and u != 0:
                chars.append(CTC_CHARS[u - 1])
            prev = u
        out.append(" ".join("".join(chars).split()))
    return out


@torch.no_grad()
def ctc_error_rates(model: CTCEncoder, manifest: str | Path, batch_size: int = 32, limit: int | None = None) -> dict:
    """WER/CER of the encoder's own greedy character CTC on a manifest."""
    from asr_reference.dataset import AudioDataset, make_loader, sorted_batches
    from asr_reference.evaluate import error_rates

    data = AudioDataset(manifest)
    idx = list(range(len(data)))[:limit]
    batches = [[idx[b] for b in batch] for batch in sorted_batches([data.lens[i] for i in idx], batch_size)]
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    hyps = {}
    for batch, (wav, lens, _) in zip(batches, make_loader(data, batches, 0)):
        enc, elen = model(wav.to(device), lens.to(device), specaug=False)
        hyps.update(zip(batch, _greedy_chars(model.ctc_head(enc).float(), elen)))
    model.train(was)
    wer, cer = error_rates([data.rows[i]["text"] for i in idx], [hyps[i] for i in idx])
    return {"wer": round(wer, 4), "cer": round(cer, 4), "n": len(idx)}


def encoder_plan(train_manifest: str | Path, *, steps: int = 1500, batch_size: int = 16, lr: float = 2e-3,
                 warmup: int = 200, seed: int = 0, arch: EncoderArch | None = None) -> dict:
    """What makes an encoder folder: a finished folder with the same plan is reused as it is."""
    return {"arch": asdict(arch or EncoderArch()), "steps": steps, "batch_size": batch_size, "lr": lr,
            "warmup": warmup, "seed": seed, "train": str(train_manifest), "data": fingerprint_file(train_manifest)}


def pretrain_encoder(train_manifest: str | Path, out: str | Path, *, steps: int = 1500, batch_size: int = 16,
                     lr: float = 2e-3, warmup: int = 200, seed: int = 0, device: str = "cpu",
                     dev: str | Path | None = None, arch: EncoderArch | None = None, log=print,
                     progress_bar: bool = True, save_every: int = 200) -> dict:
    """Train the built-in encoder with character CTC and save the folder; returns its metadata.

    Resumes from ``out/checkpoint.pt`` when one of the same plan is there; a finished folder of the
    same plan is returned as it is (see :func:`is_current`)."""
    from tqdm import tqdm

    from asr_reference.checkpoints import save_checkpoint
    from asr_reference.dataset import AudioDataset, epoch_batches, make_loader
    from asr_reference.model import ctc_chars
    from asr_reference.train import lr_lambda

    out = Path(out)
    arch = arch or EncoderArch()
    plan = encoder_plan(train_manifest, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, arch=arch)
    if is_current(out, plan):
        log(f"pretrain-encoder: reusing {out} (same data and plan)")
        return json.loads((out / MARKER).read_text())
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    random.seed(seed)
    model = CTCEncoder(arch).to(device)
    data = AudioDataset(train_manifest)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    step, epoch, pos = 0, 0, 0
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("plan") == plan:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, epoch, pos = state["step"], state["epoch"], state["pos"]
            torch.set_rng_state(state["rng"])
            log(f"pretrain-encoder: resuming {out} at step {step}")
    n_params = sum(p.numel() for p in params)
    log(f"pretrain-encoder: {len(data)} utterances ({sum(data.seconds) / 3600:.2f} h), {n_params / 1e6:.2f} M params, "
        f"{steps} steps x {batch_size}, character CTC + SpecAugment, device {device}")

    def stream():
        nonlocal epoch, pos
        while True:
            batches = epoch_batches(data.lens, batch_size, epoch, seed)
            for wav, lens, texts in make_loader(data, batches[pos:], 0):
                pos += 1
                yield wav.to(device), lens.to(device), texts
            epoch, pos = epoch + 1, 0

    model.train()
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="pretrain-encoder", mininterval=5, disable=not progress_bar or None)
    batches = stream()
    loss_avg = None
    while step < steps:
        wav, lens, texts = next(batches)
        enc, elen = model(wav, lens, specaug=True)
        targets = [torch.tensor(ctc_chars(t), dtype=torch.long) for t in texts]
        logp = model.ctc_head(enc).float().log_softmax(-1).transpose(0, 1)
        loss = F.ctc_loss(logp, torch.cat(targets).to(device), elen, torch.tensor([len(t) for t in targets]).to(device),
                          blank=0, zero_infinity=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        loss_avg = value if loss_avg is None or math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * value
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(ctc=round(loss_avg, 3))
        if step == 12:
            per = (time.time() - t0) / 12
            log(f"pretrain-encoder: {per:.2f} s/step measured -> {steps - step} more steps take about "
                f"{per * (steps - step) / 60:.1f} min")
        if step % save_every == 0 and step < steps:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "pos": pos,
                                   "rng": torch.get_rng_state(), "plan": plan})
    bar.close()
    meta = {**plan, "seconds": round(time.time() - t0, 1), "final_ctc_loss": round(loss_avg or 0.0, 4)}
    if dev:
        meta["dev"] = ctc_error_rates(model, dev)
        log(f"pretrain-encoder: dev character-CTC WER {100 * meta['dev']['wer']:.1f}% CER {100 * meta['dev']['cer']:.1f}%")
    torch.save(model.state_dict(), out / WEIGHTS)
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    ckpt.unlink(missing_ok=True)
    log(f"pretrain-encoder: saved {out} ({meta['seconds'] / 60:.1f} min)")
    return meta


def is_current(out: str | Path, plan: dict) -> bool:
    """A finished encoder folder made with exactly this plan (architecture, schedule, data)."""
    out = Path(out)
    if not (out / MARKER).is_file() or not (out / WEIGHTS).is_file():
        return False
    try:
        meta = json.loads((out / MARKER).read_text())
    except ValueError:
        return False
    return all(meta.get(k) == v for k, v in plan.items())
