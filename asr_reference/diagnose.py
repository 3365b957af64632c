"""Where a run's recognition errors come from, stage by stage, on one test set.

For each utterance the same loaded model is read at three points:

* the encoder alone: greedy CTC of the auxiliary CTC head on the encoder frames (``wer_encoder_ctc``);
* the quantiser as a classifier: greedy CTC of the VQ's distribution over LLM tokens, i.e. the argmax code
  of each projector frame, repeats merged and the blank code dropped (``wer_token_ctc``); with the CTC
  collapse on, these are exactly the codes whose frames the LLM reads;
* the LLM's own transcript (``wer_llm``, split into substitution / deletion / insertion rates).

A system that fails out of domain because its encoder fails shows a high ``wer_encoder_ctc``; one whose
quantiser picks the wrong tokens a high ``wer_token_ctc`` with a fair encoder; one whose LLM ignores or
rewrites good token evidence a ``wer_llm`` well above ``wer_token_ctc``. ``frames_per_token`` and the VQ
sharpness (max probability and entropy of the code distribution) say whether the collapse starves or floods
the LLM and how confident the quantiser is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import jiwer
import torch

from asr_reference.data import normalize_text
from asr_reference.dataset import AudioDataset, make_loader
from asr_reference.evaluate import length_sorted_batches
from asr_reference.lm import encode
from asr_reference.model import CTC_CHARS, lengths_to_mask

# rows of the (rows, V) fp32 score block formed at a time for the sharpness: ~64 MiB whatever V is
_SCORE_ELEMENTS = 1 << 24


def ctc_greedy(ids: Sequence[int], blank: int) -> list[int]:
    """Greedy CTC collapse of one frame-id sequence: merge runs of equal ids, then drop ``blank``.

    A blank between two equal ids separates them, so ``[a, a, blank, a]`` gives ``[a, a]``.
    """
    out: list[int] = []
    prev = None
    for i in ids:
        i = int(i)
        if i != blank and i != prev:
            out.append(i)
        prev = i
    return out


def batch_ctc_greedy(ids: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """ids (b, n) int, lengths (b,) -> b collapsed id lists (frames past each length ignored)."""
    rows = ids.detach().cpu().tolist()
    return [ctc_greedy(row[: int(n)], blank) for row, n in zip(rows, lengths.detach().cpu().tolist())]


def _chars_text(ids: list[int]) -> str:
    """Character-CTC unit ids (1-based into CTC_CHARS; 0 is the blank) -> text."""
    return "".join(CTC_CHARS[i - 1] for i in ids if 0 < i <= len(CTC_CHARS))


def _word_rate(refs: list[str], hyps: list[str]) -> float:
    return round(float(jiwer.wer(refs, hyps)), 4)


def _ctc_head_units(model) -> tuple[int, Callable[[list[int]], str]] | None:
    """(blank, ids -> text) of the encoder's auxiliary CTC head, or None when the run has none."""
    if model.ctc_head is None:
        return None
    if model.cfg.ctc_units == "chars":
        return 0, _chars_text
    # LLM-token units (older runs): the same blank as the token CTC, ids decoded by the tokenizer
    return model.blank_id, lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def _sharpness(model, frames: torch.Tensor) -> tuple[float, float, int]:
    """frames (k, d) fp32 projector frames -> (sum of max p, sum of entropy in nats, k) of
    softmax(scores / tau) over the VQ codebook, formed ``_SCORE_ELEMENTS`` scores at a time."""
    if frames.shape[0] == 0:
        return 0.0, 0.0, 0
    rows = max(1, _SCORE_ELEMENTS // model.vq.codebook_size)
    max_p = entropy = 0.0
    with torch.autocast(frames.device.type, enabled=False):
        for s in range(0, frames.shape[0], rows):
            logp = model.vq_scores(frames[s: s + rows].float()).log_softmax(-1)
            max_p += float(logp.max(-1).values.exp().sum())
            entropy += float(-(logp.exp() * logp).sum(-1).sum())
    return max_p, entropy, frames.shape[0]


def diagnose(model, manifest: str | Path | AudioDataset, batch_size: int = 32, limit: int | None = None) -> dict:
    """Per-stage error analysis of a loaded run (``train.load_run``) on one manifest (or dataset).

    Returns {"manifest", "n", "wer_llm", "sub", "del", "ins", "wer_encoder_ctc", "wer_token_ctc",
    "frames_per_token", "vq_max_prob", "vq_entropy", "tau"}:

    * ``wer_llm``: WER of greedy ``model.transcribe`` over the set, batched as ``evaluate.evaluate`` does
      (so it is the WER ``evaluate`` reports); ``sub``/``del``/``ins``: its substitutions, deletions and
      insertions, each over the reference words (they add up to ``wer_llm`` up to rounding).
    * ``wer_encoder_ctc``: greedy CTC of ``model.ctc_head`` on the encoder frames (``aux["enc"]``, lengths
      ``aux["enc_lens"]``); blank 0 and ``CTC_CHARS`` for character units, ``model.blank_id`` and the
      tokenizer for token units. None when the run has no CTC head (``ctc_weight == 0``).
    * ``wer_token_ctc``: greedy CTC of the VQ's argmax code per real projector frame (``aux["token_ids"]``,
      the ids the collapse uses), blank ``model.blank_id`` (the pad token, or the extra code V when the
      tokenizer has none), decoded by ``model.tokenizer``. None when ``token_ctc_weight == 0``: the
      distribution was never trained as a classifier.
    * ``frames_per_token``: mean over utterances of (audio frames the LLM reads: after the CTC collapse
      with ``compress``, else every projector frame) / (BPE tokens of the reference, as the training
      encodes it); utterances with no reference token are left out.
    * ``vq_max_prob`` / ``vq_entropy``: mean over kept frames of max_v p_v and of -sum_v p_v log p_v
      (nats), p = softmax(scores / tau) over the whole codebook (blank row included). Kept frames: the
      real projector frames whose argmax code is not the blank when ``compress`` (the frames the LLM
      reads, before runs are merged), every real projector frame otherwise. ``tau``: the VQ's current
      temperature. All three None when the run has no VQ module (vq "none" without token CTC).

    WERs are fractions over the whole set (jiwer on lists of ``normalize_text`` strings), rounded to 4
    digits. Runs in eval mode without gradients.
    """
    data, idx_all, batches = length_sorted_batches(model, manifest, batch_size, limit)
    device = next(model.parameters()).device
    head = _ctc_head_units(model)
    token_ctc = bool(model.token_scores)
    hyps: dict[int, str] = {}
    enc_hyps: dict[int, str] = {}
    tok_hyps: dict[int, str] = {}
    llm_frames: dict[int, int] = {}
    sharp = [0.0, 0.0, 0]  # sum max p, sum entropy, frames

    captured: list[torch.Tensor] = []
    hook = None
    if model.vq is not None:
        # the VQ's input (the scaled projector frames) in every mode; embed_audio keeps it only with token CTC
        hook = model.vq.register_forward_pre_hook(lambda _mod, args: captured.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            for batch, (wav, wlens, _) in zip(batches, make_loader(data, batches)):
                wav, wlens = wav.to(device), wlens.to(device)
                captured.clear()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    _, alens, aux = model.embed_audio(wav, wlens)
                    if head is not None:
                        blank, to_text = head
                        ids = model.ctc_head(aux["enc"]).float().argmax(-1)
                        enc_hyps.update(zip(batch, (to_text(c) for c in batch_ctc_greedy(ids, aux["enc_lens"], blank))))
                    if token_ctc:
                        codes = batch_ctc_greedy(aux["token_ids"], aux["proj_lens"], model.blank_id)
                        tok_hyps.update((i, model.tokenizer.decode(c, skip_special_tokens=True))
                                        for i, c in zip(batch, codes))
                    if captured:
                        x = captured[0]
                        keep = lengths_to_mask(aux["proj_lens"], x.shape[1])
                        if model.cfg.compress:
                            keep = keep & (aux["token_ids"] != model.blank_id)
                        for k, v in enumerate(_sharpness(model, x[keep])):
                            sharp[k] += v
                    llm_frames.update(zip(batch, alens.tolist()))
                    hyps.update(zip(batch, model.transcribe(wav, wlens)))
    finally:
        if hook is not None:
            hook.remove()

    texts = [data.rows[i]["text"] for i in idx_all]
    refs = [normalize_text(t) for t in texts]
    words = jiwer.process_words(refs, [normalize_text(hyps[i]) for i in idx_all])
    n_ref = words.hits + words.substitutions + words.deletions
    ratios = []
    for i, text in zip(idx_all, texts):
        n_tok = len(encode(model.tokenizer, text))
        if n_tok:
            ratios.append(llm_frames[i] / n_tok)
    has_vq = model.vq is not None
    return {
        "manifest": str(data.manifest),
        "n": len(idx_all),
        "wer_llm": round(float(words.wer), 4),
        "sub": round(words.substitutions / n_ref, 4),
        "del": round(words.deletions / n_ref, 4),
        "ins": round(words.insertions / n_ref, 4),
        "wer_encoder_ctc": _word_rate(refs, [normalize_text(enc_hyps[i]) for i in idx_all]) if head else None,
        "wer_token_ctc": _word_rate(refs, [normalize_text(tok_hyps[i]) for i in idx_all]) if token_ctc else None,
        "frames_per_token": round(sum(ratios) / len(ratios), 4) if ratios else None,
        "vq_max_prob": round(sharp[0] / sharp[2], 4) if has_vq and sharp[2] else None,
        "vq_entropy": round(sharp[1] / sharp[2], 4) if has_vq and sharp[2] else None,
        "tau": round(float(model.vq.temperature.detach()), 6) if has_vq else None,
    }


def diagnose_run(run: str | Path, manifests: Sequence[str | Path], device: str = "cpu", log=print, *,
                 batch_size: int = 32, limit: int | None = None, checkpoint: str = "last",
                 overrides: dict | None = None) -> dict[str, dict]:
    """Load ``run`` once and :func:`diagnose` each manifest -> {manifest stem: result}.

    ``device`` "auto" = cuda when available. ``checkpoint``/``overrides`` as in ``train.load_run``.
    """
    from asr_reference.checkpoints import load_run

    names = [Path(m).stem for m in manifests]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"manifests with the same name {dupes}: results are keyed by the file stem")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_run(run, device, checkpoint=checkpoint, overrides=overrides)
    results = {}
    for name, manifest in zip(names, manifests):
        results[name] = res = diagnose(model, manifest, batch_size=batch_size, limit=limit)
        if log:
            log(f"diagnose: {Path(run).name} {name}: " + ", ".join(
                f"{k} {v}" for k, v in res.items() if k != "manifest"))
    return results


_COLUMNS = (  # (key, header, formatter)
    ("n", "n", str),
    ("wer_llm", "WER LLM %", lambda v: f"{100 * v:.1f}"),
    ("sub", "sub %", lambda v: f"{100 * v:.1f}"),
    ("del", "del %", lambda v: f"{100 * v:.1f}"),
    ("ins", "ins %", lambda v: f"{100 * v:.1f}"),
    ("wer_encoder_ctc", "WER enc-CTC %", lambda v: f"{100 * v:.1f}"),
    ("wer_token_ctc", "WER token-CTC %", lambda v: f"{100 * v:.1f}"),
    ("frames_per_token", "frames/token", lambda v: f"{v:.2f}"),
    ("vq_max_prob", "VQ max p", lambda v: f"{v:.3f}"),
    ("vq_entropy", "VQ entropy (nats)", lambda v: f"{v:.2f}"),
    ("tau", "tau", lambda v: f"{v:.4g}"),
)


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """{run name: {set name: diagnose() result}} -> a markdown table, one row per (run, set); "-" where a
    quantity does not apply (no CTC head, no token CTC, no VQ)."""
    header = ["run", "set"] + [h for _, h, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(_COLUMNS)) + "|"]
    for run, sets in results.items():
        for name, res in sets.items():
            cells = [str(run), str(name)]
            for key, _, fmt in _COLUMNS:
                v = res.get(key)
                cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt(v))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
