"""A frozen encoder's outputs, computed once per (encoder, manifest) and reused by every training step,
system and seed: with the encoder frozen (eval mode, no SpecAugment) its frames are a fixed function of
the audio, so a training step then costs only the bridge (projector, VQ) and the LLM.

Where: a ``pretrain-encoder`` folder keeps its caches in ``FOLDER/cache/`` (shared by every run that uses
it); an HF encoder's cache goes to the run folder (the model folder is not written to). The cache key
is the manifest's bytes and the encoder's weights (or, for HF folders, its config and weight files'
sizes and times). The frames are computed in length-sorted batches of 32, so an utterance's padding
differs from a training batch's; the Conformer masks padding, so this changes frames only at
floating-point level.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from asr_reference.checkpoints import save_checkpoint
from asr_reference.dataset import AudioDataset, make_loader, sorted_batches


def _encoder_key(encoder_path: str) -> str:
    from asr_reference.pretrain_encoder import WEIGHTS, is_builtin_encoder

    h = hashlib.sha256()
    folder = Path(encoder_path)
    if is_builtin_encoder(folder):
        h.update((folder / WEIGHTS).read_bytes())
    else:
        h.update(str(folder.resolve()).encode())
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_file(model, manifest: str | Path, run: str | Path) -> Path:
    from asr_reference.pretrain_encoder import is_builtin_encoder

    key = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:12] + "_" + _encoder_key(model.cfg.encoder)
    folder = Path(model.cfg.encoder) / "cache" if is_builtin_encoder(model.cfg.encoder) else Path(run)
    return folder / f"encoder_frames_{key}.pt"


@torch.no_grad()
def encoder_frames(model, data: AudioDataset, path: Path, log=print, batch_size: int = 32) -> list[torch.Tensor]:
    """One (frames, enc_dim) fp32 tensor per utterance of ``data`` (CPU), loaded from ``path`` or computed."""
    if path.is_file():
        try:
            frames = torch.load(path, map_location="cpu", weights_only=True)["frames"]
            if len(frames) == len(data):
                log(f"train: encoder outputs from the cache {path}")
                return frames
        except Exception:  # damaged or foreign: computed again
            pass
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out: dict[int, torch.Tensor] = {}
    batches = sorted_batches(data.lens, batch_size)
    for batch, (wav, lens, _) in zip(batches, make_loader(data, batches, 0)):
        enc, elen = model.encode(wav.to(device), lens.to(device))
        for i, e, n in zip(batch, enc.float().cpu(), elen.tolist()):
            out[i] = e[:n].clone()
    model.train(was)
    frames = [out[i] for i in range(len(data))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"frames": frames})
    log(f"train: cached the frozen encoder's outputs for {len(frames)} utterances in {path}")
    return frames


def padded(frames: list[torch.Tensor], idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (b, t, d) frames and lengths (b,) of the utterances ``idx``."""
    lens = torch.tensor([frames[i].shape[0] for i in idx])
    out = frames[idx[0]].new_zeros(len(idx), int(lens.max()), frames[idx[0]].shape[1])
    for k, i in enumerate(idx):
        out[k, : frames[i].shape[0]] = frames[i]
    return out.to(device), lens.to(device)
