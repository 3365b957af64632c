"""The two-voice table of asr_reference/results/twovoice/: runs trained on the earlier two-voice data
(runs/twovoice/vq_{soft,none,hard}, 2,000 steps) decoded on the current test sets with ``eval``, then
tabulated with the same analysis as ``demo --compare``. Usage (after the evals of ood_study.sh):

    python asr_reference/results/twovoice_table.py runs/twovoice data/demo asr_reference/results/twovoice
"""

import json
import sys
from pathlib import Path

import jiwer

from asr_reference.compare import machine, write_compare
from asr_reference.data import test_sets

runs, data, out = (Path(a) for a in sys.argv[1:4])
results, train = {}, []
for row in ("soft", "none", "hard"):
    run = runs / f"vq_{row}"
    per_set = {}
    for name in test_sets(data):
        hyp = run / f"hyp_{name}_b1.jsonl"
        rows = [json.loads(line) for line in hyp.read_text().splitlines() if line.strip()]
        errors = sum(r["word_errors"] or 0 for r in rows)
        words = sum(r["ref_words"] for r in rows)
        cer = jiwer.cer([r["ref"] for r in rows], [r["hyp"] for r in rows])
        per_set[name] = {"n": len(rows), "wer": round(errors / words, 4), "cer": round(float(cer), 4),
                         "hypotheses": str(hyp)}
    results[row] = [per_set]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    train.append({"run": str(run), "steps": log[-1]["step"], "trained_steps": 0, "seconds": 0,
                  "loss": log[-1]["loss"], "ce": log[-1]["ce"]})
meta = {"command": "python asr_reference/results/twovoice_table.py " + " ".join(sys.argv[1:4]),
        "device": "cpu", "machine": machine(), "load_before": "n/a", "minutes": 0.0, "seeds": 1, "steps": 2000,
        "rows": list(results),
        "setup": "Runs trained on the two-voice data of the earlier default (en-us+m3 and en-us+f2 at 165 wpm, "
                 "pitch 50; 2,000 steps x 8 utterances, one seed), decoded on the current test sets: for these "
                 "runs `test_in` (the 168-voice pool) is out of domain too; their own in-domain WERs (two-voice "
                 "test set) were soft 36.1, none 31.0, hard 11.3."}
write_compare(results, train, meta, out)
