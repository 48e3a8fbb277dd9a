"""Plain-PyTorch reference for the classification tail: the CPU serving path, and the oracle for tests.

It computes exactly what the Triton kernels compute, step by step and one head at a time:
masked mean pooling, L2 normalisation, the row's head, softmax, top-k. Ranking is on logits
(the same order as probabilities, without ties from underflow to 0), and ties go to the lowest
class id, as in the kernels. Pooling and normalisation are the artifact's own
(:mod:`appliance.artifact.torch_maths`); the head scoring matches :mod:`appliance.artifact.maths`,
which the tests check.
"""

from __future__ import annotations

import numpy as np
import torch

from appliance.artifact.maths import NORM_EPS
from appliance.artifact.torch_maths import l2_normalize, masked_mean_pool
from kernels.bank import HeadBank

__all__ = ["NORM_EPS", "fused_classify_topk_reference", "masked_mean_pool", "pooled_topk_reference"]


def pooled_topk_reference(
    pooled: torch.Tensor,
    head_index: torch.Tensor,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """L2-normalise, apply each row's head, softmax, top-k; all arithmetic in ``dtype``.

    Returns ``(ids [B, k] int64, probs [B, k])`` and, with ``return_probs``, the full softmax
    ``[B, max_classes]`` padded with 0. ``ids`` is -1 (and its prob 0) where ``k`` exceeds the
    row's class count.
    """
    rows = pooled.shape[0]
    device = pooled.device
    x = l2_normalize(pooled.to(dtype))

    heads = head_index.detach().to("cpu", torch.int64).numpy()
    if heads.size and (heads.min() < 0 or heads.max() >= bank.num_heads):
        raise ValueError(
            f"head_index must lie in [0, {bank.num_heads}), got values {heads.min()}..{heads.max()}"
        )

    logits = torch.full((rows, bank.max_classes), float("-inf"), dtype=dtype, device=device)
    for head in np.unique(heads).tolist():
        first, count = bank.host_offsets[head], bank.host_counts[head]
        members = torch.from_numpy(np.flatnonzero(heads == head)).to(device)
        weight = bank.weights[first : first + count].to(dtype)
        bias = bank.biases[first : first + count].to(dtype)
        logits[members, :count] = x[members] @ weight.T + bias
    probs = torch.softmax(logits, dim=1)

    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    counts = torch.tensor(bank.host_counts, dtype=torch.int64)[torch.from_numpy(heads)].to(device)
    position = torch.arange(k, device=device)
    if order.shape[1] < k:  # k beyond every head's class count
        order = torch.cat([order, order.new_zeros(rows, k - order.shape[1])], dim=1)
    valid = position.unsqueeze(0) < counts.unsqueeze(1)
    ids = torch.where(valid, order, torch.full_like(order, -1))
    top_probs = torch.where(valid, probs.gather(1, order), torch.zeros((), dtype=dtype, device=device))
    if return_probs:
        return ids, top_probs, probs
    return ids, top_probs


def fused_classify_topk_reference(
    states: torch.Tensor,
    mask: torch.Tensor,
    head_index: torch.Tensor,
    bank: HeadBank,
    k: int,
    *,
    return_probs: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Masked mean pooling, then :func:`pooled_topk_reference`."""
    pooled = masked_mean_pool(states, mask, dtype)
    return pooled_topk_reference(pooled, head_index, bank, k, return_probs=return_probs, dtype=dtype)
