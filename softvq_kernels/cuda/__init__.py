"""The ``cuda`` backend: CUDA C++ kernels (csrc/) behind the backend contract of ``softvq_kernels.backends``.

The compiled module is ``softvq_kernels._cuda`` when ``pip install`` built it, else a JIT build of
csrc/ on first use (see ``_build.py``). Cosine normalisation, masks and dtype handling are done by
``softvq_kernels.autograd`` (fused_forward / fused_backward); these functions see l2/dot on real frames only.
Inputs: float32, float16 or bfloat16 (fp32 accumulation; fp32 products use 3xTF32 on tensor cores).
"""

from __future__ import annotations

import torch

from softvq_kernels.cuda import _build

MIN_CAPABILITY = (8, 0)  # bf16 tensor-core MMA (WMMA) needs sm_80
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device) -> str | None:
    """None when the cuda backend can run on tensors of ``device``; otherwise a sentence saying why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available to PyTorch"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"the cuda backend needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
            f"or newer, this one is {capability[0]}.{capability[1]}"
        )
    return _build.build_unavailable_reason()


def forward(x, keys, values, tau, l2, need_counts):
    """x: (T, d), keys/values: (V, d), tau: 0-dim -> y (T, d) fp32, lse (T,) fp32, indices (T,) int64,
    counts (V,) fp32 or None. See softvq_kernels.backends for the contract."""
    y, lse, indices, counts = _build.load().forward(x, keys, values, tau, bool(l2), bool(need_counts))
    return y, lse, indices, counts


def backward(grad_y, x, keys, values, tau, l2, y, lse):
    """-> (grad_x, grad_keys or None when keys is values, grad_values, grad_tau), all fp32."""
    grad_x, grad_keys, grad_values, grad_tau = _build.load().backward(grad_y, x, keys, values, tau, bool(l2), y, lse)
    return grad_x, grad_keys, grad_values, grad_tau



def codebook_stats(x, keys, tau, l2, lse, rows):
    """Soft counts sum_t p_tv (V,) and soft sums sum_t p_tv rows_t (V, D), fp32, p recomputed from lse
    (the optional hook of softvq_kernels.backends: one scores pass and one product)."""
    counts, sums = _build.load().codebook_stats(x, keys, tau, bool(l2), lse, rows)
    return counts, sums
