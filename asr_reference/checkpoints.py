"""Run folders on disk: atomic checkpoints, reading them back with one-line errors, and loading a run's
model for decoding. Used by training, decoding and diagnosis alike (none of them imports another for this)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from asr_reference.errors import CheckpointError
from asr_reference.model import ASRConfig, LLMASR, build_model


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to ``path.tmp`` then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_checkpoint`; a damaged or foreign file is a one-line error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (train first)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # EOFError, UnpicklingError ("invalid load key"), RuntimeError (zip) ...
        msg = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else "file ends early"
        raise CheckpointError(f"{path}: cannot read checkpoint, damaged or not a checkpoint "
                              f"({type(exc).__name__}: {msg})") from None
    missing = [k for k in ("model", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this program (no {', '.join(map(repr, missing))})")
    return state


def config_diff(saved: dict, wanted: dict) -> list[str]:
    """``key: saved -> wanted`` for every config entry that differs."""
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]


def load_run(run: str | Path, device: str = "cpu", checkpoint: str = "last",
             overrides: dict | None = None) -> LLMASR:
    """The model of a run folder, ready for decoding.

    ``checkpoint``: "last" (checkpoint.pt) or "best" (best.pt, the lowest dev WER). ``overrides`` replace
    config entries, e.g. ``{"llm": new_path}`` for an LLM folder that moved.
    """
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: run folder not found")
    ckpt = run / ("best.pt" if checkpoint == "best" else "checkpoint.pt")
    if not ckpt.is_file():
        hint = "train with --dev to keep one" if checkpoint == "best" else "train first"
        raise CheckpointError(f"{ckpt}: no checkpoint ({hint})")
    state = read_checkpoint(ckpt, map_location=device)
    raw = dict(state["config"])
    raw.setdefault("ctc_units", "tokens")  # runs made before character CTC became the default
    raw.update(overrides or {})
    cfg = ASRConfig.from_dict(raw, str(ckpt))
    model = build_model(cfg, device)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    bad = [k for k in missing if not k.startswith(model.frozen_prefixes())] + list(unexpected)
    if bad:
        raise CheckpointError(f"{ckpt}: checkpoint does not match the model: {bad[:5]}")
    return model.eval()
