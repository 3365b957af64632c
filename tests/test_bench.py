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
    bench_op.main(["--shapes", "64x300x24", "--impls", "eager,sdpa,chunked", "--modes", "fwdbwd,hard", "--reps", "1",
                   "--out", str(out), "--plot", str(tmp_path / "plot.png")])
    report = json.loads(out.read_text())
    assert {"date", "command", "device", "versions", "auto_backend", "load_average_1_5_15min", "shapes",
            "gemm_flops_per_s", "results"} <= report.keys()
    rows = {(r["impl"], r["distance"], r["mode"]): r for r in report["results"]}
    # sdpa has no hard-mode (or cosine) form; every (distance, mode) has a floor row
    assert set(rows) == {(impl, "l2", mode) for impl in ("floor", "eager", "chunked") for mode in ("fwdbwd", "hard")} | {
        ("sdpa", "l2", "fwdbwd")}
    assert not bench_op.supports("sdpa", "cosine", "fwd")
    best_rate = max(report["gemm_flops_per_s"]["64x300x24"].values())
    assert rows["floor", "l2", "fwdbwd"]["time_s"] == pytest.approx(14 * 64 * 300 * 24 / best_rate)
    for (impl, _, _), row in rows.items():
        assert "error" not in row, row
        assert row["time_s"] > 0 and row["time_vs_floor"] > 0
        if impl != "floor":
            assert row["peak_bytes"] >= 0 and row["peak_rss_bytes"] >= 0
    assert rows["eager", "l2", "fwdbwd"]["time_vs_eager"] == 1.0
    assert rows["sdpa", "l2", "fwdbwd"]["time_vs_sdpa"] == 1.0
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("distance", bench_op.SDPA_DISTANCES)
def test_sdpa_row_computes_soft_vq(distance):
    """The sdpa mapping (l2: q = [x, 1, 0...], k = [c, -||c||^2/2, 0...], scale 2/tau) is the same y as eager."""
    x, codebook = torch.randn(37, 20, dtype=torch.float64), torch.randn(101, 20, dtype=torch.float64)
    torch.testing.assert_close(bench_op.sdpa_soft_vq(x, codebook, 0.7, distance),
                               bench_op.naive_soft_vq(x, codebook, 0.7, distance), rtol=1e-10, atol=1e-12)


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
