"""Finding, building and loading the compiled extension ``softvq_kernels._cuda``.

Order: the module built by ``pip install`` (``softvq_kernels._cuda``); otherwise a JIT build of the
sources in ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory,
``$TORCH_EXTENSIONS_DIR/softvq_kernels`` or ``~/.cache/softvq_kernels`` (``$XDG_CACHE_HOME`` respected).
torch's own ``load`` rebuilds when a source or a flag changes, and reuses the cache otherwise.

CUTLASS GEMMs (opt-in at run time, see csrc/softvq.h ``set_gemm_path``): when the target architectures
include ``9.0a`` (``TORCH_CUDA_ARCH_LIST="9.0a"``) and CUTLASS 3.x / CuTe headers are found
(``$CUTLASS_PATH`` or the ``nvidia-cutlass`` wheel), csrc/softvq_gemm_sm90.cu (wgmma + TMA) joins the build;
without the headers the build goes on without it and says so once. ``setup.py`` uses the same helpers.

No torch import happens at module import beyond ``torch`` itself: the cpp_extension machinery is
imported only when a build is needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("bindings.cpp", "softvq_fwd.cu", "softvq_bwd.cu", "softvq_gemm.cu")
HEADERS = ("softvq.h", "softvq_common.cuh", "softvq_gemm_cutlass.h")
CUTLASS_SM90A_SOURCE = "softvq_gemm_sm90.cu"  # built for sm_90a targets only, with CUTLASS headers
CUTLASS_SM80_SOURCE = "softvq_gemm_sm80.cu"  # built only on request: SOFTVQ_CUTLASS_SM80=1 and 8.x targets
JIT_NAME = "softvq_kernels_cuda"
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3", "-std=c++17")

_lock = threading.Lock()
_module: ModuleType | None = None


def sources_dir() -> Path | None:
    """The folder with the C++/CUDA sources: inside the installed package, or csrc/ of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent.parent / "csrc"):
        names = SOURCES + HEADERS + (CUTLASS_SM90A_SOURCE, CUTLASS_SM80_SOURCE)
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


def _is_cutlass_include(folder: Path) -> bool:
    return (folder / "cutlass" / "cutlass.h").is_file() and (folder / "cute" / "tensor.hpp").is_file()


def find_cutlass_include() -> Path:
    """The CUTLASS 3.x / CuTe include folder (holding cutlass/ and cute/).

    $CUTLASS_PATH first (a CUTLASS checkout, or its include/ folder itself), else the ``nvidia-cutlass``
    wheel, which ships the headers as cutlass_library/source/include. Raises RuntimeError naming both
    options when neither has them. Does not import cutlass_library (its import pulls in cuda-python).
    """
    tried = []
    env = os.environ.get("CUTLASS_PATH")
    if env:
        for candidate in (Path(env) / "include", Path(env)):
            if _is_cutlass_include(candidate):
                return candidate
        tried.append(f"$CUTLASS_PATH={env} has no include/cutlass/cutlass.h with include/cute/tensor.hpp")
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "source" / "include"
            if _is_cutlass_include(candidate):
                return candidate
        tried.append("the installed cutlass_library package has no source/include folder")
    raise RuntimeError(
        "CUTLASS 3.x / CuTe headers not found: set CUTLASS_PATH to a CUTLASS checkout (or its include/ "
        "folder), or pip install nvidia-cutlass (its cutlass_library/source/include is used)"
        + (f" ({'; '.join(tried)})" if tried else "")
    )


