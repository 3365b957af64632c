"""Decoding (greedy or beam, via ``generate(inputs_embeds=...)``) and WER/CER with jiwer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jiwer
import torch

from asr_reference.data import normalize_text
from asr_reference.dataset import AudioDataset, make_loader, sorted_batches
from asr_reference.checkpoints import load_run


def error_rates(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """(WER, CER) after normalisation; an empty hypothesis counts as all deletions."""
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    return float(jiwer.wer(refs, hyps)), float(jiwer.cer(refs, hyps))


def length_sorted_batches(model, manifest: str | Path | AudioDataset, batch_size: int, limit: int | None = None):
    """(dataset, utterance indices, batches of indices sorted by length) for decoding ``manifest`` (or a
    dataset) with ``model``; the first ``limit`` utterances only. Every decoder batches the same way:
    padding changes the encoder's last frames, so other batches would give (slightly) other numbers."""
    data = manifest if isinstance(manifest, AudioDataset) else \
        AudioDataset(manifest, sample_rate=model.sample_rate, max_seconds=model.max_seconds)
    idx_all = list(range(len(data)))[:limit]
    lens = [data.lens[i] for i in idx_all]
    return data, idx_all, [[idx_all[b] for b in batch] for batch in sorted_batches(lens, batch_size)]


def evaluate(model, manifest: str | Path | AudioDataset, batch_size: int = 32, num_beams: int = 1,
             limit: int | None = None, out_file: str | Path | None = None, workers: int = 0,
             max_new_tokens: int | None = None) -> dict:
    """Transcribe every line of ``manifest`` (or a dataset); returns {"manifest", "n", ..., "wer", "cer"}.

    ``out_file`` gets one JSON line per utterance, in manifest order: audio path, reference, hypothesis
    (both normalised) and the utterance's word errors. ``max_new_tokens`` None = from each batch's audio
    length (:meth:`LLMASR.token_budget`).
    """
    data, idx_all, batches = length_sorted_batches(model, manifest, batch_size, limit)
    device = next(model.parameters()).device
    hyps: dict[int, str] = {}
    t0 = time.time()
    model.eval()
    for batch, (wav, wlens, _) in zip(batches, make_loader(data, batches, workers)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.transcribe(wav.to(device), wlens.to(device), num_beams=num_beams,
                                   max_new_tokens=max_new_tokens)
        hyps.update(zip(batch, out))
    refs = [data.rows[i]["text"] for i in idx_all]
    hyp_list = [hyps[i] for i in idx_all]
    wer, cer = error_rates(refs, hyp_list)
    result = {"manifest": str(data.manifest), "n": len(idx_all), "beams": num_beams,
              "seconds": round(time.time() - t0, 1)}
    if data.skipped:
        result["skipped_too_long"] = data.skipped
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for i, r, h in zip(idx_all, refs, hyp_list):
                ref, hyp = normalize_text(r), normalize_text(h)
                errors = jiwer.process_words(ref, hyp) if ref else None
                f.write(json.dumps({"audio_filepath": data.rows[i]["audio_filepath"], "ref": ref, "hyp": hyp,
                                    "word_errors": (errors.substitutions + errors.deletions + errors.insertions)
                                    if errors else None, "ref_words": len(ref.split())}) + "\n")
        result["hypotheses"] = str(out_file)
    return {**result, "wer": round(wer, 4), "cer": round(cer, 4)}


def evaluate_run(run: str | Path, manifest: str | Path, num_beams: int = 1, batch_size: int = 32,
                 device: str = "auto", limit: int | None = None, checkpoint: str = "last",
                 overrides: dict | None = None, workers: int = 0, max_new_tokens: int | None = None,
                 out_file: str | Path | None = None) -> dict:
    """Load a run and evaluate it; hypotheses go to ``RUN/hyp_<manifest>_b<beams>.jsonl`` by default."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_run(run, device, checkpoint=checkpoint, overrides=overrides)
    name = Path(manifest).stem + ("_best" if checkpoint == "best" else "")
    return evaluate(model, manifest, batch_size, num_beams, limit,
                    out_file=out_file or Path(run) / f"hyp_{name}_b{num_beams}.jsonl", workers=workers,
                    max_new_tokens=max_new_tokens)
