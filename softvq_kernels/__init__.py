"""Fused soft vector quantisation over vocabulary-sized codebooks."""

from softvq_kernels.api import SoftVQAux, soft_vq
from softvq_kernels.backends import available_backends

__all__ = ["SoftVQAux", "available_backends", "soft_vq"]
__version__ = "0.1.0"
