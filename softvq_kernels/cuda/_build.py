"""Finding, building and loading the compiled extension ``softvq_kernels._cuda``.

Order: the module built by ``pip install`` (``softvq_kernels._cuda``); otherwise a JIT build of the
sources in ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory,
``$TORCH_EXTENSIONS_DIR/softvq_kernels`` or ``~/.cache/softvq_kernels`` (``$XDG_CACHE_HOME`` respected).
torch's own ``load`` rebuilds when a source or a flag changes, and reuses the cache otherwise.

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
HEADERS = ("softvq.h", "softvq_common.cuh")
JIT_NAME = "softvq_kernels_cuda"
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3", "-std=c++17")

_lock = threading.Lock()
_module: ModuleType | None = None


def sources_dir() -> Path | None:
    """The folder with the C++/CUDA sources: inside the installed package, or csrc/ of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES + HEADERS):
            return candidate
    return None


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
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / name) for name in SOURCES],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
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
