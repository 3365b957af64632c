"""Builds the package; the CUDA extension ``softvq_kernels._cuda`` (csrc/) is added when it should be.

SOFTVQ_BUILD_CUDA=1   build the extension, and fail loudly when that is impossible;
SOFTVQ_BUILD_CUDA=0   never build it;
unset                 build it only when torch with CUDA, nvcc *and a visible GPU* are all present at
                      build time; otherwise skip with a note (the first use on a GPU then JIT-builds it
                      into a cache, see softvq_kernels/cuda/_build.py). This keeps the plain editable
                      install on GPU-less CI machines fast, since compiling costs a minute or more.

torch must be importable at build time, so install with ``pip install --no-build-isolation .`` (an
isolated build environment has no torch: the extension is then skipped with a note, or the build fails
under SOFTVQ_BUILD_CUDA=1). Targets: $TORCH_CUDA_ARCH_LIST, by default "8.0;9.0+PTX" (sm_80, sm_90,
and PTX for newer GPUs). With "9.0a" among them (e.g. "8.0;9.0a") and CUTLASS headers found
($CUTLASS_PATH or the nvidia-cutlass wheel), the CUTLASS wgmma/TMA GEMM for sm_90a is built in too
(opt-in at run time: SOFTVQ_CUDA_GEMM=cutlass); without the headers it is left out with a note.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
SOURCE_SUFFIXES = {".cu", ".cuh", ".cpp", ".h"}


def _note(message: str) -> None:
    print(f"softvq_kernels setup: {message}", file=sys.stderr, flush=True)


def _load_build_helpers():
    """softvq_kernels/cuda/_build.py by path (importing the package itself would run its __init__)."""
    spec = importlib.util.spec_from_file_location("_softvq_build", ROOT / "softvq_kernels" / "cuda" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (softvq_kernels/cuda/csrc) so an install without the compiled
    extension can still JIT-build it on a GPU machine; editable installs read csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "softvq_kernels" / "cuda" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "csrc").iterdir()):
            if path.suffix in SOURCE_SUFFIXES:
                shutil.copy2(path, target / path.name)


def cuda_extension():
    """([extension], {"build_ext": ...}) when the extension is to be built, else ([], {})."""
    flag = os.environ.get("SOFTVQ_BUILD_CUDA", "").strip().lower()
    if flag in {"0", "false", "no", "off"}:
        _note("SOFTVQ_BUILD_CUDA=0: not building the CUDA extension softvq_kernels._cuda")
        return [], {}
    forced = flag in {"1", "true", "yes", "on"}

    def skip(reason: str):
        if forced:
            raise SystemExit(f"softvq_kernels setup: SOFTVQ_BUILD_CUDA=1 but softvq_kernels._cuda cannot be built: {reason}")
        _note(
            f"not building the CUDA extension softvq_kernels._cuda: {reason}. Set SOFTVQ_BUILD_CUDA=1 to "
            "force it; without it the cuda backend JIT-builds on first use on a GPU (needs nvcc and ninja)."
        )
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"this torch ({torch.__version__}) is not a CUDA build")
    helpers = _load_build_helpers()
    cuda_home = helpers.find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit with nvcc was found (set CUDA_HOME)")
    if not forced and not torch.cuda.is_available():
        return skip("no GPU is visible at build time")
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension is imported: it reads CUDA_HOME once
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    use_ninja = shutil.which("ninja") is not None
    _note(
        f"building softvq_kernels._cuda with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST="
        f"{os.environ['TORCH_CUDA_ARCH_LIST']} (torch {torch.__version__}, CUDA {torch.version.cuda}"
        f"{', ninja' if use_ninja else ', no ninja: serial build'})"
    )
    sources, includes, cutlass_flags = helpers.extension_parts(os.environ["TORCH_CUDA_ARCH_LIST"])
    if cutlass_flags:
        _note(f"with the CUTLASS GEMMs {' '.join(cutlass_flags)} (headers: {includes[0]})")
    extension = cpp_extension.CUDAExtension(
        name="softvq_kernels._cuda",
        sources=[f"csrc/{name}" for name in sources],
        depends=[f"csrc/{name}" for name in helpers.HEADERS],
        include_dirs=includes,
        extra_compile_args={"cxx": list(helpers.CXX_FLAGS) + cutlass_flags,
                            "nvcc": list(helpers.NVCC_FLAGS) + cutlass_flags},
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
