"""``demo [--compare]``: everything end to end on the embedded default.

Stages: data (``prepare``) -> LM (``pretrain-lm``) -> encoder (``pretrain-encoder``: the built-in
Conformer with character CTC, once; ``--encoder PATH`` uses that encoder instead) -> one system (soft VQ),
or with ``--compare`` every row x seed, each training the bridge from the same frozen encoder (its outputs
cached once) -> WER on every test set (and the table, bootstrap intervals and plot with ``--compare``).
Every stage is reused when its inputs did not change; an estimate is printed first.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from asr_reference.cli import common
from asr_reference.cli.common import DEFAULTS, NONNEG_INT, POSITIVE, POSITIVE_INT

HELP = "everything end to end on the embedded default"

ROW_TEXT = {
    "none": "token CTC + collapse, the LLM reads the continuous frames",
    "hard": "token CTC + collapse, the LLM reads the argmax code (constant)",
    "soft": "token CTC + collapse, the LLM reads the soft mixture of codebook rows",
    "plain": "standard LLM-ASR (SLAM-ASR style): projector frames straight into the LLM, next-token loss only",
    "soft-no-ctc": "plain + soft VQ (next-token and commitment losses only, no collapse)",
    "hard-soft": "the hard run continued as soft VQ",
}


def add_arguments(p) -> None:
    p.add_argument("--compare", action="store_true",
                   help="train every row (soft, plain, none, hard, soft-no-ctc); write the table with bootstrap intervals")
    p.add_argument("--rows", nargs="+", choices=("none", "hard", "soft", "plain", "soft-no-ctc", "hard-soft"), default=None,
                   help="--compare: these rows only (default soft plain none hard soft-no-ctc)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=None,
                   help="--compare: training seeds per row, mean ± std per cell (default 1 on CPU, 3 on GPU)")
    p.add_argument("--hard-soft", action="store_true",
                   help="--compare: add the hard-soft row (the hard run continued as soft VQ)")
    p.add_argument("--hard-soft-steps", type=POSITIVE_INT, default=None, help="its extra steps (default steps/4)")
    p.add_argument("--tau-schedule", type=common.tau_schedule, default=None, metavar="START:END",
                   help="hard-soft row: anneal the temperature from START to END")
    p.add_argument("--jobs", type=POSITIVE_INT, default=None,
                   help="runs trained in parallel (default on a CPU: one more than its cores, 1 torch thread each; 1 on a GPU)")
    p.add_argument("--time-budget", type=POSITIVE, default=None,
                   help="minutes: warn when the estimate exceeds it (nothing is shortened)")
    p.add_argument("--llm", default=None, help="an HF causal-LM folder instead of pretraining the small LM")
    p.add_argument("--scratch-encoder", action="store_true",
                   help="no pretrain-encoder stage: every system trains the built-in encoder from scratch with "
                        "everything else (the earlier recipe)")
    p.add_argument("--encoder-steps", type=POSITIVE_INT, default=None,
                   help=f"pretrain-encoder steps (default {DEFAULTS['cpu']['enc_steps']} on CPU, "
                        f"{DEFAULTS['cuda']['enc_steps']} on GPU)")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--results", default=str(common.RESULTS))
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help=f"steps per run (default {DEFAULTS['cpu']['steps']} on CPU, {DEFAULTS['cuda']['steps']} on GPU; "
                        f"with --scratch-encoder {DEFAULTS['cpu']['scratch_steps']} / {DEFAULTS['cuda']['scratch_steps']}; fixed)")
    p.add_argument("--beams", type=POSITIVE_INT, default=1)
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=NONNEG_INT, default=50)
    p.add_argument("--fresh", action="store_true", help="rebuild data, LM, encoder and runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    common.add_model_args(p)


def run(args) -> None:
    from asr_reference import compare as C
    from asr_reference.data import prepare
    from asr_reference.lm import pretrain_lm
    from asr_reference.pretrain_encoder import EncoderArch, pretrain_encoder

    log = common.log
    t0 = time.time()
    load_before = C.load_average()
    device = common.device(args.device)
    on_gpu = device.startswith("cuda")
    size = DEFAULTS["cuda" if on_gpu else "cpu"]
    data, runs = Path(args.data), Path(args.runs)
    steps = args.steps or size["scratch_steps" if args.scratch_encoder else "steps"]
    seeds = args.seeds or (size["seeds"] if args.compare else 1)
    rows = C.resolve_rows(args.rows, args.hard_soft) if args.compare else [args.vq or "soft"]
    hard_soft_steps = args.hard_soft_steps or max(1, steps // 4)
    n_runs = seeds * len(rows)
    # CPU: single-threaded processes beat one process with all cores at this model size, and one more
    # process than cores keeps every core busy while an odd run out finishes; GPU: one run at a time
    jobs = args.jobs or (1 if on_gpu else max(1, min(n_runs, (os.cpu_count() or 1) + 1)))
    stale_data = None if args.fresh else C.data_is_stale(data)
    need_prepare = args.fresh or stale_data is not None
    lm = Path(args.llm) if args.llm else runs / "lm"
    # the LM text depends only on the sentence split: a data folder rebuilt for other voices keeps its LM
    need_lm = not args.llm and (args.fresh or not (data / "lm_train.txt").is_file()
                                or C.lm_is_stale(lm, data) is not None)
    # the encoder: given (--encoder), from scratch inside every run (--scratch-encoder), or pretrained once here
    pretrained_encoder = not args.encoder and not args.scratch_encoder
    enc_dir = runs / "encoder"
    enc_steps = args.encoder_steps or size["enc_steps"]
    arch = EncoderArch(**{k: getattr(args, k) for k in ("enc_dim", "enc_layers") if getattr(args, k) is not None})
    need_encoder = pretrained_encoder and (args.fresh or need_prepare or not C.encoder_is_current(
        enc_dir, data, enc_steps, size["enc_batch"], args.seed, arch))
    batch = size["scratch_batch" if args.scratch_encoder else "batch_size"]
    plan = (f"{len(rows)} run(s) x {seeds} seed(s), {steps} steps x {batch} utterances each"
            + (f" (hard-soft: +{hard_soft_steps} steps)" if "hard-soft" in rows else "")
            + (f", {jobs} in parallel" if jobs > 1 else "")
            + (f"; encoder pretraining {enc_steps} steps x {size['enc_batch']}" if need_encoder else ""))
    if on_gpu:
        log(f"demo: {plan} on {device}; no reference timing for GPUs: the measured speed is printed "
            f"after each run's first steps")
    else:
        done = {} if args.fresh or need_prepare else {
            (r, k): C.steps_done(C.run_dir(runs, r, k)) for r in rows for k in range(seeds)}
        est = C.estimate_seconds(rows, steps, seeds, need_prepare, need_lm, hard_soft_steps, jobs, done,
                                 encoder_steps=enc_steps if need_encoder else 0,
                                 frozen_encoder=bool(args.encoder or pretrained_encoder) and not args.finetune_encoder,
                                 batch_size=batch, side_by_side=need_lm and need_encoder and (os.cpu_count() or 1) > 1)
        log(f"demo: {plan}; expect about {est / 60:.0f} min on an idle 2-core CPU like the one the README's "
            f"numbers come from (more on a slower or busy machine: the step count is fixed, so the results "
            f"are the same, only the time changes; the measured speed is printed after each run's first steps)")
        if args.time_budget and est > 60 * args.time_budget:
            log(f"demo: WARNING: the estimate is more than the --time-budget of {args.time_budget:g} min "
                f"(nothing is shortened; use --steps or fewer --rows to make it shorter)")
    stages = {}
    if need_prepare:
        if stale_data and stale_data != "missing":
            log(f"demo: rebuilding {data}: {stale_data}")
            shutil.rmtree(data / "wav", ignore_errors=True)
        t = time.time()
        prepare(data, args.text, n_train=size["n_train"], seed=args.seed, log=log)
        stages["prepare"] = round(time.time() - t, 1)
    else:
        log(f"demo: reusing prepared data in {data} (--fresh to rebuild)")
    encoder = args.encoder
    if pretrained_encoder:
        encoder = str(enc_dir)
        if args.fresh and enc_dir.exists():
            shutil.rmtree(enc_dir)
    enc_kw = dict(steps=enc_steps, batch_size=size["enc_batch"], seed=args.seed, device=device, arch=arch,
                  dev=data / "dev.jsonl" if (data / "dev.jsonl").is_file() else None)
    lm_kw = dict(steps=size["lm_steps"], batch_size=size["lm_batch"], seed=args.seed, device=device)
    if args.llm:
        log(f"demo: using the LLM in {lm} (no LM pretraining)")
    elif not need_lm:
        log(f"demo: reusing pretrained LM in {lm}")
    else:
        stale_lm = C.lm_is_stale(lm, data)
        if not args.fresh and stale_lm not in (None, "missing"):
            log(f"demo: pretraining the LM again: {stale_lm}")
    t = time.time()
    lm_job = None
    if need_lm and need_encoder and not on_gpu and (os.cpu_count() or 1) > 1:
        # the two pretraining stages are independent: on a CPU they run side by side, one process each
        lm_job = _LMJob(data / "lm_train.txt", lm, lm_kw)
        log("demo: pretraining the LM (a second process, lines prefixed [lm]) and the encoder side by side")
    elif need_lm:
        pretrain_lm(data / "lm_train.txt", lm, log=log, **lm_kw)
        C.mark_lm(lm, data)
        stages["lm"] = round(time.time() - t, 1)
    if pretrained_encoder:
        t_enc = time.time()
        pretrain_encoder(data / "train.jsonl", enc_dir, log=log, **enc_kw)
        if need_encoder and lm_job is None:
            stages["encoder"] = round(time.time() - t_enc, 1)
    if lm_job is not None:
        lm_job.result()
        C.mark_lm(lm, data)
        lm_job.shutdown()
        stages["lm+encoder"] = round(time.time() - t, 1)
    if args.fresh:
        for row in rows:
            for k in range(seeds):
                if C.run_dir(runs, row, k).exists():
                    shutil.rmtree(C.run_dir(runs, row, k))
    args.vq = None
    args.encoder = encoder
    base = common.config_from(args, lm)
    train_kw = dict(base_cfg=base, runs=runs, data=data, steps=steps, batch_size=batch, lr=args.lr,
                    warmup=args.warmup, seed=args.seed, device=device, tau_schedule=args.tau_schedule,
                    hard_soft_steps=hard_soft_steps)
    t = time.time()
    results, summaries = C.run_all(rows, seeds, jobs=jobs, train_kw=train_kw, beams=args.beams, log=log)
    stages["systems"] = round(time.time() - t, 1)
    elapsed = time.time() - t0
    for row in rows:
        for k, res in enumerate(results[row]):
            ood = [r["wer"] for name, r in res.items() if name != "test_in"]
            log(f"demo[{row}{f' seed {k}' if seeds > 1 else ''}]: WER in-domain {100 * res['test_in']['wer']:.1f}%"
                + (" | out-of-domain " + ", ".join(f"{name[9:]} {100 * r['wer']:.1f}%" for name, r in res.items()
                                                   if name != "test_in") + f" (mean {100 * sum(ood) / len(ood):.1f}%)"
                   if ood else ""))
    log(f"demo: total {elapsed / 60:.1f} min on {device} (" + ", ".join(
        f"{k} {v / 60:.1f}" for k, v in stages.items()) + " min)")
    if args.compare:
        trained = {s["row"]: s.get("trained") for s in summaries}
        enc_text = (f"encoder `{encoder}` ({'fine-tuned by every system' if args.finetune_encoder else 'frozen, its outputs cached'})"
                    if encoder else "the built-in encoder trained from scratch inside every run")
        setup = (f"{'GPU' if on_gpu else 'CPU'} default config: {steps} steps x {batch} utterances per run "
                 f"(fixed, whatever the machine's speed), lr {args.lr}, warm-up {args.warmup}, {seeds} seed(s) "
                 f"(training seeds {args.seed}..{args.seed + seeds - 1}; data, LM and encoder from seed {args.seed}); "
                 f"data `{data}`, LLM `{lm}` (frozen), {enc_text}; greedy decoding (beams {args.beams}). Rows: "
                 + "; ".join(f"`{r}` = {ROW_TEXT[r]}" + (f" (trains: {', '.join(trained[r])})" if trained.get(r) else "")
                             for r in rows)
                 + (f"; hard-soft: {hard_soft_steps} more steps from the hard run"
                    + (f", tau schedule {args.tau_schedule}" if args.tau_schedule else "")
                    if "hard-soft" in rows else "") + ".")
        meta = {"command": " ".join(["python", "-m", "asr_reference", *args.argv]), "device": device,
                "machine": C.machine(), "load_before": load_before, "minutes": round(elapsed / 60, 1),
                "stage_seconds": stages, "seeds": seeds, "steps": steps, "rows": rows, "setup": setup}
        C.write_compare(results, summaries, meta, Path(args.results), log=log)


def _lm_worker(text, out, kw) -> None:
    import torch

    from asr_reference.lm import pretrain_lm

    torch.set_num_threads(1)
    pretrain_lm(text, out, log=lambda m: print("[lm] " + m, flush=True), **kw)


class _LMJob:
    """LM pretraining in one spawned process (one torch thread); the caller trains the encoder meanwhile
    with the remaining threads. The process exits if the demo is killed."""

    def __init__(self, text, out, kw):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from asr_reference.compare import _exit_with_parent

        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_with_parent, initargs=(os.getpid(),))
        self.future = self.pool.submit(_lm_worker, str(text), str(out), kw)
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    def result(self):
        return self.future.result()

    def shutdown(self):
        import torch

        self.pool.shutdown()
        torch.set_num_threads(self.threads)

