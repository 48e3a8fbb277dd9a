"""A published span extractor, loaded and verified: its encoder, token head, slots and calibration.

It shares the encoder artifact (and, when served, the ONNX session and batcher) with every
classifier on the same base; it reads the ``states`` output where a classifier reads ``pooled``.
Encoding and decoding are :mod:`appliance.artifact.spans`, the same functions the factory
evaluates with (``appliance.factory.extract.SpanTagger``), so served spans are the artifact's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance.artifact.manifest import ExtractorInfo, SpecialistManifest
from appliance.artifact.spans import Encoded, Span, TokenHead, decode_spans, encode_many
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.engines.specialist import Specialist, open_encoder, specialist_from
from appliance.errors import IntegrityError
from appliance.store import Manifest, ModelStore


@dataclass(frozen=True)
class Extractor:
    manifest: Manifest
    tagger: TokenHead
    encoder: OnnxEncoder

    @property
    def spec(self) -> SpecialistManifest:
        return self.manifest.spec

    @property
    def info(self) -> ExtractorInfo:
        info = self.spec.extractor
        if info is None:  # the manifest's validator makes this unreachable for a span_extractor
            raise IntegrityError(f"{self.spec.ref} has no extractor fields")
        return info

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def threshold(self) -> float:
        return self.spec.calibration.threshold

    @property
    def precision(self) -> str:
        return self.spec.precision

    def encode(self, texts: Sequence[str], requested_slots: Sequence[Sequence[str]] = ()) -> list[Encoded]:
        """Word pieces for the window. The requested slots are context only for an extractor
        trained with it; for the others they are ignored, as in training."""
        slots = requested_slots if requested_slots and self.info.uses_context else None
        return encode_many(self.encoder.tokenizer, texts, slots, self.encoder.config.max_length)

    def decode(self, states: np.ndarray, encoded: Encoded, text: str) -> list[Span]:
        """One text's spans from its token states ``[T, dim]``."""
        return decode_spans(self.tagger.probs(states), encoded.offsets, text, self.labels)

    def warm_up(self) -> None:
        """One text through the session and the head, so the first request pays nothing."""
        (encoded,) = self.encode(["warm up"])
        (states,) = self.encoder.run_states([encoded.ids])
        self.decode(states, encoded, "warm up")


Served = Specialist | Extractor


def load_served(ref: str, store: ModelStore, config: EncoderConfig | None = None) -> Served:
    """Verify and load ``NAME[:VERSION]`` as the kind its manifest names."""
    manifest = store.load(ref)
    info = manifest.spec.extractor
    if manifest.spec.kind != "span_extractor" or info is None:
        return specialist_from(store, manifest, config)
    encoder = open_encoder(store, manifest, config)
    if not encoder.has_states:
        raise IntegrityError(f"{ref}: its encoder {manifest.encoder_id[:12]} has no token states output")
    return Extractor(manifest, TokenHead.load(manifest.folder, info.tagger.file), encoder)
