"""Command line: ``python -m asr_reference prepare | pretrain-lm | train | eval | demo``.

Quick start (CPU, ~9 minutes measured on 2 cores, everything made locally):

    python -m asr_reference demo                 # data, LM, ASR training, WER in and out of domain
    python -m asr_reference demo --compare       # vq none / hard / soft, table under asr_reference/results/

Pieces, for your own data (NeMo-style JSON-lines manifests; WAV/FLAC at any rate, resampled on load):

    python -m asr_reference prepare --out data/asr
    python -m asr_reference pretrain-lm --text data/asr/lm_train.txt --out runs/asr/lm
    python -m asr_reference train --train data/asr/train.jsonl --llm runs/asr/lm --run runs/asr/soft --vq soft
    python -m asr_reference eval --run runs/asr/soft --manifest data/asr/test_in.jsonl
    torchrun --nproc_per_node 2 -m asr_reference train ...   # DDP (gloo on CPU, nccl on GPU)

Bad inputs (manifest lines, audio files, checkpoints, model folders, option values) end the command with
one line ``path[:line]: what is wrong`` and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from asr_reference.errors import ASRError
from asr_reference.model import VQ_MODES, ASRConfig

RESULTS = Path(__file__).with_name("results")

# The embedded default configuration. CPU: sized for the 20-minute budget on a 2-core machine.
DEFAULTS = {
    "cpu": {"n_train": 2400, "lm_steps": 1500, "lm_batch": 32, "steps": 2000, "batch_size": 8, "train_budget": 570},
    "cuda": {"n_train": 4800, "lm_steps": 1500, "lm_batch": 64, "steps": 4000, "batch_size": 16, "train_budget": 1800},
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


def cmd_prepare(args) -> None:
    from asr_reference.data import prepare

    prepare(args.out, args.text, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
            log=_log)


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
                         device=args.device), log=_log)


def cmd_eval(args) -> None:
    from asr_reference.evaluate import evaluate_run

    overrides = {k: v for k, v in (("llm", args.llm), ("encoder", args.encoder)) if v}
    res = evaluate_run(args.run, args.manifest, num_beams=args.beams, batch_size=args.batch_size,
                       device=args.device, limit=args.limit, checkpoint=args.checkpoint, overrides=overrides,
                       workers=args.workers, max_new_tokens=args.max_new_tokens, out_file=args.out)
    print(json.dumps(res), flush=True)


def _eval_all(run: Path, data: Path, beams: int, device: str) -> dict:
    from asr_reference.data import test_sets
    from asr_reference.evaluate import evaluate
    from asr_reference.train import load_run

    model = load_run(run, device)
    out = {}
    for name, manifest in test_sets(data).items():
        res = evaluate(model, manifest, num_beams=beams, out_file=run / f"hyp_{name}_b{beams}.jsonl")
        out[name] = res
        _log(f"eval[{model.cfg.vq}] {name}: WER {100 * res['wer']:.1f}%  CER {100 * res['cer']:.1f}%  "
             f"({res['n']} utts, {res['seconds']} s)")
    return out


def cmd_demo(args) -> None:
    from asr_reference.data import prepare
    from asr_reference.lm import pretrain_lm
    from asr_reference.train import TrainArgs, train

    t0 = time.time()
    device = _device(args.device)
    size = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    data, runs = Path(args.data), Path(args.runs)
    steps = args.steps or size["steps"]
    if (data / "test_ood_noise.jsonl").is_file() and not args.fresh:
        _log(f"demo: reusing prepared data in {data} (--fresh to rebuild)")
    else:
        prepare(data, args.text, n_train=size["n_train"], seed=args.seed, log=_log)
    lm = runs / "lm"
    if args.llm:
        lm = Path(args.llm)
        _log(f"demo: using the LLM in {lm} (no LM pretraining)")
    elif (lm / "config.json").is_file() and not args.fresh:
        _log(f"demo: reusing pretrained LM in {lm}")
    else:
        pretrain_lm(data / "lm_train.txt", lm, steps=size["lm_steps"], batch_size=size["lm_batch"],
                    seed=args.seed, device=device, log=_log)
    # soft first: the first run trained may be shortened by the time budget, the others then use
    # the same number of steps so the comparison stays fair
    modes = ["soft", "hard", "none"] if args.compare else [args.vq]
    results, summaries = {}, {}
    for mode in modes:
        run = runs / f"vq_{mode}"
        if args.fresh and run.exists():
            import shutil

            shutil.rmtree(run)
        args.vq = mode
        cfg = config_from(args, lm)
        if (run / "config.json").is_file() and _saved_config(run).to_dict() != cfg.to_dict():
            import shutil

            _log(f"demo: {run} was made with another configuration; starting it again")
            shutil.rmtree(run)
        resume = (run / "checkpoint.pt").is_file()
        first = not summaries
        summaries[mode] = train(cfg, TrainArgs(train=str(data / "train.jsonl"), run=str(run), steps=steps,
                                               batch_size=size["batch_size"], lr=args.lr, warmup=args.warmup,
                                               seed=args.seed, resume=resume,
                                               time_budget=size["train_budget"] if first else None,
                                               device=device), log=_log)
        steps = summaries[mode]["steps"]
        results[mode] = _eval_all(run, data, args.beams, device)
    elapsed = time.time() - t0
    for mode in modes:
        ind = results[mode]["test_in"]["wer"]
        ood = [r["wer"] for k, r in results[mode].items() if k != "test_in"]
        _log(f"demo[{mode}]: WER in-domain {100 * ind:.1f}% | out-of-domain "
             + ", ".join(f"{k[9:]} {100 * r['wer']:.1f}%" for k, r in results[mode].items() if k != "test_in")
             + f" (mean {100 * sum(ood) / len(ood):.1f}%)")
    _log(f"demo: total {elapsed / 60:.1f} min on {device}")
    if args.compare:
        write_compare(results, summaries, elapsed, device, " ".join(["python", "-m", "asr_reference", *sys.argv[1:]]),
                      Path(args.results))


def write_compare(results: dict, summaries: dict, elapsed: float, device: str, command: str, out: Path) -> None:
    """JSON + markdown + bar plot of WER per mode per test set."""
    import platform

    out.mkdir(parents=True, exist_ok=True)
    sets = list(next(iter(results.values())).keys())
    payload = {"command": command, "device": device, "platform": platform.platform(),
               "minutes": round(elapsed / 60, 1), "train": summaries, "results": results}
    (out / "compare.json").write_text(json.dumps(payload, indent=1))
    lines = ["# LLM-ASR: WER (%) by VQ mode and test set", "",
             f"Command: `{command}` ({device}, {elapsed / 60:.1f} min in all).", "",
             "| vq | " + " | ".join(sets) + " | mean OOD |", "|---|" + "---:|" * (len(sets) + 1)]
    for mode, res in results.items():
        ood = [res[s]["wer"] for s in sets if s != "test_in"]
        lines.append(f"| {mode} | " + " | ".join(f"{100 * res[s]['wer']:.1f}" for s in sets)
                     + f" | {100 * sum(ood) / len(ood):.1f} |")
    lines += ["", "CER (%):", "", "| vq | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for mode, res in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{100 * res[s]['cer']:.1f}" for s in sets) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        w = 0.8 / len(results)
        for k, (mode, res) in enumerate(results.items()):
            ax.bar([i + k * w for i in range(len(sets))], [100 * res[s]["wer"] for s in sets], w, label=f"vq={mode}")
        ax.set_xticks([i + w * (len(results) - 1) / 2 for i in range(len(sets))], sets)
        ax.set_ylabel("WER (%)")
        ax.set_title("LLM-ASR on espeak-ng speech: WER by VQ mode")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=120)
    except ImportError:
        _log("demo: matplotlib missing, no plot")
    _log(f"demo: wrote {out / 'compare.md'}, compare.json, compare.png")


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
    p.add_argument("--time-budget", type=POSITIVE, default=None, help="seconds; fewer steps if needed")
    p.add_argument("--stop-after", type=POSITIVE_INT, default=None, help="stop at this step (checkpointed)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_train)

    p = command("eval", "WER/CER of a run on a manifest (JSON line, wer and cer last)")
    p.add_argument("--run", required=True)
    p.add_argument("--manifest", required=True)
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

    p = command("demo", "everything end to end on the embedded default")
    p.add_argument("--compare", action="store_true", help="train vq none, hard and soft; write the table")
    p.add_argument("--llm", default=None, help="an HF causal-LM folder instead of pretraining the small LM")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=POSITIVE_INT, default=None)
    p.add_argument("--beams", type=POSITIVE_INT, default=1)
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=NONNEG_INT, default=50)
    p.add_argument("--fresh", action="store_true", help="rebuild data, LM and runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
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
