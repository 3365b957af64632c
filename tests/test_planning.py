"""softvq_kernels.planning: one chunking policy and one workspace knob for every backend."""

import os
import subprocess
import sys

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import planning


def test_chunk_width_follows_the_memory_budget():
    budget = 24 * 2**20
    with planning.options(memory_budget=budget):
        width = planning.vocab_chunk(4096, 32000, 4, planning.CHUNKED_LIVE_TEMPORARIES)
    assert width * 4096 * 4 * planning.CHUNKED_LIVE_TEMPORARIES <= budget
    assert width >= planning.MIN_CHUNK
    assert planning.vocab_chunk(4, 10, 4) == 10  # never wider than the vocabulary
    assert planning.vocab_chunk(20, 100, 4, multiple=16, min_cols=16, budget=20 * 4 * 40) == 32  # tile multiple
    assert planning.vocab_chunk(20, 100, 4, multiple=16, min_cols=48, budget=1) == 48
    assert planning.vocab_chunk(20, 100, 4, multiple=16, budget=2**30) == 112  # V rounded up to the tile


def test_vocab_splits_reach_the_program_target():
    assert planning.vocab_splits(row_blocks=2, col_tiles=7, target=1) == (7, 1)
    per_split, splits = planning.vocab_splits(row_blocks=2, col_tiles=100, target=64)
    assert per_split * splits >= 100 and 16 <= splits <= 32  # about target / row_blocks programs per row block
    assert planning.vocab_splits(row_blocks=1, col_tiles=3, target=1000) == (1, 3)


@pytest.mark.parametrize("text, expected", [("67108864", 2**26), ("64MiB", 2**26), ("64 mib", 2**26), ("1G", 2**30),
                                            ("512k", 2**19), ("2.5MB", 2_500_000)])
def test_workspace_env_accepts_units(monkeypatch, text, expected):
    monkeypatch.setenv("SOFTVQ_WORKSPACE_BYTES", text)
    assert planning.workspace_bytes() == expected


@pytest.mark.parametrize("name", ["SOFTVQ_WORKSPACE_BYTES", "SOFTVQ_CHUNK_BUDGET_BYTES"])
def test_bad_workspace_env_is_a_clear_error_at_use_not_a_crash_at_import(name):
    env = dict(os.environ, **{name: "lots"})
    code = (
        "import torch, softvq_kernels as sk\n"
        "try:\n    sk.soft_vq(torch.randn(3, 4), torch.randn(5, 4))\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ERR {name} must be a byte count" in out.stdout


def test_units_env_is_used_by_the_chunked_backend(monkeypatch):
    monkeypatch.setenv("SOFTVQ_CHUNK_BUDGET_BYTES", "64MiB")  # the older name of the knob
    x, codebook = torch.randn(6, 10), torch.randn(33, 10)
    torch.testing.assert_close(sk.soft_vq(x, codebook), sk.soft_vq(x, codebook, backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(chunk_size=0), dict(chunk_size=2.5), dict(memory_budget=-1),
                                    dict(memory_budget=True)])
def test_bad_options(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        with planning.options(**kwargs):
            pass
