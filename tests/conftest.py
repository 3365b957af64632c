"""Shared test fixtures. Without a GPU, Triton kernels run in Triton's CPU interpreter: the variable
must be set before triton is first imported, hence here."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible stream per test: inputs are random, never zeros, never shared.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
