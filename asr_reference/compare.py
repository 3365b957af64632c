"""``demo --compare``: the rows of the comparison (model presets), several seeds, paired bootstrap
significance, the markdown/JSON table and the plot with error bars.

Rows (every one: the same encoder, projector, data, LLM, steps, batch and seed):

* ``none`` / ``hard`` / ``soft``: the like-for-like rows. All three have the token CTC on the VQ's
  distribution over LLM tokens, the CTC collapse before the LLM and the character CTC on the encoder;
  they differ only in what the LLM reads (the continuous frame, the argmax code, the soft mixture).
* ``plain``: the standard LLM-ASR system (SLAM-ASR style): encoder -> frame stacking -> projector ->
  frozen LLM, next-token loss only (no token CTC, no collapse, no character CTC, no VQ).
* ``soft-no-ctc``: ``plain`` plus soft VQ (its commitment loss included): separates what the VQ does
  (vs ``plain``) from what the CTC losses and the collapse do (vs ``soft``).
* ``hard-soft`` (only with ``--hard-soft``): the ``hard`` run's weights continued as soft VQ for
  ``--hard-soft-steps`` more steps (``--tau-schedule`` anneals the temperature).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

# row name -> ASRConfig overrides
ROWS = {
    "none": {"vq": "none"},
    "hard": {"vq": "hard"},
    "soft": {"vq": "soft"},
    "plain": {"vq": "none", "token_ctc_weight": 0.0, "compress": False, "ctc_weight": 0.0},
    "soft-no-ctc": {"vq": "soft", "token_ctc_weight": 0.0, "compress": False, "ctc_weight": 0.0},
    "hard-soft": {"vq": "soft"},
}
DEFAULT_ROWS = ("soft", "plain", "none", "hard", "soft-no-ctc")  # the system, the standard baseline, the rest
# (a, b): the pairs the report draws conclusions from, WER(a) - WER(b); negative = a is better
PAIRS = (("soft", "none"), ("soft", "plain"), ("hard", "none"), ("soft-no-ctc", "plain"), ("soft", "soft-no-ctc"),
         ("hard-soft", "soft"), ("hard-soft", "hard"))

# For the estimate printed before the demo starts: seconds measured on the 2-core CPU the committed
# results were made on (LM pretraining, data preparation, encoder pretraining per step, seconds per
# training step of each row, decoding one run on every test set). A different machine takes longer or
# shorter; the results do not change, because the step count is fixed. The measured speed is printed
# after each run's first steps. "step*": the built-in encoder trained inside the run, batch 8;
# "bridge_step*": a frozen pretrained encoder (cached outputs), per utterance of the batch (measured
# 0.17 s per step of 16 on one thread of the shared CPU, 2026-12-03); "encoder_step" and
# "encoder_cache" are estimates, not idle-machine measurements (2.6 s/step was measured with two
# threads on the contended CPU).
REFERENCE_CPU = {"cores": 2, "prepare": 80.0, "lm": 370.0, "eval": 30.0, "encoder_step": 0.55, "encoder_cache": 40.0,
                 # per run, with one single-threaded process per core (demo --compare's default)
                 "step_parallel": {"none": 0.38, "hard": 0.36, "soft": 0.39, "plain": 0.37, "soft-no-ctc": 0.38,
                                   "hard-soft": 0.39},
                 # one run alone with both cores
                 "step": {"none": 0.32, "hard": 0.30, "soft": 0.33, "plain": 0.31, "soft-no-ctc": 0.32,
                          "hard-soft": 0.33},
                 "bridge_step_parallel": 0.012, "bridge_step": 0.010}


def resolve_rows(rows: list[str] | None, hard_soft: bool = False) -> list[str]:
    """The rows to run, in order: the defaults unless given, hard-soft added on request, and hard
    before hard-soft (which continues the hard run)."""
    rows = list(rows or DEFAULT_ROWS)
    if hard_soft and "hard-soft" not in rows:
        rows.append("hard-soft")
    if "hard-soft" in rows and "hard" not in rows:
        rows.insert(rows.index("hard-soft"), "hard")
    if "hard-soft" in rows and rows.index("hard") > rows.index("hard-soft"):
        rows.remove("hard")
        rows.insert(rows.index("hard-soft"), "hard")
    return rows


def run_dir(runs: Path, row: str, seed_index: int) -> Path:
    return runs / (f"vq_{row}" if seed_index == 0 else f"vq_{row}_s{seed_index}")


def estimate_seconds(rows: list[str], steps: int, seeds: int, need_prepare: bool, need_lm: bool,
                     hard_soft_steps: int = 0, jobs: int = 1, done: dict | None = None, *, encoder_steps: int = 0,
                     frozen_encoder: bool = False, batch_size: int = 8, side_by_side: bool = False) -> float:
    """Wall seconds on the reference CPU: preparation and LM pretraining, then the runs (each trained
    and decoded; ``done[(row, seed_index)]``: steps a run folder already has). ``jobs`` > 1 processes
    share the cores, so the runs take their total work divided by the cores in use, and never less
    than the longest run; hard-soft runs after the rest."""
    ref = REFERENCE_CPU
    step = ref["step_parallel"] if jobs > 1 else ref["step"]
    if frozen_encoder:  # the bridge and the LLM only; batch-size proportional
        per = (ref["bridge_step_parallel"] if jobs > 1 else ref["bridge_step"]) * batch_size
        step = {r: per for r in step}
    else:
        step = {r: v * batch_size / 8 for r, v in step.items()}
    cores = min(jobs, ref["cores"])
    done = done or {}

    def run_time(row: str, k: int) -> float:
        n = hard_soft_steps if row == "hard-soft" else steps
        return max(0, n - done.get((row, k), 0)) * step.get(row, 0.4) + ref["eval"]

    def span(times: list[float]) -> float:
        return max(sum(times) / cores, max(times, default=0.0))

    first = [run_time(r, k) for r in rows if r != "hard-soft" for k in range(seeds)]
    second = [run_time(r, k) for r in rows if r == "hard-soft" for k in range(seeds)]
    encoder = encoder_steps * ref["encoder_step"]
    lm = ref["lm"] * need_lm
    # LM and encoder pretraining side by side (one process each): the cores share their work
    pretrain = (max(lm, encoder, (lm + encoder) / min(2, ref["cores"])) if side_by_side and lm and encoder
                else lm + encoder)
    cache = ref["encoder_cache"] if frozen_encoder else 0.0
    return ref["prepare"] * need_prepare + pretrain + cache + span(first) + span(second)


def encoder_is_current(enc_dir: Path, data: Path, steps: int, batch_size: int, seed: int, arch=None) -> bool:
    """The demo's pretrained encoder folder can be reused: made from this data with this plan."""
    from asr_reference.pretrain_encoder import encoder_plan, is_current

    train = data / "train.jsonl"
    return train.is_file() and is_current(enc_dir, encoder_plan(train, steps=steps, batch_size=batch_size, seed=seed,
                                                                 arch=arch))


