"""The opt-in schedules of the Triton backend beyond tests/test_triton.py's fp64 comparisons: the launch
budget and host-sync freedom of the few-launch path (flash.py), the hard-mode forward (lse and argmax
without y) on every schedule and through ``SoftVQ(mode="hard")``, and the one-pass large-d forward's
conditional rescale. Interpreter-sized: 16-wide blocks, a few dozen frames and codes."""

from __future__ import annotations

import collections
import contextlib
import importlib

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends
from tests.conftest import DEVICE
from tests.helpers import REL_TOL, fp64_oracle, random_problem, rel_err, run_with_grads

REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's numpy on masked lanes
]

if REASON is None:
    from softvq_kernels.triton import configs

    MODULES = [importlib.import_module(f"softvq_kernels.triton.{name}") for name in ("common", "flash", "forward", "backward")]

TINY = dict(block_t=16, block_v=16, block_k=16, mm_block_m=16, mm_block_n=16, mm_block_k=16)
FLASH = dict(TINY, fused_max_d=64, fused_finish=True, fused_backward=True)


class _CountingLaunch:
    """Stands in for a kernel object: records kernel[grid](...) launches, delegates everything else."""

    def __init__(self, kernel, name, log):
        self._kernel, self._name, self._log = kernel, name, log

    def __getitem__(self, grid):
        self._log.append(self._name)
        return self._kernel[grid]

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)


@contextlib.contextmanager
def count_launches(monkeypatch):
    """Every Triton kernel launch and every torch GEMM the backend issues, by name, in order."""
    log = []
    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                monkeypatch.setattr(module, name, _CountingLaunch(obj, name, log))
            elif name in ("mm_acc", "addmm_acc", "matmul_into") and callable(obj):
                def gemm(*args, _real=obj, _name=name, **kwargs):
                    log.append(_name)
                    return _real(*args, **kwargs)
                monkeypatch.setattr(module, name, gemm)
    yield log
    monkeypatch.undo()


@pytest.mark.parametrize("distance, splits, budget", [("l2", 1, 5), ("l2", 3, 6), ("dot", 3, 5)])
def test_flash_forward_backward_launch_budget(monkeypatch, distance, splits, budget):
    """soft_vq forward + backward (unmasked, loss on y) launches at most 6 kernels on the flash schedule,
    and no GEMM outside Triton; the results match fp64."""
    T, V, d = 20, 48, 24
    x, codebook, temperature, _ = random_problem((T,), V, d, torch.float32, DEVICE)
    upstream = torch.randn(T, d, device=DEVICE)
    with configs.override(**FLASH, min_programs=2 * splits), count_launches(monkeypatch) as log:
        per_split, n_split = configs.vocab_splits(configs.get_config(V, d, x.dtype, DEVICE), T, V, DEVICE)
        y = sk.soft_vq(x, codebook, temperature, distance=distance, backend="triton")
        grads = torch.autograd.grad((y * upstream).sum(), (x, codebook, temperature))
    assert n_split == splits
    launches = collections.Counter(log)
    assert len(log) == budget <= 6, log
    assert launches["online_kernel"] == 1 and launches["_merge_kernel"] == (splits > 1)
    assert launches["_codebook_grad_kernel"] == launches["_frame_grad_kernel"] == 1
    y_ref, _, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=None, upstream=upstream)
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 2 * REL_TOL[torch.float32]


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_flash_backward_with_its_own_tiles_and_d_blocks_matches_fp64(distance):
    """The fused backward at tiles other than the forward's (fused_bwd_block_t / _v) and with the codebook
    kernel split into d-blocks (fused_bwd_block_d: d = 40 pads to 64, four 16-wide blocks, the last one
    partly past d) gives the fp64 gradients, including the lse and counts terms and the column sums that
    only d-block 0 writes; the same problem on one d-block gives the same gradients to rounding."""
    T, V, d = 21, 37, 40
    x, codebook, temperature, _ = random_problem((T,), V, d, torch.float32, DEVICE)
    upstream = torch.randn(T, d, device=DEVICE)
    upstream_lse, upstream_counts = torch.randn(T, device=DEVICE), torch.randn(V, device=DEVICE)
    kwargs = dict(distance=distance, mask=None, upstream=upstream, upstream_lse=upstream_lse,
                  upstream_counts=upstream_counts)
    results = {}
    for block_d in (16, 0):
        with configs.override(**dict(FLASH, block_t=32), fused_bwd_block_t=16, fused_bwd_block_v=32,
                              fused_bwd_block_d=block_d):
            results[block_d] = run_with_grads(x, codebook, temperature, backend="triton", **kwargs)[2]
    _, _, grads_ref = fp64_oracle(x, codebook, temperature, **kwargs)
    for blocked, whole, grad_ref in zip(results[16], results[0], grads_ref):
        assert rel_err(blocked, grad_ref) < 2 * REL_TOL[torch.float32]
        assert rel_err(blocked, whole) < 1e-5


