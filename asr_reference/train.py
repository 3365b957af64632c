"""ASR training: AdamW, warm-up + cosine decay, gradient clipping, bf16 autocast on GPU, DDP under torchrun,
atomic checkpoints and an exact ``--resume``.

Run folder layout: ``RUN/config.json`` (model config), ``RUN/checkpoint.pt`` (latest, written to a temp
file and renamed), ``RUN/train_log.jsonl``. Everything the next step depends on (weights, optimiser,
scheduler, step, data order position, every RNG state) is in the checkpoint, so a run killed at any
time and resumed gives the same result as one that never stopped (up to the last checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from asr_reference.data import read_manifest
from asr_reference.dataset import (AudioDataset, AudioSet, epoch_batches, make_loader,  # noqa: F401 (AudioSet:
                                   seconds_batches, sorted_batches)  # the names earlier code imported from here)
from asr_reference.checkpoints import (config_diff, load_run, read_checkpoint,  # noqa: F401 (load_run:
                                       save_checkpoint)  # imported from here by earlier code)
from asr_reference.errors import ASRError, CheckpointError
from asr_reference.evaluate import evaluate
from asr_reference.model import ASRConfig, build_model, count_params


class RunExistsError(ASRError, FileExistsError):
    """A new run was asked for in a folder that already has a checkpoint."""



@dataclass
class TrainArgs:
    train: str
    run: str
    dev: str | None = None  # dev manifest: WER every eval_every steps, best.pt keeps the best
    steps: int | None = 1000  # None on resume: the steps the run was asked for
    batch_size: int = 16  # utterances per process and micro-batch (when batch_seconds is None)
    batch_seconds: float | None = None  # else: padded seconds of audio per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 60
    clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    eval_every: int = 500
    dev_limit: int | None = None  # decode only the first N dev utterances
    resume: bool = False
    # seconds: after the first steps, log the measured ETA and warn when it exceeds this; the step count
    # never changes (results must not depend on the machine's speed)
    time_budget: float | None = None
    # "START:END": set the VQ temperature each step, geometrically from START to END over the run
    # (overrides a learnable temperature); None = the model's own (learned or fixed) temperature
    tau_schedule: str | None = None
    # a run folder whose trained weights (checkpoint.pt) start this new run, e.g. hard VQ -> soft VQ
    init_from: str | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step: simulates a kill
    # a frozen pretrained encoder: compute its outputs once (asr_reference.feature_cache) instead of every step
    feature_cache: bool = True
    device: str = "auto"
    quiet: bool = False
    # False: no tqdm bar (several runs in parallel share one terminal; their caller shows one bar)
    progress_bar: bool = True

    def __post_init__(self):
        # the CLI checks these at parse time; this catches the same mistakes from Python
        for name in ("steps", "batch_size", "grad_accum", "save_every", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_seconds is not None and self.batch_seconds <= 0:
            raise ValueError(f"batch_seconds must be > 0, got {self.batch_seconds}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.tau_schedule is not None:
            parse_tau_schedule(self.tau_schedule)


def parse_tau_schedule(text: str) -> tuple[float, float]:
    """"START:END" -> (start, end), both > 0."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"tau schedule must be START:END (two positive numbers), got {text!r}") from None
    if not (start > 0 and end > 0):
        raise ValueError(f"tau schedule values must be > 0, got {text!r}")
    return start, end


def tau_at(schedule: tuple[float, float], step: int, total: int) -> float:
    """Geometric interpolation: START at step 0, END at the last step."""
    start, end = schedule
    frac = min(1.0, step / max(1, total - 1))
    return start * (end / start) ** frac


def _dist_info():
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _resume_state(ckpt_path: Path, cfg: ASRConfig) -> dict:
    """The checkpoint to resume, refusing a model config that differs from the one it was trained with."""
    state = read_checkpoint(ckpt_path)
    saved = ASRConfig.from_dict(state["config"], str(ckpt_path)).to_dict()
    diff = config_diff(saved, cfg.to_dict())
    if diff:
        raise CheckpointError(f"{ckpt_path}: --resume with a different model config ({'; '.join(diff)}); "
                              f"drop those options or start a new --run")
    return state


