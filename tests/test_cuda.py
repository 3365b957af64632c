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

CUTLASS GEMMs (csrc/softvq_gemm_sm90.cu, csrc/softvq_gemm_sm80.cu; opt-in with SOFTVQ_CUDA_GEMM=cutlass):
without a GPU, header discovery and build wiring, and one instantiation of each compiled with nvcc
(about 1.5 min each on 2 cores) whose SASS must hold HGMMA (sm_90a) / HMMA (sm_80). On a GPU whose
build has them (TORCH_CUDA_ARCH_LIST with 9.0a, see csrc/gpu_check_cutlass.sh), the bare product
against torch on both paths, aligned and not.
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
# Anywhere: CUTLASS header discovery and build wiring


def _fake_cutlass_checkout(root: Path) -> Path:
    for header in ("cutlass/cutlass.h", "cute/tensor.hpp"):
        (root / "include" / header).parent.mkdir(parents=True, exist_ok=True)
        (root / "include" / header).write_text("// empty\n")
    return root


def test_cutlass_headers_from_cutlass_path(monkeypatch, tmp_path):
    checkout = _fake_cutlass_checkout(tmp_path / "cutlass")
    monkeypatch.setenv("CUTLASS_PATH", str(checkout))
    assert _build.find_cutlass_include() == checkout / "include"
    monkeypatch.setenv("CUTLASS_PATH", str(checkout / "include"))  # the include folder itself also works
    assert _build.find_cutlass_include() == checkout / "include"


def test_cutlass_headers_from_the_wheel(monkeypatch):
    pytest.importorskip("cutlass_library", reason="needs the nvidia-cutlass wheel (test extra)")
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    include = _build.find_cutlass_include()
    assert include.name == "include" and include.parent.name == "source"
    assert (include / "cute" / "atom" / "mma_traits_sm90_gmma.hpp").is_file()


def test_missing_cutlass_headers_name_both_options(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "cutlass_library" else real_find_spec(name, *args))
    with pytest.raises(RuntimeError, match="CUTLASS_PATH") as error:
        _build.find_cutlass_include()
    assert "pip install nvidia-cutlass" in str(error.value)


def test_sm90a_gemm_joins_the_build_only_for_9_0a(monkeypatch, tmp_path, capsys):
    checkout = _fake_cutlass_checkout(tmp_path / "cutlass")
    monkeypatch.setenv("CUTLASS_PATH", str(checkout))
    monkeypatch.delenv("SOFTVQ_CUTLASS_SM80", raising=False)
    for arch_list in (None, "8.0;9.0+PTX", "9.0", "8.6"):
        assert _build.extension_parts(arch_list) == (list(_build.SOURCES), [], []), arch_list
    for arch_list in ("9.0a", "8.0;9.0a", "8.0 9.0a+PTX"):
        sources, includes, flags = _build.extension_parts(arch_list)
        assert sources == [*_build.SOURCES, _build.CUTLASS_SM90A_SOURCE], arch_list
        assert includes == [str(checkout / "include")] and flags == ["-DSOFTVQ_WITH_CUTLASS_SM90A"]
    # The CuTe sm_80 GEMM only on request, and only for 8.x targets.
    monkeypatch.setenv("SOFTVQ_CUTLASS_SM80", "1")
    assert _build.extension_parts("9.0") == (list(_build.SOURCES), [], [])
    assert _build.extension_parts("8.0;9.0a") == (
        [*_build.SOURCES, _build.CUTLASS_SM90A_SOURCE, _build.CUTLASS_SM80_SOURCE], [str(checkout / "include")],
        ["-DSOFTVQ_WITH_CUTLASS_SM90A", "-DSOFTVQ_WITH_CUTLASS_SM80"])
    # Without headers the build goes on with WMMA only and says so once, never silently.
    monkeypatch.setattr(_build, "find_cutlass_include", lambda: (_ for _ in ()).throw(RuntimeError("no headers")))
    monkeypatch.setattr(_build, "_cutlass_note_said", False)
    capsys.readouterr()
    assert _build.extension_parts("8.0;9.0a") == (list(_build.SOURCES), [], [])
    assert _build.extension_parts("8.0;9.0a") == (list(_build.SOURCES), [], [])
    err = capsys.readouterr().err
    assert err.count("building without the CUTLASS sm_90a and sm_80 GEMM (WMMA only): no headers") == 1, err


