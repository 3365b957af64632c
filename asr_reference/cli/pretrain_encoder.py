"""``pretrain-encoder``: the built-in Conformer trained once with character CTC; every system starts from it."""

from __future__ import annotations

from asr_reference.cli import common
from asr_reference.cli.common import DEFAULTS, NONNEG_INT, POSITIVE, POSITIVE_INT

HELP = "train the built-in Conformer encoder alone with character CTC (a folder for --encoder)"


def add_arguments(p) -> None:
    p.add_argument("--train", required=True, help="training manifest")
    p.add_argument("--out", required=True, help="encoder folder (then: train --encoder OUT)")
    p.add_argument("--dev", default=None, help="dev manifest: the encoder's greedy CTC WER/CER at the end")
    p.add_argument("--steps", type=POSITIVE_INT, default=DEFAULTS["cpu"]["enc_steps"],
                   help=f"default {DEFAULTS['cpu']['enc_steps']} (the demo on a GPU: {DEFAULTS['cuda']['enc_steps']})")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=DEFAULTS["cpu"]["enc_batch"],
                   help=f"default {DEFAULTS['cpu']['enc_batch']} (the demo on a GPU: {DEFAULTS['cuda']['enc_batch']})")
    p.add_argument("--lr", type=POSITIVE, default=2e-3)
    p.add_argument("--warmup", type=NONNEG_INT, default=200)
    p.add_argument("--enc-dim", type=POSITIVE_INT, default=144)
    p.add_argument("--enc-layers", type=POSITIVE_INT, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args) -> None:
    from asr_reference.errors import ASRError
    from asr_reference.pretrain_encoder import EncoderArch, pretrain_encoder

    arch = EncoderArch(enc_dim=args.enc_dim, enc_layers=args.enc_layers)
    if arch.enc_dim % arch.enc_heads:
        raise ASRError(f"--enc-dim {arch.enc_dim}: must be a multiple of the {arch.enc_heads} attention heads")
    from asr_reference.data import read_manifest

    read_manifest(args.train)  # a bad line fails before any training
    pretrain_encoder(args.train, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     warmup=min(args.warmup, max(0, args.steps - 1)) or 1, seed=args.seed,
                     device=common.device(args.device), dev=args.dev, arch=arch, log=common.log)
