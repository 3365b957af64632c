"""The sharded op's promises beyond tests/test_distributed.py, in a 3-process gloo group, each against an
fp64 oracle built from the formulas on the full codebook (tests/test_surface_exactness.formula_scores):
fp32 gradients at large temperatures, NaN in masked frames through code_scores, ties between identical
rows within and across shards, NaN frames' index, a counts loss on some ranks only, a vocabulary smaller
than the group (tensor_split gives a rank 0 rows), code ranges checked with shard_offset= (the same error
on every rank, and the group still usable), perplexity with every frame masked, empty batches."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import spawn_ranks

TIMEOUT_S = 240
WORLD = 3


def _record(failures, what):
    def check(condition, message=""):
        if not condition:
            failures.append(f"{what}: {message}")
    return check


def _close(failures, what, got, want, rtol, atol):
    try:
        torch.testing.assert_close(got.detach().double(), want.detach().double(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        failures.append(f"{what}: {str(exc).splitlines()[:4]}")


def _shard_rows(V, rank):
    rows = torch.tensor_split(torch.arange(V), WORLD)[rank]  # the README's recipe; uneven, maybe empty
    return (int(rows[0]) if len(rows) else sum(len(r) for r in torch.tensor_split(torch.arange(V), WORLD)[:rank])), len(rows)


def _check_large_temperature(failures, group, rank):
    import softvq_kernels as sk
    from tests.test_surface_exactness import formula_scores

    g = torch.Generator().manual_seed(7)
    V, d, T = 301, 9, 19
    x, codebook = torch.randn(T, d, generator=g).double(), torch.randn(V, d, generator=g).double()
    up_lse, up_y = torch.randn(T, generator=g).double(), torch.randn(T, d, generator=g).double()
    lo, n = _shard_rows(V, rank)
    for distance in ("l2", "cosine", "dot"):
        for tau_value in (1e4, 1e6):
            x32, c32, tau32 = x.float(), codebook.float(), torch.tensor(tau_value)
            leaves = [x32.clone().requires_grad_(), c32[lo : lo + n].clone().requires_grad_(), tau32.clone().requires_grad_()]
            y, aux = sk.soft_vq(*leaves, distance=distance, backend="chunked", return_aux=True, process_group=group)
            grads = torch.autograd.grad((aux.lse.double() * up_lse).sum() + (y.double() * up_y).sum(), leaves)
            ref = [t.double().clone().requires_grad_() for t in (x32, c32, tau32)]
            s = formula_scores(*ref, distance)
            loss = (s.logsumexp(-1) * up_lse).sum() + ((s.softmax(-1) @ ref[1]) * up_y).sum()
            *grads_ref, ds = torch.autograd.grad(loss, [*ref, s])
            what = f"large tau {distance} {tau_value:g}"
            for name, got, want in zip(("x", "codebook"), grads[:2], (grads_ref[0], grads_ref[1][lo : lo + n])):
                err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
                _record(failures, what)(err < 2e-5, f"grad {name} relative error {err:.2e}")
            scale = ((ds * s).abs().sum() / tau_value).item()
            err = abs(grads[2].item() - grads_ref[2].item())
            _record(failures, what)(err <= 4e-6 * scale, f"grad tau error {err:.2e} (term scale {scale:.2e})")


def _check_ties_and_nan_frames(failures, group, rank):
    import softvq_kernels as sk
    from tests.test_surface_exactness import formula_scores

    g = torch.Generator().manual_seed(11)
    V, d = 130, 513
    codebook = torch.randn(V, d, generator=g)
    codebook[[1, 3, 44, 60, 100, 129]] = codebook[1].clone()  # copies in every shard (rows 0-43, 44-86, 87-129)
    x = torch.cat([codebook[1][None] * torch.linspace(0.5, 2.0, 6)[:, None], torch.randn(3, d, generator=g)])
    x[7, 5] = torch.nan
    lo, n = _shard_rows(V, rank)
    for distance in ("l2", "cosine", "dot"):
        s = formula_scores(torch.nan_to_num(x).double(), codebook.double(), torch.tensor(0.5).double(), distance)
        want = s.argmax(-1)
        want[7] = -1  # the NaN frame: no code
        _, aux = sk.soft_vq(x, codebook[lo : lo + n], 0.5, distance=distance, backend="chunked", return_aux=True,
                            process_group=group)
        _record(failures, f"ties {distance}")(aux.indices.tolist() == want.tolist(),
                                               f"{aux.indices.tolist()} != {want.tolist()}")


def _check_counts_loss_on_some_ranks(failures, group, rank):
    """Rank 0 puts a loss on its code_counts, the others none; every rank has the y loss (replicated)."""
    import softvq_kernels as sk
    from tests.test_surface_exactness import formula_scores

    g = torch.Generator().manual_seed(13)
    V, d = 11, 5
    x, codebook = torch.randn(6, d, generator=g).double(), torch.randn(V, d, generator=g).double()
    tau = torch.tensor(0.8, dtype=torch.float64)
    up_y, up_counts = torch.randn(6, d, generator=g).double(), torch.randn(V, generator=g).double()
    lo, n = _shard_rows(V, rank)
    lo0, n0 = _shard_rows(V, 0)
    for distance in ("l2", "cosine", "dot"):
        leaves = [x.clone().requires_grad_(), codebook[lo : lo + n].clone().requires_grad_(), tau.clone().requires_grad_()]
        y, aux = sk.soft_vq(*leaves, distance=distance, backend="chunked", return_aux=True, process_group=group)
        loss = (y * up_y).sum()
        if rank == 0:
            loss = loss + (aux.code_counts * up_counts[lo : lo + n]).sum()
        grads = torch.autograd.grad(loss, leaves)
        ref = [t.clone().requires_grad_() for t in (x, codebook, tau)]
        p = formula_scores(*ref, distance).softmax(-1)
        loss_ref = ((p @ ref[1]) * up_y).sum() + (p.sum(0)[lo0 : lo0 + n0] * up_counts[lo0 : lo0 + n0]).sum()
        grads_ref = torch.autograd.grad(loss_ref, ref)
        for name, got, want in zip(("x", "codebook", "tau"), grads, (grads_ref[0], grads_ref[1][lo : lo + n], grads_ref[2])):
            _close(failures, f"counts loss on rank 0 only, {distance} grad {name}", got, want, 1e-9, 1e-11)


def _check_vocabulary_smaller_than_group(failures, group, rank):
    """V = 2 over 3 ranks: rank 2's shard has no rows; every output and gradient is the unsharded one."""
    import softvq_kernels as sk
    from softvq_kernels import SoftVQ
    from tests.test_surface_exactness import formula_scores

    g = torch.Generator().manual_seed(17)
    V, d = 2, 4
    x, codebook = torch.randn(2, 3, d, generator=g).double(), torch.randn(V, d, generator=g).double()
    tau = torch.tensor(0.9, dtype=torch.float64)
    up_y, up_lse = torch.randn(2, 3, d, generator=g).double(), torch.randn(2, 3, generator=g).double()
    up_counts = torch.randn(V, generator=g).double()
    lo, n = _shard_rows(V, rank)
    check = _record(failures, "V < world")
    check((n == 0) == (rank == 2), f"rank {rank} holds {n} rows")
    for distance in ("l2", "cosine", "dot"):
        leaves = [x.clone().requires_grad_(), codebook[lo : lo + n].clone().requires_grad_(), tau.clone().requires_grad_()]
        y, aux = sk.soft_vq(*leaves, distance=distance, backend="chunked", return_aux=True, process_group=group)
        loss = (y * up_y).sum() + (aux.lse * up_lse).sum() + (aux.code_counts * up_counts[lo : lo + n]).sum()
        grads = torch.autograd.grad(loss, leaves)
        ref = [t.clone().requires_grad_() for t in (x, codebook, tau)]
        s = formula_scores(ref[0].reshape(-1, d), ref[1], ref[2], distance)
        p = s.softmax(-1)
        y_ref, lse_ref = (p @ ref[1]).reshape(2, 3, d), s.logsumexp(-1).reshape(2, 3)
        counts_ref = p.sum(0)
        loss_ref = (y_ref * up_y).sum() + (lse_ref * up_lse).sum() + (counts_ref * up_counts).sum()
        grads_ref = torch.autograd.grad(loss_ref, ref)
        what = f"V < world {distance}"
        _close(failures, f"{what} y", y, y_ref, 1e-9, 1e-11)
        _close(failures, f"{what} lse", aux.lse, lse_ref, 1e-9, 1e-11)
        check(aux.indices.reshape(-1).tolist() == s.argmax(-1).tolist(), f"{distance} indices")
        _close(failures, f"{what} counts", aux.code_counts, counts_ref[lo : lo + n], 1e-9, 1e-11)
        for name, got, want in zip(("x", "codebook", "tau"), grads, (grads_ref[0], grads_ref[1][lo : lo + n], grads_ref[2])):
            _close(failures, f"{what} grad {name}", got, want, 1e-9, 1e-11)
        codes = torch.tensor([[0, 1], [1, 1]])
        cs = sk.code_scores(x, codebook[lo : lo + n], tau, codes, distance=distance, process_group=group)
        want = s.reshape(2, 3, V).gather(-1, codes[:, None, :].expand(2, 3, 2))
        _close(failures, f"{what} code_scores", cs, want, 1e-9, 1e-11)
    for mode in ("soft", "hard"):
        vq = SoftVQ.from_embedding(codebook[lo : lo + n].clone(), temperature=0.9, mode=mode, backend="chunked",
                                   process_group=group).train()
        out = vq(x)
        check(torch.isfinite(out.quantized).all() and torch.isfinite(out.perplexity), f"SoftVQ {mode} not finite")