def _arch_entries(arch_list: str | None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST entries without "+PTX": "8.0;9.0a+PTX" -> ["8.0", "9.0a"]."""
    return [entry.split("+")[0].strip() for entry in (arch_list or "").replace(",", ";").replace(" ", ";").split(";")
            if entry.strip()]


def wants_sm90a(arch_list: str | None) -> bool:
    """Whether these targets include sm_90a, the only one the wgmma/TMA kernel is compiled for."""
    return "9.0a" in _arch_entries(arch_list)


def wants_sm80(arch_list: str | None) -> bool:
    """Whether to build the CuTe mma.sync GEMM: asked for (SOFTVQ_CUTLASS_SM80=1, as it adds minutes to
    every build and is unmeasured) and an 8.x target present."""
    asked = os.environ.get("SOFTVQ_CUTLASS_SM80", "").strip().lower() in {"1", "true", "yes", "on"}
    return asked and any(entry.startswith("8.") for entry in _arch_entries(arch_list))


_cutlass_note_said = False


def _note_once(message: str) -> None:
    global _cutlass_note_said
    if not _cutlass_note_said:
        _cutlass_note_said = True
        print(f"softvq_kernels: {message}", file=sys.stderr, flush=True)


def extension_parts(arch_list: str | None) -> tuple[list[str], list[str], list[str]]:
    """(source file names in csrc/, extra include folders, extra nvcc flags) for these targets.

    The CUTLASS sm_90a GEMM joins when the targets include 9.0a and the headers are found; when they are
    not, the build goes on without it (softvq::gemm then always runs WMMA) and says so once."""
    sources, includes, nvcc_flags = list(SOURCES), [], []
    wanted = [(CUTLASS_SM90A_SOURCE, "SOFTVQ_WITH_CUTLASS_SM90A", "sm_90a")] if wants_sm90a(arch_list) else []
    if wants_sm80(arch_list):
        wanted.append((CUTLASS_SM80_SOURCE, "SOFTVQ_WITH_CUTLASS_SM80", "sm_80"))
    if wanted:
        try:
            include = find_cutlass_include()
        except RuntimeError as missing:
            names = " and ".join(name for _, _, name in wanted)
            _note_once(f"building without the CUTLASS {names} GEMM (WMMA only): {missing}")
        else:
            includes.append(str(include))
            for source, macro, _ in wanted:
                sources.append(source)
                nvcc_flags.append(f"-D{macro}")
    return sources, includes, nvcc_flags


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def _point_torch_at_toolkit(cuda_home: str) -> None:
    """torch guesses CUDA_HOME from `which nvcc` at import (here a wrapper in /usr/local/bin, giving
    /usr/local, which has no CUDA headers); set it explicitly before and after that import."""
    os.environ["CUDA_HOME"] = cuda_home
    if "torch.utils.cpp_extension" in sys.modules:
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = cuda_home


def cache_dir() -> Path:
    """Where JIT builds go, one subfolder per torch/CUDA version and target architectures."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        base = Path(root) / "softvq_kernels"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "softvq_kernels"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch:  # torch then builds for the visible GPUs: key the cache by their compute capabilities
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = "visible:" + ",".join(f"{major}.{minor}" for major, minor in caps)
    key = hashlib.sha1(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode()).hexdigest()[:10]
    return base / f"{JIT_NAME}-{key}"


def _import_prebuilt() -> ModuleType | None:
    try:
        from softvq_kernels import _cuda  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cuda


def _ninja_binary() -> str | None:
    """ninja on PATH, else the one the PyPI package installs (next to the interpreter in a venv)."""
    found = shutil.which("ninja")
    if found is not None:
        return found
    try:
        import ninja

        candidate = Path(ninja.BIN_DIR) / "ninja"
    except (ImportError, AttributeError):
        candidate = Path(sys.executable).parent / "ninja"
    return str(candidate) if candidate.is_file() else None


def ensure_ninja_on_path() -> bool:
    """torch.utils.cpp_extension runs `ninja` from PATH; a venv used without activation has it beside
    the interpreter only. Returns whether ninja is now reachable."""
    ninja_bin = _ninja_binary()
    if ninja_bin is None:
        return False
    if shutil.which("ninja") is None:
        os.environ["PATH"] = str(Path(ninja_bin).parent) + os.pathsep + os.environ.get("PATH", "")
    return True


def build_unavailable_reason() -> str | None:
    """None when the extension is importable or can be JIT-built here; else why not, as a sentence."""
    if _module is not None or _import_prebuilt() is not None:
        return None
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support, so softvq_kernels._cuda can be neither built nor loaded"
    if sources_dir() is None:
        return (
            "softvq_kernels._cuda was not built at install time and the csrc/ sources to JIT-build it are "
            "not installed (reinstall with SOFTVQ_BUILD_CUDA=1 on a machine with nvcc)"
        )
    if find_cuda_home() is None:
        return (
            "softvq_kernels._cuda was not built at install time and no CUDA toolkit (nvcc) was found to "
            "JIT-build it (set CUDA_HOME, or reinstall with SOFTVQ_BUILD_CUDA=1 where nvcc exists)"
        )
    if _ninja_binary() is None:
        return "JIT-building softvq_kernels._cuda needs ninja (pip install ninja), and it is not installed"
    return None


def jit_build(*, arch_list: str | None = None, build_directory: str | os.PathLike | None = None,
              verbose: bool = False, quiet: bool = False) -> ModuleType:
    """Compile csrc/ with nvcc + ninja and import the result (torch.utils.cpp_extension.load).

    arch_list: a TORCH_CUDA_ARCH_LIST value for this build (default: the environment's, else the
    visible GPUs'). Raises RuntimeError with the reason when no build is possible here.
    """
    src = sources_dir()
    if src is None:
        raise RuntimeError("cannot JIT-build softvq_kernels._cuda: the csrc/ sources are not installed")
    cuda_home = find_cuda_home()
    if cuda_home is None or torch.version.cuda is None:
        raise RuntimeError(
            "cannot JIT-build softvq_kernels._cuda: "
            + ("this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found; set CUDA_HOME")
        )
    _point_torch_at_toolkit(cuda_home)
    if not ensure_ninja_on_path():
        raise RuntimeError("cannot JIT-build softvq_kernels._cuda: ninja is not installed (pip install ninja)")
    from torch.utils import cpp_extension

    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        out = Path(build_directory) if build_directory is not None else cache_dir()
        out.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(
                f"softvq_kernels: building the CUDA extension with {cuda_home}/bin/nvcc into {out} "
                "(first use only; about a minute or two)...",
                file=sys.stderr,
                flush=True,
            )
        sources, includes, cutlass_flags = extension_parts(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        # Macros reach the host compiler too: bindings.cpp and softvq_gemm.cu see the same ones.
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / name) for name in sources],
            extra_cflags=list(CXX_FLAGS) + cutlass_flags,
            extra_cuda_cflags=list(NVCC_FLAGS) + cutlass_flags,
            extra_include_paths=includes,
            build_directory=str(out),
            verbose=verbose,
        )
    finally:
        if arch_list is not None:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch


def load() -> ModuleType:
    """The extension module: prebuilt if installed, else JIT-built once per process (and cached on disk)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            module = _import_prebuilt()
            if module is None:
                reason = build_unavailable_reason()
                if reason is not None:
                    raise RuntimeError(f"the cuda backend is unavailable: {reason}")
                module = jit_build()
            _module = module
    return _module
