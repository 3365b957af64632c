#!/usr/bin/env bash
# One GPU call (<= 10 minutes) for the Triton groundwork of issues 11 and 12, written without a GPU:
#   - flash.py (KernelConfig.fused_finish / fused_backward, d <= 256): few-launch forward, FlashAttention
#     style backward; hard-mode forward (lse_argmax) on every schedule;
#   - forward.py's one-pass large-d forward (KernelConfig.online_output, with score_gemm);
#   - TMA tile loads (KernelConfig.tma, sm_90: issue 23) on the default and the flash schedule.
# Stages: install, GPU tests of the new paths, then timings old vs new schedule (bf16, fwd, fwd+bwd,
# hard-mode forward) at the four shapes, kernel counts (torch.profiler) and a CUDA-graph capture of the
# flash path. Everything lands in $OUT (or benchmarks/results/ without it) as JSON / logs.
#
#   bash benchmarks/gpu_triton_next.sh            # run by the device tool: run(command="bash benchmarks/gpu_triton_next.sh", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
STAMP=$(date -u +%Y%m%d-%H%M%S)
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$DEST/gpu-info-$STAMP.txt" 2>&1
"$PY" -m pip install --no-deps --no-build-isolation -e . > "$DEST/pip-install-$STAMP.log" 2>&1 \
  || echo "pip install -e . failed (see pip-install log); running from the source tree"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. GPU tests of the new paths (the interpreter tests run them at tiny shapes; here real tiles compile).
timeout 200 "$PY" -m pytest -q -x tests/test_triton_flash.py tests/test_triton.py tests/test_triton_tma.py \
  -k "flash or online_output or hard or launch or gpu or config or tma" -rs --durations=10 \
  > "$DEST/gpu-tests-next-$STAMP.log" 2>&1 || status=1
tail -n 5 "$DEST/gpu-tests-next-$STAMP.log"

# 2. Timings, kernel counts, CUDA-graph capture.
timeout 330 "$PY" - "$DEST/triton-next-$STAMP.json" <<'PYEOF' || status=1
import dataclasses, json, sys, time, traceback
import torch
import softvq_kernels as sk
import softvq_kernels.triton as tri
from softvq_kernels.api import lse_argmax
from softvq_kernels.backends import Scoring
from softvq_kernels.triton import configs

out_path = sys.argv[1]
dev = torch.device("cuda")
report = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
          "arch": configs.device_arch(dev), "torch": torch.__version__, "shapes": {}}
SHAPES = [(4096, 32000, 256), (65536, 128256, 256), (8192, 151936, 896), (8192, 128256, 2048)]
START = time.time()


def save():
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)


def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def variants(base, d):
    if triton_pow2(d) <= base.fused_max_d:
        flash = dataclasses.replace(base, fused_finish=True, fused_backward=True)
        return {"default": base, "flash": flash, "flash_fwd_only": dataclasses.replace(base, fused_finish=True),
                "tma": dataclasses.replace(base, tma=True), "flash_tma": dataclasses.replace(flash, tma=True)}
    out = {"default": base, "score_gemm": dataclasses.replace(base, score_gemm=True, gemm="cublas")}
    if not base.score_gemm:
        out["tma"] = dataclasses.replace(base, tma=True)
    out["score_gemm_online_output"] = dataclasses.replace(out["score_gemm"], online_output=True)
    return out


def triton_pow2(n):
    return 1 << (n - 1).bit_length()


for T, V, d in SHAPES:
    key = f"{T}x{V}x{d}"
    rows = report["shapes"][key] = {}
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16).requires_grad_()
    codebook = (torch.randn(V, d, device=dev) / d ** 0.25).to(torch.bfloat16).requires_grad_()
    g = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    tau = float(d) ** 0.5 / 4
    base = configs.get_config(V, d, torch.bfloat16, dev)
    reference = None
    for name, cfg in variants(base, d).items():
        if time.time() - START > 290:
            rows[name] = "skipped: time budget"
            continue
        entry = rows[name] = {}
        try:
            with configs.override(cfg):
                fwd = lambda: sk.soft_vq(x.detach(), codebook.detach(), tau, backend="triton")
                def fwdbwd():
                    y = sk.soft_vq(x, codebook, tau, backend="triton")
                    torch.autograd.backward(y, g)
                hard = lambda: lse_argmax(x.detach(), codebook.detach(), tau, "l2", None, "triton")
                entry["fwd_ms"] = timed(fwd)
                entry["hard_fwd_ms"] = timed(hard)
                entry["hard_over_soft"] = entry["hard_fwd_ms"] / entry["fwd_ms"]
                entry["fwdbwd_ms"] = timed(fwdbwd, reps=3)
                x.grad = codebook.grad = None
                y = sk.soft_vq(x, codebook, tau, backend="triton")
                torch.autograd.backward(y, g)
                result = (y.detach().float(), x.grad.float(), codebook.grad.float())
                x.grad = codebook.grad = None
                if reference is None:
                    reference = result
                else:
                    entry["rel_diff_vs_default"] = [((a - b).norm() / b.norm()).item() for a, b in zip(result, reference)]
                entry["tflops_fwdbwd"] = 14 * T * V * d / entry["fwdbwd_ms"] / 1e9
        except Exception as exc:
            entry["error"] = "".join(traceback.format_exception_only(exc)).strip()
        save()

# Kernel counts (every CUDA kernel, torch's included) and a CUDA-graph capture of the flash path.
T, V, d = 4096, 32000, 256
x = torch.randn(T, d, device=dev, dtype=torch.bfloat16).requires_grad_()
codebook = (torch.randn(V, d, device=dev) / 4).to(torch.bfloat16).requires_grad_()
g = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
flash = dataclasses.replace(configs.get_config(V, d, torch.bfloat16, dev), fused_finish=True, fused_backward=True)
counts = report["kernel_counts_4096x32000x256"] = {}
for name, cfg in {"default": configs.get_config(V, d, torch.bfloat16, dev), "flash": flash}.items():
    try:
        with configs.override(cfg):
            for _ in range(2):
                y = sk.soft_vq(x, codebook, 4.0, backend="triton"); torch.autograd.backward(y, g)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                y = sk.soft_vq(x, codebook, 4.0, backend="triton"); torch.autograd.backward(y, g)
                torch.cuda.synchronize()
            kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            counts[name] = {"total": len(kernels), "names": kernels}
    except Exception as exc:
        counts[name] = {"error": str(exc)}
save()
try:  # the backend calls alone (what the kernels own): capture forward + backward in one graph
    tau_t = torch.tensor(4.0, device=dev)
    xs, cs = x.detach(), codebook.detach()
    with configs.override(flash):
        def step():
            y, lse, idx, _ = tri.forward(xs, cs, tau_t, Scoring("l2"), False)
            return tri.backward(g, xs, cs, tau_t, Scoring("l2"), y, lse, None, None)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pieces = step()
        graph.replay(); torch.cuda.synchronize()
        eager = step()
        report["cuda_graph_capture"] = {"ok": True, "grad_codebook_rel_diff": (
            (pieces.grad_codebook - eager.grad_codebook).norm() / eager.grad_codebook.norm()).item()}
except Exception as exc:
    report["cuda_graph_capture"] = {"ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()}
save()
print(json.dumps({k: v for k, v in report.items() if k != "kernel_counts_4096x32000x256"}, indent=1, default=str))
print({k: v.get("total", v) for k, v in counts.items()})
PYEOF
ls -l "$DEST"
exit $status
