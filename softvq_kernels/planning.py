"""One planning policy for every backend: how wide a vocabulary chunk is and how far to split the
vocabulary across programs, from (T, V, element size, device). The chunked backend, the Triton
launchers and the CUDA bindings all ask here, so there is one knob:

    SOFTVQ_WORKSPACE_BYTES   bytes one staged (T, chunk) matrix may take (default 64 MiB; units such as
                             "256MiB", "1G" or "65536" are accepted). SOFTVQ_CHUNK_BUDGET_BYTES is read
                             as an older name of the same knob.
    softvq_kernels.planning.options(chunk_size=..., memory_budget=...)   the same in a block of code.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

DEFAULT_WORKSPACE_BYTES = 64 * 2**20
MIN_CHUNK = 64
# The chunked backward holds about four (T, chunk) temporaries at once (scores, p, dp, ds).
CHUNKED_LIVE_TEMPORARIES = 4
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}
_ENV_NAMES = ("SOFTVQ_WORKSPACE_BYTES", "SOFTVQ_CHUNK_BUDGET_BYTES")

_options: dict = {"chunk_size": None, "memory_budget": None}


def parse_bytes(text: str, name: str = "value") -> int:
    """'64MiB' / '1G' / '65536' -> bytes; a clear ValueError naming ``name`` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"{name} must be a byte count such as 67108864, '64MiB' or '1G', got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {text!r}")
    return value


def workspace_bytes() -> int:
    """The current budget for one staged (T, chunk) matrix."""
    if _options["memory_budget"] is not None:
        return _options["memory_budget"]
    for name in _ENV_NAMES:
        if os.environ.get(name):
            return parse_bytes(os.environ[name], name)
    return DEFAULT_WORKSPACE_BYTES


@contextlib.contextmanager
def options(*, chunk_size: int | None = None, memory_budget: int | None = None):
    """Override the vocabulary chunk size, or the memory budget it is derived from, in a block."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    saved = dict(_options)
    _options.update(chunk_size=chunk_size, memory_budget=memory_budget if memory_budget is not None else saved["memory_budget"])
    try:
        yield
    finally:
        _options.update(saved)


def vocab_chunk(num_frames: int, vocab_size: int, elem_bytes: int, live_matrices: int = 1, *,
                multiple: int = 1, min_cols: int = MIN_CHUNK, budget: int | None = None) -> int:
    """Columns per vocabulary chunk: ``live_matrices`` (T, chunk) matrices of ``elem_bytes`` fit the
    budget (``workspace_bytes()`` unless given), at least ``min_cols``, a multiple of ``multiple`` (a
    kernel's tile), at most V rounded up to that multiple."""
    full = -(-max(vocab_size, 1) // multiple) * multiple
    if _options["chunk_size"] is not None:
        cols = _options["chunk_size"]
    else:
        per_column = max(num_frames, 1) * elem_bytes * live_matrices
        cols = max(min_cols, (budget or workspace_bytes()) // per_column)
    cols = max(multiple, cols // multiple * multiple)
    return min(cols, full)


def program_target(device: torch.device) -> int:
    """How many programs a split-vocabulary pass aims for: twice the SM count on CUDA (enough blocks
    to hide a tile's latency), one elsewhere (the interpreter and CPU gain nothing from splitting)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def vocab_splits(row_blocks: int, col_tiles: int, target: int) -> tuple[int, int]:
    """(tiles per split, number of splits) so that row_blocks x splits reaches ``target`` programs."""
    want = max(1, min(col_tiles, -(-target // max(row_blocks, 1))))
    per_split = -(-col_tiles // want)
    return per_split, -(-col_tiles // per_split)