def fingerprint(*paths: Path) -> str:
    """sha256 (16 hex digits) of the files' bytes (a missing file counts as empty): a run or an LM is
    reused only on the same data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes() if Path(p).is_file() else b"")
    return h.hexdigest()[:16]


def data_is_stale(data: Path) -> str | None:
    """Why a data folder cannot be used as it is (None: it can): missing, or made by ``prepare`` with
    other voices / conditions than the current :data:`asr_reference.data.IN_DOMAIN` and
    ``OUT_OF_DOMAIN`` (a folder of the user's own manifests, without ``splits.json``, is used as it is)."""
    from asr_reference.data import IN_DOMAIN, OUT_OF_DOMAIN

    if not (data / "test_in.jsonl").is_file():
        return "missing"
    splits = data / "splits.json"
    if not splits.is_file():
        return None  # not made by ``prepare`` (the user's own manifests): used as it is
    saved = json.loads(splits.read_text())
    if saved.get("in_domain") != [v.__dict__ for v in IN_DOMAIN]:
        return "its training voices are not the current default"
    if saved.get("out_of_domain") != {k: [v.__dict__ for v in vs] for k, vs in OUT_OF_DOMAIN.items()}:
        return "its out-of-domain conditions are not the current default"
    missing = [n for n in ("train", "dev", "test_in", *OUT_OF_DOMAIN) if not (data / f"{n}.jsonl").is_file()]
    return f"manifests missing: {', '.join(missing)}" if missing else None


LM_SOURCE = "lm_source.json"


def lm_is_stale(lm: Path, data: Path) -> str | None:
    """Why the demo's pretrained LM cannot be reused with ``data`` (None: it can)."""
    if not (lm / "config.json").is_file():
        return "missing"
    source = lm / LM_SOURCE
    if not source.is_file() or json.loads(source.read_text()).get("lm_text") != fingerprint(data / "lm_train.txt"):
        return f"it was not pretrained on {data / 'lm_train.txt'}"
    return None


def mark_lm(lm: Path, data: Path) -> None:
    (lm / LM_SOURCE).write_text(json.dumps({"lm_text": fingerprint(data / "lm_train.txt")}))


def _stale(run: Path, cfg_dict: dict, plan: dict) -> str | None:
    """Why an existing run folder cannot be reused (None: it can be resumed or is finished)."""
    if not (run / "config.json").is_file():
        return "incomplete"
    if json.loads((run / "config.json").read_text()) != cfg_dict:
        return "another model configuration"
    saved = run / "demo_plan.json"
    if not saved.is_file() or json.loads(saved.read_text()) != plan:
        return "another training plan (steps, seed, batch, lr, schedule or initialisation)"
    return None


def train_row(row: str, seed_index: int, *, base_cfg, runs: Path, data: Path, steps: int, batch_size: int,
              lr: float, warmup: int, seed: int, device: str, tau_schedule: str | None = None,
              hard_soft_steps: int = 0, progress_bar: bool = True, log=print) -> tuple[Path, dict]:
    """Train one row for one seed (reusing a finished or interrupted run of the same plan)."""
    from asr_reference.model import ASRConfig
    from asr_reference.train import TrainArgs, train

    cfg = ASRConfig(**{**base_cfg.to_dict(), **ROWS[row]})
    run = run_dir(runs, row, seed_index)
    init_from = None
    if row == "hard-soft":
        init_from = str(run_dir(runs, "hard", seed_index))
        steps = hard_soft_steps
    plan = {"steps": steps, "seed": seed + seed_index, "batch_size": batch_size, "lr": lr, "warmup": warmup,
            "tau_schedule": tau_schedule if row == "hard-soft" else None, "init_from": init_from,
            "train": str(data / "train.jsonl"), "data": fingerprint(data / "train.jsonl", data / "splits.json")}
    if run.exists():
        why = _stale(run, cfg.to_dict(), plan)
        if why:
            log(f"demo: {run} was made with {why}; starting it again")
            shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    resume = (run / "checkpoint.pt").is_file()
    (run / "demo_plan.json").write_text(json.dumps(plan, indent=1))
    summary = train(cfg, TrainArgs(train=plan["train"], run=str(run), steps=steps, batch_size=batch_size, lr=lr,
                                   warmup=warmup, seed=plan["seed"], resume=resume, device=device,
                                   tau_schedule=plan["tau_schedule"], init_from=init_from,
                                   progress_bar=progress_bar), log=log)
    summary["row"] = row
    summary["seed"] = plan["seed"]
    return run, summary


def eval_run(run: Path, data: Path, beams: int, device: str, log=print) -> dict:
    """WER/CER of a run on every test set of ``data`` (hypotheses in RUN/hyp_<set>_b<beams>.jsonl)."""
    from asr_reference.data import test_sets
    from asr_reference.evaluate import evaluate
    from asr_reference.checkpoints import load_run

    model = load_run(run, device)
    out = {}
    for name, manifest in test_sets(data).items():
        res = evaluate(model, manifest, num_beams=beams, out_file=run / f"hyp_{name}_b{beams}.jsonl")
        out[name] = res
        log(f"eval[{run.name}] {name}: WER {100 * res['wer']:.1f}%  CER {100 * res['cer']:.1f}%  "
            f"({res['n']} utts, {res['seconds']} s)")
    return out


def _train_and_eval(row: str, seed_index: int, train_kw: dict, beams: int, threads: int | None,
                    parallel: bool) -> tuple[dict, dict]:
    """One (row, seed): train (or reuse) and decode every test set. In a worker process of
    :func:`run_all` it prints prefixed lines instead of a progress bar."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    tag = f"[{row}{f' seed {seed_index}' if seed_index else ''}] "
    log = (lambda msg: print(tag + msg, flush=True)) if parallel else print
    run, summary = train_row(row, seed_index, **train_kw, progress_bar=not parallel, log=log)
    return summary, eval_run(run, train_kw["data"], beams, train_kw["device"], log=log)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker whose demo process was killed stops too (its run keeps the
    checkpoints, so the same command resumes it) instead of training on as an orphan."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(2)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def steps_done(run: Path) -> int:
    """The last logged step of a run (its train_log.jsonl is written every 10 steps)."""
    try:
        with open(run / "train_log.jsonl", "rb") as f:
            lines = f.read().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def run_all(rows: list[str], seeds: int, *, jobs: int, train_kw: dict, beams: int,
            log=print) -> tuple[dict, list[dict]]:
    """Train and evaluate every (row, seed): ``results[row][seed_index]`` and the training summaries.

    ``jobs`` > 1: that many worker processes with ``cpu_count // jobs`` torch threads each and one
    progress bar over all their steps (read from the runs' logs). The hard-soft row starts after the
    rest, since it continues the hard run. A failing run stops the others; every run keeps its
    checkpoints, so the same command resumes where it stopped."""
    from tqdm import tqdm

    phases = [[(r, k) for k in range(seeds) for r in rows if r != "hard-soft"],
              [(r, k) for k in range(seeds) for r in rows if r == "hard-soft"]]
    out: dict[tuple[str, int], tuple[dict, dict]] = {}
    if jobs <= 1:
        for phase in phases:
            for r, k in phase:
                out[(r, k)] = _train_and_eval(r, k, train_kw, beams, None, parallel=False)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        def n_steps(row: str) -> int:
            return train_kw["hard_soft_steps"] if row == "hard-soft" else train_kw["steps"]

        total = sum(n_steps(r) for ph in phases for r, _ in ph)
        finished: set[tuple[str, int]] = set()
        log(f"demo: {sum(map(len, phases))} runs over {jobs} parallel processes, {threads} torch thread(s) each")
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_exit_with_parent,
                                 initargs=(os.getpid(),)) as pool, \
                tqdm(total=total, desc="demo", unit="step", mininterval=5) as bar:
            for phase in phases:
                futures = {pool.submit(_train_and_eval, r, k, train_kw, beams, threads, True): (r, k) for r, k in phase}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=5, return_when=FIRST_EXCEPTION)
                    failed = [f for f in done if f.exception() is not None]
                    finished.update(futures[f] for f in done if f.exception() is None)
                    # the logs lag by up to 10 steps: a finished run counts all of its steps
                    steps_now = sum(n_steps(r) if (r, k) in finished else steps_done(run_dir(train_kw["runs"], r, k))
                                    for ph in phases for r, k in ph)
                    bar.update(max(0, steps_now - bar.n))
                    if failed:
                        for f in pending:
                            f.cancel()
                        raise failed[0].exception()
                for f, key in futures.items():
                    out[key] = f.result()
    results: dict = {}
    summaries = []
    for phase in phases:
        for r, k in phase:
            summary, res = out[(r, k)]
            summaries.append(summary)
            results.setdefault(r, []).append(res)
    return {r: results[r] for r in rows}, summaries


# ------------------------------------------------------------------------------------------ analysis
def _ood(sets: list[str]) -> list[str]:
    return [s for s in sets if s != "test_in"]


def analyse(results: dict, n_resamples: int = 1000) -> dict:
    """``results[row][seed_index][set]`` (evaluate() dicts with their hypotheses files) -> per cell
    mean/std over seeds and the bootstrap interval of the seed-mean WER, and for every pair in
    :data:`PAIRS` whose rows ran a paired bootstrap per set (and on all OOD sets pooled)."""
    import numpy as np

    from asr_reference.significance import paired_bootstrap, pool_by_sentence, read_refs, seed_errors, wer_interval

    rows = list(results)
    sets = list(results[rows[0]][0])
    # (seeds, utterances) word errors: the bootstraps resample seeds as well as utterances
    errors = {r: {s: seed_errors([seed_res[s]["hypotheses"] for seed_res in results[r]]) for s in sets} for r in rows}
    cells = {}
    for r in rows:
        cells[r] = {}
        for s in sets + ["mean_ood"]:
            if s == "mean_ood":
                vals = [sum(seed_res[x]["wer"] for x in _ood(sets)) / max(1, len(_ood(sets))) for seed_res in results[r]]
                cers = [sum(seed_res[x]["cer"] for x in _ood(sets)) / max(1, len(_ood(sets))) for seed_res in results[r]]
                if not _ood(sets):
                    continue
            else:
                vals = [seed_res[s]["wer"] for seed_res in results[r]]
                cers = [seed_res[s]["cer"] for seed_res in results[r]]
            cell = {"wer": round(statistics.fmean(vals), 4), "cer": round(statistics.fmean(cers), 4),
                    "wer_seeds": vals, "cer_seeds": cers}
            if len(vals) > 1:
                cell["wer_std"] = round(statistics.stdev(vals), 4)
                cell["cer_std"] = round(statistics.stdev(cers), 4)
            if s != "mean_ood":
                err, words = errors[r][s]
                cell["wer_ci95"] = list(wer_interval(err, words, n_resamples))
            cells[r][s] = cell
    pairs = {}
    pooled_unit = None
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        per = {}
        for s in sets:
            (ea, w), (eb, _) = errors[a][s], errors[b][s]
            per[s] = paired_bootstrap(ea, eb, w, n_resamples)
        if _ood(sets):  # pooled OOD: sentence clusters when the sets render the same sentences
            ea, eb, w, unit = pool_by_sentence([(errors[a][s][0], errors[b][s][0], errors[a][s][1],
                                                 read_refs(results[a][0][s]["hypotheses"])) for s in _ood(sets)])
            pooled_unit = unit
            per["ood_pooled"] = paired_bootstrap(ea, eb, w, n_resamples)
        pairs[f"{a} vs {b}"] = per
    return {"sets": sets, "cells": cells, "pairs": pairs, "resamples": n_resamples, "pooled_unit": pooled_unit}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(c: dict, key: str = "wer") -> str:
    return _pct(c[key]) + (f" ± {_pct(c[key + '_std'])}" if key + "_std" in c else "")


def markdown(analysis: dict, meta: dict) -> str:
    sets, cells, pairs = analysis["sets"], analysis["cells"], analysis["pairs"]
    seeds = meta["seeds"]
    has_ood = bool(_ood(sets))
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = ["# LLM-ASR: WER (%) by system and test set", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; {meta['minutes']:.1f} min wall time in all "
             f"(load average {meta['load_before']} before the run: the machine may have been shared).", "",
             f"WER (%), {spread}; [95% bootstrap interval over utterances"
             + (" and seeds" if seeds > 1 else "") + f", {analysis['resamples']} resamples]:", "",
             "| system | " + " | ".join(sets) + (" | mean OOD |" if has_ood else " |"),
             "|---|" + "---:|" * (len(sets) + has_ood)]
    for row, c in cells.items():
        lines.append(f"| {row} | " + " | ".join(
            f"{_cell(c[s])} [{_pct(c[s]['wer_ci95'][0])}, {_pct(c[s]['wer_ci95'][1])}]" for s in sets)
            + (f" | {_cell(c['mean_ood'])} |" if has_ood else " |"))
    lines += ["", f"CER (%), {spread}:", "", "| system | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for row, c in cells.items():
        lines.append(f"| {row} | " + " | ".join(_cell(c[s], "cer") for s in sets) + " |")
    lines += ["", "## Paired differences", "",
              f"WER(a) - WER(b) in points (negative: a is better), paired bootstrap over utterances "
              f"({analysis['resamples']} resamples"
              + (", each also drawing every system's seeds with replacement: the interval covers the spread "
                 "between training seeds as well as between utterances" if seeds > 1 else "") + "), 95% interval; "
              f"\"significant\" only where the interval excludes 0. `ood_pooled`: all OOD sets together, "
              + ("resampling test sentences (each with its errors summed over the OOD conditions, which render "
                 "the same sentences: utterances of one sentence are not independent)"
                 if analysis.get("pooled_unit") == "sentence" else "every OOD utterance once") + ".", "",
              "| a vs b | set | WER(a) - WER(b) | 95% interval | |", "|---|---|---:|---|---|"]
    for pair, per in pairs.items():
        for s, r in per.items():
            lines.append(f"| {pair} | {s} | {100 * r['diff']:+.1f} | [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | "
                         + ("**significant**" if r["significant"] else "not significant") + " |")
    lines += ["", "## Setup", "", meta["setup"], "",
              "Training per run (steps, s/step measured on this machine during this run):", "",
              "| run | steps | s/step | final loss | next-token CE |", "|---|---:|---:|---:|---:|"]
    for s in meta["train"]:
        trained = s.get("trained_steps", s["steps"])
        lines.append(f"| {Path(s['run']).name} | {s['steps']} | "
                     + (f"{s['seconds'] / trained:.3f}" if trained else "reused") + f" | {s.get('loss')} | {s.get('ce')} |")
    lines += ["", f"Plot: `compare.png` (bars: mean WER; error bars: "
              + ("std over seeds" if seeds > 1 else "95% bootstrap interval over utterances") + ")."]
    return "\n".join(lines) + "\n"


def plot(analysis: dict, seeds: int, out: Path, log=print) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("demo: matplotlib missing, no plot")
        return
    sets, cells = analysis["sets"], analysis["cells"]
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(sets)), 4.2))
    w = 0.8 / len(cells)
    for k, (row, c) in enumerate(cells.items()):
        ys = [100 * c[s]["wer"] for s in sets]
        if seeds > 1:
            err = [[100 * c[s].get("wer_std", 0) for s in sets]] * 2
        else:
            err = [[100 * (c[s]["wer"] - c[s]["wer_ci95"][0]) for s in sets],
                   [100 * (c[s]["wer_ci95"][1] - c[s]["wer"]) for s in sets]]
        ax.bar([i + k * w for i in range(len(sets))], ys, w, yerr=err, capsize=2, label=row)
    ax.set_xticks([i + w * (len(cells) - 1) / 2 for i in range(len(sets))], sets)
    ax.set_ylabel("WER (%)")
    ax.set_title("LLM-ASR on espeak-ng speech: WER by system ("
                 + (f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed, 95% bootstrap interval") + ")")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)


def write_compare(results: dict, summaries: list[dict], meta: dict, out: Path, log=print) -> dict:
    """compare.json (everything), compare.md (tables + paired differences + setup), compare.png."""
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(results)
    meta = {**meta, "train": summaries}
    payload = {**{k: v for k, v in meta.items() if k != "setup"}, "setup": meta["setup"], **analysis,
               "results": results}
    (out / "compare.json").write_text(json.dumps(payload, indent=1))
    (out / "compare.md").write_text(markdown(analysis, meta))
    plot(analysis, meta["seeds"], out, log)
    log(f"demo: wrote {out / 'compare.md'}, compare.json, compare.png")
    return analysis


def rerender(out: Path, log=print) -> dict:
    """compare.md/.json/.png again from ``out/compare.json`` (its runs' hypotheses files must still
    exist): the analysis of the current code over the same decoded runs; timings and setup are kept."""
    path = Path(out) / "compare.json"
    if not path.is_file():
        from asr_reference.errors import ASRError

        raise ASRError(f"{path}: not found (run demo --compare first)")
    saved = json.loads(path.read_text())
    meta = {k: saved[k] for k in ("command", "device", "machine", "load_before", "minutes", "seeds", "steps",
                                  "rows", "setup") if k in saved}
    for row in saved["results"].values():
        for seed_res in row:
            for res in seed_res.values():
                if not Path(res["hypotheses"]).is_file():
                    from asr_reference.errors import ASRError

                    raise ASRError(f"{res['hypotheses']}: missing (compare.json lists it; the runs were moved or deleted)")
    return write_compare(saved["results"], saved["train"], meta, Path(out), log=log)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), {platform.platform()}")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
