"""``train``: one ASR run (also under torchrun)."""

from __future__ import annotations

from pathlib import Path

from asr_reference.cli import common
from asr_reference.cli.common import DEFAULTS, NONNEG_INT, POSITIVE, POSITIVE_INT
from asr_reference.errors import ASRError

HELP = "train the ASR model (also under torchrun)"


def add_arguments(p) -> None:
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
    p.add_argument("--tau-schedule", type=common.tau_schedule, default=None, metavar="START:END",
                   help="anneal the VQ temperature geometrically from START to END over the run (overrides a learned one)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start a new run from another run's weights, e.g. a hard-VQ run continued with --vq soft")
    p.add_argument("--stop-after", type=POSITIVE_INT, default=None, help="stop at this step (checkpointed)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="with a frozen encoder: run it every step instead of caching its outputs once")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    common.add_model_args(p)


def run(args) -> None:
    from asr_reference.train import TrainArgs, train

    run_dir = Path(args.run)
    resuming = args.resume and (run_dir / "checkpoint.pt").is_file()
    if not resuming and not args.llm:
        raise ASRError(f"{run_dir}: --llm is required for a new run (a folder from pretrain-lm or any HF causal LM)")
    # on --resume only the options given here change the run's config (and train() refuses any change)
    cfg = common.config_from(args, args.llm, base=common.saved_config(run_dir) if resuming else None)
    steps = args.steps if args.steps is not None or resuming else DEFAULTS["cpu"]["steps"]
    train(cfg, TrainArgs(train=args.train, run=args.run, dev=args.dev, steps=steps, batch_size=args.batch_size,
                         batch_seconds=args.batch_seconds, grad_accum=args.grad_accum, workers=args.workers,
                         lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                         eval_every=args.eval_every, dev_limit=args.dev_limit,
                         resume=args.resume, time_budget=args.time_budget, stop_after=args.stop_after,
                         tau_schedule=args.tau_schedule, init_from=args.init_from, device=args.device,
                         feature_cache=not args.no_feature_cache), log=common.log)
