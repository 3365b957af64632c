"""Command line: ``python -m asr_reference prepare | pretrain-lm | train | eval | demo``.

Quick start (CPU, ~9 minutes measured on 2 cores, everything made locally):

    python -m asr_reference demo                 # data, LM, ASR training, WER in and out of domain
    python -m asr_reference demo --compare       # vq none / hard / soft, table under asr_reference/results/

Pieces, for your own data (16 kHz mono WAV in NeMo-style JSON-lines manifests):

    python -m asr_reference prepare --out data/asr
    python -m asr_reference pretrain-lm --text data/asr/lm_train.txt --out runs/asr/lm
    python -m asr_reference train --train data/asr/train.jsonl --llm runs/asr/lm --run runs/asr/soft --vq soft
    python -m asr_reference eval --run runs/asr/soft --manifest data/asr/test_in.jsonl
    torchrun --nproc_per_node 2 -m asr_reference train ...   # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = ASRConfig()
    p.add_argument("--vq", choices=VQ_MODES, default=d.vq)
    p.add_argument("--enc-dim", type=int, default=d.enc_dim)
    p.add_argument("--enc-layers", type=int, default=d.enc_layers)
    p.add_argument("--stack", type=int, default=d.stack)
    p.add_argument("--distance", choices=("cosine", "l2", "dot"), default=d.distance)
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="soft VQ tau (for l2: a fraction of the mean squared codebook-row norm)")
    p.add_argument("--ctc-weight", type=float, default=d.ctc_weight, help="character CTC on the encoder (0 = off)")
    p.add_argument("--token-ctc-weight", type=float, default=d.token_ctc_weight,
                   help="CTC on the VQ's distribution over LLM tokens (blank = pad token; 0 = off)")
    p.add_argument("--compress", action=argparse.BooleanOptionalAction, default=d.compress,
                   help="CTC-collapse the frames (drop blanks, merge repeats) before the LLM")
    p.add_argument("--commitment-weight", type=float, default=d.commitment_weight)
    p.add_argument("--straight-through", action=argparse.BooleanOptionalAction, default=d.straight_through,
                   help="hard VQ: pass the LLM loss's gradient through the argmax to the encoder")
    p.add_argument("--frozen-codebook", action="store_true", help="keep the VQ codebook = the LLM's table")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = LLM fully frozen")
    p.add_argument("--vq-backend", default=d.vq_backend)
    p.add_argument("--no-specaug", action="store_true")


def config_from(args, llm: str) -> ASRConfig:
    return ASRConfig(llm=str(llm), vq=args.vq, enc_dim=args.enc_dim, enc_layers=args.enc_layers,
                     stack=args.stack, distance=args.distance, temperature=args.temperature, ctc_weight=args.ctc_weight,
                     vq_backend=args.vq_backend, specaug=not args.no_specaug,
                     lora_rank=args.lora_rank, token_ctc_weight=args.token_ctc_weight, compress=args.compress,
                     commitment_weight=args.commitment_weight, learnable_codebook=not args.frozen_codebook,
                     straight_through=args.straight_through)


def cmd_prepare(args) -> None:
    from asr_reference.data import prepare

    prepare(args.out, args.text, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
            log=_log)


def cmd_pretrain_lm(args) -> None:
    from asr_reference.lm import pretrain_lm

    pretrain_lm(args.text, args.out, steps=args.steps, batch_size=args.batch_size, hidden=args.hidden, layers=args.layers,
                vocab_size=args.vocab_size, copy_frac=args.copy_frac, seed=args.seed,
                device=_device(args.device), log=_log)


def cmd_train(args) -> None:
    from asr_reference.train import TrainArgs, train

    cfg = config_from(args, args.llm)
    train(cfg, TrainArgs(train=args.train, run=args.run, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                         resume=args.resume, time_budget=args.time_budget, stop_after=args.stop_after,
                         device=args.device), log=_log)


def cmd_eval(args) -> None:
    from asr_reference.evaluate import evaluate_run

    res = evaluate_run(args.run, args.manifest, num_beams=args.beams, batch_size=args.batch_size,
                       device=args.device, limit=args.limit)
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
    if (lm / "config.json").is_file() and not args.fresh:
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
        if (run / "config.json").is_file() and json.loads((run / "config.json").read_text()) != cfg.to_dict():
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
    ap = argparse.ArgumentParser(prog="python -m asr_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="text splits + espeak-ng speech + manifests")
    p.add_argument("--out", default="data/asr")
    p.add_argument("--text", default=None, help="text file (default: the embedded corpus)")
    p.add_argument("--n-train", type=int, default=DEFAULTS["cpu"]["n_train"])
    p.add_argument("--n-dev", type=int, default=100)
    p.add_argument("--n-test", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("pretrain-lm", help="BPE tokenizer + small Llama-style LM on text")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=DEFAULTS["cpu"]["lm_steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["cpu"]["lm_batch"])
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--copy-frac", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_pretrain_lm)

    p = sub.add_parser("train", help="train the ASR model (also under torchrun)")
    p.add_argument("--train", required=True, help="training manifest")
    p.add_argument("--llm", required=False, default="", help="HF causal-LM folder")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (config, checkpoint, log); under torchrun spell it --run-dir")
    p.add_argument("--steps", type=int, default=DEFAULTS["cpu"]["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["cpu"]["batch_size"], help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; fewer steps if needed")
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step (checkpointed)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="WER/CER of a run on a manifest (JSON line, wer and cer last)")
    p.add_argument("--run", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--beams", type=int, default=1, help="1 = greedy")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("demo", help="everything end to end on the embedded default")
    p.add_argument("--compare", action="store_true", help="train vq none, hard and soft; write the table")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--fresh", action="store_true", help="rebuild data, LM and runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_model_args(p)
    p.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    if args.cmd == "train" and not args.resume and not args.llm:
        ap.error("train: --llm is required (a folder from pretrain-lm or any HF causal LM)")
    args.fn(args)


if __name__ == "__main__":
    main()