# ---------------------------------------------------------------------------------------------
# Anywhere nvcc and the CUTLASS headers are: one instantiation per CUTLASS GEMM, read the SASS


def _compile_cutlass_gemm(tmp_path_factory, source: str, arch: str, one_instance_macro: str):
    """nvcc -c of one CUTLASS GEMM file, a single instantiation (bf16, K-major A), for one arch."""
    cuda_home = _build.find_cuda_home()
    if cuda_home is None:
        pytest.skip("needs nvcc")
    try:
        include = _build.find_cutlass_include()
    except RuntimeError as missing:
        pytest.skip(str(missing))
    out = tmp_path_factory.mktemp(f"softvq_cutlass_{arch}") / (Path(source).stem + ".o")
    command = [f"{cuda_home}/bin/nvcc", *_build.NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
               f"-D{one_instance_macro}", f"-I{CSRC}", f"-I{include}", "-c", str(CSRC / source), "-o", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-6000:]
    print(f"\n{source} (one instantiation) compiled for sm_{arch} in {seconds:.1f} s")
    return out, result.stderr


@pytest.fixture(scope="module")
def cutlass_sm90a_object():
    """The one-instantiation sm_90a object of softvq_kernels.cuda.static_check (same flags plus -Xptxas -v),
    compiled once into its cache: tests/test_static_check.py then reads the same object instead of spending
    the same two minutes of nvcc again."""
    if _build.find_cuda_home() is None:
        pytest.skip("needs nvcc")
    try:
        _build.find_cutlass_include()
    except RuntimeError as missing:
        pytest.skip(str(missing))
    from softvq_kernels.cuda import static_check

    obj, log, seconds = static_check.cutlass_sm90a_object(one_instance=True)
    print(f"\nsoftvq_gemm_sm90.cu (one instantiation) for sm_90a: {seconds:.1f} s of nvcc (0: cached)")
    return obj, log


@pytest.fixture(scope="module")
def cutlass_sm80_object(tmp_path_factory):
    return _compile_cutlass_gemm(tmp_path_factory, "softvq_gemm_sm80.cu", "80", "SOFTVQ_SM80_GEMM_ONE_INSTANCE")


