"""The Triton backend's own tests: both schedules (fused on-chip output, staged large-d output) forced at
tiny odd shapes with 16-wide blocks, a vocabulary split and several staged chunks; poisoned buffers;
the config table and its cache. Without CUDA the kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). The shared suite (tests/test_backends.py) covers
the defaults, edge shapes and gradcheck. GPU-only tests at real shapes are at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import backends
from tests.conftest import DEVICE
from tests.helpers import (
    REL_TOL,
    assert_grads_close,
    assert_indices_are_argmax,
    fp64_oracle,
    random_problem,
    rel_err,
    run_with_grads,
)

REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
    # The interpreter converts 1-element arrays to scalars, which numpy deprecates: noise, not ours.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
CUDA = torch.cuda.is_available()

if REASON is None:
    import importlib

    from softvq_kernels.triton import configs

    # The package's ``forward`` attribute is the contract's function; the module is fetched by name.
    fwd_mod = importlib.import_module("softvq_kernels.triton.forward")
    common = importlib.import_module("softvq_kernels.triton.common")

# 16-wide blocks so that tiny shapes still have several tiles in every direction.
TINY = dict(block_t=16, block_v=16, block_k=16, mm_block_m=16, mm_block_n=16, mm_block_k=16)


def _schedule(name, T, elem_bytes=4):
    """Config overrides for one schedule: 'fused' (on-chip output, vocabulary split over programs),
    'staged' (the large-d path: lse pass, then p tiles of 16-column chunks and GEMMs), 'score_gemm'
    (staged, with the chunks' scores and dp from torch products: cuBLAS on a GPU), 'flash' (flash.py:
    few-launch forward and FlashAttention-style backward) or 'online_output' (score_gemm forward in one
    pass, conditionally rescaled)."""
    if name == "fused":
        return configs.override(**TINY, fused_max_d=64, min_programs=6)
    if name == "flash":  # few-launch forward (vocabulary split: the merge kernel) and on-chip backward
        return configs.override(**TINY, fused_max_d=64, min_programs=6, fused_finish=True, fused_backward=True)
    if name == "score_gemm":  # fp32 (T, 32) score chunks; 2 splits per chunk for the online pass
        return configs.override(**TINY, fused_max_d=0, min_programs=6, workspace_bytes=T * 4 * 32, score_gemm=True)
    if name == "online_output":  # score_gemm with y accumulated in the one pass over 32-column chunks
        return configs.override(**TINY, fused_max_d=0, workspace_bytes=T * 4 * 32, score_gemm=True, online_output=True)
    return configs.override(**TINY, fused_max_d=0, min_programs=6, workspace_bytes=T * elem_bytes * 16)


SCHEDULES = ["fused", "staged", "score_gemm", "flash", "online_output"]


def test_interpreter_is_on_without_cuda():
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert "triton" in sk.available_backends("cpu")


def test_unavailable_reason(monkeypatch):
    import softvq_kernels.triton as tri

    assert tri.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = tri.unavailable_reason(torch.device("cpu"))
    assert isinstance(reason, str) and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tri.unavailable_reason(torch.device("cpu")) is None
    assert isinstance(tri.unavailable_reason(torch.device("meta")), str)


@pytest.mark.skipif(CUDA, reason="the interpreter's bf16 refusal is CPU-only")
def test_interpreter_refuses_bfloat16():
    x, codebook = torch.randn(4, 16).bfloat16(), torch.randn(5, 16).bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        sk.soft_vq(x, codebook, backend="triton")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_schedules_match_fp64_reference(schedule, distance, dtype):
    """Forward outputs and the gradients of a loss on y, lse and code_counts at odd shapes (d = 24 is no
    multiple of the block), masked."""
    T_shape, V, d = (3, 13), 45, 24
    x, codebook, temperature, mask = random_problem(T_shape, V, d, dtype, DEVICE, masked=True)
    upstream = torch.randn(*T_shape, d, device=DEVICE)
    extra = dict(upstream_lse=torch.randn(*T_shape, device=DEVICE), upstream_counts=torch.randn(V, device=DEVICE))
    with _schedule(schedule, math.prod(T_shape)):
        y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="triton",
                                       upstream=upstream, **extra)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=mask,
                                            upstream=upstream, **extra)
    tol = REL_TOL[dtype]
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    assert (aux.lse.double() - aux_ref.lse).abs().max().item() < tol * (1 + aux_ref.lse.abs().max().item())
    assert_indices_are_argmax(aux.indices, x, codebook, temperature, distance, mask, atol=50 * tol)
    assert rel_err(aux.code_counts, aux_ref.code_counts) < tol
    *_, eager_grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="reference",
                                     upstream=upstream, **extra)
    assert_grads_close(grads, grads_ref, eager_grads, tol)
    assert (y[~mask] == 0).all() and (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_codebook_stats_hook_matches_reference(distance):
    """counts and soft sums sum_t p_tv x_t for EMA statistics, through the api's internal entry point."""
    from softvq_kernels.api import quantize

    x, codebook, temperature, mask = random_problem((4, 9), 37, 20, torch.float32, DEVICE, masked=True, requires_grad=False)
    with _schedule("staged", 36):
        _, _, _, counts, sums = quantize(x, codebook, temperature, distance, mask, "triton", True, True)
    _, _, _, counts_ref, sums_ref = quantize(
        x.double(), codebook.double(), temperature.double(), distance, mask, "reference", True, True
    )
    assert counts.dtype == sums.dtype == torch.float32 and sums.shape == (37, 20)
    assert rel_err(counts, counts_ref) < REL_TOL[torch.float32]
    assert rel_err(sums, sums_ref) < REL_TOL[torch.float32]


