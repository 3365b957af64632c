"""Paired bootstrap over utterances for WER differences, and per-system WER intervals.

Both systems decode the same utterances, so the comparison is paired: each resample draws utterance
indices with replacement and recomputes both corpus-level WERs (sum of word errors / sum of reference
words) on the same draw. The 95% interval of WER(a) - WER(b) excludes 0 only when the difference
holds across resamples of the test set; that is what "significant" means in the compare table. With
several seeds each resample also draws every system's seeds with replacement, so the interval covers
the spread between training seeds as well as between utterances (with seeds as unstable as they are
at this scale, an utterance-only interval of the seed mean would call differences "significant" that a
new seed would undo).
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


def _as_runs(err) -> np.ndarray:
    """Per-utterance errors as (runs, n): one row per seed (a 1-d array is one run)."""
    err = np.asarray(err, dtype=np.float64)
    return err[None] if err.ndim == 1 else err


def _resampled_errors(err: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Total word errors of each resample: the utterances ``idx`` (R, n) of the seed-mean system, whose
    seeds are themselves drawn with replacement when there are several (so the interval also covers
    the spread between training seeds, not only between utterances)."""
    if err.shape[0] == 1:
        return err[0][idx].sum(1)
    picks = rng.integers(0, err.shape[0], size=(idx.shape[0], err.shape[0]))
    seed_mean = err[picks].mean(1)  # (R, n)
    return np.take_along_axis(seed_mean, idx, 1).sum(1)


def paired_bootstrap(err_a, err_b, words, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict:
    """WER(a) - WER(b) on the full set and its ``level`` percentile interval over ``n_resamples``
    paired resamples. ``err_*``: word errors per utterance (same order), (n,) for one run or
    (seeds, n) for several; ``words``: reference words per utterance. Each resample draws the
    utterances (the same for a and b: paired) and, for a system with several seeds, its seeds with
    replacement. Returns {"diff", "lo", "hi", "significant", "n", "seeds", "resamples"} (fractions,
    not percent); significant = the interval excludes 0."""
    err_a, err_b, words = _as_runs(err_a), _as_runs(err_b), np.asarray(words, dtype=np.float64)
    if not (err_a.shape[1] == err_b.shape[1] == words.shape[0]) or words.ndim != 1 or not len(words):
        raise ValueError(f"need per-utterance arrays of one length, got {err_a.shape}, {err_b.shape}, {words.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(words), size=(n_resamples, len(words)))
    w = words[idx].sum(1)
    w[w == 0] = 1.0
    diffs = (_resampled_errors(err_a, idx, rng) - _resampled_errors(err_b, idx, rng)) / w
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    diff = (err_a.mean(0).sum() - err_b.mean(0).sum()) / max(words.sum(), 1.0)
    return {"diff": round(float(diff), 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4),
            "significant": bool(lo > 0 or hi < 0), "n": int(len(words)), "seeds": [err_a.shape[0], err_b.shape[0]],
            "resamples": n_resamples}


def wer_interval(err, words, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of one system's corpus WER: utterances, and seeds when ``err`` is
    (seeds, n)."""
    err, words = _as_runs(err), np.asarray(words, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(words), size=(n_resamples, len(words)))
    w = words[idx].sum(1)
    w[w == 0] = 1.0
    wers = _resampled_errors(err, idx, rng) / w
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
    return (np.concatenate([a for a, *_ in sets], axis=-1), np.concatenate([b for _, b, *_ in sets], axis=-1),
            np.concatenate([w for _, _, w, _ in sets]), "utterance")


def seed_errors(hyp_files: list[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, n) word errors of several runs (seeds) of one system on one set, and reference words;
    the files must list the same utterances in the same order."""
    first_paths, rows, words = None, [], None
    for f in hyp_files:
        paths, err, w = read_errors(f)
        if first_paths is None:
            first_paths, words = paths, w
        elif paths != first_paths:
            raise ValueError(f"{f}: not the same utterances as {hyp_files[0]}")
        rows.append(err)
    return np.stack(rows), words
