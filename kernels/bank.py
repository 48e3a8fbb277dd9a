"""The packed bank of specialist classification heads shared by one encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class HeadBank:
    """All heads' weight rows concatenated, so one kernel can serve a batch that mixes heads.

    Head ``h`` owns rows ``offsets[h] : offsets[h] + counts[h]`` of ``weights`` and ``biases``;
    its class ``c`` is row ``offsets[h] + c``.
    """

    weights: torch.Tensor  # [sum C_h, D], the bank's dtype
    offsets: torch.Tensor  # [H] int64
    counts: torch.Tensor  # [H] int32
    biases: torch.Tensor  # [sum C_h] float32
    max_classes: int
    # Host copies of offsets/counts, so the reference path never syncs with a device to read them.
    host_offsets: tuple[int, ...] = field(repr=False)
    host_counts: tuple[int, ...] = field(repr=False)

    @property
    def num_heads(self) -> int:
        return len(self.host_counts)

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @classmethod
    def from_heads(
        cls,
        heads: Sequence[tuple[ArrayLike, ArrayLike]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HeadBank:
        """Pack ``(weight [C_i, D], bias [C_i])`` pairs; head ``i`` keeps index ``i``."""
        if len(heads) == 0:
            raise ValueError("a head bank needs at least one head")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"head weights must be float32, float16 or bfloat16, got {dtype}")
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor] = []
        dim: int | None = None
        for i, (weight, bias) in enumerate(heads):
            w = torch.as_tensor(weight).detach().to("cpu", torch.float32)
            b = torch.as_tensor(bias).detach().to("cpu", torch.float32)
            if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
                raise ValueError(f"head {i}: weight must be [classes >= 1, D], got {tuple(w.shape)}")
            if dim is None:
                dim = int(w.shape[1])
            if w.shape[1] != dim:
                raise ValueError(f"head {i}: weight has D={w.shape[1]}, the other heads have D={dim}")
            if b.shape != (w.shape[0],):
                raise ValueError(f"head {i}: bias must be [{w.shape[0]}], got {tuple(b.shape)}")
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise ValueError(f"head {i}: weight or bias holds NaN or infinity")
            weights.append(w)
            biases.append(b)
        counts = [int(w.shape[0]) for w in weights]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        return cls(
            weights=torch.cat(weights).to(device=device, dtype=dtype).contiguous(),
            offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            counts=torch.tensor(counts, dtype=torch.int32, device=device),
            biases=torch.cat(biases).to(device=device).contiguous(),
            max_classes=max(counts),
            host_offsets=tuple(offsets),
            host_counts=tuple(counts),
        )

    def to(self, device: torch.device | str) -> HeadBank:
        """The same bank on another device."""
        return HeadBank(
            weights=self.weights.to(device),
            offsets=self.offsets.to(device),
            counts=self.counts.to(device),
            biases=self.biases.to(device),
            max_classes=self.max_classes,
            host_offsets=self.host_offsets,
            host_counts=self.host_counts,
        )