def _check_masked_frames(failures, group, rank):
    """code_scores' cross-entropy recipe over a shard with NaN in masked frames; SoftVQ's perplexity with
    every frame masked."""
    import softvq_kernels as sk
    from softvq_kernels import SoftVQ
    from tests.test_surface_exactness import formula_scores

    g = torch.Generator().manual_seed(19)
    V, d = 13, 5
    x, codebook = torch.randn(2, 7, d, generator=g).double(), torch.randn(V, d, generator=g).double()
    tau = torch.tensor(0.7, dtype=torch.float64)
    mask = torch.rand(2, 7, generator=g) > 0.35
    mask[0, 0], mask[1, 6] = True, False
    targets = torch.randint(0, V, (2, 7), generator=g)
    lo, n = _shard_rows(V, rank)
    for distance in ("l2", "cosine", "dot"):
        leaves = [torch.where(mask[..., None], x, torch.nan).requires_grad_(), codebook[lo : lo + n].clone().requires_grad_(),
                  tau.clone().requires_grad_()]
        _, aux = sk.soft_vq(*leaves, distance=distance, mask=mask, backend="chunked", return_aux=True, process_group=group)
        log_p = sk.code_scores(*leaves, targets[..., None], distance=distance, process_group=group)[..., 0] - aux.lse
        grads = torch.autograd.grad(-log_p[mask].mean(), leaves)
        ref = [t.clone().requires_grad_() for t in (x, codebook, tau)]
        want = F.cross_entropy(formula_scores(ref[0][mask], ref[1], ref[2], distance), targets[mask])
        grads_ref = torch.autograd.grad(want, ref)
        for name, got, expect in zip(("x", "codebook", "tau"), grads, (grads_ref[0], grads_ref[1][lo : lo + n], grads_ref[2])):
            _close(failures, f"masked NaN CE {distance} grad {name}", got, expect, 1e-9, 1e-11)
    vq = SoftVQ.from_embedding(codebook[lo : lo + n].clone(), temperature=0.7, backend="chunked",
                               process_group=group).train()
    out = vq(x, mask=torch.zeros(2, 7, dtype=torch.bool))
    _record(failures, "all masked")(float(out.perplexity) == 1.0 and float(vq.perplexity) == 1.0,
                                    f"perplexity {float(out.perplexity)}, buffer {float(vq.perplexity)}")
    empty = sk.code_scores(torch.randn(0, 4, d).double(), codebook[lo : lo + n], tau, torch.zeros(0, 2, dtype=torch.int64),
                           process_group=group)
    _record(failures, "empty batch")(empty.shape == (0, 4, 2), str(tuple(empty.shape)))


