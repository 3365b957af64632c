"""The benchmark entry point and the README's promises about commands."""

import json
import re
from pathlib import Path

import pytest
import torch

from softvq_kernels.bench import bench_op

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_command) == 1
    readme_commands = re.findall(r"^(bash scripts/setup_env\.sh && .*?)\s+#", (ROOT / "README.md").read_text(), re.M)
    assert len(readme_commands) == 2, "README opens with the main-job command and the test command"
    assert ci_command[0].strip() == readme_commands[1].strip()


def test_shape_parsing():
    assert bench_op.parse_shape("4096x32000x256") == (4096, 32000, 256)
    for bad in ("4096x32000", "0x1x1", "axbxc"):
        with pytest.raises(Exception, match="shape"):
            bench_op.parse_shape(bad)


def test_benchmark_runs_end_to_end_on_a_tiny_shape(tmp_path):
    out = tmp_path / "report.json"
    bench_op.main(["--shapes", "64x300x24", "--impls", "eager,chunked", "--modes", "fwdbwd", "--reps", "1",
                   "--out", str(out), "--plot", str(tmp_path / "plot.png")])
    report = json.loads(out.read_text())
    assert {"date", "device", "versions", "shapes", "results"} <= report.keys()
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"eager", "chunked"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["time_s"] > 0 and row["peak_bytes"] >= 0
    assert rows["eager"]["time_vs_eager"] == 1.0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_triton_profiler_calls_the_backend_contract():
    """profile_triton drives the Triton backend directly: its calls must match the backend contract."""
    pytest.importorskip("triton")
    from softvq_kernels import backends

    if backends.unavailable_reason("triton", torch.device("cpu")) is not None and not torch.cuda.is_available():
        pytest.skip("no Triton on this machine")
    from softvq_kernels.bench import profile_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, c, g = torch.randn(16, 16, device=device), torch.randn(40, 16, device=device), torch.randn(16, 16, device=device)
    fns = profile_triton.phases(x, c, g, torch.tensor(1.0, device=device))
    y, lse, _, _ = fns["fwd"]()
    assert y.shape == x.shape and lse.shape == (16,)
    assert fns["bwd"]().grad_x_raw.shape == x.shape