def _gemm_kernel_sass(obj: Path) -> tuple[str, dict[str, str]]:
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (triton's package carries one)")
    elves = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
    kernels = {name: body for name, body in _sass_by_function(cuobjdump, obj).items() if "GemmUniversal" in name}
    assert len(kernels) == 1, sorted(kernels)
    return elves, kernels


@pytest.mark.slow
def test_cutlass_sm90a_gemm_sass_holds_wgmma_and_tma(cutlass_sm90a_object):
    obj, warnings = cutlass_sm90a_object
    elves, kernels = _gemm_kernel_sass(obj)
    assert "sm_90" in elves, elves
    (body,) = kernels.values()
    assert re.search(r"\bHGMMA\.64x\d+x16\.F32\.BF16", body), sorted(set(re.findall(r"\b[A-Z]+MMA[.\w]*", body)))
    assert re.search(r"\bUTMALDG\b", body) and re.search(r"\bUTMASTG\b", body), "expected TMA loads and stores"
    assert "C7510" not in warnings, warnings  # wgmma serialised across a call (device asserts, say)


@pytest.mark.slow
def test_cutlass_sm80_gemm_sass_holds_mma_sync(cutlass_sm80_object):
    obj, _ = cutlass_sm80_object
    elves, kernels = _gemm_kernel_sass(obj)
    assert "sm_80" in elves, elves
    (body,) = kernels.values()
    assert re.search(r"\bHMMA\.16816\.F32\.BF16\b", body), sorted(set(re.findall(r"\b[A-Z]+MMA[.\w]*", body)))
    assert re.search(r"\bLDGSTS\b", body), "expected cp.async (LDGSTS) operand loads"
    assert re.search(r"\bLDSM\b", body), "expected ldmatrix (LDSM) fragment loads"


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
def test_emulated_backend_exact_at_large_temperature(emulated_cuda, distance):
    from tests.test_large_temperature import assert_exact_at_large_temperature

    for tau_value in (1e4, 1e6):
        assert_exact_at_large_temperature(emulated_cuda, None, distance, tau_value, with_y=True)


@needs_gxx
def test_emulated_backend_ties_and_nan_frames(emulated_cuda):
    """Identical rows -> the lowest index, a NaN frame -> -1 (tests/test_surface_exactness.py's rules)."""
    import softvq_kernels as sk
    from tests.test_surface_exactness import _first_argmax, _tied_problem

    x, codebook, _ = _tied_problem(torch.float32)
    x[-1, 0] = torch.nan
    for distance in ("l2", "cosine", "dot"):
        want = _first_argmax(torch.nan_to_num(x), codebook, 0.5, distance)
        want[-1] = -1
        _, aux = sk.soft_vq(x, codebook, 0.5, distance=distance, backend=emulated_cuda, return_aux=True)
        assert aux.indices.tolist() == want.tolist()


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
def test_emulated_gemm_binding_and_path_switch(emulated_extension):
    """The bare product with both operand layouts; "cutlass" in a build without it runs WMMA, no error."""
    assert emulated_extension.cutlass_gemms_compiled() == ""
    assert emulated_extension.gemm_path() == "wmma"
    a, b_t = torch.randn(70, 40), torch.randn(40, 33)  # A (M, K); B (N, K) read transposed, as bindings.cpp does
    for path in ("cutlass", "wmma"):
        emulated_extension.set_gemm_path(path)
        assert emulated_extension.gemm_path() == path
        c = torch.zeros(70, 33)
        emulated_extension.gemm(a, b_t.t(), c, 0.5)
        assert rel_err(c, 0.5 * a.double() @ b_t.double()) < 1e-5
        emulated_extension.gemm(a.t().contiguous().t(), b_t.t(), c, 2.0, accumulate=True)  # M-major A
        assert rel_err(c, 2.5 * a.double() @ b_t.double()) < 1e-5
    with pytest.raises(RuntimeError, match="'wmma' or 'cutlass'"):
        emulated_extension.set_gemm_path("cublas")


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


def _gpu_module_with_cutlass():
    module = _build.load()
    if not module.cutlass_gemms_compiled():
        pytest.skip("this build has no CUTLASS GEMM (build with TORCH_CUDA_ARCH_LIST containing 9.0a and the "
                    "nvidia-cutlass wheel or $CUTLASS_PATH; see csrc/gpu_check_cutlass.sh)")
    return module


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("a_layout", ["k_major", "m_major"])
@pytest.mark.parametrize("M, N, K", [(256, 128, 512), (197, 136, 264), (64, 1000, 4096), (37, 67, 19)])
def test_gpu_cutlass_gemm_matches_torch_on_both_paths(M, N, K, a_layout, dtype):
    """softvq::gemm on the CUTLASS path (aligned shapes) and its WMMA fallback (37 x 67 x 19: strides not
    16-byte multiples) against an fp64 product, plain and accumulating, alpha != 1."""
    module = _gpu_module_with_cutlass()
    a = torch.randn(M, K, device="cuda").to(dtype)
    if a_layout == "m_major":
        a = a.t().contiguous().t()
    b = torch.randn(K, N, device="cuda").to(dtype).t()  # (N, K) with unit stride along N, as bindings.cpp
    expected = a.double() @ b.double().t()
    previous = module.gemm_path()
    try:
        for path in ("cutlass", "wmma"):
            module.set_gemm_path(path)
            c = torch.full((M, N), float("nan"), device="cuda")  # beta = 0 must not read C
            module.gemm(a, b, c, 0.5)
            torch.cuda.synchronize()
            assert rel_err(c, 0.5 * expected) < 2e-3, path
            module.gemm(a, b, c, 1.5, accumulate=True)
            assert rel_err(c, 2.0 * expected) < 2e-3, path
    finally:
        module.set_gemm_path(previous)
