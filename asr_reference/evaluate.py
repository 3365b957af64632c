"""Decoding (greedy or beam, via ``generate(inputs_embeds=...)``) and WER/CER with jiwer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jiwer
import torch

from asr_reference.data import normalize_text
from asr_reference.train import AudioSet, load_run, sorted_batches


def error_rates(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """(WER, CER) after normalisation; an empty hypothesis counts as all deletions."""
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    return float(jiwer.wer(refs, hyps)), float(jiwer.cer(refs, hyps))


def evaluate(model, manifest: str | Path, batch_size: int = 32, num_beams: int = 1,
             limit: int | None = None, out_file: str | Path | None = None) -> dict:
    """Transcribe every line of ``manifest``; returns {"manifest", "n", ..., "wer", "cer"}."""
    data = AudioSet(manifest)
    device = next(model.parameters()).device
    idx_all = list(range(len(data)))[:limit]
    lens = [data.lens[i] for i in idx_all]
    hyps = [""] * len(idx_all)
    t0 = time.time()
    model.eval()
    for batch in sorted_batches(lens, batch_size):
        idx = [idx_all[b] for b in batch]
        wav, wlens, _ = data.batch(idx, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.transcribe(wav, wlens, num_beams=num_beams)
        for b, h in zip(batch, out):
            hyps[b] = h
    refs = [data.rows[i]["text"] for i in idx_all]
    wer, cer = error_rates(refs, hyps)
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for r, h in zip(refs, hyps):
                f.write(json.dumps({"ref": normalize_text(r), "hyp": normalize_text(h)}) + "\n")
    return {"manifest": str(manifest), "n": len(idx_all), "beams": num_beams,
            "seconds": round(time.time() - t0, 1), "wer": round(wer, 4), "cer": round(cer, 4)}


def evaluate_run(run: str | Path, manifest: str | Path, num_beams: int = 1, batch_size: int = 32,
                 device: str = "auto", limit: int | None = None) -> dict:
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_run(run, device)
    name = Path(manifest).stem
    return evaluate(model, manifest, batch_size, num_beams, limit,
                    out_file=Path(run) / f"hyp_{name}_b{num_beams}.jsonl")
