"""The classification head file: a linear layer over L2-normalised pooled embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.artifact.maths import head_probs

HEAD_FILE = "head.npz"


@dataclass(frozen=True)
class Head:
    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32

    def probs(self, normalized: np.ndarray) -> np.ndarray:
        """Label probabilities ``[B, C]`` for normalised embeddings ``[B, D]``."""
        return head_probs(normalized, self.weight, self.bias)

    def save(self, folder: Path) -> Path:
        path = folder / HEAD_FILE
        with path.open("wb") as handle:
            np.savez(handle, weight=self.weight, bias=self.bias)
        return path

    @classmethod
    def load(cls, folder: Path) -> Head:
        with np.load(folder / HEAD_FILE, allow_pickle=False) as data:
            return cls(data["weight"].astype(np.float32), data["bias"].astype(np.float32))