def test_flash_backend_calls_never_read_device_values_on_the_host(monkeypatch):
    """No .item() / float(t) / bool(t) / .tolist() in the backend's forward and backward (a host sync on a
    GPU, and what CUDA-graph capture forbids); shapes alone decide every grid and allocation."""
    import softvq_kernels.triton as tri
    from softvq_kernels.backends import Scoring

    T, V, d = 20, 40, 24
    x, codebook, _, _ = random_problem((T,), V, d, torch.float32, DEVICE, requires_grad=False)
    tau = torch.tensor(0.7, device=DEVICE)
    g = torch.randn(T, d, device=DEVICE)
    gl, gn = torch.randn(T, device=DEVICE), torch.randn(V, device=DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    with configs.override(**FLASH, min_programs=6), monkeypatch.context() as patch:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, attr, refuse)
        y, lse, idx, _ = tri.forward(x, codebook, tau, Scoring("l2"), False)
        pieces = tri.backward(g, x, codebook, tau, Scoring("l2"), y, lse, gl, gn)
        lse_hard, idx_hard = tri.lse_argmax(x, codebook, tau, Scoring("l2"))
    assert torch.equal(idx, idx_hard) and torch.equal(lse, lse_hard)
    assert torch.isfinite(pieces.grad_codebook).all() and torch.isfinite(pieces.grad_x_raw).all()


def test_flash_norms_are_bitwise_the_staged_schedules():
    """The prologue's ||c||^2 and ||x||^2 / tau are the bits rowdot and a torch division give, so either
    forward pairs with either backward and one-hot rows stay exact."""
    flash = importlib.import_module("softvq_kernels.triton.flash")
    common = importlib.import_module("softvq_kernels.triton.common")
    from softvq_kernels.backends import Scoring

    x, codebook = torch.randn(37, 45, device=DEVICE), torch.randn(29, 45, device=DEVICE) * 3
    tau = torch.tensor(0.37, device=DEVICE)
    (_, knorm, _), xoff = flash.prologue(x, codebook, tau.reshape(1), Scoring("l2"))
    (_, knorm_ref, _), xoff_ref = common.score_operands(x, codebook, tau, Scoring("l2"))
    assert torch.equal(knorm, knorm_ref) and torch.equal(xoff, xoff_ref)