def _check_code_ranges_with_offset(failures, group, rank):
    """A code outside [0, V) with shard_offset= raises the same ValueError on every rank; the group works after."""
    import softvq_kernels as sk

    V, d = 5, 3
    codebook = torch.randn(V, d, generator=torch.Generator().manual_seed(23))
    lo, n = _shard_rows(V, rank)
    x = torch.randn(2, 4, d, generator=torch.Generator().manual_seed(29))
    lse = torch.zeros(2, 4)
    for what, call in (
        ("code_scores", lambda: sk.code_scores(x, codebook[lo : lo + n], 0.5, torch.tensor([[99], [1]]),
                                               process_group=group, shard_offset=lo)),
        ("ctc targets", lambda: sk.code_ctc_loss(x, codebook[lo : lo + n], 0.5, lse, torch.tensor([[1, 7], [2, 3]]),
                                                 [4, 4], [2, 2], blank=0, process_group=group, shard_offset=lo)),
        ("ctc blank", lambda: sk.code_ctc_loss(x, codebook[lo : lo + n], 0.5, lse, torch.tensor([[1, 2], [2, 3]]),
                                               [4, 4], [2, 2], blank=12, process_group=group, shard_offset=lo)),
    ):
        try:
            call()
            failures.append(f"{what}: an out-of-range code was accepted")
        except ValueError as exc:
            _record(failures, what)("name no row" in str(exc), str(exc))
    alive = torch.ones(1)
    torch.distributed.all_reduce(alive, group=group)
    _record(failures, "group after the errors")(alive.item() == WORLD, f"all-reduce gave {alive.item()}")


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    failures = []
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = torch.distributed.group.WORLD
    try:
        for check in (_check_large_temperature, _check_ties_and_nan_frames, _check_counts_loss_on_some_ranks,
                      _check_vocabulary_smaller_than_group, _check_masked_frames, _check_code_ranges_with_offset):
            try:
                check(failures, group, rank)
            except Exception:
                failures.append(f"{check.__name__}: {traceback.format_exc()}")
                break  # the group may be out of step now: stop rather than hang
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_op_holds_every_promise_in_a_gloo_group(tmp_path):
    procs = spawn_ranks(_worker, WORLD, lambda rank, port: (rank, port, str(tmp_path)), TIMEOUT_S)
    reports = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(WORLD)]
    problems = [f"rank {rank}: {text}" for rank, text in enumerate(reports) if text]
    assert not problems, "\n".join(problems)
    assert [p.exitcode for p in procs] == [0] * WORLD
