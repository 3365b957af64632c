"""Paired bootstrap over utterances for WER differences, and per-system WER intervals.

Both systems decode the same utterances, so the comparison is paired: each resample draws utterance
indices with replacement and recomputes both corpus-level WERs (sum of word errors / sum of reference
words) on the same draw. The 95% interval of WER(a) - WER(b) excludes 0 only when the difference
holds across resamples of the test set; that is what "significant" means in the compare table. With
several seeds the per-utterance errors are the mean over seeds (the bootstrap then resamples utterances
of the seed-averaged system; the seed spread is reported separately as a std).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_RESAMPLES = 1000


def read_errors(hyp_file: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(audio paths, word errors, reference words) per utterance of an ``evaluate`` hypotheses file."""
    paths, errs, words = [], [], []
    for line in Path(hyp_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        n = int(row["ref_words"])
        paths.append(row["audio_filepath"])
        # an empty reference with a hypothesis: jiwer counts its words as insertions; the file has None
        e = row["word_errors"]
        errs.append(float(e) if e is not None else float(len(row["hyp"].split())))
        words.append(n)
    return paths, np.asarray(errs, dtype=np.float64), np.asarray(words, dtype=np.float64)


def _indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def paired_bootstrap(err_a, err_b, words, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict:
    """WER(a) - WER(b) on the full set and its ``level`` percentile interval over ``n_resamples``
    paired resamples of utterances. ``err_*``: word errors per utterance (same order), ``words``:
    reference words per utterance. Returns {"diff", "lo", "hi", "significant", "n", "resamples"}
    (fractions, not percent); significant = the interval excludes 0."""
    err_a, err_b, words = (np.asarray(x, dtype=np.float64) for x in (err_a, err_b, words))
    if not (err_a.shape == err_b.shape == words.shape) or err_a.ndim != 1 or not len(words):
        raise ValueError(f"need equal-length 1-d per-utterance arrays, got {err_a.shape}, {err_b.shape}, {words.shape}")
    idx = _indices(len(words), n_resamples, seed)
    w = words[idx].sum(1)
    w[w == 0] = 1.0
    diffs = (err_a[idx].sum(1) - err_b[idx].sum(1)) / w
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    diff = (err_a.sum() - err_b.sum()) / max(words.sum(), 1.0)
    return {"diff": round(float(diff), 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4),
            "significant": bool(lo > 0 or hi < 0), "n": int(len(words)), "resamples": n_resamples}


def wer_interval(err, words, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of one system's corpus WER (the plot's error bars for one seed)."""
    err, words = np.asarray(err, dtype=np.float64), np.asarray(words, dtype=np.float64)
    idx = _indices(len(words), n_resamples, seed)
    w = words[idx].sum(1)
    w[w == 0] = 1.0
    wers = err[idx].sum(1) / w
    alpha = (1 - level) / 2
    lo, hi = np.quantile(wers, [alpha, 1 - alpha])
    return round(float(lo), 4), round(float(hi), 4)


def read_refs(hyp_file: str | Path) -> list[str]:
    """The (normalised) reference transcripts of an ``evaluate`` hypotheses file, in order."""
    return [json.loads(line)["ref"] for line in Path(hyp_file).read_text(encoding="utf-8").splitlines() if line.strip()]


def pool_by_sentence(sets: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]]):
    """Pool several test sets for one bootstrap: ``sets`` = [(errors a, errors b, words, refs)].

    Sets that are renderings of the same sentences in the same order (the default out-of-domain sets)
    are not independent: a hard sentence is hard in every condition. They are pooled by sentence, so
    the bootstrap resamples sentences (each with its errors summed over the conditions), not the
    correlated utterances, whose intervals would be too narrow. Other sets are concatenated.
    Returns (errors a, errors b, words, "sentence" | "utterance")."""
    refs = [r for *_, r in sets]
    if all(r == refs[0] for r in refs[1:]):
        return (sum(a for a, *_ in sets), sum(b for _, b, *_ in sets), sum(w for _, _, w, _ in sets), "sentence")
    return (np.concatenate([a for a, *_ in sets]), np.concatenate([b for _, b, *_ in sets]),
            np.concatenate([w for _, _, w, _ in sets]), "utterance")


def mean_errors(hyp_files: list[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance word errors averaged over several runs (seeds) of one system, and reference words;
    the files must list the same utterances in the same order."""
    first_paths, total, words = None, None, None
    for f in hyp_files:
        paths, err, w = read_errors(f)
        if first_paths is None:
            first_paths, total, words = paths, err.copy(), w
        else:
            if paths != first_paths:
                raise ValueError(f"{f}: not the same utterances as {hyp_files[0]}")
            total += err
    return total / len(hyp_files), words
