"""The serving entry points: validate once, then run the Triton kernel or the PyTorch reference.

``APPLIANCE_KERNEL`` picks the path on every call:

- ``auto`` (default): the Triton kernel for CUDA tensors, the reference otherwise;
- ``triton``: always the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``, for debugging);
- ``reference``: always the reference.

Both paths rank classes by logit and break ties by the lowest class id, so they return the same
labels. NumPy inputs (ONNX Runtime outputs on the CPU path) come back as NumPy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from kernels.bank import HeadBank
from kernels.reference import fused_classify_topk_reference, pooled_topk_reference

KERNEL_ENV = "APPLIANCE_KERNEL"
KERNEL_MODES = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_mode() -> str:
    """The path ``APPLIANCE_KERNEL`` asks for; unset means ``auto``."""
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


def uses_triton(device: torch.device) -> bool:
    """Whether a call with inputs on ``device`` runs the Triton kernel."""
    mode = kernel_mode()
    return mode == "triton" or (mode == "auto" and device.type == "cuda")


def _as_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if not value.flags.writeable:  # torch.from_numpy needs a writeable buffer
            value = value.copy()
        return torch.from_numpy(value).to(device)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _check_common(head_index: torch.Tensor, rows: int, bank: HeadBank, k: int, device: torch.device) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if head_index.shape != (rows,):
        raise ValueError(f"head_index must be [{rows}], got {tuple(head_index.shape)}")
    if head_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"head_index must be int32 or int64, got {head_index.dtype}")
    for name, tensor in (("head_index", head_index), ("the head bank", bank.weights)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, the inputs on {device}")
    # A host-side check is free; on a device it would cost a sync, so there the kernel instead
    # answers an unknown head with ids -1 and probabilities 0.
    if device.type == "cpu" and rows and (head_index.min() < 0 or head_index.max() >= bank.num_heads):
        low, high = int(head_index.min()), int(head_index.max())
        raise ValueError(f"head_index must lie in [0, {bank.num_heads}), got {low}..{high}")


def _check_float(tensor: torch.Tensor, name: str, ndim: int) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def _finish(results: tuple[torch.Tensor, ...], as_numpy: bool) -> tuple[Any, ...]:
    results = (results[0], *(r.to(torch.float32) for r in results[1:]))
    if as_numpy:
        return tuple(r.cpu().numpy() for r in results)
    return results


def pooled_topk(
    pooled: torch.Tensor | np.ndarray,
    head_index: torch.Tensor | np.ndarray,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
) -> tuple[Any, ...]:
    """Classify rows already pooled by the engine: [B, D] -> top-k per row under its own head.

    Returns ``(ids [B, k] int64, probs [B, k] float32)``: class ids within the row's head, best
    first, ties to the lowest id; -1 with prob 0 where ``k`` exceeds the head's class count.
    With ``return_probs``, also the full softmax ``[B, max_classes]`` float32, padded with 0.
    NumPy in, NumPy out.
    """
    as_numpy = isinstance(pooled, np.ndarray)
    pooled_t = _as_tensor(pooled, "pooled", bank.device)
    head_t = _as_tensor(head_index, "head_index", pooled_t.device)
    _check_float(pooled_t, "pooled", 2)
    if pooled_t.shape[1] != bank.dim:
        raise ValueError(f"pooled rows have D={pooled_t.shape[1]}, the head bank D={bank.dim}")
    _check_common(head_t, pooled_t.shape[0], bank, k, pooled_t.device)
    if uses_triton(pooled_t.device):
        from kernels.triton_topk import pooled_topk_triton  # triton is imported only when used

        results = pooled_topk_triton(pooled_t, head_t, bank, k, return_probs=return_probs)
    else:
        results = pooled_topk_reference(pooled_t, head_t, bank, k, return_probs=return_probs)
    return _finish(results, as_numpy)


def fused_classify_topk(
    states: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    head_index: torch.Tensor | np.ndarray,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
) -> tuple[Any, ...]:
    """Masked mean pooling of token states [B, T, D] over ``mask`` [B, T], then :func:`pooled_topk`.

    A fully padded row pools to the zero vector, which normalises to zeros, so its logits are
    the head's biases and its probabilities the softmax of those biases.
    """
    as_numpy = isinstance(states, np.ndarray)
    states_t = _as_tensor(states, "states", bank.device)
    mask_t = _as_tensor(mask, "mask", states_t.device)
    head_t = _as_tensor(head_index, "head_index", states_t.device)
    _check_float(states_t, "states", 3)
    rows, tokens, dim = states_t.shape
    if dim != bank.dim:
        raise ValueError(f"states have D={dim}, the head bank D={bank.dim}")
    if mask_t.shape != (rows, tokens):
        raise ValueError(f"mask must be [{rows}, {tokens}], got {tuple(mask_t.shape)}")
    if mask_t.device != states_t.device:
        raise ValueError(f"mask is on {mask_t.device}, the states on {states_t.device}")
    if mask_t.is_complex():
        raise ValueError("mask must be real-valued")
    _check_common(head_t, rows, bank, k, states_t.device)
    if uses_triton(states_t.device):
        from kernels.triton_topk import fused_pool_topk_triton

        results = fused_pool_topk_triton(states_t, mask_t, head_t, bank, k, return_probs=return_probs)
    else:
        results = fused_classify_topk_reference(states_t, mask_t, head_t, bank, k, return_probs=return_probs)
    return _finish(results, as_numpy)


def pooled_topk_numpy(
    pooled: np.ndarray, head_index: np.ndarray, bank: HeadBank, k: int, *, return_probs: bool = False
) -> tuple[np.ndarray, ...]:
    """:func:`pooled_topk` for NumPy arrays from ONNX Runtime; always NumPy out."""
    return pooled_topk(np.asarray(pooled), np.asarray(head_index), bank, k, return_probs=return_probs)
