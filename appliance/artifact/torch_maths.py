"""The PyTorch side of :mod:`.maths`: pooling and normalisation on tensors.

Used where the maths must run inside a graph: the ONNX export, fine-tuning (gradients flow
through it) and the kernels' reference. Same formulas and epsilon as :mod:`.maths`.
"""

from __future__ import annotations

import torch

from appliance.artifact.maths import NORM_EPS


def masked_mean_pool(
    states: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Mean of the token states where the 0/1 ``mask`` is set, in ``dtype``: [B, T, D], [B, T] -> [B, D].

    A fully padded row pools to zeros (the count is clamped to 1 instead of dividing by 0).
    """
    if states.dtype != dtype:  # no cast node in an exported fp32 graph
        states = states.to(dtype)
    weights = mask.unsqueeze(-1).to(dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (``torch.nn.functional.normalize`` with :data:`NORM_EPS`)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
