"""The cuda backend: build, SASS, loader and setup checks, the kernels under CPU emulation, and on a
GPU the real kernels.

Without a GPU (CI): the extension is compiled here with nvcc for sm_90 (about a minute on 2 cores) and
its machine code is checked for sm_90 and for tensor-core instructions (HMMA/HGMMA) in every kernel.
The kernels' C++ also runs on the CPU under csrc/emu, an emulation of the CUDA calls they use (threads,
barriers, shuffles, atomics, WMMA on whole tiles): once launcher by launcher against fp64 loops, and
once as a CPU extension with bindings.cpp through the public API against the shared suite's checks
(tests/test_backends.py). That checks tiling, strides, epilogues and host code; not the hardware.
With a GPU: the shared suite runs on "cuda" by itself; here, several tiles and chunks, large d,
codebook_stats, and agreement with the triton backend.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import softvq_kernels.cuda as cuda_backend
import tests.test_backends as shared
from softvq_kernels import available_backends, backends
from softvq_kernels.backends import Scoring
from softvq_kernels.cuda import _build
from tests.helpers import random_problem, rel_err, run_with_grads

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_GPU = torch.cuda.is_available()
CAN_BUILD = (
    torch.version.cuda is not None
    and _build.find_cuda_home() is not None
    and _build.sources_dir() is not None
    and _build._ninja_binary() is not None
)
KERNELS = ("lse_partials_kernel", "probs_chunk_kernel", "dscores_kernel", "gemm_kernel")

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _cuobjdump() -> str | None:
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    if _build.find_cuda_home():
        candidates.append(Path(_build.find_cuda_home()) / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file()), None)


# ---------------------------------------------------------------------------------------------
# Anywhere: loader, availability, setup.py switches


def test_unavailable_reason_for_cpu_tensors():
    assert cuda_backend.unavailable_reason(torch.device("cpu")) == "the cuda backend runs on CUDA tensors only"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU answer")
def test_unavailable_reason_without_gpu_is_a_sentence():
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert isinstance(reason, str) and reason
    assert "cuda" not in available_backends("cuda")


def test_jit_cache_respects_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _build.cache_dir().parent == tmp_path / "softvq_kernels"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_dir().parent == tmp_path / "xdg" / "softvq_kernels"


def test_load_without_toolkit_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(_build, "_module", None)
    monkeypatch.setattr(_build, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        _build.load()


def test_sources_are_found_in_the_checkout():
    assert _build.sources_dir() == ROOT / "csrc"


def _setup_note(env_overrides: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_setup_skips_the_extension_when_told():
    assert "SOFTVQ_BUILD_CUDA=0: not building" in _setup_note({"SOFTVQ_BUILD_CUDA": "0"})


@pytest.mark.skipif(HAS_GPU, reason="checks the default on a machine without a GPU")
def test_setup_default_skips_without_gpu():
    assert "no GPU is visible at build time" in _setup_note({"SOFTVQ_BUILD_CUDA": None})


# ---------------------------------------------------------------------------------------------
# Anywhere nvcc is: compile for sm_90 and read the machine code


@pytest.fixture(scope="module")
def built_sm90(tmp_path_factory):
    if not CAN_BUILD:
        pytest.skip("needs a CUDA build of torch, nvcc and ninja")
    out = tmp_path_factory.mktemp("softvq_cuda_sm90")
    start = time.perf_counter()
    module = _build.jit_build(arch_list="9.0", build_directory=out, quiet=True)
    seconds = time.perf_counter() - start
    print(f"\nsoftvq_kernels._cuda built for sm_90 in {seconds:.1f} s")
    return module, Path(module.__file__), seconds


def test_extension_builds_and_imports(built_sm90):
    module, library, seconds = built_sm90
    assert callable(module.forward) and callable(module.backward)
    assert library.is_file()
    assert seconds < 600


def _sass_by_function(cuobjdump: str, library: Path) -> dict[str, str]:
    sass = subprocess.run([cuobjdump, "--dump-sass", str(library)], capture_output=True, text=True, check=True).stdout
    functions: dict[str, str] = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, body = block.partition("\n")
        functions[name.strip()] = body
    return functions


def test_binary_holds_sm90_tensor_core_code(built_sm90):
    _, library, _ = built_sm90
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (triton's package carries one)")
    elves = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in elves, elves
    functions = _sass_by_function(cuobjdump, library)
    checked = 0
    for kernel in KERNELS:
        instances = {name: body for name, body in functions.items() if kernel in name}
        assert len(instances) == 3, f"{kernel}: expected fp32/fp16/bf16 instances, found {sorted(instances)}"
        for name, body in instances.items():
            mma = re.findall(r"\b(HGMMA|HMMA)\.[0-9A-Z.]+", body)
            assert mma, f"{name} has no tensor-core instruction (only {sorted(set(re.findall(r'[A-Z]MMA|FFMA', body)))})"
            checked += 1
    assert checked == 3 * len(KERNELS)


# ---------------------------------------------------------------------------------------------
# Anywhere g++ is: the kernels' logic on the CPU (csrc/emu emulates the CUDA calls, WMMA included)

LAUNCH = re.compile(r"([\w:]+(?:<scalar_t>)?)<<<(.*?), ([\w:]+), 0, stream>>>\(")


def _emulation_sources(out: Path) -> list[Path]:
    """The .cu files with each launch rewritten for csrc/emu (plain C++ from then on)."""
    sources = []
    for name in ("softvq_fwd.cu", "softvq_bwd.cu", "softvq_gemm.cu"):
        text, launches = LAUNCH.subn(r"::emu::launch(\2, \3, \1, ", (CSRC / name).read_text())
        assert launches >= 1 and "<<<" not in text, name
        sources.append(out / (name[:-3] + ".cpp"))
        sources[-1].write_text(text)
    return sources


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")


@needs_gxx
def test_kernels_in_cpu_emulation(tmp_path):
    """Each launcher against fp64 loops: strides, ragged tiles, splits, chunks, one-hot rows."""
    sources = _emulation_sources(tmp_path)
    binary = tmp_path / "emu"
    command = ["g++", "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", f"-I{CSRC / 'emu'}", f"-I{CSRC}",
               "-o", str(binary), str(CSRC / "emu" / "emu_main.cpp"), *map(str, sources)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "all ok" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def emulated_extension(tmp_path_factory):
    """bindings.cpp + the emulated kernels as a CPU extension (SOFTVQ_CPU_EMULATION): the whole backend,
    host code included, on CPU tensors."""
    if shutil.which("g++") is None or not _build.ensure_ninja_on_path():
        pytest.skip("needs g++ and ninja")
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("softvq_cpu_emulation")
    sources = _emulation_sources(out)
    start = time.perf_counter()
    module = cpp_extension.load(
        name="softvq_kernels_cpu_emulation",
        sources=[str(CSRC / "bindings.cpp"), *map(str, sources)],
        extra_cflags=["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-DSOFTVQ_CPU_EMULATION"],
        extra_ldflags=["-pthread"],
        extra_include_paths=[str(CSRC / "emu"), str(CSRC)],
        build_directory=str(out),
    )
    print(f"\nCPU emulation extension built in {time.perf_counter() - start:.1f} s")
    return module


@pytest.fixture
def emulated_cuda(emulated_extension, monkeypatch):
    """backend="cuda" served by the emulation extension, on CPU tensors (never with a GPU present)."""
    if HAS_GPU:
        pytest.skip("a GPU runs the real kernels instead")
    monkeypatch.setattr(_build, "_module", emulated_extension)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    spec = backends.REGISTRY["cuda"]
    monkeypatch.setitem(backends.REGISTRY, "cuda", dataclasses.replace(spec, devices=(*spec.devices, "cpu")))
    return "cuda"


@needs_gxx
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_emulated_backend_matches_reference(emulated_cuda, distance, masked):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        shared._check_against_reference(emulated_cuda, (2, 9), 37, 19, dtype, distance, masked)


@needs_gxx
@pytest.mark.parametrize("T_shape, V, d", [((1,), 1, 16), ((2, 3, 5), 67, 33), ((70,), 130, 17)])
def test_emulated_backend_shapes(emulated_cuda, T_shape, V, d):
    shared._check_against_reference(emulated_cuda, T_shape, V, d, torch.float32, "l2", masked=False)


@needs_gxx
@pytest.mark.parametrize("distance", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_emulated_backend_several_chunks(emulated_cuda, monkeypatch, dtype, distance):
    monkeypatch.setenv("SOFTVQ_WORKSPACE_BYTES", "1")  # 64-column chunks
    shared._check_against_reference(emulated_cuda, (67,), 200, 40, dtype, distance, masked=True)


@needs_gxx
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("regime", ["inputs_x1e3", "tau_1e-30"])
def test_emulated_backend_one_hot_regime(emulated_cuda, distance, regime):
    shared.test_one_hot_regime_is_exact(emulated_cuda, distance, regime)


@needs_gxx
def test_emulated_backend_edge_cases(emulated_cuda):
    shared.test_huge_l2_inputs_snap_to_nearest_code(emulated_cuda)
    shared.test_empty_batch(emulated_cuda)
    shared.test_all_frames_masked(emulated_cuda)
    shared.test_float_and_tensor_temperature_agree(emulated_cuda)


@needs_gxx
@pytest.mark.parametrize("distance", ["l2", "dot", "cosine"])
def test_emulated_codebook_stats(emulated_cuda, distance):
    from softvq_kernels import chunked
    from softvq_kernels.autograd import inverse_norms

    x, codebook, rows = torch.randn(45, 20), torch.randn(150, 20), torch.randn(45, 7)
    tau = torch.tensor(0.8)
    scoring = Scoring(distance, *((inverse_norms(x), inverse_norms(codebook)) if distance == "cosine" else ()))
    _, lse, _, _ = chunked.forward(x, codebook, tau, scoring, False)
    counts, sums = cuda_backend.codebook_stats(x, codebook, tau, scoring, lse, rows)
    counts_ref, sums_ref = chunked.codebook_stats(x, codebook, tau, scoring, lse, rows)
    assert rel_err(counts, counts_ref) < 1e-5 and rel_err(sums, sums_ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels (tests/test_backends.py also runs its whole suite on "cuda" there)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("T_shape, V, d", [((37,), 203, 67), ((2, 65), 1000, 128), ((130,), 517, 256)])
def test_gpu_matches_reference_over_several_tiles(T_shape, V, d, masked, dtype, distance):
    shared._check_against_reference("cuda", T_shape, V, d, dtype, distance, masked, scale=d**-0.25)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("distance", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_gpu_several_chunks_and_large_d(monkeypatch, dtype, distance):
    monkeypatch.setenv("SOFTVQ_WORKSPACE_BYTES", "1")  # 64-column chunks
    shared._check_against_reference("cuda", (70,), 333, 1000, dtype, distance, True, scale=1000**-0.25)


@pytest.mark.gpu
@needs_gpu
def test_gpu_float64_is_refused_clearly():
    x = torch.randn(4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cuda_backend.forward(x, x[:3], x[:3], torch.tensor(1.0, device="cuda"), True, False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("l2", [True, False], ids=["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_gpu_codebook_stats(dtype, l2):
    from softvq_kernels import chunked

    x, keys = torch.randn(300, 96, device="cuda").to(dtype) * 0.3, torch.randn(700, 96, device="cuda").to(dtype) * 0.3
    rows, tau = x.float(), torch.tensor(0.8, device="cuda")
    _, lse, _, _ = chunked.forward(x, keys, keys, tau, l2, False)
    counts, sums = cuda_backend.codebook_stats(x, keys, tau, l2, lse, rows)
    counts_ref, sums_ref = chunked.codebook_stats(x, keys, tau, l2, lse, rows)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(counts, counts_ref) < tol and rel_err(sums, sums_ref) < tol


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_gpu_agrees_with_triton(dtype, distance):
    if "triton" not in available_backends("cuda"):
        pytest.skip("the triton backend is not available")
    x, codebook, temperature, mask = random_problem((257,), 1531, 192, dtype, "cuda", scale=192**-0.25, masked=True)
    upstream = torch.randn(257, 192, device="cuda")
    ours = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="cuda", upstream=upstream)
    theirs = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="triton", upstream=upstream)
    tol = 2 * shared.REL_TOL[dtype]
    (y, aux, grads), (y_t, aux_t, grads_t) = ours, theirs
    assert rel_err(y, y_t) < tol and rel_err(aux.lse, aux_t.lse) < tol
    assert rel_err(aux.code_counts, aux_t.code_counts) < tol
    for name, grad, grad_t in zip(("x", "codebook", "temperature"), grads, grads_t):
        assert rel_err(grad, grad_t) < 3 * tol, name
