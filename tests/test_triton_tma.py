"""KernelConfig.tma: the online forward kernel reading its frame and codebook tiles through device-side TMA
tensor descriptors (tl.make_tensor_descriptor) gives what the pointer path gives, at odd shapes, fp32 and fp16,
on the default, flash and staged (large-d) schedules; inputs TMA cannot read fall back to the pointer path with
a TMAFallback warning, never a wrong answer; the descriptor workspace allocator never replaces a user's.
Under Triton's interpreter (conftest), which checks TMA's layout rules (16-byte base and row strides) as the
hardware does. What it compiles to on sm_90 (UTMALDG, HGMMA, spills) is tests/test_static_check.py's part."""

from __future__ import annotations

import contextvars
import warnings

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends
from tests.conftest import DEVICE
from tests.helpers import REL_TOL, fp64_oracle, rel_err, run_with_grads

REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's numpy on masked lanes
]

if REASON is None:
    from softvq_kernels.triton import common, configs

TINY = dict(block_t=16, block_v=16, block_k=16, mm_block_m=16, mm_block_n=16, mm_block_k=16)
SCHEDULES = {
    "default": dict(TINY, fused_max_d=64, min_programs=3),  # online kernel with the output product, split V
    "flash": dict(TINY, fused_max_d=64, fused_finish=True, fused_backward=True, min_programs=1),  # FINISH
    "staged": dict(TINY, fused_max_d=0, min_programs=3),  # large-d schedule: the online kernel's scores only
}


def _padded(rows: int, d: int, width: int, dtype, scale: float = 1.0) -> torch.Tensor:
    """(rows, d) values in a (rows, width) allocation: row stride width, odd d, TMA-readable for 16 B rows."""
    return (torch.randn(rows, width, device=DEVICE) * scale).to(dtype)[:, :d]


@pytest.fixture
def tma_calls(monkeypatch):
    """The decisions of every online-kernel launch (True: TMA path) and the warnings they raised."""
    calls = []
    real = common.use_tma

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(common, "use_tma", spy)
    return calls


@pytest.mark.parametrize("dtype, distance", [(torch.float32, "l2"), (torch.float16, "l2"), (torch.float32, "cosine")])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_tma_path_matches_pointer_path_and_fp64(tma_calls, dtype, distance, schedule):
    """T = 23 frames, V = 45 codes (partial last tiles), d = 37 (partial k-block and output columns, row stride
    40 elements: 16-byte rows in both dtypes): y, lse, argmax and every gradient (lse and counts terms too) from
    the TMA path equal the pointer path's bit for bit (same operands, same k order) and match the fp64 reference.
    On the flash schedule the fused backward's kernels (counts gradient, dC, dx) read their tiles by TMA too,
    g (contiguous, 74 / 148 B rows from autograd) re-laid into 16-byte rows by the launcher."""
    torch.manual_seed(0)
    T, V, d = 23, 45, 37
    x = _padded(T, d, 40, dtype).requires_grad_()
    codebook = _padded(V, d, 40, dtype, 0.7).requires_grad_()
    temperature = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    upstream = torch.randn(T, d, device=DEVICE)  # g reaches the backward contiguous (74 / 148 B rows): re-laid
    upstream_lse, upstream_counts = torch.randn(T, device=DEVICE), torch.randn(V, device=DEVICE)
    kwargs = dict(distance=distance, mask=None, upstream=upstream, upstream_lse=upstream_lse,
                  upstream_counts=upstream_counts)
    results = {}
    for tma in (False, True):
        tma_calls.clear()
        with configs.override(**SCHEDULES[schedule], tma=tma), warnings.catch_warnings():
            warnings.simplefilter("error", common.TMAFallback)
            results[tma] = run_with_grads(x, codebook, temperature, backend="triton", **kwargs)
        if tma:
            assert tma_calls and all(tma_calls), tma_calls  # every online launch took the TMA path
    (y, aux, grads), (y_ref_ptr, aux_ptr, grads_ptr) = results[True], results[False]
    assert torch.equal(y, y_ref_ptr)
    assert torch.equal(aux.lse, aux_ptr.lse) and torch.equal(aux.indices, aux_ptr.indices)
    for grad, grad_ptr in zip(grads, grads_ptr):
        assert torch.equal(grad, grad_ptr)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, **kwargs)
    tol = 2 * REL_TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(aux.lse, aux_ref.lse) < tol
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < tol


