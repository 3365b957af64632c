"""The chunked backend: chunk-size independence, every CPU dtype, the memory-budget rule."""

import pytest
import torch

import softvq_kernels as sk
from softvq_kernels import planning
from tests.helpers import REL_TOL, assert_grads_close, fp64_oracle, random_problem, rel_err, run_with_grads


@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_same_answer_for_every_chunk_size(distance):
    x, codebook, temperature, mask = random_problem((3, 7), 53, 11, torch.float64, "cpu", masked=True)
    upstream = torch.randn(3, 7, 11, dtype=torch.float64)
    results = []
    for size in (1, 3, 16, 52, 53, 1000):
        with planning.options(chunk_size=size):
            results.append(run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="chunked", upstream=upstream))
    y0, aux0, grads0 = results[0]
    for y, aux, grads in results[1:]:
        torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(aux.lse, aux0.lse)
        assert torch.equal(aux.indices, aux0.indices)
        torch.testing.assert_close(aux.code_counts, aux0.code_counts)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distance", ["l2", "cosine", "dot"])
def test_every_cpu_dtype_against_fp64_reference(dtype, distance):
    x, codebook, temperature, mask = random_problem((2, 13), 301, 45, dtype, "cpu", masked=True)
    upstream = torch.randn(2, 13, 45)
    with planning.options(chunk_size=64):
        y, aux, grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="chunked", upstream=upstream)
    y_ref, aux_ref, grads_ref = fp64_oracle(x, codebook, temperature, distance=distance, mask=mask, upstream=upstream)
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < REL_TOL[dtype]
    assert [g.dtype for g in grads] == [dtype, dtype, temperature.dtype]
    *_, eager_grads = run_with_grads(x, codebook, temperature, distance=distance, mask=mask, backend="reference", upstream=upstream)
    assert_grads_close(grads, grads_ref, eager_grads, REL_TOL[dtype])


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_chunk_options(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        with planning.options(chunk_size=bad):
            pass


def test_chunked_is_the_cpu_default_and_matches_reference():
    x, codebook = torch.randn(6, 10), torch.randn(33, 10)
    torch.testing.assert_close(sk.soft_vq(x, codebook), sk.soft_vq(x, codebook, backend="reference"), rtol=1e-5, atol=1e-6)
