"""``eval``: WER/CER of a run on one or more manifests (one JSON line each)."""

from __future__ import annotations

import json
from pathlib import Path

from asr_reference.cli import common
from asr_reference.cli.common import NONNEG_INT, POSITIVE_INT
from asr_reference.errors import ASRError

HELP = "WER/CER of a run on a manifest (JSON line, wer and cer last)"


def add_arguments(p) -> None:
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


def run(args) -> None:
    from asr_reference.checkpoints import load_run
    from asr_reference.data import read_manifest
    from asr_reference.evaluate import evaluate

    if args.out and len(args.manifest) > 1:
        raise ASRError(f"--out {args.out}: one file for {len(args.manifest)} manifests; drop --out "
                       f"(each gets RUN/hyp_<manifest>_b<beams>.jsonl)")
    for manifest in args.manifest:  # every manifest is checked before the model loads
        read_manifest(manifest)
    overrides = {k: v for k, v in (("llm", args.llm), ("encoder", args.encoder)) if v}
    model = load_run(args.run, common.device(args.device), checkpoint=args.checkpoint, overrides=overrides)
    for manifest in args.manifest:
        name = Path(manifest).stem + ("_best" if args.checkpoint == "best" else "")
        res = evaluate(model, manifest, args.batch_size, args.beams, args.limit,
                       out_file=args.out or Path(args.run) / f"hyp_{name}_b{args.beams}.jsonl", workers=args.workers,
                       max_new_tokens=args.max_new_tokens)
        print(json.dumps(res), flush=True)
