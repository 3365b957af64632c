"""``prepare``: text splits + espeak-ng speech + manifests (and extra out-of-domain sets with --ood)."""

from __future__ import annotations

import argparse
from pathlib import Path

from asr_reference.cli import common
from asr_reference.cli.common import DEFAULTS, POSITIVE_INT

HELP = "text splits + espeak-ng speech + manifests"


def _condition(text: str):
    from asr_reference.data import parse_condition

    try:
        return parse_condition(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p) -> None:
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


def run(args) -> None:
    from asr_reference.data import prepare, render_conditions

    extra = dict(args.ood) if args.ood else None
    if extra and (Path(args.out) / "test_in.jsonl").is_file():
        common.log(f"prepare: {args.out} is already prepared; making only the --ood sets from its test sentences")
        render_conditions(args.out, extra, seed=args.seed, log=common.log)
        return
    prepare(args.out, args.text, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test, seed=args.seed,
            log=common.log, extra=extra)
