"""Tuning: time candidate configs on the GPU at hand and keep the fastest (explicit, never at import).

This module imports the kernels (forward/backward) and the config table; the kernels import only the
table, so there is no import cycle. ``tune_to_file`` writes a SOFTVQ_TRITON_CONFIGS file whose tables are keyed
by GPU architecture (configs.device_arch), so they never apply to a GPU they were not tuned on.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import triton

from softvq_kernels.backends import Scoring
from softvq_kernels.triton import configs
from softvq_kernels.triton.backward import backward as run_backward
from softvq_kernels.triton.forward import forward as run_forward


def candidates_for(V: int, d: int, dtype: torch.dtype, arch: str = "sm_90") -> list[configs.KernelConfig]:
    """The table's (or the rule's) config and its neighbours: tile shapes, GEMM tiles, chunk budgets."""
    base = configs.TABLES[arch].get((V, d, dtype)) or configs.default_config(V, d, dtype, arch)
    budget = base.workspace_bytes or 64 * 2**20
    out = [base] + [
        dataclasses.replace(base, block_t=bt, block_v=bv, num_warps=w)
        for bt, bv, w in ((64, 64, 8), (64, 128, 8), (128, 64, 8), (128, 128, 8), (64, 64, 4))
        if (bt, bv, w) != (base.block_t, base.block_v, base.num_warps)
    ] + [
        dataclasses.replace(base, mm_block_n=256, mm_num_warps=8),
        dataclasses.replace(base, workspace_bytes=budget // 4),
        dataclasses.replace(base, workspace_bytes=budget * 2),
    ]
    if triton.next_power_of_2(d) <= base.fused_max_d:  # fused vs staged forward; the few-launch schedule
        out.append(dataclasses.replace(base, fused_max_d=0))
        out.append(dataclasses.replace(base, fused_finish=True, fused_backward=True))
    elif base.score_gemm:
        out.append(dataclasses.replace(base, online_output=True))
    return out


def tune(T: int, V: int, d: int, dtype: torch.dtype, candidates=None, *, backward: bool = True,
         device="cuda", bench=None):
    """Time candidate configs for forward (+ backward) at (T, V, d, dtype) and remember the fastest.

    ``bench(fn) -> milliseconds`` defaults to triton.testing.do_bench (CUDA). Returns
    (winner, [(config, milliseconds), ...]); a config that fails to run scores inf.
    """
    if bench is None:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=2, rep=20)

    device = torch.device(device)
    if candidates is None:
        candidates = candidates_for(V, d, dtype, configs.device_arch(device) if device.type == "cuda" else "sm_90")
    x = torch.randn(T, d, device=device, dtype=dtype)
    c = torch.randn(V, d, device=device, dtype=dtype) / d**0.5
    tau = torch.tensor(1.0, device=device)
    g = torch.randn(T, d, device=device, dtype=dtype)
    scoring = Scoring("l2")
    best, best_ms, timings = None, float("inf"), []
    for config in candidates:
        try:
            with configs.override(config):
                def step():
                    y, lse, _, _ = run_forward(x, c, tau, scoring, False)
                    if backward:
                        run_backward(g, x, c, tau, scoring, y, lse, None, None)

                ms = bench(step)
        except Exception:  # a candidate that does not compile (e.g. out of shared memory) just loses
            ms = float("inf")
        timings.append((config, ms))
        if ms < best_ms:
            best, best_ms = config, ms
    configs.remember(V, d, dtype, device, best)
    return best, timings


def tune_to_file(path: str, shapes, dtype: torch.dtype = torch.bfloat16, device="cuda") -> dict:
    """Tune each (T, V, d) of ``shapes`` on ``device`` and write the winners under its architecture in
    the SOFTVQ_TRITON_CONFIGS file ``path`` ({"sm_90": {"V,d,dtype": {...}}}; other architectures'
    tables already in the file are kept)."""
    device = torch.device(device)
    arch = configs.device_arch(device)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    table, report = data.setdefault(arch, {}), {}
    for T, V, d in shapes:
        best, timings = tune(T, V, d, dtype, device=device)
        table[configs.key_text(V, d, dtype)] = dataclasses.asdict(best)
        report[f"{T}x{V}x{d}"] = [(dataclasses.asdict(c), ms) for c, ms in timings]
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return report
