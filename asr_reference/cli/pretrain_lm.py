"""``pretrain-lm``: a byte-level BPE tokenizer and a small Llama-style LM on the training text."""

from __future__ import annotations

from asr_reference.cli import common
from asr_reference.cli.common import DEFAULTS, FRACTION, POSITIVE_INT

HELP = "BPE tokenizer + small Llama-style LM on text"


def add_arguments(p) -> None:
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


def run(args) -> None:
    from asr_reference.lm import pretrain_lm

    pretrain_lm(args.text, args.out, steps=args.steps, batch_size=args.batch_size, hidden=args.hidden, layers=args.layers,
                vocab_size=args.vocab_size, copy_frac=args.copy_frac, seed=args.seed,
                device=common.device(args.device), log=common.log)
