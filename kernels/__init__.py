"""Triton kernels for the hot classification path, with plain-PyTorch references.

After the encoder, each row is pooled, L2-normalised, scored by its own specialist head, and
reduced to its top-k labels. :func:`fused_classify_topk` (token states in) and
:func:`pooled_topk` (pooled rows in) do this in one launch on CUDA and with the reference on
CPU; ``APPLIANCE_KERNEL=auto|triton|reference`` forces a path. Triton itself is imported only
when the kernel path is taken.
"""

from kernels.bank import HeadBank
from kernels.dispatch import (
    KERNEL_ENV,
    KERNEL_MODES,
    fused_classify_topk,
    kernel_mode,
    pooled_topk,
    pooled_topk_numpy,
    uses_triton,
)
from kernels.reference import fused_classify_topk_reference, masked_mean_pool, pooled_topk_reference

__all__ = [
    "KERNEL_ENV",
    "KERNEL_MODES",
    "HeadBank",
    "fused_classify_topk",
    "fused_classify_topk_reference",
    "kernel_mode",
    "masked_mean_pool",
    "pooled_topk",
    "pooled_topk_numpy",
    "pooled_topk_reference",
    "uses_triton",
]