@pytest.mark.parametrize("schedule", ["default", "flash", "score_gemm"])
def test_hard_mode_lse_and_argmax_match_the_reference(schedule):
    """lse_argmax (what SoftVQ(mode="hard") runs) on each schedule and on chunked, masked, every distance:
    the reference's lse and indices, without y (test_flash_backend_calls... checks they equal the soft
    forward's bit for bit)."""
    from softvq_kernels.api import lse_argmax

    fields = {"default": dict(TINY, min_programs=6), "flash": dict(FLASH, min_programs=6),
              "score_gemm": dict(TINY, fused_max_d=0, score_gemm=True, workspace_bytes=30 * 4 * 32, min_programs=6)}
    x, codebook, temperature, mask = random_problem((3, 10), 41, 21, torch.float32, DEVICE, masked=True,
                                                    requires_grad=False)
    for distance in ("l2", "cosine", "dot"):
        lse_ref, idx_ref = lse_argmax(x.double(), codebook.double(), temperature.double(), distance, mask, "reference")
        with configs.override(**fields[schedule]):
            lse, idx = lse_argmax(x, codebook, temperature, distance, mask, "triton")
        assert lse.dtype == torch.float32 and lse.shape == idx.shape == mask.shape
        assert torch.equal(idx, idx_ref)
        assert (lse.double() - lse_ref).abs().max() < 1e-5 * (1 + lse_ref.abs().max())
        if schedule == "default":
            lse_c, idx_c = lse_argmax(x, codebook, temperature, distance, mask, "chunked")
            assert torch.equal(idx_c, idx_ref) and (lse_c.double() - lse_ref).abs().max() < 1e-5 * (1 + lse_ref.abs().max())


def test_soft_vq_module_hard_mode_forms_no_weighted_sum(monkeypatch):
    """SoftVQ(mode="hard") takes the lse/argmax path: the flash forward runs without its output accumulator."""
    flash = importlib.import_module("softvq_kernels.triton.flash")
    calls = []
    real = flash.forward
    monkeypatch.setattr(flash, "forward", lambda *a, **k: calls.append(k.get("need_output", True)) or real(*a, **k))
    codebook = torch.randn(33, 20, device=DEVICE)
    x = torch.randn(2, 7, 20, device=DEVICE)
    mask = torch.rand(2, 7, device=DEVICE) > 0.3
    vq = sk.SoftVQ(codebook.clone(), mode="hard", backend="triton").eval()
    with configs.override(**FLASH, min_programs=1):
        out = vq(x, mask=mask)
    ref = sk.SoftVQ(codebook.clone(), mode="hard", backend="reference").eval()(x, mask=mask)
    assert calls == [False]
    assert torch.equal(out.indices, ref.indices) and (out.indices[~mask] == -1).all()
    assert torch.allclose(out.quantized, ref.quantized)


@pytest.mark.parametrize("order", ["growing", "shrinking"])
def test_online_output_rescales_only_rows_whose_max_moved(monkeypatch, order):
    """Codes ordered so later chunks raise rows' maxima by more than the threshold (y rows are rescaled),
    or so the first chunk holds the max (y is never rescaled): y, lse, argmax and gradients match fp64
    either way."""
    forward = importlib.import_module("softvq_kernels.triton.forward")
    T, V, d = 12, 64, 20
    x = torch.randn(T, d, device=DEVICE).abs()
    scale = torch.linspace(0.1, 30.0, V, device=DEVICE)
    if order == "shrinking":
        scale = scale.flip(0)
    codebook = torch.randn(V, d, device=DEVICE).abs() * scale[:, None] / d
    temperature = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    x.requires_grad_(), codebook.requires_grad_()
    upstream = torch.randn(T, d, device=DEVICE)
    moved = []
    with configs.override(**TINY, fused_max_d=0, score_gemm=True, online_output=True, workspace_bytes=T * 4 * 16):
        chunks = forward.score_chunks(configs.get_config(V, d, x.dtype, DEVICE), T, V)
        s = x.detach() @ codebook.detach().T / 0.5
        for start, stop in chunks[1:]:
            previous = s[:, :start].max(dim=1).values
            moved.append(int((s[:, start:stop].max(dim=1).values > previous + forward.RESCALE_THRESHOLD).sum()))
        y, aux, grads = run_with_grads(x, codebook, temperature, distance="dot", mask=None, backend="triton",
                                       upstream=upstream)
    assert len(chunks) == 4
    assert (sum(moved) > 0) == (order == "growing")
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance="dot", mask=None, upstream=upstream)
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    assert torch.equal(aux.indices, aux_ref.indices)
    assert (aux.lse.double() - aux_ref.lse).abs().max() < 1e-5 * (1 + aux_ref.lse.abs().max())
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 2 * REL_TOL[torch.float32]
