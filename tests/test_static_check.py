"""The static checks of the GPU code (issue 23), run on CPU without a GPU:

- softvq_kernels.sass, the SASS / ptxas-log reader both checks use, on hand-written listings;
- softvq_kernels.triton.static_check: every Triton kernel the default and opt-in schedules launch at the
  reference shapes, compiled for sm_90 and sm_80, must keep its spills out of loops, run its tl.dot on
  wgmma (sm_90) / mma (sm_80), fit the shared memory and not have ptxas serialise its wgmma; and the check
  itself must fail on a config known to spill (the d = 256 forward on 128-row tiles);
- softvq_kernels.cuda.static_check: the CUDA C++ kernels compiled for sm_90a (nvcc -c, no link) keep their
  spills out of loops and the CUTLASS GEMM is on HGMMA + TMA; the WMMA kernels' lack of wgmma is reported.

The Triton check runs in a subprocess: this process has triton in interpreter mode (conftest), where
@triton.jit kernels cannot be compiled. Its compiles run one per core and are cached
(~/.cache/softvq_kernels/static_check, keyed on triton's own compile key), so only a changed kernel or config
costs compile time again. CI compiles the CI shapes (static_check.CI_SHAPES), the script the full sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from softvq_kernels import sass

ROOT = Path(__file__).resolve().parents[1]
HAS_PTXAS = sass.triton_tool("ptxas") is not None and sass.triton_tool("cuobjdump") is not None

LISTING = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1+0x8], RZ ;
        /*0020*/               @P0 BRA 0x80 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   LDL R2, [R1+0x8] ;
        /*0050*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0060*/              @!P1 BRA 0x30 ;
        /*0070*/                   STL [R1+0xc], R2 ;
        /*0080*/                   BRA 0x80 ;
        /*0090*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
"""


def test_sass_reader_counts_spills_inside_loops_only():
    # The loop is 0x30..0x60 (the branch back from 0x60); 0x80 branching to itself is the trailing
    # self-loop every kernel ends with and holds no spill; the STL at 0x10 and 0x70 are outside.
    assert sass.loop_ranges(LISTING) == [(0x30, 0x60), (0x80, 0x80)]
    counts = sass.sass_counts(LISTING)
    assert counts == {"spill_instrs": 3, "spill_instrs_in_loops": 1, "loops": 2, "hgmma": 1, "hmma": 1, "tma": 1}
    assert sass.sass_by_function("header\n\tFunction : a\nX\n\tFunction : b\nY\n") == {"a": "X", "b": "Y\n"}


def test_ptxas_log_reader():
    log = """ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    288 bytes stack frame, 328 bytes spill stores, 300 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 288 bytes cumulative stack size
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'k2'
"""
    figures = sass.ptxas_by_function(log)
    assert figures["k1"] == {"regs": 255, "spill_store_bytes": 328, "spill_load_bytes": 300, "wgmma_serialized": []}
    assert figures["k2"]["regs"] == 128 and figures["k2"]["spill_store_bytes"] == 0
    assert len(figures["k2"]["wgmma_serialized"]) == 1


def _triton_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "-m", "softvq_kernels.triton.static_check", "--json", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PTXAS, reason="needs the ptxas / cuobjdump the triton wheel ships")
def test_triton_kernels_pass_the_static_check_at_the_ci_shapes(tmp_path):
    """Every compile of the default schedule, the opt-in ones (fused, online_output, and on sm_90 tma /
    fused_tma: tiles through TMA descriptors) and the code-counts variants at the CI shapes
    (static_check.CI_SHAPES: every distinct compile of the seven reference shapes but the d = 64 copies of the
    d = 128 kernels), sm_90 and sm_80, compiled in parallel, one per core (about 3 minutes uncached on 2 cores;
    the full sweep is the script's default and the committed table)."""
    result, report = _triton_check(tmp_path, "--shapes", "ci")
    print(result.stdout)
    kernels = {(row["arch"], row["kernel"]) for row in report["rows"]}
    launched = {"online_kernel", "_stage_kernel", "_mm_kernel", "_rowdot_kernel", "_prologue_kernel", "_merge_kernel",
                "_codebook_grad_kernel", "_frame_grad_kernel", "_counts_gradient_kernel", "_chunk_online_kernel"}
    for arch in ("sm_90", "sm_80"):  # the recording saw every schedule's kernels, not a vacuous subset
        assert {name for a, name in kernels if a == arch} == launched, sorted(kernels)
    assert len(report["shapes"]) == 5
    failing = {(row["arch"], row["kernel"], row["variant"]): row["failures"] for row in report["rows"] if row["failures"]}
    known = set(report["known_failures"])
    new = {key: value for key, value in failing.items() if "|".join(key) not in known}
    assert not new, "\n".join(f"{key}: {value}" for key, value in new.items())
    fixed = known - {"|".join(key) for key in failing}
    assert not fixed, f"fixed: remove from static_check.KNOWN_FAILURES: {sorted(fixed)}"
    assert result.returncode == (1 if failing else 0)
    if failing:
        warnings.warn("Triton static check: known failures (static_check.KNOWN_FAILURES): "
                      + "; ".join(f"{' '.join(key)}: {value}" for key, value in failing.items()), stacklevel=1)
    hopper_dots = [row for row in report["rows"] if row["arch"] == "sm_90" and row["dots"]]
    assert hopper_dots and all(row["hgmma"] and not row["hmma"] for row in hopper_dots)
    # The TMA schedules (KernelConfig.tma, sm_90 only): their kernels read tiles with UTMALDG, and only they do.
    tma_rows = [row for row in report["rows"] if "TMA=1" in row["variant"]]
    assert {row["kernel"] for row in tma_rows} == {"online_kernel", "_codebook_grad_kernel", "_frame_grad_kernel",
                                                   "_counts_gradient_kernel"}, sorted(r["kernel"] for r in tma_rows)
    assert all(row["arch"] == "sm_90" and row["tma"] and row["hgmma"] for row in tma_rows)
    assert not any(row["tma"] for row in report["rows"] if "TMA=1" not in row["variant"])


