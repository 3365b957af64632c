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

import json
import os
import platform
import shutil
import statistics
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
# results were made on (LM pretraining, data preparation, seconds per training step of each row,
# decoding one run on every test set). A different machine takes longer or shorter; the results do not
# change, because the step count is fixed. The measured speed is printed after each run's first steps.
REFERENCE_CPU = {"prepare": 60.0, "lm": 186.0, "eval": 10.0,
                 "step": {"none": 0.151, "hard": 0.136, "soft": 0.16, "plain": 0.15, "soft-no-ctc": 0.15,
                          "hard-soft": 0.16}}


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
                     hard_soft_steps: int = 0) -> float:
    ref = REFERENCE_CPU
    total = ref["prepare"] * need_prepare + ref["lm"] * need_lm
    for row in rows:
        n = hard_soft_steps if row == "hard-soft" else steps
        total += seeds * (n * ref["step"].get(row, 0.16) + ref["eval"])
    return total


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
              hard_soft_steps: int = 0, log=print) -> tuple[Path, dict]:
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
            "train": str(data / "train.jsonl")}
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
                                   tau_schedule=plan["tau_schedule"], init_from=init_from), log=log)
    summary["row"] = row
    summary["seed"] = plan["seed"]
    return run, summary


def eval_run(run: Path, data: Path, beams: int, device: str, log=print) -> dict:
    """WER/CER of a run on every test set of ``data`` (hypotheses in RUN/hyp_<set>_b<beams>.jsonl)."""
    from asr_reference.data import test_sets
    from asr_reference.evaluate import evaluate
    from asr_reference.train import load_run

    model = load_run(run, device)
    out = {}
    for name, manifest in test_sets(data).items():
        res = evaluate(model, manifest, num_beams=beams, out_file=run / f"hyp_{name}_b{beams}.jsonl")
        out[name] = res
        log(f"eval[{run.name}] {name}: WER {100 * res['wer']:.1f}%  CER {100 * res['cer']:.1f}%  "
            f"({res['n']} utts, {res['seconds']} s)")
    return out


# ------------------------------------------------------------------------------------------ analysis
def _ood(sets: list[str]) -> list[str]:
    return [s for s in sets if s != "test_in"]


def analyse(results: dict, n_resamples: int = 1000) -> dict:
    """``results[row][seed_index][set]`` (evaluate() dicts with their hypotheses files) -> per cell
    mean/std over seeds and the bootstrap interval of the seed-mean WER, and for every pair in
    :data:`PAIRS` whose rows ran a paired bootstrap per set (and on all OOD sets pooled)."""
    import numpy as np

    from asr_reference.significance import mean_errors, paired_bootstrap, wer_interval

    rows = list(results)
    sets = list(results[rows[0]][0])
    errors = {r: {s: mean_errors([seed_res[s]["hypotheses"] for seed_res in results[r]]) for s in sets} for r in rows}
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
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        per = {}
        for s in sets:
            (ea, w), (eb, _) = errors[a][s], errors[b][s]
            per[s] = paired_bootstrap(ea, eb, w, n_resamples)
        if _ood(sets):  # pooled OOD: every OOD utterance once (the default sets share the test sentences)
            ea = np.concatenate([errors[a][s][0] for s in _ood(sets)])
            eb = np.concatenate([errors[b][s][0] for s in _ood(sets)])
            w = np.concatenate([errors[a][s][1] for s in _ood(sets)])
            per["ood_pooled"] = paired_bootstrap(ea, eb, w, n_resamples)
        pairs[f"{a} vs {b}"] = per
    return {"sets": sets, "cells": cells, "pairs": pairs, "resamples": n_resamples}


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
             f"WER (%), {spread}; [95% bootstrap interval over utterances, {analysis['resamples']} resamples]:", "",
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
              f"({analysis['resamples']} resamples, seed-mean errors per utterance), 95% interval; "
              f"\"significant\" only where the interval excludes 0. `ood_pooled`: every OOD utterance once.", "",
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
