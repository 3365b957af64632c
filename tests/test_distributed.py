"""Vocabulary-parallel soft VQ on gloo (CPU, loopback) with 2 and 3 processes and uneven shards: y, lse,
indices, the concatenated counts and every gradient equal the unsharded fp64 reference on the full
codebook, for every distance, with and without a mask, with a learnable temperature; code_scores and
SoftVQ(process_group=...) (soft and hard modes, EMA statistics per shard) too. NCCL on >= 2 GPUs."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from tests.helpers import spawn_ranks

TIMEOUT_S = 180
D = 7



def _close(failures, what, got, want, rtol=1e-9, atol=1e-11):
    try:
        torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        failures.append(f"{what}: {str(exc).splitlines()[0:4]}")


def _problem(seed, V, device, dtype=torch.float64, masked=True):
    g = torch.Generator().manual_seed(seed)  # the same on every rank: x, mask and tau are replicated
    x = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    codebook = torch.randn(V, D, generator=g, dtype=torch.float64)
    tau = torch.tensor(0.5 + torch.rand((), generator=g).item(), dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[0, 0] = True
    up_y = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    up_lse = torch.randn(3, 5, generator=g, dtype=torch.float64)
    up_counts = torch.randn(V, generator=g, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    return (x.to(**to), codebook.to(**to), tau.to(device=device, dtype=dtype if dtype == torch.float64 else torch.float32),
            None if mask is None else mask.to(device), up_y.to(device), up_lse.to(device), up_counts.to(device))


def _check_soft_vq(failures, group, rank, sizes, device, backend, dtype, rtol, atol):
    import softvq_kernels as sk

    V, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    for case, (distance, masked) in enumerate([("l2", True), ("cosine", True), ("dot", False), ("l2", False),
                                               ("cosine", False), ("dot", True)]):
        x, codebook, tau, mask, up_y, up_lse, up_counts = _problem(10 + case, V, device, dtype, masked)
        if case == 0:  # an exact tie across shards: the lowest global index wins
            codebook[V - 1] = codebook[0]
            x[0, 0] = codebook[0]
        for reduce_x_grad, offset in ((True, None), (False, lo)):
            leaves = [t.clone().requires_grad_() for t in (x, codebook[lo:hi], tau)]
            y, aux = sk.soft_vq(*leaves, distance=distance, mask=mask, backend=backend, return_aux=True,
                                process_group=group, shard_offset=offset, reduce_x_grad=reduce_x_grad)
            loss = ((y.double() * up_y).sum() + (aux.lse.double() * up_lse).sum()
                    + (aux.code_counts.double() * up_counts[lo:hi]).sum())
            grads = list(torch.autograd.grad(loss, leaves))
            if not reduce_x_grad:  # partial: the sum over ranks is the full gradient
                torch.distributed.all_reduce(grads[0], group=group)

            ref = [t.detach().double().clone().requires_grad_() for t in (x, codebook, tau)]
            y_ref, aux_ref = sk.soft_vq(*ref, distance=distance, mask=mask, backend="reference", return_aux=True)
            loss_ref = (y_ref * up_y).sum() + (aux_ref.lse * up_lse).sum() + (aux_ref.code_counts * up_counts).sum()
            grads_ref = torch.autograd.grad(loss_ref, ref)
            what = f"{distance} masked={masked} reduce_x_grad={reduce_x_grad}"
            _close(failures, f"{what} y", y, y_ref, rtol, atol)
            _close(failures, f"{what} lse", aux.lse, aux_ref.lse, rtol, atol)
            if not torch.equal(aux.indices.cpu(), aux_ref.indices.cpu()):
                failures.append(f"{what} indices {aux.indices.tolist()} != {aux_ref.indices.tolist()}")
            _close(failures, f"{what} counts", aux.code_counts, aux_ref.code_counts[lo:hi], rtol, atol)
            for name, got, want in zip(("x", "codebook", "tau"), grads, (grads_ref[0], grads_ref[1][lo:hi], grads_ref[2])):
                _close(failures, f"{what} grad {name}", got, want, rtol, atol)


def _check_code_scores(failures, group, rank, sizes, device):
    import softvq_kernels as sk
    from softvq_kernels.reference import scores

    V, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    for distance in ("l2", "cosine", "dot"):
        x, codebook, tau, *_ = _problem(40, V, device)
        codes = torch.randint(0, V, (3, 5, 4), generator=torch.Generator().manual_seed(41)).to(device)
        up = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(42), dtype=torch.float64).to(device)
        leaves = [t.clone().requires_grad_() for t in (x, codebook[lo:hi], tau)]
        s = sk.code_scores(*leaves, codes, distance=distance, process_group=group)
        grads = torch.autograd.grad((s * up).sum(), leaves)
        ref = [t.clone().requires_grad_() for t in (x, codebook, tau)]
        s_ref = scores(ref[0].reshape(-1, D), ref[1], ref[2], distance).reshape(3, 5, V).gather(-1, codes)
        grads_ref = torch.autograd.grad((s_ref * up).sum(), ref)
        _close(failures, f"code_scores {distance}", s, s_ref)
        for name, got, want in zip(("x", "codebook", "tau"), grads, (grads_ref[0], grads_ref[1][lo:hi], grads_ref[2])):
            _close(failures, f"code_scores {distance} grad {name}", got, want)


def _check_module(failures, group, rank, sizes, device):
    """SoftVQ over a shard equals SoftVQ over the full codebook: outputs, losses, the shard's gradient,
    and after one training step the EMA buffers and codebook of the shard."""
    from softvq_kernels import SoftVQ, module

    V, lo = sum(sizes), sum(sizes[:rank])
    hi = lo + sizes[rank]
    x, codebook, _, mask, up_y, *_ = _problem(50, V, device, torch.float32)
    for kwargs in (dict(mode="soft", ema_decay=0.9), dict(mode="hard", ema_decay=0.9),
                   dict(mode="soft", learnable_temperature=True), dict(mode="hard")):
        what = f"SoftVQ {kwargs}"
        full = SoftVQ(codebook.double(), 0.7, backend="reference", **kwargs).train()
        shard = SoftVQ.from_embedding(codebook[lo:hi].double(), temperature=0.7, backend="chunked",
                                      process_group=group, **kwargs).train()
        xs = [x.double().clone().requires_grad_() for _ in range(2)]
        out = shard(xs[0], mask=mask)
        ((out.quantized * up_y).sum() + out.loss).backward()
        # The full-codebook oracle is one process: its DDP all-reduce of the statistics must not run here.
        saved, module._all_reduce_sum_ = module._all_reduce_sum_, lambda *tensors, group=None: None
        try:
            out_ref = full(xs[1], mask=mask)
        finally:
            module._all_reduce_sum_ = saved
        ((out_ref.quantized * up_y).sum() + out_ref.loss).backward()
        _close(failures, f"{what} quantized", out.quantized, out_ref.quantized, 1e-6, 1e-8)
        _close(failures, f"{what} loss", out.loss, out_ref.loss, 1e-6, 1e-8)
        _close(failures, f"{what} perplexity", out.perplexity, out_ref.perplexity, 1e-5, 1e-6)
        _close(failures, f"{what} code_counts", out.code_counts, out_ref.code_counts[lo:hi], 1e-6, 1e-8)
        if not torch.equal(out.indices, out_ref.indices):
            failures.append(f"{what} indices differ")
        if int(out.dead_codes) != int(out_ref.dead_codes):
            failures.append(f"{what} dead_codes {int(out.dead_codes)} != {int(out_ref.dead_codes)}")
        _close(failures, f"{what} grad x", xs[0].grad, xs[1].grad, 1e-6, 1e-8)
        _close(failures, f"{what} ema_counts", shard.ema_counts, full.ema_counts[lo:hi], 1e-6, 1e-8)
        _close(failures, f"{what} codebook", shard.codebook, full.codebook[lo:hi], 1e-6, 1e-8)
        if shard.codebook.grad is not None or full.codebook.grad is not None:
            _close(failures, f"{what} grad codebook", shard.codebook.grad, full.codebook.grad[lo:hi], 1e-6, 1e-8)
        if kwargs.get("learnable_temperature"):
            _close(failures, f"{what} grad tau", shard.log_temperature.grad, full.log_temperature.grad, 1e-6, 1e-8)


def _worker(rank, world, port, out_dir, device_kind, backend):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    failures = []
    nccl = device_kind == "cuda"
    if nccl:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if nccl else torch.device("cpu")
        # One spawn serves every layout (importing torch._dynamo costs seconds per process): the whole world
        # with uneven shards, and with 3 processes also a 2-rank subgroup.
        layouts = [(torch.distributed.group.WORLD, SIZES[world])]
        if world == 3:
            pair = torch.distributed.new_group([0, 1])
            if rank < 2:
                layouts.append((pair, SIZES[2]))
        for group, sizes in layouts:
            where = f"[{len(sizes)} ranks {sizes}] "
            found = []
            if nccl:  # the GPU backends take fp32: compare at fp32 accuracy
                _check_soft_vq(found, group, rank, sizes, device, backend, torch.float32, 2e-3, 2e-4)
            else:
                _check_soft_vq(found, group, rank, sizes, device, backend, torch.float64, 1e-9, 1e-11)
                _check_code_scores(found, group, rank, sizes, device)
                _check_module(found, group, rank, sizes, device)
            failures += [where + f for f in found]
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        torch.distributed.destroy_process_group()


# Shard sizes per layout: uneven, with a shard smaller than the others.
SIZES = {2: [6, 5], 3: [4, 7, 2]}


def _run(tmp_path, world, device_kind="cpu", backend="chunked"):
    procs = spawn_ranks(_worker, world, lambda rank, port: (rank, world, port, str(tmp_path), device_kind, backend), TIMEOUT_S)
    reports = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(world)]
    problems = [f"rank {rank}: {text}" for rank, text in enumerate(reports) if text]
    assert not problems, "\n".join(problems)
    assert [p.exitcode for p in procs] == [0] * world


@pytest.mark.slow
def test_vocab_parallel_gloo_matches_unsharded(tmp_path):
    """3 processes (shards 4, 7, 2 rows) and a 2-process subgroup (6, 5) in one spawn."""
    _run(tmp_path, 3)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL test needs at least 2 visible GPUs")
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_vocab_parallel_nccl_matches_unsharded(tmp_path, backend):
    _run(tmp_path, 2, device_kind="cuda", backend=backend)


def test_process_group_errors():
    import softvq_kernels as sk

    x, codebook = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="shard_offset is only meaningful"):
        sk.soft_vq(x, codebook, shard_offset=2)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialised"):
            sk.soft_vq(x, codebook, process_group=object())
