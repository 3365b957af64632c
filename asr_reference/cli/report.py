"""``report``: compare.md and the plot again from compare.json (same decoded runs, current analysis)."""

from __future__ import annotations

from pathlib import Path

from asr_reference.cli import common

HELP = "write compare.md/.png again from compare.json (same runs, current analysis)"


def add_arguments(p) -> None:
    p.add_argument("--results", default=str(common.RESULTS), help="folder with compare.json")


def run(args) -> None:
    from asr_reference.compare import rerender

    rerender(Path(args.results), log=common.log)
