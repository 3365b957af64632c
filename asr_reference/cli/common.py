"""What every command shares: the one-line-error parser, checked option types, the model options
(``add_model_args`` / ``config_from``), the embedded default sizes and the log function.

Commands call ``common.log`` (not a copy of it), so tests can capture the log by patching it here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asr_reference.errors import ASRError
from asr_reference.model import VQ_MODES, ASRConfig

RESULTS = Path(__file__).resolve().parent.parent / "results"

# The embedded default configuration: a fixed number of steps (the results do not depend on the
# machine's speed; the demo prints how long it expects to take). CPU: one seed; GPU: larger, 3 seeds.
# enc_*: the pretrain-encoder stage (character CTC on the training set; shared by every system and seed).
DEFAULTS = {
    "cpu": {"n_train": 2400, "lm_steps": 1500, "lm_batch": 32, "enc_steps": 1500, "enc_batch": 16,
            "steps": 600, "batch_size": 16, "seeds": 1, "scratch_steps": 1500, "scratch_batch": 8},
    "cuda": {"n_train": 4800, "lm_steps": 1500, "lm_batch": 64, "enc_steps": 6000, "enc_batch": 32,
             "steps": 3000, "batch_size": 32, "seeds": 3, "scratch_steps": 4000, "scratch_batch": 16},
}
# scratch_*: demo --scratch-encoder, the earlier recipe (the encoder trained inside every run), as the
# results made before the pretrain-encoder stage were trained


def device(arg: str) -> str:
    import torch

    return arg if arg != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def log(msg: str) -> None:
    print(msg, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``, exit status 2), like every other CLI error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def ranged(kind, low=None, high=None, low_open=False, what=""):
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


POSITIVE_INT = ranged(int, 1, what="an integer")
NONNEG_INT = ranged(int, 0, what="an integer")
POSITIVE = ranged(float, 0.0, low_open=True, what="a number")
NONNEG = ranged(float, 0.0, what="a number")
FRACTION = ranged(float, 0.0, 1.0, what="a number")


def tau_schedule(text: str) -> str:
    from asr_reference.train import parse_tau_schedule

    try:
        parse_tau_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def prompt_template(text: str) -> str:
    from asr_reference.model import AUDIO_SLOT

    if text.count(AUDIO_SLOT) != 1:
        raise argparse.ArgumentTypeError(f"must contain {AUDIO_SLOT} exactly once, got {text!r}")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model options. Their defaults are None: ``config_from`` fills what was not given from the base
    config (the defaults, or the run's own config on --resume), so a resume sees only explicit changes."""
    d = ASRConfig()
    p.add_argument("--encoder", default=None, metavar="PATH",
                   help="a pretrained encoder: a folder from pretrain-encoder (the built-in Conformer) or a local "
                        "HF speech-encoder folder (Whisper, wav2vec2, HuBERT, WavLM); default: the built-in "
                        "Conformer trained from scratch with everything else")
    p.add_argument("--finetune-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the pretrained encoder too (default: frozen, its outputs cached)")
    p.add_argument("--vq", choices=VQ_MODES, default=None, help=f"default {d.vq}")
    p.add_argument("--enc-dim", type=POSITIVE_INT, default=None, help=f"built-in encoder width (default {d.enc_dim})")
    p.add_argument("--enc-layers", type=POSITIVE_INT, default=None, help=f"default {d.enc_layers}")
    p.add_argument("--stack", type=NONNEG_INT, default=None,
                   help=f"encoder frames per projector frame (default {d.stack}; with --encoder: 0 = ~80 ms frames)")
    p.add_argument("--distance", choices=("cosine", "l2", "dot"), default=None, help=f"default {d.distance}")
    p.add_argument("--temperature", type=POSITIVE, default=None,
                   help=f"soft VQ tau (for l2: a fraction of the mean squared codebook-row norm; default {d.temperature})")
    p.add_argument("--ctc-weight", type=NONNEG, default=None,
                   help=f"character CTC on the encoder (0 = off; default {d.ctc_weight}; "
                        f"nothing to train with a frozen pretrained encoder)")
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
    p.add_argument("--prompt", type=prompt_template, default=None,
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


def saved_config(run: Path) -> ASRConfig:
    """The model config of an existing run (its config.json), for --resume."""
    path = run / "config.json"
    if not path.is_file():
        raise ASRError(f"{path}: missing (the run folder is incomplete; start a new --run)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ASRError(f"{path}: not valid JSON ({exc})") from None
    return ASRConfig.from_dict(raw, str(path))
