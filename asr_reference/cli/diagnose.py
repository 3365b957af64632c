"""``diagnose``: where a run's errors come from (encoder CTC, VQ token readout, LLM) per test set."""

from __future__ import annotations

import json
from pathlib import Path

from asr_reference.cli import common
from asr_reference.cli.common import POSITIVE_INT
from asr_reference.errors import ASRError

HELP = "where a run's errors come from: encoder CTC, VQ token CTC and LLM WER per test set"


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, nargs="+", help="one or more run folders")
    p.add_argument("--data", default=None, help="a prepared folder: every test set in it")
    p.add_argument("--manifest", nargs="+", default=None, help="or these manifests")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N utterances of each set")
    p.add_argument("--out", default=None, help="write OUT.md (the table) and OUT.json")
    p.add_argument("--llm", default=None, help="the runs' LLM from another folder (e.g. moved)")
    p.add_argument("--label", default=None, help="prefix for the run names in the table (e.g. the training data)")
    p.add_argument("--device", default="auto")


def run(args) -> None:
    from asr_reference.data import read_manifest, test_sets
    from asr_reference.diagnose import diagnose_run, format_table

    if bool(args.data) == bool(args.manifest):
        raise ASRError("diagnose: give either --data DIR (every test set in it) or --manifest M [M ...]")
    if args.data:
        manifests = list(test_sets(args.data).values())
        if not manifests:
            raise ASRError(f"{args.data}: no test manifests (test_in.jsonl, test_ood_*.jsonl)")
    else:
        manifests = args.manifest
    for manifest in manifests:  # every manifest is checked before any model loads
        read_manifest(manifest)
    results = {}
    for run_dir in args.run:
        name = Path(run_dir).name if not args.label else f"{args.label}/{Path(run_dir).name}"
        results[name] = diagnose_run(run_dir, manifests, device=common.device(args.device), log=common.log,
                                     limit=args.limit, overrides={"llm": args.llm} if args.llm else None)
    table = format_table(results)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(table)
        common.log(f"diagnose: wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
