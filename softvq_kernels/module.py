"""``SoftVQ``: soft or hard vector quantisation against a (possibly LLM-sized) codebook, as an nn.Module.

    vq = SoftVQ(codebook, temperature=1.0, mode="soft")
    out = vq(x, mask=mask)        # x: (b, n, d), mask: (b, n) bool, True = real frame
    out.quantized                 # (b, n, d)
    out.indices                   # (b, n) int64 nearest code (argmax score), -1 on masked frames
    out.loss                      # 0-dim fp32 auxiliary loss to add to the training loss
    out.perplexity                # 0-dim fp32 usage perplexity of this batch
    out.dead_codes, out.code_counts   # 0-dim int64 codes with EMA count below threshold; (V,) counts

Modes: "soft" (quantized = sum_v p_tv c_v, differentiable in x, codebook and temperature), "hard"
(nearest code with a straight-through estimator, VQ-VAE commitment and codebook losses), "none"
(x passes through untouched: the baseline, so a model can switch by config).

Codebook updates: by gradient (``learnable_codebook=True``), by exponential moving averages of the
code counts and sums (``ema_decay`` set; Laplace smoothing; statistics all-reduced under
torch.distributed), or frozen (``learnable_codebook=False``). Formulas: docs/math.md.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from softvq_kernels import backends
from softvq_kernels.api import DISTANCES, lse_argmax, quantize
from softvq_kernels.op import snapshot

MODES = ("soft", "hard", "none")


class SoftVQOutput(NamedTuple):
    """What ``SoftVQ.forward`` returns (unpacks like a tuple: ``quantized, indices, loss, *_ = vq(x)``).

    quantized: (..., d) the quantized frames (masked frames are x unchanged), dtype of the op
        (x's dtype; the autocast dtype under torch.autocast).
    indices: (...,) int64 nearest code per frame (argmax score); -1 for masked frames and in mode "none".
    loss: 0-dim fp32 auxiliary loss (commitment, plus the codebook loss in hard mode); 0 in mode "none".
    perplexity: 0-dim fp32 usage perplexity exp(H(q)) of this batch's code counts q (soft counts in
        soft mode, hard counts in hard mode; summed over processes when training under
        torch.distributed); 0 in mode "none".
    dead_codes: 0-dim int64 number of codes whose EMA count is below ``dead_code_threshold``.
    code_counts: (V,) fp32 this batch's code counts (masked frames never count).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    dead_codes: torch.Tensor
    code_counts: torch.Tensor


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (a - b)^2 over the real frames' elements, in fp32 (0 when every frame is masked)."""
    diff = a.float() - b.float()
    if mask is None:
        return diff.pow(2).mean(dim=-1).sum() / max(diff[..., 0].numel(), 1)
    # Select before squaring, not multiply after: a NaN in a masked frame must reach neither the loss
    # (NaN * 0 = NaN) nor the gradient (the square's backward would meet 0 * NaN).
    diff = torch.where(mask[..., None], diff, 0.0)
    return diff.pow(2).mean(dim=-1).sum() / mask.sum().clamp_min(1)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum_v q_v log q_v), q = counts / sum(counts), 0 log 0 = 0 (1 when nothing was counted)."""
    q = counts / counts.sum().clamp_min(torch.finfo(counts.dtype).tiny)
    return torch.exp(-torch.special.xlogy(q, q).sum())


def _all_reduce_sum_(*tensors: torch.Tensor, group=None) -> None:
    """Sum tensors in place over ``group`` (default: the default process group), in one collective, when
    torch.distributed is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _check_number(name, value, *, allow_none=False, low_open=True, high_open=True, low=0.0, high=1.0):
    """A float in the interval (low, high) (ends closed when low_open/high_open is False), or None if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (math.isfinite(value) and ok_low and ok_high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


# log(tau) is kept in fp32: tau = exp(log tau) must stay a normal fp32 number (see soft_vq's check).
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def _check_temperature(value, name="temperature") -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"{name} must have a value; got a meta-device tensor")
        value = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= _MIN_TEMPERATURE):
        raise ValueError(f"{name} must be positive and finite, at least {_MIN_TEMPERATURE:.3g}, got {value}")
    return value


class SoftVQ(nn.Module):
    """Soft / hard vector quantisation of frames (..., d) against a codebook (V, d).

    Args:
        codebook: (V, d) floating tensor. A plain tensor is copied; an ``nn.Parameter`` is shared
            (used as is, e.g. an LLM's input embedding: see ``from_embedding(tie=True)``).
        temperature: positive float, the softmax temperature tau of soft mode (hard mode's nearest
            code does not depend on it).
        mode: "soft" | "hard" | "none".
        distance: "l2" | "cosine" | "dot" (scores of the math note).
        learnable_codebook: the codebook is trained by gradient (True) or frozen (False). Ignored when
            ``ema_decay`` is set: the codebook is then updated by EMA and gets no gradient.
        learnable_temperature: learn log(tau) by gradient (tau stays positive). Either way the
            temperature can be set between steps (annealing): ``vq.temperature = 0.5``.
        ema_decay: None, or the decay lambda in (0, 1) of the EMA codebook update (training mode
            only): N <- lambda N + (1 - lambda) n, M <- lambda M + (1 - lambda) m, c_v = M_v / N~_v with
            N~ = (N + eps) / (sum N + V eps) * sum N (Laplace smoothing). n, m are the batch's code
            counts and sums (soft in soft mode, hard in hard mode), summed over processes under
            torch.distributed. N starts at 1 and M at the initial codebook.
        commitment_weight: weight beta >= 0 of the commitment loss mean ||x - sg(q)||^2 (q: the soft
            output in soft mode, the nearest code in hard mode). Hard mode adds the codebook loss
            mean ||sg(x) - c_idx||^2 when the codebook is learned by gradient.
        backend: "auto" | "reference" | "chunked" | "triton" | "cuda" (see ``soft_vq``).
        dead_code_threshold: a code whose EMA count is below this is counted dead (monitoring).
        usage_decay: decay of the EMA code counts kept for monitoring when ``ema_decay`` is None.
        eps: Laplace smoothing constant of the EMA update.
        process_group: None, or the torch.distributed group over which the codebook is sharded by rows
            (vocabulary parallelism, ``softvq_kernels.distributed``): ``codebook`` is then this rank's
            contiguous block, inputs are the same on every rank, indices are global and ``code_counts``,
            ``ema_counts`` and ``ema_sums`` are this rank's shard (perplexity, dead codes and the EMA
            smoothing use the whole vocabulary). The shard offset is found once, at the first call.
        data_parallel_group: with process_group, the group over which batch statistics are summed for
            the EMA (the data-parallel replicas of this shard); None = not summed. Without process_group
            statistics are summed over the default group, as for DDP.

    Buffers (all in the state_dict): ``log_temperature`` (a Parameter when learnable), ``codebook``
    (a buffer when frozen or EMA-updated), ``ema_counts`` (V,), ``ema_sums`` (V, d) (EMA only),
    ``perplexity`` and ``dead_codes`` (last training batch).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        temperature: float = 1.0,
        *,
        mode: str = "soft",
        distance: str = "l2",
        learnable_codebook: bool = True,
        learnable_temperature: bool = False,
        ema_decay: float | None = None,
        commitment_weight: float = 0.25,
        backend: str = "auto",
        dead_code_threshold: float = 1e-3,
        usage_decay: float = 0.99,
        eps: float = 1e-5,
        process_group=None,
        data_parallel_group=None,
    ):
        super().__init__()
        if process_group is not None:
            from softvq_kernels import distributed

            distributed.check_process_group(process_group)
        elif data_parallel_group is not None:
            raise ValueError("data_parallel_group is only meaningful with process_group=")
        self.process_group, self.data_parallel_group = process_group, data_parallel_group
        self._shard_layout = None  # (offset, total codes) of a sharded codebook, found at the first call
        if not isinstance(codebook, torch.Tensor):
            raise TypeError(f"codebook must be a torch.Tensor (V, d), got {type(codebook).__name__}")
        if not codebook.is_floating_point():
            raise TypeError(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
        # a rank's shard may hold no rows (V < world size); an unsharded codebook may not
        if codebook.dim() != 2 or (codebook.shape[0] == 0 and process_group is None) or codebook.shape[1] == 0:
            raise ValueError(f"codebook must be a non-empty 2-D tensor (V, d), got shape {tuple(codebook.shape)}")
        temperature = _check_temperature(temperature)
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(distance, str) or distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        flags = (("learnable_codebook", learnable_codebook), ("learnable_temperature", learnable_temperature))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        ema_decay = _check_number("ema_decay", ema_decay, allow_none=True)
        commitment_weight = _check_number("commitment_weight", commitment_weight, low_open=False, high=math.inf)
        if not isinstance(backend, str) or backend not in backends.BACKEND_NAMES:
            raise ValueError(f"backend must be one of {backends.BACKEND_NAMES}, got {backend!r}")
        dead_code_threshold = _check_number(
            "dead_code_threshold", dead_code_threshold, low_open=False, high=math.inf
        )
        usage_decay = _check_number("usage_decay", usage_decay, low_open=False)
        eps = _check_number("eps", eps, high=math.inf)
        shared = isinstance(codebook, nn.Parameter)
        if shared and ema_decay is not None:
            raise ValueError(
                "ema_decay cannot be used with a shared codebook Parameter (the EMA would overwrite it); "
                "pass a tensor (it is copied) or use from_embedding(..., tie=False)"
            )

        self.mode, self.distance, self.backend = mode, distance, backend
        self.ema_decay, self.commitment_weight = ema_decay, commitment_weight
        self.dead_code_threshold, self.usage_decay, self.eps = dead_code_threshold, usage_decay, eps
        self.codebook_update = "ema" if ema_decay is not None else ("gradient" if learnable_codebook else "frozen")
        self.learnable_temperature = learnable_temperature

        if shared:
            self.codebook = codebook
        elif self.codebook_update == "gradient":
            self.codebook = nn.Parameter(codebook.detach().clone())
        else:
            self.register_buffer("codebook", codebook.detach().clone())
        log_tau = torch.tensor(math.log(temperature), dtype=torch.float32, device=codebook.device)
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        V, d = codebook.shape
        stats = dict(dtype=torch.float32, device=codebook.device)
        self.register_buffer("ema_counts", torch.ones(V, **stats))
        if self.codebook_update == "ema":
            self.register_buffer("ema_sums", codebook.detach().to(torch.float32).clone())
        self.register_buffer("perplexity", torch.zeros((), **stats))
        self.register_buffer("dead_codes", torch.zeros((), dtype=torch.int64, device=codebook.device))

    @classmethod
    def from_embedding(cls, embedding: nn.Module | torch.Tensor, tie: bool = False, **kwargs) -> "SoftVQ":
        """A SoftVQ whose codebook is an embedding table (V, d), e.g. ``llm.get_input_embeddings()``.

        tie=False copies the table; tie=True shares its Parameter (gradient updates reach the LLM's
        table; not allowed with ``ema_decay``). Other keyword arguments go to the constructor.
        """
        if not isinstance(tie, bool):
            raise TypeError(f"tie must be a bool, got {type(tie).__name__}")
        weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"embedding must be an nn.Embedding (or a module with a .weight tensor) or a tensor, "
                f"got {type(embedding).__name__}"
            )
        if tie:
            if not isinstance(weight, nn.Parameter):
                raise TypeError("tie=True needs an embedding whose weight is an nn.Parameter")
            return cls(weight, **kwargs)
        return cls(weight.detach().clone(), **kwargs)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    @property
    def temperature(self) -> torch.Tensor:
        """0-dim fp32 tau = exp(log_temperature) (carries gradient when learnable)."""
        return self.log_temperature.exp()

    @temperature.setter
    def temperature(self, value) -> None:
        """Set tau for the next steps (annealing); no recompilation under torch.compile."""
        value = _check_temperature(value)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(value))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, mode={self.mode!r}, distance={self.distance!r}, "
            f"codebook_update={self.codebook_update!r}, learnable_temperature={self.learnable_temperature}, "
            f"ema_decay={self.ema_decay}, commitment_weight={self.commitment_weight}, backend={self.backend!r}"
        )

    def _codebook(self) -> torch.Tensor:
        return self.codebook if self.codebook_update == "gradient" else self.codebook.detach()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> SoftVQOutput:
        """x: (..., d), e.g. (b, n, d); mask: (...) bool, True = real frame (masked frames pass through,
        get index -1 and never count in the loss, the statistics or the EMA update). -> SoftVQOutput.

        The op runs in x's dtype (the codebook is cast to it, differentiably), or under torch.autocast
        in the autocast dtype; it accumulates in fp32 either way. Training mode updates the EMA
        buffers (and the codebook when ema_decay is set); eval mode changes no state."""
        V = self.codebook_size
        if self.mode == "none":
            zero = torch.zeros((), dtype=torch.float32, device=x.device)
            counts = torch.zeros(V, dtype=torch.float32, device=x.device)
            indices = torch.full(x.shape[:-1], -1, dtype=torch.int64, device=x.device)
            return SoftVQOutput(x, indices, zero, zero.clone(), self._dead_code_count(), counts)

        codebook = self._codebook()
        if codebook.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            codebook = codebook.to(x.dtype)  # the op runs in x's dtype (autocast: in the autocast dtype)
        update = self.training and self.codebook_update == "ema"
        if self.mode == "soft":
            if update:
                # The op saves the codebook for backward and the EMA update below rewrites it in place: the
                # backward must see this step's codebook, also in a compiled graph (snapshot's docstring).
                codebook = snapshot(codebook)
            y, _, indices, counts, sums = quantize(
                x, codebook, self.temperature, self.distance, mask, self.backend, True, update,
                tau_checked_on_device=True, **self._sharding(x.device),
            )
            loss = self.commitment_weight * _masked_mse(x, y.detach(), mask)
            quantized = y
        elif self.process_group is not None:  # the global nearest code of a sharded codebook
            _, _, indices, _, _ = quantize(
                x.detach(), codebook.detach(), self.temperature.detach(), self.distance, mask, self.backend,
                False, False, tau_checked_on_device=True, **self._sharding(x.device),
            )
        else:
            _, indices = lse_argmax(  # the nearest codes only: no weighted sum is formed
                x.detach(), codebook.detach(), self.temperature.detach(), self.distance, mask, self.backend,
                tau_checked_on_device=True,
            )
        if self.mode == "hard":
            real = indices >= 0
            local = indices if self.process_group is None else indices - self._shard_layout[0]
            owned = (local >= 0) & (local < V)  # this rank's codes (every real frame when not sharded)
            safe = local.clamp(0, max(V - 1, 0))
            if V > 0:
                codes = F.embedding(safe, codebook)  # (..., d)
            else:  # an empty shard holds none of the codes
                codes = codebook.new_zeros(*local.shape, codebook.shape[1])
            if self.process_group is not None:  # each code row comes from the rank holding it
                from softvq_kernels.distributed import sum_over_group

                codes = sum_over_group(torch.where(owned[..., None], codes, 0.0), self.process_group)
            loss = self.commitment_weight * _masked_mse(x, codes.detach(), mask)
            if self.codebook_update == "gradient":
                loss = loss + _masked_mse(x.detach(), codes, mask)
            quantized = x + (codes.to(x.dtype) - x).detach()
            flat_idx = safe.reshape(-1)
            counted = (real & owned).reshape(-1)
            counts = torch.zeros(V, dtype=torch.float32, device=x.device)
            if V > 0:
                counts.index_add_(0, flat_idx, counted.float())
            sums = None
            if update:
                frames = torch.where((real & owned)[..., None], x.detach().float(), 0.0).reshape(-1, x.shape[-1])
                sums = torch.zeros(V, x.shape[-1], dtype=torch.float32, device=x.device)
                if V > 0:
                    sums.index_add_(0, flat_idx, frames)
        if mask is not None:
            quantized = torch.where(mask[..., None], quantized, x.to(quantized.dtype))
        if self.training:
            counts = self._update_statistics(counts, sums if update else None)
        perplexity = _perplexity(counts) if self.process_group is None else self._sharded_perplexity(counts)
        if self.training:
            with torch.no_grad():
                self.perplexity.copy_(perplexity)
        return SoftVQOutput(quantized, indices, loss, perplexity, self._dead_code_count(), counts)

    def _sharding(self, device) -> dict:
        """quantize's keyword arguments for a sharded codebook (the offset is found once, then cached)."""
        if self.process_group is None:
            return {}
        if self._shard_layout is None:
            from softvq_kernels.distributed import shard_layout

            self._shard_layout = shard_layout(self.codebook_size, self.process_group, device)
        return dict(process_group=self.process_group, shard_offset=self._shard_layout[0])

    def _sharded_perplexity(self, counts: torch.Tensor) -> torch.Tensor:
        """Perplexity of the whole vocabulary's counts from this rank's shard: exp(log N - sum n log n / N)
        with N and sum n log n summed over the group (differentiable, as for an unsharded codebook)."""
        from softvq_kernels.distributed import sum_over_group

        sums = sum_over_group(torch.stack([counts.sum(), torch.special.xlogy(counts, counts).sum()]), self.process_group)
        total = sums[0].clamp_min(torch.finfo(counts.dtype).tiny)
        # nothing counted (every frame masked): 1, as unsharded, not exp(log tiny)
        return torch.exp(torch.where(sums[0] > 0, total.log() - sums[1] / total, 0.0))

    def _dead_code_count(self) -> torch.Tensor:
        dead = (self.ema_counts < self.dead_code_threshold).sum()
        if self.process_group is not None:  # codes below the threshold in the whole vocabulary
            torch.distributed.all_reduce(dead, group=self.process_group)
        return dead

    @torch.no_grad()
    def _update_statistics(self, counts: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
        """Sync the batch statistics over processes, update the EMA buffers (and the EMA codebook)."""
        counts = counts.detach().to(torch.float32, copy=True)
        sums = None if sums is None else sums.detach().clone()
        to_sum = (counts,) if sums is None else (counts, sums)
        if self.process_group is None:
            _all_reduce_sum_(*to_sum)
        elif self.data_parallel_group is not None:  # replicas of this shard saw other frames
            _all_reduce_sum_(*to_sum, group=self.data_parallel_group)
        decay = self.ema_decay if self.ema_decay is not None else self.usage_decay
        self.ema_counts.mul_(decay).add_(counts, alpha=1 - decay)
        if sums is not None:
            self.ema_sums.mul_(decay).add_(sums, alpha=1 - decay)
            total, codes = self.ema_counts.sum(), self.codebook_size
            if self.process_group is not None:  # the smoothing is over the whole vocabulary
                torch.distributed.all_reduce(total, group=self.process_group)
                codes = self._shard_layout[1]
            smoothed = (self.ema_counts + self.eps) / (total + codes * self.eps) * total
            self.codebook.copy_(self.ema_sums / smoothed[:, None])
        self.dead_codes.copy_(self._dead_code_count())
        return counts
