"""A published specialist, loaded and verified: its encoder, head, labels and calibration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from appliance.artifact.head import Head
from appliance.artifact.manifest import SpecialistManifest
from appliance.artifact.rejection import Rejection
from appliance.artifact.selfcheck import SelfCheckResult, SelfCheckSet, score
from appliance.engines.encoder import EncoderConfig, OnnxEncoder
from appliance.errors import FailedPrecondition
from appliance.store import Manifest, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Specialist:
    manifest: Manifest
    head: Head
    encoder: OnnxEncoder

    @property
    def spec(self) -> SpecialistManifest:
        return self.manifest.spec

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

    rejection: Rejection | None = None  # the manifest's out-of-scope rejection, when it has one

    def probs(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Offline path (evaluation, benchmarks): full distribution per text and truncation flags."""
        x, truncated = self.encoder.embed(texts)
        return self.head.probs(x), truncated

    def scored(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None, list[bool]]:
        """Offline path: probabilities, out-of-scope rejection scores (None without rejection) and
        truncation flags; a score below ``spec.oos.threshold`` is rejected."""
        x, truncated = self.encoder.embed(texts)
        probs = self.head.probs(x)
        return probs, None if self.rejection is None else self.rejection.scores(probs, x), truncated


def open_encoder(store: ModelStore, manifest: Manifest, config: EncoderConfig | None = None) -> OnnxEncoder:
    # the window is the artifact's: the one its head was trained and calibrated with
    cfg = replace(config or EncoderConfig(), max_length=manifest.spec.encoder.window)
    return OnnxEncoder(store.encoder_folder(manifest.encoder_id), "model.onnx", cfg)


def load_specialist(
    ref: str, store: ModelStore | None = None, config: EncoderConfig | None = None
) -> Specialist:
    """Verify and load ``NAME[:VERSION]``; raises NotFound or IntegrityError."""
    store = store or ModelStore()
    return specialist_from(store, store.load(ref), config)


def specialist_from(store: ModelStore, manifest: Manifest, config: EncoderConfig | None = None) -> Specialist:
    """The classifier a verified manifest describes."""
    oos = manifest.spec.oos
    rejection = Rejection.load(manifest.folder, oos) if oos is not None else None
    return Specialist(manifest, Head.load(manifest.folder), open_encoder(store, manifest, config), rejection)


def self_check(specialist: Specialist) -> SelfCheckResult | None:
    """The version's self-check set run on this CPU; None for a version published without one."""
    info = specialist.spec.self_check
    if info is None:
        return None
    check = SelfCheckSet.load(specialist.manifest.folder / info.file)
    probs, _ = specialist.probs(check.texts)
    return score(check, probs, info.min_agreement)


def require_self_check(specialist: Specialist) -> None:
    """Refuse (FailedPrecondition) a version whose labels on this CPU stray from the factory's."""
    result = self_check(specialist)
    if result is None:
        return
    if not result.passed:
        raise FailedPrecondition(f"{specialist.spec.ref} refused: {result.describe()}")
    log.info("%s: %s", specialist.spec.ref, result.describe())