@pytest.mark.skipif(not HAS_PTXAS, reason="needs the ptxas / cuobjdump the triton wheel ships")
def test_triton_static_check_fails_on_a_spilling_config(tmp_path):
    """The d = 256 forward on the 128 x 128 tiles it had before the check: its 128 x 256 fp32 accumulator
    spills inside the vocabulary loop on sm_90, and the check must say so and exit 1."""
    result, report = _triton_check(tmp_path, "--arch", "sm_90", "--shapes", "4096,32000,256", "--schedules", "default",
                                   "--kernels", "online_kernel", "--set", "block_t=128", "num_stages=3")
    assert result.returncode == 1, result.stdout[-3000:]
    spilling = [row for row in report["rows"] if row["kernel"] == "online_kernel" and row["spill_instrs_in_loops"]]
    assert spilling and "inside loops" in spilling[0]["failures"][0], report["rows"]
    assert "FAIL sm_90 online_kernel" in result.stdout


def _cuda_check_available() -> str | None:
    try:
        from softvq_kernels.cuda import _build, static_check
    except ImportError as error:
        return str(error)
    if _build.find_cuda_home() is None:
        return "needs nvcc"
    if static_check.cuobjdump() is None:
        return "needs cuobjdump"
    return None


@pytest.mark.slow
def test_cuda_kernels_sm90a_static_check():
    """The CUDA backend's kernels for sm_90a (one nvcc per csrc/ file, in parallel: about 40 s of nvcc uncached;
    the CUTLASS GEMM's object, 2 minutes more, is the one tests/test_cuda.py's cutlass_sm90a_object fixture
    already compiled into the same cache when that module runs first, as in the full suite): no spill
    instruction in any loop beyond static_check.KNOWN_SPILLS (reported as a warning); the
    CUTLASS GEMM on HGMMA with TMA and unserialised wgmma.
    The WMMA kernels are mma.sync by construction (WMMA has no wgmma form): reported as a warning naming
    them, and the test fails if one of them spills in a loop or a new kernel appears off tensor cores."""
    reason = _cuda_check_available()
    if reason:
        pytest.skip(reason)
    from softvq_kernels.cuda import _build, static_check

    try:
        _build.find_cutlass_include()
        with_cutlass = True
    except RuntimeError:
        with_cutlass = False
    rows = static_check.sweep(one_instance=True, with_cutlass=with_cutlass)
    print("\n" + static_check.markdown_table(rows))
    assert rows
    spilling = {row["kernel"] for row in rows if row["spill_instrs_in_loops"]}
    assert spilling <= set(static_check.KNOWN_SPILLS), f"new spills inside loops: {sorted(spilling - set(static_check.KNOWN_SPILLS))}"
    assert spilling >= set(static_check.KNOWN_SPILLS), f"fixed: remove from KNOWN_SPILLS: {sorted(set(static_check.KNOWN_SPILLS) - spilling)}"
    if spilling:
        warnings.warn(f"CUDA backend on sm_90a: spills inside loops (static_check.KNOWN_SPILLS): {sorted(spilling)}",
                      stacklevel=1)
    serialised = [row["kernel"] for row in rows if row["wgmma_serialized"]]
    assert not serialised, serialised
    if with_cutlass:
        gemms = [row for row in rows if "cutlass" in row["kernel"]]
        assert gemms and all(row["hgmma"] and row["tma"] for row in gemms), gemms
    mma_sync = sorted(row["kernel"] for row in rows if row["hmma"] and not row["hgmma"])
    no_tensor_cores = sorted(row["kernel"] for row in rows if not row["hmma"] and not row["hgmma"]
                             and row["kernel"] not in NO_PRODUCTS)
    assert not no_tensor_cores, f"kernels with neither HGMMA nor HMMA: {no_tensor_cores}"
    if mma_sync:
        warnings.warn(f"CUDA backend on sm_90a: {len(mma_sync)} kernels on mma.sync (WMMA), not wgmma: "
                      + ", ".join(mma_sync), stacklevel=1)


# CUDA kernels without matrix products of their own (reductions / merges): no tensor-core instruction expected.
NO_PRODUCTS = {"lse_merge_kernel"}
