"""Command line: ``python -m asr_reference prepare | pretrain-lm | pretrain-encoder | train | eval | diagnose | demo | report``.

Quick start (CPU; each command prints its time estimate first; everything made locally):

    python -m asr_reference demo                 # data, LM, encoder, one system's training, WER in and out of domain
    python -m asr_reference demo --compare       # soft / plain / none / hard / soft-no-ctc, table + bootstrap under asr_reference/results/

Pieces, for your own data (NeMo-style JSON-lines manifests; WAV/FLAC at any rate, resampled on load):

    python -m asr_reference prepare --out data/asr
    python -m asr_reference pretrain-lm --text data/asr/lm_train.txt --out runs/asr/lm
    python -m asr_reference pretrain-encoder --train data/asr/train.jsonl --dev data/asr/dev.jsonl --out runs/asr/encoder
    python -m asr_reference train --train data/asr/train.jsonl --llm runs/asr/lm --encoder runs/asr/encoder --run runs/asr/soft --vq soft
    python -m asr_reference eval --run runs/asr/soft --manifest data/asr/test_in.jsonl
    python -m asr_reference diagnose --run runs/asr/soft --data data/asr   # where the errors come from
    torchrun --nproc_per_node 2 -m asr_reference train ...   # DDP (gloo on CPU, nccl on GPU)

Bad inputs (manifest lines, audio files, checkpoints, model folders, option values) end the command with
one line ``path[:line]: what is wrong`` and exit status 2; ``--debug`` shows the traceback instead.

One module per command in this package (``cli/<command>.py``: ``HELP``, ``add_arguments(parser)``,
``run(args)``); what they share is in ``cli/common.py``.
"""

from __future__ import annotations

import argparse
import sys

from asr_reference.cli import (common, demo, diagnose, eval as eval_cmd, prepare, pretrain_encoder, pretrain_lm,
                               report, train)
from asr_reference.errors import ASRError

COMMANDS = {"prepare": prepare, "pretrain-lm": pretrain_lm, "pretrain-encoder": pretrain_encoder, "train": train,
            "eval": eval_cmd, "report": report, "diagnose": diagnose, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap = common.Parser(prog="python -m asr_reference", description=__doc__, parents=[shared],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=common.Parser)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, parents=[shared])
        module.add_arguments(p)
        p.set_defaults(fn=module.run)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
