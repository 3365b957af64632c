"""DDP with 2 CPU processes on gloo (loopback only, bounded time): the EMA statistics of SoftVQ are
all-reduced, so both ranks end with the codebook the formula gives on the union of their batches."""

from __future__ import annotations

import os

import pytest
import torch
from tests.helpers import spawn_ranks
from torch import nn

from softvq_kernels import SoftVQ
from softvq_kernels.reference import scores

WORLD, V, D, DECAY, TAU = 2, 7, 4, 0.9, 0.5
TIMEOUT_S = 120


class _Model(nn.Module):
    def __init__(self, codebook):
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.soft = SoftVQ(codebook, TAU, ema_decay=DECAY)
        self.hard = SoftVQ(codebook, mode="hard", ema_decay=DECAY)

    def forward(self, x, mask):
        h = self.encoder(x)
        soft, hard = self.soft(h, mask=mask), self.hard(h, mask=mask)
        return soft.quantized.square().mean() + hard.quantized.square().mean() + soft.loss + hard.loss


def _setup(seed=0):
    torch.manual_seed(seed)
    codebook = torch.randn(V, D)
    return _Model(codebook)


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 3 + rank, D, generator=g)
    mask = torch.ones(2, 3 + rank, dtype=torch.bool)
    mask[rank, -1] = False
    return x, mask


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = nn.parallel.DistributedDataParallel(_setup())
        x, mask = _batch(rank)
        model(x, mask).backward()
        torch.save({k: v for k, v in model.module.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()



def _expected(model):
    """The EMA formula on the union of both ranks' real frames (one process, no torch.distributed)."""
    frames = []
    with torch.no_grad():
        for rank in range(WORLD):
            x, mask = _batch(rank)
            frames.append(model.encoder(x)[mask])
    h = torch.cat(frames).double()
    codebook = model.soft.codebook.double()
    probs = scores(h, codebook, torch.tensor(TAU, dtype=torch.float64), "l2").softmax(-1)
    one_hot = torch.nn.functional.one_hot(probs.argmax(-1), V).double()
    result = {}
    for name, p in (("soft", probs), ("hard", one_hot)):
        N = DECAY + (1 - DECAY) * p.sum(0)
        M = DECAY * codebook + (1 - DECAY) * (p.T @ h)
        smoothed = (N + 1e-5) / (N.sum() + V * 1e-5) * N.sum()
        result[name] = (N, M, M / smoothed[:, None])
    return result


@pytest.mark.slow
def test_ddp_gloo_synchronises_ema_statistics(tmp_path):
    procs = spawn_ranks(_worker, WORLD, lambda rank, port: (rank, port, str(tmp_path)), TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0] * WORLD

    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between ranks"
    expected = _expected(_setup())
    for prefix, (N, M, codebook) in expected.items():
        torch.testing.assert_close(states[0][f"{prefix}.ema_counts"].double(), N)
        torch.testing.assert_close(states[0][f"{prefix}.ema_sums"].double(), M)
        torch.testing.assert_close(states[0][f"{prefix}.codebook"].double(), codebook, rtol=1e-5, atol=1e-6)
