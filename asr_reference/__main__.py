"""Command line: ``python -m asr_reference prepare | pretrain-lm | train | eval | demo``.

Quick start (CPU; each command prints its time estimate first; everything made locally):

    python -m asr_reference demo                 # data, LM, ASR training, WER in and out of domain
    python -m asr_reference demo --compare       # none / hard / soft / plain / soft-no-ctc, table + bootstrap under asr_reference/results/

Pieces, for your own data (NeMo-style JSON-lines manifests; WAV/FLAC at any rate, resampled on load):

    python -m asr_reference prepare --out data/asr
    python -m asr_reference pretrain-lm --text data/asr/lm_train.txt --out runs/asr/lm
    python -m asr_reference train --train data/asr/train.jsonl --llm runs/asr/lm --run runs/asr/soft --vq soft
    python -m asr_reference eval --run runs/asr/soft --manifest data/asr/test_in.jsonl
    python -m asr_reference diagnose --run runs/asr/soft --data data/asr   # where the errors come from
    torchrun --nproc_per_node 2 -m asr_reference train ...   # DDP (gloo on CPU, nccl on GPU)

Bad inputs (manifest lines, audio files, checkpoints, model folders, option values) end the command with
one line ``path[:line]: what is wrong`` and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from asr_reference.errors import ASRError
from asr_reference.model import VQ_MODES, ASRConfig

RESULTS = Path(__file__).with_name("results")

# The embedded default configuration: a fixed number of steps (the results do not depend on the
# machine's speed; the demo prints how long it expects to take). CPU: one seed; GPU: larger, 3 seeds.
DEFAULTS = {
    "cpu": {"n_train": 2400, "lm_steps": 1500, "lm_batch": 32, "steps": 1500, "batch_size": 8, "seeds": 1},
    "cuda": {"n_train": 4800, "lm_steps": 1500, "lm_batch": 64, "steps": 4000, "batch_size": 16, "seeds": 3},
}


def _device(arg: str) -> str:
    import torch

    return arg if arg != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _log(msg: str) -> None:
    print(msg, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit status 2), like every other CLI error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ranged(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: ``kind`` checked against [low, high] (or (low, ...) with low_open) at parse time."""
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    check.__name__ = kind.__name__
    return check


POSITIVE_INT = _ranged(int, 1, what="an integer")
NONNEG_INT = _ranged(int, 0, what="an integer")
POSITIVE = _ranged(float, 0.0, low_open=True, what="a number")
NONNEG = _ranged(float, 0.0, what="a number")
FRACTION = _ranged(float, 0.0, 1.0, what="a number")


