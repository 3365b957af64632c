"""ASR training: AdamW, warm-up + cosine decay, gradient clipping, bf16 autocast on GPU, DDP under torchrun,
atomic checkpoints and an exact ``--resume``.

Run folder layout: ``RUN/config.json`` (model config), ``RUN/checkpoint.pt`` (latest, written to a temp
file and renamed), ``RUN/train_log.jsonl``. Everything the next step depends on (weights, optimiser,
scheduler, step, data order position, every RNG state) is in the checkpoint, so a run killed at any
time and resumed gives the same result as one that never stopped (up to the last checkpoint).
"""

from __future__ import annotations

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

from asr_reference.data import read_manifest, read_wav
from asr_reference.model import ASRConfig, LLMASR, build_model, count_params


# -------------------------------------------------------------------------------------------- data
class AudioSet:
    """Manifest rows with their waveforms loaded once into memory."""

    def __init__(self, manifest: str | Path):
        self.rows = read_manifest(manifest)
        self.audio = []
        for row in self.rows:
            wav, _ = read_wav(row["audio_filepath"])
            self.audio.append(wav)
        self.lens = [a.numel() for a in self.audio]

    def __len__(self):
        return len(self.rows)

    def batch(self, idx: list[int], device="cpu"):
        n = max(self.lens[i] for i in idx)
        wav = torch.zeros(len(idx), n)
        for j, i in enumerate(idx):
            wav[j, : self.lens[i]] = self.audio[i]
        lens = torch.tensor([self.lens[i] for i in idx])
        return wav.to(device), lens.to(device), [self.rows[i]["text"] for i in idx]


def epoch_batches(lens: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches in a deterministic order for (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lens)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s: s + chunk], key=lambda i: lens[i])
        batches += [part[k: k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lens: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    return [order[k: k + batch_size] for k in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    """Write to ``path.tmp`` then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_run(run: str | Path, device: str = "cpu") -> LLMASR:
    """The model of a run folder, ready for decoding."""
    run = Path(run)
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run}: no checkpoint.pt (train first)")
    raw = json.loads((run / "config.json").read_text())
    raw.setdefault("ctc_units", "tokens")  # runs made before character CTC became the default
    cfg = ASRConfig(**raw)
    model = build_model(cfg, device)
    state = torch.load(ckpt, map_location=device, weights_only=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    bad = [k for k in missing if not k.startswith("llm.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model: {bad[:5]}")
    return model.eval()


@dataclass
class TrainArgs:
    train: str
    run: str
    dev: str | None = None
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 60
    clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    time_budget: float | None = None  # seconds: shrink `steps` after calibrating the speed
    stop_after: int | None = None  # stop (with a checkpoint) after this step: simulates a kill
    device: str = "auto"
    quiet: bool = False


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


def train(cfg: ASRConfig, args: TrainArgs, log=print) -> dict:
    """Train (or resume) a run; returns a summary dict. Works alone or under torchrun."""
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
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = ASRConfig(**state["config"])
    elif rank == 0:
        if ckpt_path.is_file():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or use a new --run")
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    data = AudioSet(args.train)
    model = build_model(cfg, device)
    total_p, train_p = count_params(model)
    if rank == 0 and not args.quiet:
        log(f"train: {len(data)} utterances, vq={cfg.vq}, {train_p / 1e6:.2f} M trainable of "
            f"{total_p / 1e6:.2f} M params, device {device}, world {world}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    total_steps = args.steps
    step, epoch, pos = 0, 0, 0
    if state is not None:
        step, epoch, pos, total_steps = state["step"], state["epoch"], state["pos"], state["total_steps"]
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
                                        "pos": pos, "total_steps": total_steps, "rng": rngs,
                                        "config": cfg.to_dict(), "args": args.__dict__})

    logf = open(run / "train_log.jsonl", "a") if rank == 0 else None
    model.train()
    t0 = time.time()
    calibrated = state is not None or args.time_budget is None
    bar = tqdm(total=total_steps, initial=step, desc=f"train[{cfg.vq}]", mininterval=5,
               disable=(rank != 0 or args.quiet) or None)
    last = {}
    batches = epoch_batches(data.lens, args.batch_size * world, epoch, args.seed)
    while step < total_steps:
        batches = epoch_batches(data.lens, args.batch_size * world, epoch, args.seed)
        while pos < len(batches) and step < total_steps:
            idx = batches[pos][rank::world]
            pos += 1
            if not idx:
                continue
            wav, lens, texts = data.batch(idx, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = net(wav, lens, texts)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
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
            if not calibrated and step == 8:
                per_step = (time.time() - t0) / step
                budget_steps = int(args.time_budget / per_step)
                total_steps = max(step + 1, min(total_steps, budget_steps))
                sched.lr_lambdas[0] = lr_lambda(args.warmup, total_steps)
                bar.total = total_steps
                calibrated = True
                if rank == 0 and not args.quiet:
                    log(f"train: {per_step:.2f} s/step -> {total_steps} steps fit the {args.time_budget:.0f} s budget")
            if step % args.save_every == 0 or step == total_steps or step == args.stop_after:
                checkpoint()
            if args.stop_after is not None and step >= args.stop_after:
                break
        if args.stop_after is not None and step >= args.stop_after:
            break
        if pos >= len(batches):
            epoch, pos = epoch + 1, 0
    bar.close()
    if logf:
        logf.close()
    summary = {"run": str(run), "vq": cfg.vq, "steps": step, "epochs": round(epoch + pos / max(1, len(batches)), 2),
               "seconds": round(time.time() - t0, 1), **{("vq_loss" if k == "vq" else k): last.get(k) for k in ("loss", "ce", "ctc", "tctc", "vq", "ppl")}}
    if rank == 0 and not args.quiet:
        log(f"train: done {json.dumps(summary)}")
    return summary