def test_every_output_element_is_written(monkeypatch):
    """torch.empty poisoned with NaN / -7 for the whole call: any element a kernel skipped would show."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    x, codebook, temperature, _ = random_problem((35,), 41, 21, torch.float32, DEVICE)
    upstream = torch.randn(35, 21, device=DEVICE)
    for schedule in SCHEDULES:
        with _schedule(schedule, 35):
            monkeypatch.setattr(torch, "empty", poisoned)
            y, aux, grads = run_with_grads(x, codebook, temperature, distance="l2", mask=None, backend="triton", upstream=upstream)
            monkeypatch.setattr(torch, "empty", real_empty)
        for t in (y, aux.lse, aux.code_counts, *grads):
            assert torch.isfinite(t).all(), schedule
        assert (aux.indices >= 0).all()
        y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance="l2", mask=None, upstream=upstream)
        assert rel_err(y, y_ref) < REL_TOL[torch.float32]
        assert rel_err(grads[1], grads_ref[1]) < 2 * REL_TOL[torch.float32]


def test_default_cpu_config_takes_staged_path_past_fused_max_d(monkeypatch):
    """With the default (interpreter) config, d = 80 > fused_max_d: the forward runs the staged GEMMs."""
    calls = []
    real = fwd_mod.matmul_into
    monkeypatch.setattr(fwd_mod, "matmul_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, codebook, temperature, _ = random_problem((9,), 19, 80, torch.float32, DEVICE, requires_grad=False)
    cfg = configs.get_config(19, 80, torch.float32, DEVICE)
    y = sk.soft_vq(x, codebook, temperature, backend="triton")
    y_ref = sk.soft_vq(x.double(), codebook.double(), temperature.double(), backend="reference")
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    assert (len(calls) > 0) == (triton_next_pow2(80) > cfg.fused_max_d)


def test_split_and_chunk_arithmetic():
    cfg = configs.KernelConfig(block_t=16, block_v=16, min_programs=8)
    per_split, n_split = configs.vocab_splits(cfg, 20, 100, torch.device("cpu"))  # 2 t-blocks, 7 v-tiles
    assert n_split * 2 >= 8 or per_split == 1
    assert (n_split - 1) * per_split < 7 <= n_split * per_split  # every split non-empty, all tiles covered
    assert configs.vocab_splits(configs.KernelConfig(block_t=16, block_v=16, min_programs=1), 20, 100, torch.device("cpu")) == (7, 1)
    width = configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=20 * 4 * 40, min_chunk_cols=0), 20, 100, 4)
    assert width == 32 and width % 16 == 0
    assert configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=1, min_chunk_cols=0), 20, 100, 4) == 16
    assert configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=2**30), 20, 100, 4) == 112
    # The floor on the chunk width (thin chunks make thin GEMMs), rounded to whole tiles, capped at V.
    assert configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=1, min_chunk_cols=40), 20, 100, 4) == 32
    assert configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=1, min_chunk_cols=48), 20, 100, 4) == 48
    assert configs.chunk_width(configs.KernelConfig(block_v=16, workspace_bytes=1, min_chunk_cols=4096), 20, 100, 4) == 112


@pytest.fixture
def gpu_arch(monkeypatch):
    """Pretend the CUDA device has a given compute capability: gpu_arch(9, 0)."""
    def pretend(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        configs.clear_cache()

    yield pretend
    configs.clear_cache()


def test_config_table_lookup_and_cache(gpu_arch):
    gpu_arch(9, 0)
    cuda = torch.device("cuda")
    for (V, d, dtype), entry in configs.TABLES["sm_90"].items():
        assert configs.get_config(V, d, dtype, cuda) is entry
    key = (128256, 4096, torch.bfloat16, "cuda", "sm_90")
    assert configs.cache_info()[key] is configs.TABLE[key[:3]]
    # Off-table keys fall back to a rule by d and dtype, and are cached too.
    small = configs.get_config(1000, 128, torch.float16, cuda)
    large = configs.get_config(1000, 3000, torch.float16, cuda)
    fp32 = configs.get_config(1000, 128, torch.float32, cuda)
    assert triton_next_pow2(128) <= small.fused_max_d < triton_next_pow2(3000) and large.fused_max_d < 3000
    assert fp32.mm_block_n <= small.mm_block_n
    assert (1000, 3000, torch.float16, "cuda", "sm_90") in configs.cache_info()
    assert configs.get_config(1000, 3000, torch.float16, cuda) is large
    cpu = configs.get_config(1000, 128, torch.float32, torch.device("cpu"))
    assert cpu.block_t >= 16 and cpu.mm_num_stages >= 1
    with configs.override(block_t=16, fused_max_d=0) as forced:
        assert configs.get_config(32000, 256, torch.bfloat16, cuda) is forced and forced.block_t == 16
    assert configs.get_config(32000, 256, torch.bfloat16, cuda) is configs.TABLE[(32000, 256, torch.bfloat16)]
    configs.clear_cache()
    assert configs.cache_info() == {}


def test_new_schedules_are_off_in_every_gpu_default(gpu_arch):
    """The few-launch (flash) and one-pass (online_output) schedules stay opt-in until a GPU measures them."""
    for capability in ((9, 0), (8, 0), (8, 6), (12, 0)):
        gpu_arch(*capability)
        arch = configs.device_arch(torch.device("cuda"))
        for V, d, dtype in [*configs.TABLES[arch], (1000, 100, torch.bfloat16), (1000, 2048, torch.float16),
                            (1000, 64, torch.float32)]:
            config = configs.get_config(V, d, dtype, torch.device("cuda"))
            assert not (config.fused_finish or config.fused_backward or config.online_output), (capability, V, d)


def test_configs_are_keyed_by_gpu_architecture(gpu_arch):
    cuda = torch.device("cuda")
    assert [configs.arch_of_capability(*c) for c in ((9, 0), (8, 0), (8, 6), (8, 9), (10, 0), (7, 5))] == [
        "sm_90", "sm_80", "other", "other", "other", "other"]
    gpu_arch(9, 0)
    hopper = configs.get_config(32000, 256, torch.bfloat16, cuda)
    assert hopper is configs.TABLES["sm_90"][(32000, 256, torch.bfloat16)]
    gpu_arch(8, 6)  # an RTX 30x0: never the H200 entry, the safe rule (fits ~100 KB of shared memory)
    ada = configs.get_config(32000, 256, torch.bfloat16, cuda)
    assert ada is configs.default_config(32000, 256, torch.bfloat16, "other") and ada is not hopper
    assert ada.num_stages <= 2 and ada.block_t * ada.block_k <= hopper.block_t * hopper.block_k
    assert configs.get_config(128256, 4096, torch.bfloat16, cuda).score_gemm  # cuBLAS everywhere at large d
    gpu_arch(8, 0)
    assert configs.get_config(32000, 256, torch.bfloat16, cuda) == configs.default_config(32000, 256, torch.bfloat16, "sm_80")


def test_config_files_per_architecture(tmp_path, monkeypatch, gpu_arch):
    import json

    monkeypatch.setattr(configs, "TABLES", {arch: dict(t) for arch, t in configs.TABLES.items()})
    cuda = torch.device("cuda")
    # A directory of <arch>.json files: each GPU reads only its own.
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "sm_90.json").write_text(json.dumps({"777,48,bfloat16": {"block_t": 32, "block_v": 128}}))
    (folder / "sm_80.json").write_text(json.dumps({"777,48,bfloat16": {"block_t": 16, "block_v": 64}}))
    monkeypatch.setenv("SOFTVQ_TRITON_CONFIGS", str(folder))
    gpu_arch(9, 0)
    assert (configs.get_config(777, 48, torch.bfloat16, cuda).block_t, configs.TABLES["sm_80"]) == (32, {})
    gpu_arch(8, 0)
    assert configs.get_config(777, 48, torch.bfloat16, cuda).block_v == 64
    gpu_arch(8, 9)  # no other.json: the safe rule, not either GPU's entry
    assert configs.get_config(777, 48, torch.bfloat16, cuda) is configs.default_config(777, 48, torch.bfloat16, "other")
    # One file keyed by architecture (what tuning.tune_to_file writes).
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"sm_80": {"999,64,float16": {"block_t": 32, "fused_max_d": 0}}}))
    monkeypatch.setenv("SOFTVQ_TRITON_CONFIGS", str(path))
    gpu_arch(8, 0)
    assert (configs.get_config(999, 64, torch.float16, cuda).fused_max_d) == 0
    gpu_arch(9, 0)
    assert configs.get_config(999, 64, torch.float16, cuda).fused_max_d == 256
    # A table without its architecture is refused, never applied to whatever GPU is present.
    path.write_text(json.dumps({"999,64,float16": {"block_t": 32}}))
    gpu_arch(9, 0)
    with pytest.raises(ValueError, match="architectures"):
        configs.get_config(999, 64, torch.float16, cuda)


def test_tune_picks_the_fastest_runnable_candidate_and_caches_it():
    import time

    def wall_ms(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    good = dataclasses.replace(configs.get_config(40, 24, torch.float32, DEVICE), **TINY)
    broken = dataclasses.replace(good, block_t=12)  # not a power of two: fails to launch
    configs.clear_cache()
    from softvq_kernels.triton import tuning

    best, timings = tuning.tune(20, 40, 24, torch.float32, [broken, good], device=DEVICE, bench=wall_ms)
    assert best is good and timings[0][1] == float("inf") and math.isfinite(timings[1][1])
    assert configs.get_config(40, 24, torch.float32, DEVICE) is good
    configs.clear_cache()


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# GPU only: real shapes, the kernel's error against fp64 must not exceed eager PyTorch's in the same dtype.


def _eager_same_dtype(x, codebook, temperature, distance, upstream):
    """The naive PyTorch op computed in the inputs' dtype (scores, softmax and product in bf16/fp32)."""
    from softvq_kernels.reference import scores

    leaves = [t.detach().clone().requires_grad_() for t in (x, codebook, temperature)]
    x_, c_, t_ = leaves
    y = scores(x_, c_, t_.to(x_.dtype), distance).softmax(dim=-1) @ c_
    grads = torch.autograd.grad((y.float() * upstream).sum(), leaves)
    return y, grads


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T, V, d", [(2048, 32000, 256), (1024, 16384, 2048)])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_gpu_error_not_worse_than_eager(dtype, T, V, d, distance):
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda").to(dtype).requires_grad_()
    codebook = (torch.randn(V, d, device="cuda") / d**0.25).to(dtype).requires_grad_()
    temperature = torch.tensor(float(d) ** 0.5 / 4, device="cuda", requires_grad=True)
    upstream = torch.randn(T, d, device="cuda")
    y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=None, backend="triton", upstream=upstream)
    y_eager, grads_eager = _eager_same_dtype(x, codebook, temperature, distance, upstream)
    y_ref, _, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=None, upstream=upstream)
    slack = {torch.bfloat16: 2e-3, torch.float32: 1e-5}[dtype]
    pairs = [("y", y, y_eager, y_ref)] + [
        (name, g, ge, gr) for name, g, ge, gr in zip(("x", "codebook", "temperature"), grads, grads_eager, grads_ref)
    ]
    for name, got, eager, ref in pairs:
        err, err_eager = rel_err(got, ref), rel_err(eager, ref)
        assert err <= 1.25 * err_eager + slack, f"{name}: triton {err:.3e} vs eager {err_eager:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_staged_and_fused_agree_at_small_d():
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    codebook = torch.randn(32000, 256, device="cuda", dtype=torch.bfloat16) / 4
    outs = []
    for fused_max_d in (256, 0):
        base = configs.get_config(32000, 256, torch.bfloat16, torch.device("cuda"))
        with configs.override(base, fused_max_d=fused_max_d):
            outs.append(sk.soft_vq(x, codebook, 4.0, backend="triton", return_aux=True))
    (y0, a0), (y1, a1) = outs
    assert rel_err(y0, y1) < 1e-2
    assert (a0.indices == a1.indices).float().mean() > 0.999