def _tau_schedule(text: str) -> str:
    from asr_reference.train import parse_tau_schedule

    try:
        parse_tau_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _prompt_template(text: str) -> str:
    from asr_reference.model import AUDIO_SLOT

    if text.count(AUDIO_SLOT) != 1:
        raise argparse.ArgumentTypeError(f"must contain {AUDIO_SLOT} exactly once, got {text!r}")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model options. Their defaults are None: ``config_from`` fills what was not given from the base
    config (the defaults, or the run's own config on --resume), so a resume sees only explicit changes."""
    d = ASRConfig()
    p.add_argument("--encoder", default=None, metavar="PATH",
                   help="local HF speech-encoder folder (Whisper, wav2vec2, HuBERT, WavLM); default: the "
                        "built-in log-mel + Conformer trained from scratch")
    p.add_argument("--finetune-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the pretrained encoder too (default: frozen)")
    p.add_argument("--vq", choices=VQ_MODES, default=None, help=f"default {d.vq}")
    p.add_argument("--enc-dim", type=POSITIVE_INT, default=None, help=f"built-in encoder width (default {d.enc_dim})")
    p.add_argument("--enc-layers", type=POSITIVE_INT, default=None, help=f"default {d.enc_layers}")
    p.add_argument("--stack", type=NONNEG_INT, default=None,
                   help=f"encoder frames per projector frame (default {d.stack}; with --encoder: 0 = ~80 ms frames)")
    p.add_argument("--distance", choices=("cosine", "l2", "dot"), default=None, help=f"default {d.distance}")
    p.add_argument("--temperature", type=POSITIVE, default=None,
                   help=f"soft VQ tau (for l2: a fraction of the mean squared codebook-row norm; default {d.temperature})")
    p.add_argument("--ctc-weight", type=NONNEG, default=None,
                   help=f"character CTC on the encoder (0 = off; default {d.ctc_weight})")
    p.add_argument("--token-ctc-weight", type=NONNEG, default=None,
                   help=f"CTC on the VQ's distribution over LLM tokens (0 = off; default {d.token_ctc_weight})")
    p.add_argument("--compress", action=argparse.BooleanOptionalAction, default=None,
                   help="CTC-collapse the frames (drop blanks, merge repeats) before the LLM (default on)")
    p.add_argument("--commitment-weight", type=NONNEG, default=None, help=f"default {d.commitment_weight}")
    p.add_argument("--straight-through", action=argparse.BooleanOptionalAction, default=None,
                   help="hard VQ: pass the LLM loss's gradient through the argmax to the encoder")
    p.add_argument("--frozen-codebook", action="store_true", default=None, help="keep the VQ codebook = the LLM's table")
    p.add_argument("--lora-rank", type=NONNEG_INT, default=None, help="0 = LLM fully frozen (default)")
    p.add_argument("--vq-backend", default=None)
    p.add_argument("--no-specaug", action="store_true", default=None)
    p.add_argument("--prompt", type=_prompt_template, default=None,
                   help=f"what the LLM reads around the audio; default {d.prompt!r} (after the bos token)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap --prompt as the user turn of the tokenizer's chat template")


# command-line dest -> ASRConfig field, for the options whose meaning is the field itself
_MODEL_FIELDS = {"encoder": "encoder", "finetune_encoder": "finetune_encoder", "vq": "vq", "enc_dim": "enc_dim",
                 "enc_layers": "enc_layers", "stack": "stack", "distance": "distance", "temperature": "temperature",
                 "ctc_weight": "ctc_weight", "token_ctc_weight": "token_ctc_weight", "compress": "compress",
                 "commitment_weight": "commitment_weight", "straight_through": "straight_through",
                 "lora_rank": "lora_rank", "vq_backend": "vq_backend", "prompt": "prompt",
                 "chat_template": "chat_template"}


def config_from(args, llm, base: ASRConfig | None = None) -> ASRConfig:
    """``base`` (default: the defaults) with every model option given on the command line applied."""
    values = (base or ASRConfig()).to_dict()
    given = {field: getattr(args, dest) for dest, field in _MODEL_FIELDS.items() if getattr(args, dest, None) is not None}
    if getattr(args, "frozen_codebook", None):
        given["learnable_codebook"] = False
    if getattr(args, "no_specaug", None):
        given["specaug"] = False
    if llm:
        given["llm"] = str(llm)
    if given.get("encoder") and base is None and "stack" not in given:
        given["stack"] = 0  # a pretrained encoder: ~80 ms projector frames from its own frame rate
    values.update(given)
    cfg = ASRConfig(**values)
    if not cfg.encoder and cfg.enc_dim % cfg.enc_heads:
        raise ASRError(f"--enc-dim {cfg.enc_dim}: must be a multiple of the {cfg.enc_heads} attention heads")
    if cfg.compress and cfg.token_ctc_weight <= 0:
        raise ASRError("--compress needs --token-ctc-weight > 0 (the blank is learned by the token CTC); "
                       "add --no-compress")
    return cfg


def _condition(text: str):
    from asr_reference.data import parse_condition

    try:
        return parse_condition(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_prepare(args) -> None:
    from asr_reference.data import prepare, render_conditions

    extra = dict(args.ood) if args.ood else None
    if extra and (Path(args.out) / "test_in.jsonl").is_file():
        _log(f"prepare: {args.out} is already prepared; making only the --ood sets from its test sentences")
        render_conditions(args.out, extra, seed=args.seed, log=_log)
        return
    prepare(args.out, args.text, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
            log=_log, extra=extra)


def cmd_pretrain_lm(args) -> None:
    from asr_reference.lm import pretrain_lm

    pretrain_lm(args.text, args.out, steps=args.steps, batch_size=args.batch_size, hidden=args.hidden, layers=args.layers,
                vocab_size=args.vocab_size, copy_frac=args.copy_frac, seed=args.seed,
                device=_device(args.device), log=_log)


def _saved_config(run: Path) -> ASRConfig:
    """The model config of an existing run (its config.json), for --resume."""
    path = run / "config.json"
    if not path.is_file():
        raise ASRError(f"{path}: missing (the run folder is incomplete; start a new --run)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ASRError(f"{path}: not valid JSON ({exc})") from None
    return ASRConfig.from_dict(raw, str(path))


def cmd_train(args) -> None:
    from asr_reference.train import TrainArgs, train

    run = Path(args.run)
    resuming = args.resume and (run / "checkpoint.pt").is_file()
    if not resuming and not args.llm:
        raise ASRError(f"{run}: --llm is required for a new run (a folder from pretrain-lm or any HF causal LM)")
    # on --resume only the options given here change the run's config (and train() refuses any change)
    cfg = config_from(args, args.llm, base=_saved_config(run) if resuming else None)
    steps = args.steps if args.steps is not None or resuming else DEFAULTS["cpu"]["steps"]
    train(cfg, TrainArgs(train=args.train, run=args.run, dev=args.dev, steps=steps, batch_size=args.batch_size,
                         batch_seconds=args.batch_seconds, grad_accum=args.grad_accum, workers=args.workers,
                         lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                         eval_every=args.eval_every, dev_limit=args.dev_limit,
                         resume=args.resume, time_budget=args.time_budget, stop_after=args.stop_after,
                         tau_schedule=args.tau_schedule, init_from=args.init_from, device=args.device), log=_log)


def cmd_eval(args) -> None:
    from asr_reference.data import read_manifest
    from asr_reference.evaluate import evaluate
    from asr_reference.train import load_run

    if args.out and len(args.manifest) > 1:
        raise ASRError(f"--out {args.out}: one file for {len(args.manifest)} manifests; drop --out "
                       f"(each gets RUN/hyp_<manifest>_b<beams>.jsonl)")
    for manifest in args.manifest:  # every manifest is checked before the model loads
        read_manifest(manifest)
    device = _device(args.device)
    overrides = {k: v for k, v in (("llm", args.llm), ("encoder", args.encoder)) if v}
    model = load_run(args.run, device, checkpoint=args.checkpoint, overrides=overrides)
    for manifest in args.manifest:
        name = Path(manifest).stem + ("_best" if args.checkpoint == "best" else "")
        res = evaluate(model, manifest, args.batch_size, args.beams, args.limit,
                       out_file=args.out or Path(args.run) / f"hyp_{name}_b{args.beams}.jsonl", workers=args.workers,
                       max_new_tokens=args.max_new_tokens)
        print(json.dumps(res), flush=True)


def cmd_diagnose(args) -> None:
    from asr_reference.data import read_manifest, test_sets
    from asr_reference.diagnose import diagnose_run, format_table

    if bool(args.data) == bool(args.manifest):
        raise ASRError("diagnose: give either --data DIR (every test set in it) or --manifest M [M ...]")
    if args.data:
        manifests = list(test_sets(args.data).values())
        if not manifests:
            raise ASRError(f"{args.data}: no test manifests (test_in.jsonl, test_ood_*.jsonl)")
    else:
        manifests = args.manifest
    for manifest in manifests:  # every manifest is checked before any model loads
        read_manifest(manifest)
    results = {}
    for run in args.run:
        results[Path(run).name if not args.label else f"{args.label}/{Path(run).name}"] = diagnose_run(
            run, manifests, device=_device(args.device), log=_log, limit=args.limit,
            overrides={"llm": args.llm} if args.llm else None)
    table = format_table(results)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(table)
        _log(f"diagnose: wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def cmd_demo(args) -> None:
    from asr_reference import compare as C
    from asr_reference.data import prepare
    from asr_reference.lm import pretrain_lm

    t0 = time.time()
    load_before = C.load_average()
    device = _device(args.device)
    on_gpu = device.startswith("cuda")
    size = DEFAULTS["cuda" if on_gpu else "cpu"]
    data, runs = Path(args.data), Path(args.runs)
    steps = args.steps or size["steps"]
    seeds = args.seeds or (size["seeds"] if args.compare else 1)
    if args.compare:
        rows = C.resolve_rows(args.rows, args.hard_soft)
    else:
        rows = [args.vq or "soft"]
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
    # the step count is fixed: the machine's speed changes how long this takes, never the result
    plan = (f"{len(rows)} run(s) x {seeds} seed(s), {steps} steps x {size['batch_size']} utterances each"
            + (f" (hard-soft: +{hard_soft_steps} steps)" if "hard-soft" in rows else "")
            + (f", {jobs} in parallel" if jobs > 1 else ""))
    if on_gpu:
        _log(f"demo: {plan} on {device}; no reference timing for GPUs: the measured speed is printed "
             f"after each run's first steps")
    else:
        done = {} if args.fresh or need_prepare else {
            (r, k): C.steps_done(C.run_dir(runs, r, k)) for r in rows for k in range(seeds)}
        est = C.estimate_seconds(rows, steps, seeds, need_prepare, need_lm, hard_soft_steps, jobs, done)
        _log(f"demo: {plan}; expect about {est / 60:.0f} min on an idle 2-core CPU like the one the README's "
             f"numbers come from (more on a slower or busy machine: the step count is fixed, so the results "
             f"are the same, only the time changes; the measured speed is printed after each run's first steps)")
        if args.time_budget and est > 60 * args.time_budget:
            _log(f"demo: WARNING: the estimate is more than the --time-budget of {args.time_budget:g} min "
                 f"(nothing is shortened; use --steps or fewer --rows to make it shorter)")
    if need_prepare:
        if stale_data and stale_data != "missing":
            _log(f"demo: rebuilding {data}: {stale_data}")
            shutil.rmtree(data / "wav", ignore_errors=True)
        prepare(data, args.text, n_train=size["n_train"], seed=args.seed, log=_log)
    else:
        _log(f"demo: reusing prepared data in {data} (--fresh to rebuild)")
    if args.llm:
        _log(f"demo: using the LLM in {lm} (no LM pretraining)")
    elif args.fresh or (stale_lm := C.lm_is_stale(lm, data)) is not None:
        if not args.fresh and stale_lm != "missing":
            _log(f"demo: pretraining the LM again: {stale_lm}")
        pretrain_lm(data / "lm_train.txt", lm, steps=size["lm_steps"], batch_size=size["lm_batch"],
                    seed=args.seed, device=device, log=_log)
        C.mark_lm(lm, data)
    else:
        _log(f"demo: reusing pretrained LM in {lm}")
    if args.fresh:
        for row in rows:
            for k in range(seeds):
                if C.run_dir(runs, row, k).exists():
                    shutil.rmtree(C.run_dir(runs, row, k))
    args.vq = None
    base = config_from(args, lm)
    train_kw = dict(base_cfg=base, runs=runs, data=data, steps=steps, batch_size=size["batch_size"], lr=args.lr,
                    warmup=args.warmup, seed=args.seed, device=device, tau_schedule=args.tau_schedule,
                    hard_soft_steps=hard_soft_steps)
    results, summaries = C.run_all(rows, seeds, jobs=jobs, train_kw=train_kw, beams=args.beams, log=_log)
    elapsed = time.time() - t0
    for row in rows:
        for k, res in enumerate(results[row]):
            ood = [r["wer"] for name, r in res.items() if name != "test_in"]
            _log(f"demo[{row}{f' seed {k}' if seeds > 1 else ''}]: WER in-domain {100 * res['test_in']['wer']:.1f}%"
                 + (" | out-of-domain " + ", ".join(f"{name[9:]} {100 * r['wer']:.1f}%" for name, r in res.items()
                                                    if name != "test_in") + f" (mean {100 * sum(ood) / len(ood):.1f}%)"
                    if ood else ""))
    _log(f"demo: total {elapsed / 60:.1f} min on {device}")
    if args.compare:
        setup = (f"{'GPU' if on_gpu else 'CPU'} default config: {steps} steps x {size['batch_size']} utterances per run "
                 f"(fixed, whatever the machine's speed), lr {args.lr}, warm-up {args.warmup}, {seeds} seed(s) "
                 f"(training seeds {args.seed}..{args.seed + seeds - 1}; data and LM from seed {args.seed}); data "
                 f"`{data}`, LLM `{lm}` (frozen); greedy decoding (beams {args.beams}). Rows: " + "; ".join(
                     f"`{r}` = {ROW_TEXT[r]}" for r in rows)
                 + (f"; hard-soft: {hard_soft_steps} more steps from the hard run"
                    + (f", tau schedule {args.tau_schedule}" if args.tau_schedule else "")
                    if "hard-soft" in rows else "") + ".")
        meta = {"command": " ".join(["python", "-m", "asr_reference", *args.argv]), "device": device, "machine": C.machine(), "load_before": load_before,
                "minutes": round(elapsed / 60, 1), "seeds": seeds, "steps": steps, "rows": rows, "setup": setup}
        C.write_compare(results, summaries, meta, Path(args.results), log=_log)


ROW_TEXT = {
    "none": "token CTC + collapse, the LLM reads the continuous frames",
    "hard": "token CTC + collapse, the LLM reads the argmax code (constant)",
    "soft": "token CTC + collapse, the LLM reads the soft mixture of codebook rows",
    "plain": "standard LLM-ASR (SLAM-ASR style): projector frames straight into the LLM, next-token loss only",
    "soft-no-ctc": "plain + soft VQ (next-token and commitment losses only, no collapse)",
    "hard-soft": "the hard run continued as soft VQ",
}


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap = Parser(prog="python -m asr_reference", description=__doc__, parents=[common],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, parents=[common])

    p = command("prepare", "text splits + espeak-ng speech + manifests")
    p.add_argument("--out", default="data/asr")
    p.add_argument("--text", default=None, help="text file (default: the embedded corpus)")
    p.add_argument("--n-train", type=POSITIVE_INT, default=DEFAULTS["cpu"]["n_train"])
    p.add_argument("--n-dev", type=POSITIVE_INT, default=100)
    p.add_argument("--n-test", type=POSITIVE_INT, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ood", nargs="+", type=_condition, default=None, metavar="NAME=VOICES[:opt=value...]",
                   help="extra out-of-domain test sets of the test sentences, e.g. 'phone=en-us+m3,en-us+f2:sox=telephone' "
                        "'echo=en-us+f2:sox=reverb' 'fast=en-us+m3:rate=260' 'speed=en-us+f2:sox=speed 1.2' "
                        "'loud=en-us+m3:snr=0' (options rate=WPM, pitch=0..99, snr=DB, sox=telephone|reverb|fast|slow|"
                        "any sox effect chain, joined with +); on an already prepared --out only these sets are made")
    p.set_defaults(fn=cmd_prepare)

    p = command("pretrain-lm", "BPE tokenizer + small Llama-style LM on text")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=POSITIVE_INT, default=DEFAULTS["cpu"]["lm_steps"])
    p.add_argument("--batch-size", type=POSITIVE_INT, default=DEFAULTS["cpu"]["lm_batch"])
    p.add_argument("--hidden", type=POSITIVE_INT, default=192)
    p.add_argument("--layers", type=POSITIVE_INT, default=3)
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=512)
    p.add_argument("--copy-frac", type=FRACTION, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_pretrain_lm)

    p = command("train", "train the ASR model (also under torchrun)")
    p.add_argument("--train", required=True, help="training manifest")
    p.add_argument("--dev", default=None, help="dev manifest: WER every --eval-every steps, best.pt = best WER")
    p.add_argument("--llm", required=False, default="", help="HF causal-LM folder (not needed on --resume)")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (config, checkpoint, log); under torchrun spell it --run-dir")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help=f"optimiser steps (default {DEFAULTS['cpu']['steps']}; on --resume: the run's own, "
                        f"a different value extends or shortens it)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=DEFAULTS["cpu"]["batch_size"],
                   help="utterances per process and micro-batch")
    p.add_argument("--batch-seconds", type=POSITIVE, default=None,
                   help="instead of --batch-size: padded seconds of audio per process and micro-batch")
    p.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimiser step")
    p.add_argument("--workers", type=NONNEG_INT, default=0, help="DataLoader worker processes")
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=NONNEG_INT, default=50)
    p.add_argument("--save-every", type=POSITIVE_INT, default=100)
    p.add_argument("--eval-every", type=POSITIVE_INT, default=500, help="steps between dev evaluations")
    p.add_argument("--dev-limit", type=POSITIVE_INT, default=None, help="decode only the first N dev utterances")
    p.add_argument("--time-budget", type=POSITIVE, default=None,
                   help="seconds: warn when the measured ETA exceeds it (the step count never changes)")
    p.add_argument("--tau-schedule", type=_tau_schedule, default=None, metavar="START:END",
                   help="anneal the VQ temperature geometrically from START to END over the run (overrides a learned one)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start a new run from another run's weights, e.g. a hard-VQ run continued with --vq soft")
    p.add_argument("--stop-after", type=POSITIVE_INT, default=None, help="stop at this step (checkpointed)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_train)

    p = command("eval", "WER/CER of a run on a manifest (JSON line, wer and cer last)")
    p.add_argument("--run", required=True)
    p.add_argument("--manifest", required=True, nargs="+", help="one or more manifests (one JSON line each)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="best = best.pt, kept by dev WER during training")
    p.add_argument("--llm", default=None, help="the run's LLM from another folder (e.g. moved)")
    p.add_argument("--encoder", default=None, help="the run's pretrained encoder from another folder")
    p.add_argument("--beams", type=POSITIVE_INT, default=1, help="1 = greedy")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None,
                   help="decoding budget (default: from each batch's audio length, at least 48)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None)
    p.add_argument("--workers", type=NONNEG_INT, default=0)
    p.add_argument("--out", default=None, help="per-utterance hypotheses JSONL (default RUN/hyp_<manifest>_b<beams>.jsonl)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_eval)

    p = command("report", "write compare.md/.png again from compare.json (same runs, current analysis)")
    p.add_argument("--results", default=str(RESULTS), help="folder with compare.json")
    p.set_defaults(fn=lambda a: __import__("asr_reference.compare", fromlist=["rerender"]).rerender(Path(a.results), log=_log))

    p = command("diagnose", "where a run's errors come from: encoder CTC, VQ token CTC and LLM WER per test set")
    p.add_argument("--run", required=True, nargs="+", help="one or more run folders")
    p.add_argument("--data", default=None, help="a prepared folder: every test set in it")
    p.add_argument("--manifest", nargs="+", default=None, help="or these manifests")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N utterances of each set")
    p.add_argument("--out", default=None, help="write OUT.md (the table) and OUT.json")
    p.add_argument("--llm", default=None, help="the runs' LLM from another folder (e.g. moved)")
    p.add_argument("--label", default=None, help="prefix for the run names in the table (e.g. the training data)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_diagnose)

    p = command("demo", "everything end to end on the embedded default")
    p.add_argument("--compare", action="store_true",
                   help="train every row (soft, plain, none, hard, soft-no-ctc); write the table with bootstrap intervals")
    p.add_argument("--rows", nargs="+", choices=("none", "hard", "soft", "plain", "soft-no-ctc", "hard-soft"), default=None,
                   help="--compare: these rows only (default soft plain none hard soft-no-ctc)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=None,
                   help="--compare: training seeds per row, mean ± std per cell (default 1 on CPU, 3 on GPU)")
    p.add_argument("--hard-soft", action="store_true",
                   help="--compare: add the hard-soft row (the hard run continued as soft VQ)")
    p.add_argument("--hard-soft-steps", type=POSITIVE_INT, default=None, help="its extra steps (default steps/4)")
    p.add_argument("--tau-schedule", type=_tau_schedule, default=None, metavar="START:END",
                   help="hard-soft row: anneal the temperature from START to END")
    p.add_argument("--jobs", type=POSITIVE_INT, default=None,
                   help="runs trained in parallel (default on a CPU: one more than its cores, 1 torch thread each; 1 on a GPU)")
    p.add_argument("--time-budget", type=POSITIVE, default=None,
                   help="minutes: warn when the estimate exceeds it (nothing is shortened)")
    p.add_argument("--llm", default=None, help="an HF causal-LM folder instead of pretraining the small LM")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help=f"steps per run (default {DEFAULTS['cpu']['steps']} on CPU, {DEFAULTS['cuda']['steps']} on GPU; fixed)")
    p.add_argument("--beams", type=POSITIVE_INT, default=1)
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=NONNEG_INT, default=50)
    p.add_argument("--fresh", action="store_true", help="rebuild data, LM and runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars per model would bury the log
    except ImportError:
        pass
    try:
        args.fn(args)
    except ASRError as exc:
        if args.debug:
            raise
        # one line naming the file (and line); the exit status says "bad input", as argparse's does
        print(exc, file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
