#!/usr/bin/env bash
# One GPU call (<= 10 minutes, an H100) for the CUTLASS GEMMs of softvq::gemm, written without a GPU:
#   1. JIT-build the extension for TORCH_CUDA_ARCH_LIST=9.0a (csrc/softvq_gemm_sm90.cu: wgmma + TMA) with
#      the CUTLASS headers from $CUTLASS_PATH or the nvidia-cutlass wheel (a device machine cannot pip
#      install: carry .venv/lib/python3.11/site-packages/cutlass_library, which this script then finds);
#   2. the GPU tests of tests/test_cuda.py and the shared suite on "cuda" (tests/test_backends.py), once
#      with SOFTVQ_CUDA_GEMM=wmma (today's default) and once with SOFTVQ_CUDA_GEMM=cutlass;
#   3. timings of softvq::gemm, WMMA vs CUTLASS, and torch.mm, at the backend's GEMM shapes (bf16, fp16).
# Everything lands in $OUT (or /tmp/softvq_gpu_check without it): build/test logs and gemm-timings.json.
#
#   run(command="bash csrc/gpu_check_cutlass.sh", timeout_s=600,
#       carry=[".venv/lib/python3.11/site-packages/cutlass_library"])
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp/softvq_gpu_check}
mkdir -p "$DEST"
status=0

if [ -z "${CUTLASS_PATH:-}" ]; then
  for candidate in .venv/lib/python3*/site-packages/cutlass_library/source; do
    [ -f "$candidate/include/cutlass/cutlass.h" ] && export CUTLASS_PATH="$PWD/$candidate"
  done
fi
export TORCH_CUDA_ARCH_LIST="9.0a"
export TORCH_EXTENSIONS_DIR=/tmp/softvq_gpu_check_build  # not under $OUT: the build stays on the machine
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$DEST/gpu-info.txt" 2>&1

# 1. Build (the one sm_90a translation unit with four CUTLASS instantiations is the slow part).
timeout 300 "$PY" - > "$DEST/build.log" 2>&1 <<'PYEOF' || status=1
import json, os, time
from softvq_kernels.cuda import _build
print("CUTLASS headers:", _build.find_cutlass_include())
start = time.perf_counter()
module = _build.jit_build(verbose=True)
seconds = time.perf_counter() - start
info = {"build_seconds": round(seconds, 1), "cutlass_gemms_compiled": module.cutlass_gemms_compiled(),
        "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"]}
print(json.dumps(info))
json.dump(info, open(os.path.join(os.environ.get("OUT", "/tmp/softvq_gpu_check"), "build.json"), "w"))
PYEOF
tail -n 3 "$DEST/build.log"

# 2. Correctness with the switch off and on (same build: the switch is read at run time).
for path in wmma cutlass; do
  SOFTVQ_CUDA_GEMM=$path timeout 120 "$PY" -m pytest -q -x -rs tests/test_cuda.py -m gpu \
    > "$DEST/gpu-tests-$path.log" 2>&1 || status=1
  SOFTVQ_CUDA_GEMM=$path timeout 90 "$PY" -m pytest -q -x -rs tests/test_backends.py -k cuda \
    > "$DEST/shared-suite-$path.log" 2>&1 || status=1
  echo "$path: $(tail -n 1 "$DEST/gpu-tests-$path.log") | shared: $(tail -n 1 "$DEST/shared-suite-$path.log")"
done

# 3. Timings: C (M, N) fp32 = A (M, K) B (N, K)^T at the chunked schedule's products, T frames, chunk
#    width w, feature size d: y/dx: (M, N, K) = (T, d, w), A = P (K-major); dC/sums: (w, d, T), A = P^T
#    (M-major). B is always read with unit stride along N (codebook rows / G / X transposed).
timeout 150 "$PY" - "$DEST/gemm-timings.json" <<'PYEOF' || status=1
import json, sys
import torch
from softvq_kernels.cuda import _build

module = _build.load()
results = {"device": torch.cuda.get_device_name(), "cutlass_gemms_compiled": module.cutlass_gemms_compiled(),
           "rows": []}

def time_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]

shapes = []
for T, d, w in [(16384, 256, 4096), (16384, 1024, 4096), (8192, 512, 8192), (4096, 2048, 2048)]:
    shapes.append(("y/dx", T, d, w, "k_major"))
    shapes.append(("dC", w, d, T, "m_major"))
for dtype in (torch.bfloat16, torch.float16):
    for role, M, N, K, a_layout in shapes:
        a = torch.randn(M, K, device="cuda").to(dtype)
        if a_layout == "m_major":
            a = a.t().contiguous().t()
        b = torch.randn(K, N, device="cuda").to(dtype).t()
        c = torch.empty(M, N, device="cuda")
        row = {"role": role, "dtype": str(dtype)[6:], "M": M, "N": N, "K": K, "a_layout": a_layout}
        reference = a.double() @ b.double().t()
        for path in ("wmma", "cutlass"):
            module.set_gemm_path(path)
            module.gemm(a, b, c, 1.0)
            torch.cuda.synchronize()
            row[f"{path}_rel_err"] = float((c.double() - reference).norm() / reference.norm())
            row[f"{path}_ms"] = time_ms(lambda: module.gemm(a, b, c, 1.0))
        row["torch_mm_ms"] = time_ms(lambda: torch.mm(a, b.t()))  # output in the input dtype (cuBLAS)
        for key in ("wmma", "cutlass", "torch_mm"):
            row[f"{key}_tflops"] = round(2 * M * N * K / (row[f"{key}_ms"] * 1e-3) / 1e12, 1)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
module.set_gemm_path("wmma")
json.dump(results, open(sys.argv[1], "w"), indent=1)
PYEOF
exit $status
