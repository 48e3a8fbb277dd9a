"""A published specialist, loaded and verified: its encoder, head, labels and calibration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.factory.head import Head
from appliance.store import Manifest, ModelStore


@dataclass(frozen=True)
class Specialist:
    manifest: Manifest
    head: Head
    encoder: OnnxEncoder

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def threshold(self) -> float:
        return float(self.manifest.data["calibration"]["threshold"])

    @property
    def precision(self) -> str:
        return str(self.manifest.data["precision"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.data

    def probs(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Offline path (evaluation, benchmarks): full distribution per text and truncation flags."""
        x, truncated = self.encoder.embed(texts)
        return self.head.probs(x), truncated


def open_encoder(store: ModelStore, manifest: Manifest, config: EncoderConfig | None = None) -> OnnxEncoder:
    window = int(manifest.data["encoder"]["window"])
    cfg = replace(config or EncoderConfig(), max_length=window)  # the window is the model's own
    return OnnxEncoder(store.encoder_folder(manifest.encoder_id), "model.onnx", cfg)


def load_specialist(
    ref: str, store: ModelStore | None = None, config: EncoderConfig | None = None
) -> Specialist:
    """Verify and load ``NAME[:VERSION]``; raises NotFound or IntegrityError."""
    store = store or ModelStore()
    manifest = store.load(ref)
    return Specialist(manifest, Head.load(manifest.folder), open_encoder(store, manifest, config))
