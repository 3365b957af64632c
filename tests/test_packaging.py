"""Packaging: ``python -m build`` makes an sdist and a wheel of this checkout, the wheel holds what a user
needs (the package, the CUDA sources for the JIT build) and nothing generic at top level, and it installs
into a fresh virtual environment that already has torch, without reinstalling torch, and works there.

The fresh environment is ``python -m venv --without-pip`` whose site-packages has a .pth line naming this
interpreter's site-packages (torch, triton, numpy), but not its editable install of softvq_kernels (a .pth
file inside a folder named by a .pth line is not processed), so the import must come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in {".cu", ".cuh", ".cpp", ".h"})

pytestmark = pytest.mark.slow


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _checkout_copy(dest: Path) -> Path:
    """The files git would ship (tracked, or untracked and not ignored), copied, so building never writes
    build/ or *.egg-info into the shared working tree."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    pytest.importorskip("build")
    src = _checkout_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, SOFTVQ_BUILD_CUDA="0")  # the pure-Python wheel; the extension is JIT-built on GPUs
    # --no-isolation: build with this environment's setuptools (and torch, which setup.py imports).
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", out, src], env=env)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_wheel_holds_the_package_and_the_cuda_sources_only(dists):
    wheel, _ = dists
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert "softvq_kernels" in tops
    assert not tops & {"benchmarks", "tests", "docs", "scripts", "csrc"}, tops
    for required in ("softvq_kernels/__init__.py", "softvq_kernels/bench/bench_op.py",
                     "softvq_kernels/bench/__main__.py", "softvq_kernels/cuda/_build.py"):
        assert required in names
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("softvq_kernels/cuda/csrc/")}
    assert set(CSRC) <= shipped, f"CUDA sources missing from the wheel: {set(CSRC) - shipped}"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    torch_req = next(r for r in requires if r.split()[1].startswith("torch") and "extra" not in r and "torchaudio" not in r)
    assert ">=" in torch_req and "==" not in torch_req, torch_req  # a range, not a pin


def test_sdist_has_sources_docs_and_constraints(dists):
    _, sdist = dists
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for required in ("pyproject.toml", "setup.py", "README.md", "constraints.txt", "docs/math.md",
                     *(f"csrc/{name}" for name in CSRC)):
        assert required in names, required


def test_wheel_installs_next_to_an_existing_torch_and_runs(dists, tmp_path):
    wheel, _ = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
                      "--no-index", "--disable-pip-version-check", wheel])
    assert "torch" not in installed.stdout.replace("softvq", "")  # nothing but this wheel was installed
    check = (
        "import pathlib, sys, torch, softvq_kernels as sk\n"
        "assert pathlib.Path(sk.__file__).is_relative_to(sys.prefix), sk.__file__\n"
        "from softvq_kernels.cuda import _build\n"
        "assert _build.sources_dir() is not None and _build.sources_dir().is_relative_to(sys.prefix)\n"
        "x, c = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)\n"
        "sk.soft_vq(x, c, 0.5, backend='chunked').sum().backward()\n"
        "assert x.grad.shape == x.shape\n"
        "import importlib.util; assert importlib.util.find_spec('benchmarks') is None\n"
        "print(torch.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ran = _run([python, "-c", check], cwd=tmp_path, env=env)
    assert ran.stdout.strip() == __import__("torch").__version__  # the outer torch, not a new one
    assert (venv / "bin" / "softvq-bench").exists()
    _run([python, "-m", "softvq_kernels.bench", "--help"], cwd=tmp_path, env=env)
