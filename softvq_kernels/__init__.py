"""Fused soft vector quantisation over vocabulary-sized codebooks."""

from softvq_kernels.api import SoftVQAux, soft_vq
from softvq_kernels.backends import available_backends
from softvq_kernels.code_scores import code_ctc_loss, code_scores
from softvq_kernels.module import SoftVQ, SoftVQOutput

__all__ = ["SoftVQ", "SoftVQAux", "SoftVQOutput", "available_backends", "code_ctc_loss", "code_scores", "soft_vq"]
__version__ = "0.1.0"
