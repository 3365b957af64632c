#!/usr/bin/env bash
# One command for a GPU machine: install (builds softvq_kernels._cuda, about a minute), the GPU tests,
# Triton tuning and the benchmarks of docs/benchmarks.md.
#
#   bash scripts/gpu_suite.sh                    # every stage: tests tune small bench big
#   bash scripts/gpu_suite.sh tests              # or any subset, in order (each fits one 10-minute call)
#
# Writes to benchmarks/results/ (and copies to $OUT when set): gpu-tests-<stamp>.log,
# triton-tuned-<stamp>.json (+ -report.json), <gpu>-bf16-d256-<stamp>.json/.png (4096x32000x256 with
# torch.compile), <gpu>-bf16-<stamp>.json/.png (the four reference shapes), <gpu>-bf16-T65536-<stamp>.json/.png,
# where <gpu> is $GPU_TAG or the model in the device name, lower case (h200, h100, a100, ...).
# The bench stages use the newest tuned file from the tune stage (SOFTVQ_TRITON_CONFIGS) when there is one.
# REPS (default 10) sets the timed repetitions; TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 shorten the build.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STAGES=${*:-tests tune small bench big}
REPS=${REPS:-10}
RESULTS=benchmarks/results
STAMP=$(date -u +%Y%m%d-%H%M%S)
SHAPES=4096x32000x256,8192x151936x896,8192x128256x2048,4096x128256x4096
BIG_SHAPE=65536x128256x256   # eager needs several 65536 x 128256 fp32/bf16 matrices (>= 17 GB each)
mkdir -p "$RESULTS"
status=0
GPU=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -o -E '[A-Z]+[0-9]+' | head -n 1 | tr 'A-Z' 'a-z')}
GPU=${GPU:-gpu}

out() {  # copy results to the device tool's $OUT folder when there is one
  [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ 2>/dev/null
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$RESULTS/gpu-info-$STAMP.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$RESULTS/gpu-info-$STAMP.txt"
out "$RESULTS/gpu-info-$STAMP.txt"

if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$RESULTS/pip-install-$STAMP.log" 2>&1; then
  echo "pip install -e . failed (see $RESULTS/pip-install-$STAMP.log); running from the source tree"
  out "$RESULTS/pip-install-$STAMP.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

for stage in $STAGES; do
  case "$stage" in
    tests)
      log="$RESULTS/gpu-tests-$STAMP.log"
      "$PY" -m pytest tests/test_triton.py tests/test_cuda.py tests/test_backends.py tests/test_op.py \
        tests/test_module.py -q -rs --durations=15 2>&1 | tee "$log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      out "$log"
      ;;
    tune)
      tuned="$RESULTS/triton-tuned-$STAMP.json"
      "$PY" - "$tuned" "$SHAPES" <<'EOF' || status=1
import json, sys
from softvq_kernels.triton import tuning
path, shapes = sys.argv[1], [tuple(int(v) for v in s.split("x")) for s in sys.argv[2].split(",")]
report = tuning.tune_to_file(path, shapes)
with open(path.replace(".json", "-report.json"), "w") as f:
    json.dump(report, f, indent=1)
for shape, rows in report.items():
    for config, ms in sorted(rows, key=lambda r: r[1]):
        print(f"{shape:>22} {ms:10.3f} ms  {config}")
EOF
      out "$tuned" "${tuned%.json}-report.json"
      ;;
    small)  # the d = 256 target is also against torch.compile, which compiles per shape (slow): one shape
      tuned=$(ls -t "$RESULTS"/triton-tuned-*.json 2>/dev/null | grep -v report | head -n 1)
      [ -n "$tuned" ] && export SOFTVQ_TRITON_CONFIGS="$PWD/$tuned" && echo "using tuned configs $tuned"
      "$PY" -m softvq_kernels.bench --device cuda --dtype bfloat16 --shapes 4096x32000x256 \
        --impls eager,compile,chunked,triton,cuda --modes fwd,fwdbwd --reps "$REPS" \
        --out "$RESULTS/$GPU-bf16-d256-$STAMP.json" --plot "$RESULTS/$GPU-bf16-d256-$STAMP.png" || status=1
      out "$RESULTS/$GPU-bf16-d256-$STAMP.json" "$RESULTS/$GPU-bf16-d256-$STAMP.png"
      ;;
    bench)
      tuned=$(ls -t "$RESULTS"/triton-tuned-*.json 2>/dev/null | grep -v report | head -n 1)
      [ -n "$tuned" ] && export SOFTVQ_TRITON_CONFIGS="$PWD/$tuned" && echo "using tuned configs $tuned"
      "$PY" -m softvq_kernels.bench --device cuda --dtype bfloat16 --shapes "$SHAPES" \
        --impls eager,chunked,triton,cuda --modes fwd,fwdbwd --reps "$REPS" \
        --out "$RESULTS/$GPU-bf16-$STAMP.json" --plot "$RESULTS/$GPU-bf16-$STAMP.png" || status=1
      out "$RESULTS/$GPU-bf16-$STAMP.json" "$RESULTS/$GPU-bf16-$STAMP.png"
      ;;
    big)
      "$PY" -m softvq_kernels.bench --device cuda --dtype bfloat16 --shapes "$BIG_SHAPE" \
        --impls eager,chunked,triton,cuda --modes fwd,fwdbwd --reps 5 \
        --out "$RESULTS/$GPU-bf16-T65536-$STAMP.json" --plot "$RESULTS/$GPU-bf16-T65536-$STAMP.png" || status=1
      out "$RESULTS/$GPU-bf16-T65536-$STAMP.json" "$RESULTS/$GPU-bf16-T65536-$STAMP.png"
      ;;
    *)
      echo "unknown stage $stage (choose from: tests tune small bench big)"; status=2
      ;;
  esac
done
exit $status
