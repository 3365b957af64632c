#!/usr/bin/env bash
# How the committed ASR results were made, in order, on the 2-core CPU (see asr_reference/README.md,
# "Results"). Each step reuses what the previous ones made; rerunning a finished step only decodes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python

# 1. the five-row table from nothing: data (168 training voices, seven OOD sets), LM, 5 runs, one seed
$PY -m asr_reference demo --compare --fresh
# 2. three seeds of soft, none and hard (seed 0 reused from step 1)
$PY -m asr_reference demo --compare --seeds 3 --rows soft none hard --results asr_reference/results/seeds3
# 3. five seeds of soft and none (seeds 0-2 reused)
$PY -m asr_reference demo --compare --seeds 5 --rows soft none --jobs 4 --results asr_reference/results/seeds5
# 4. where the errors come from, for the one-seed runs of step 1
$PY -m asr_reference diagnose --run runs/demo/vq_soft runs/demo/vq_none runs/demo/vq_hard runs/demo/vq_plain \
    runs/demo/vq_soft-no-ctc --label diverse --data data/demo --out asr_reference/results/diagnose/diverse_1500

# 5. the earlier two-voice training, for comparison: data and runs made at commit b1044bc by its
#    `demo --compare` (prepare with en-us+m3 and en-us+f2 at 165 wpm; 2,000 steps per run), kept as
#    data/twovoice and runs/twovoice (with their LM copied to runs/twovoice/lm; its text and seed are those
#    of step 1's LM); decoded on the current test sets and tabulated like the rest
for row in soft none hard; do
  $PY -m asr_reference eval --run runs/twovoice/vq_$row --llm runs/twovoice/lm --manifest data/demo/test_*.jsonl
done
$PY asr_reference/results/twovoice_table.py runs/twovoice data/demo asr_reference/results/twovoice
$PY -m asr_reference diagnose --run runs/twovoice/vq_soft runs/twovoice/vq_none runs/twovoice/vq_hard \
    --llm runs/twovoice/lm --label two-voice --data data/demo --out asr_reference/results/diagnose/twovoice_2000