@pytest.mark.parametrize("variant", ["plain", "accumulate", "two_products", "two_products_accumulate"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32_out", "fp16_out"])
def test_cublas_path_matches_the_triton_gemm(monkeypatch, variant, out_dtype):
    """matmul_into with gemm="cublas" computes what _mm_kernel computes. Without a GPU the cuBLAS product
    is replaced by an fp32 torch product of the same 16-bit operands (the bookkeeping is what is tested)."""
    if not CUDA:
        monkeypatch.setattr(common, "cublas_can_take", lambda c, *ops: True)
        monkeypatch.setattr(common, "_mm_fp32", lambda a, b: a.float() @ b.float())
        monkeypatch.setattr(common, "addmm_acc", lambda c, a, b: c.add_(a.float() @ b.float()))
    dtype = torch.float16
    M, N, K = 37, 29, 45
    a, b = torch.randn(M, K, device=DEVICE).to(dtype), torch.randn(K, N, device=DEVICE).to(dtype)
    a2, b2 = torch.randn(K, M, device=DEVICE).to(dtype).T, torch.randn(K, N, device=DEVICE).to(dtype)
    kwargs = {
        "plain": {},
        "accumulate": {"accumulate": True},
        "two_products": {"second": (a2, b2)},
        "two_products_accumulate": {"second": (a2, b2), "accumulate": True},
    }[variant]
    start = torch.randn(M, N, device=DEVICE).to(out_dtype)
    results = {}
    for gemm in ("triton", "cublas"):
        cfg = dataclasses.replace(configs.get_config(N, K, dtype, DEVICE), gemm=gemm)
        results[gemm] = common.matmul_into(start.clone(), a, b, cfg, **kwargs)
    expected = a.double() @ b.double() + (a2.double() @ b2.double() if "second" in kwargs else 0)
    expected = expected + (start.double() if kwargs.get("accumulate") else 0)
    tol = 1e-5 if out_dtype == torch.float32 else 2e-3
    assert rel_err(results["triton"], expected) < tol
    assert rel_err(results["cublas"], results["triton"]) < tol


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_schedules_stay_exact_when_one_hot(schedule, distance):
    """Inputs x1e3 (cosine: tau = 1e-6): every schedule recomputes the forward's scores bit for bit, so
    p = 1 at the argmax, y is the code itself and every gradient matches fp64 to fp32 accuracy."""
    x, codebook, temperature, mask = random_problem((11,), 29, 13, torch.float32, DEVICE, scale=1e3, masked=True)
    if distance == "cosine":
        temperature = torch.tensor(1e-6, device=DEVICE, requires_grad=True)
    upstream = torch.randn(11, 13, device=DEVICE)
    extra = dict(upstream_counts=torch.randn(29, device=DEVICE))
    with _schedule(schedule, 11):
        y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="triton",
                                       upstream=upstream, **extra)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=mask, upstream=upstream,
                                            **extra)
    tol = REL_TOL[torch.float32]
    assert rel_err(y, y_ref) < tol
    assert_indices_are_argmax(aux.indices, x, codebook, temperature, distance, mask, atol=0)
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < tol