@pytest.mark.parametrize("distance", ["dot", "cosine"])
def test_tma_hard_mode_and_other_distances(tma_calls, distance):
    """lse_argmax (the online kernel without the output product) on the TMA path: the pointer path's bits."""
    from softvq_kernels.api import lse_argmax

    torch.manual_seed(1)
    x, codebook = _padded(19, 29, 32, torch.float32), _padded(41, 29, 32, torch.float32)
    temperature = torch.tensor(0.6, device=DEVICE)
    out = {}
    for tma in (False, True):
        with configs.override(**SCHEDULES["default"], tma=tma), warnings.catch_warnings():
            warnings.simplefilter("error", common.TMAFallback)
            out[tma] = lse_argmax(x, codebook, temperature, distance, None, "triton")
    assert tma_calls == [False, True]  # one online launch per call: pointer path, then TMA
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    lse_ref, idx_ref = lse_argmax(x.double(), codebook.double(), temperature.double(), distance, None, "reference")
    assert torch.equal(out[True][1], idx_ref)
    assert (out[True][0].double() - lse_ref).abs().max() < 1e-5 * (1 + lse_ref.abs().max())


def test_tma_falls_back_with_a_reason_when_rows_are_not_16_byte_aligned(tma_calls):
    """fp16 rows of d = 37 contiguous elements (74 B): TMA cannot address them; the pointer path runs, a
    TMAFallback warning names the stride, and the answer is right."""
    torch.manual_seed(2)
    x = torch.randn(23, 37, device=DEVICE).half()
    codebook = torch.randn(45, 37, device=DEVICE).half()
    temperature = torch.tensor(0.8, device=DEVICE)
    with (configs.override(**SCHEDULES["default"], tma=True),
          pytest.warns(common.TMAFallback, match="74 B is not a multiple of 16 B")):
        y = sk.soft_vq(x, codebook, temperature, distance="l2", backend="triton")
    assert tma_calls == [False]
    with configs.override(**SCHEDULES["default"]):
        y_ptr = sk.soft_vq(x, codebook, temperature, distance="l2", backend="triton")
    assert torch.equal(y, y_ptr)


def test_tma_fallback_reasons():
    """The layout rules, one at a time (meta tensors stand for any device's layout)."""
    meta = dict(device="meta")
    good = torch.empty(64, 40, dtype=torch.float16, **meta)
    boxes = ([(16, 16)], [(16, 16), (16, 64)])
    assert common.tma_fallback_reason((good, good), boxes, torch.device("meta")) is None
    odd = torch.empty(64, 37, dtype=torch.float16, **meta)
    assert "row stride 37" in common.tma_fallback_reason((good, odd), boxes, torch.device("meta"))
    assert "over 256" in common.tma_fallback_reason((good, good), ([(16, 16)], [(16, 512)]), torch.device("meta"))
    assert "< 16 B" in common.tma_fallback_reason((good, good), ([(16, 4)], [(16, 16)]), torch.device("meta"))
    if DEVICE == "cpu":
        base = torch.zeros(1 + 64 * 40, dtype=torch.float16)[1:].view(64, 40)  # 2 bytes past an aligned start
        assert "not 16-byte aligned" in common.tma_fallback_reason((base, good), boxes, torch.device("cpu"))


def test_tma_allocator_is_set_once_and_never_replaces_a_users():
    """ensure_tma_allocator sets the workspace allocator only where none is set (contextvars: each test runs in a
    copy of the context, so nothing leaks into other tests)."""
    from triton.runtime import _allocation

    def fresh():
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        common.ensure_tma_allocator()
        first = _allocation._allocator.get()
        common.ensure_tma_allocator()
        return first, _allocation._allocator.get()

    first, second = contextvars.copy_context().run(fresh)
    assert first is common._tma_workspace and second is first

    def users():
        def mine(size, alignment, stream):
            raise AssertionError("not called here")
        import triton
        triton.set_allocator(mine)
        common.ensure_tma_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.copy_context().run(users)