def train(cfg: ASRConfig, args: TrainArgs, log=print) -> dict:
    """Train (or resume) a run; returns a summary dict. Works alone or under torchrun.

    On ``resume`` ``cfg`` must equal the run's config. ``args.steps`` different from the steps the run
    was asked for last time re-targets the schedule (a finished 6-step run resumed with steps=10 trains
    4 more steps); the same value continues exactly where the run stopped.
    """
    rank, world = _dist_info()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    run = Path(args.run)
    ckpt_path = run / "checkpoint.pt"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    state = None
    if args.resume and ckpt_path.is_file():
        state = _resume_state(ckpt_path, cfg)
    elif rank == 0:
        if ckpt_path.is_file():
            raise RunExistsError(f"{ckpt_path} exists: pass --resume to continue it, or use a new --run")
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    # the manifests first: a bad line fails in seconds, not after loading an LLM
    train_rows = read_manifest(args.train)
    dev_rows = read_manifest(args.dev) if args.dev and rank == 0 else None
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    model = build_model(cfg, device)
    data = AudioDataset(args.train, sample_rate=model.sample_rate, max_seconds=model.max_seconds, rows=train_rows)
    dev = None
    if dev_rows is not None:
        dev = AudioDataset(args.dev, sample_rate=model.sample_rate, max_seconds=model.max_seconds, rows=dev_rows)
    if args.init_from and state is None:
        init_ckpt = Path(args.init_from) / "checkpoint.pt"
        init = read_checkpoint(init_ckpt, map_location=device)
        missing, unexpected = model.load_state_dict(init["model"], strict=False)
        bad = [k for k in missing if not k.startswith(model.frozen_prefixes())] + list(unexpected)
        if bad:
            raise CheckpointError(f"{init_ckpt}: --init-from weights do not match this model: {bad[:5]}")
        if rank == 0 and not args.quiet:
            log(f"train: initialised from {init_ckpt} (vq={init['config'].get('vq')}, step {init.get('step')})")
    schedule = parse_tau_schedule(args.tau_schedule) if args.tau_schedule else None
    if schedule and model.vq is None:
        raise ValueError("tau_schedule needs a VQ (vq soft/hard or a token CTC)")
    total_p, train_p = count_params(model)
    if rank == 0 and not args.quiet:
        log(f"train: {len(data)} utterances ({sum(data.seconds) / 3600:.2f} h), vq={cfg.vq}, "
            f"encoder {cfg.encoder or 'built-in'}, trains {', '.join(model.trained_parts())}: {train_p / 1e6:.2f} M trainable of "
            f"{total_p / 1e6:.2f} M params, device {device}, world {world}")
        if data.skipped:
            log(f"train: skipped {data.skipped} utterances longer than the encoder's {model.max_seconds:.0f} s window")
    if not len(data):
        raise ValueError(f"{args.train}: no utterance fits the encoder's {model.max_seconds} s window")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    total_steps = args.steps
    if state is None and args.steps is None:
        raise ValueError("steps is needed for a new run")
    step, epoch, pos, best_wer = 0, 0, 0, None
    if state is not None:
        step, epoch, pos, total_steps = state["step"], state["epoch"], state["pos"], state["total_steps"]
        best_wer = state.get("best_dev_wer")
        requested = state.get("requested_steps", state.get("args", {}).get("steps", total_steps))
        if args.steps is None:
            args.steps = requested
        if args.steps != requested:
            total_steps = args.steps
            if rank == 0 and not args.quiet:
                log(f"train: resuming at step {step} with --steps {args.steps} (was {requested}): "
                    + ("nothing to do" if step >= total_steps else f"{total_steps - step} more steps, "
                       f"learning-rate schedule re-targeted"))
    # the scheduler first: creating it rewrites the optimiser's lr, which the loaded state then restores
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, total_steps))
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    use_bf16 = device.startswith("cuda")

    def checkpoint():
        rngs = _rng_state()
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.trainable_state(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                                        "pos": pos, "total_steps": total_steps, "requested_steps": args.steps,
                                        "best_dev_wer": best_wer, "rng": rngs,
                                        "config": cfg.to_dict(), "args": args.__dict__})

    def dev_eval():
        """Dev WER on rank 0 (others wait); best.pt keeps the weights of the best one so far."""
        nonlocal best_wer
        if rank == 0:
            rngs = _rng_state()  # decoding must not move the training's random stream
            res = evaluate(model, dev, batch_size=max(1, args.batch_size), limit=args.dev_limit, workers=args.workers,
                           out_file=run / "hyp_dev_last.jsonl")
            _set_rng_state(rngs)
            model.train()
            better = best_wer is None or res["wer"] < best_wer
            if better:
                best_wer = res["wer"]
                save_checkpoint(run / "best.pt", {"model": model.trainable_state(), "config": cfg.to_dict(),
                                                  "step": step, "dev_wer": res["wer"], "dev_cer": res["cer"]})
            if logf:
                logf.write(json.dumps({"step": step, "dev_wer": res["wer"], "dev_cer": res["cer"]}) + "\n")
                logf.flush()
            if not args.quiet:
                tqdm.write(f"train: step {step} dev WER {100 * res['wer']:.1f}% CER {100 * res['cer']:.1f}%"
                           + (" (best)" if better else f" (best {100 * best_wer:.1f}%)"))
        if world > 1:
            dist.barrier()

    def plan(ep: int) -> list[list[int]]:
        if args.batch_seconds is not None:
            return seconds_batches(data.seconds, args.batch_seconds * world, ep, args.seed)
        return epoch_batches(data.lens, args.batch_size * world, ep, args.seed)

    n_batches = len(plan(epoch))

    cached = None
    if args.feature_cache and not model.encoder_trainable():
        from asr_reference.feature_cache import cache_file, encoder_frames

        path = cache_file(model, args.train, run)
        if rank == 0:  # one process computes and writes the cache; the others read it
            cached = encoder_frames(model, data, path, log=log if not args.quiet else (lambda m: None))
        if world > 1:
            dist.barrier()
            if rank > 0:
                cached = encoder_frames(model, data, path, log=lambda m: None)

    def micro_batches():
        """(wav, lengths, texts, encoded) of this rank, endlessly over epochs; (epoch, pos) name the next
        one. With a frozen encoder's cache: wav and lengths are None and ``encoded`` holds its frames."""
        nonlocal epoch, pos, n_batches
        while True:
            batches = plan(epoch)
            n_batches = len(batches)
            shares = [b[rank::world] for b in batches[pos:]]
            if cached is not None:
                from asr_reference.feature_cache import padded

                for idx in shares:
                    pos += 1
                    if idx:
                        yield None, None, [data.rows[i]["text"] for i in idx], padded(cached, idx, device)
            else:
                for wav, lens, texts in make_loader(data, shares, args.workers):
                    pos += 1
                    if texts:  # a rank's share of a tiny last batch may be empty
                        yield wav.to(device), lens.to(device), texts, None
            epoch, pos = epoch + 1, 0

    logf = open(run / "train_log.jsonl", "a") if rank == 0 else None
    model.train()
    t0 = time.time()
    calibrated = False
    start_step = step
    # the speed is measured over 8 steps after the first 2 (whose one-off start-up costs, a minute on a
    # busy CPU, would make the ETA far too long); a shorter run measures what it has, so it always reports
    warm_at = start_step + (2 if total_steps - start_step > 4 else 0)
    calibrate_at = min(warm_at + 8, max(start_step + 1, total_steps - 1))
    t_warm = t0
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc=f"train[{cfg.vq}]", mininterval=5,
               disable=(rank != 0 or args.quiet or not args.progress_bar) or None)
    last = {}
    stream = micro_batches()
    while step < total_steps and (args.stop_after is None or step < args.stop_after):
        opt.zero_grad(set_to_none=True)
        if schedule:
            model.vq.temperature = tau_at(schedule, step, total_steps)
        for micro in range(args.grad_accum):
            wav, lens, texts, encoded = next(stream)
            # DDP: all-reduce the gradients once, on the last micro-batch
            sync = contextlib.nullcontext() if world == 1 or micro == args.grad_accum - 1 else net.no_sync()
            with sync:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    out = net(wav, lens, texts, encoded)
                (out["loss"] / args.grad_accum if args.grad_accum > 1 else out["loss"]).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        sched.step()
        step += 1
        last = {k: round(float(v.detach()), 4) for k, v in out.items()}
        last.update(step=step, lr=round(sched.get_last_lr()[0], 6), gnorm=round(float(gnorm), 3),
                    t=round(time.time() - t0, 1))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=last["loss"], ce=last["ce"])
            if logf:
                logf.write(json.dumps(last) + "\n")
                logf.flush()
        if step == warm_at:
            t_warm = time.time()
        if not calibrated and step == calibrate_at:
            calibrated = True
            per_step = (time.time() - t_warm) / max(1, step - warm_at)
            eta = per_step * (total_steps - step)
            if rank == 0 and not args.quiet:
                msg = (f"train[{cfg.vq}]: {per_step:.2f} s/step measured -> {total_steps - step} more steps take "
                       f"about {eta / 60:.1f} min (the step count is fixed; a slower machine only takes longer)")
                if args.time_budget is not None and eta > args.time_budget:
                    msg += f"; WARNING: more than the {args.time_budget:.0f} s time budget"
                log(msg)
        if args.dev and (step % args.eval_every == 0 or step == total_steps):
            dev_eval()
        if step % args.save_every == 0 or step == total_steps or step == args.stop_after:
            checkpoint()
    bar.close()
    if logf:
        logf.close()
    summary = {"run": str(run), "vq": cfg.vq, "trained": model.trained_parts(), "steps": step, "trained_steps": step - start_step, "epochs": round(epoch + pos / max(1, n_batches), 2),
               "seconds": round(time.time() - t0, 1),
               **{("vq_loss" if k == "vq" else k): last.get(k) for k in ("loss", "ce", "ctc", "tctc", "vq", "ppl")}}
    if best_wer is not None:
        summary["best_dev_wer"] = best_wer
    if rank == 0 and not args.quiet:
        log(f"train: done {json.dumps(summary)}")
    return summary
