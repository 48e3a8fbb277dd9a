"""The specialist manifest, typed: what ``manifest.json`` holds and every reader may rely on.

The factory builds :class:`SpecialistFields`; the store adds the publishing fields (name,
version, creation time, file hashes) and signs the JSON bytes it writes. Readers parse those
bytes into a :class:`SpecialistManifest`; the signature stays over the bytes, never over a
re-serialisation of this model.

Schema versions: 1 is every manifest written before ``schema_version`` existed (no training
columns, no lineage); 2 adds ``columns`` and ``lineage``, and, for kind ``span_extractor`` only,
``extractor`` (tags, tagger file, span metrics, training format). ``stage`` and the lineage's
dataset digests were added to 2 with defaults ("champion", none), which is what an older manifest
means. Unknown keys are ignored, so a manifest from a newer factory still loads here.

A span extractor's ``labels`` are its slot names; its ``calibration`` is over span confidence
(:mod:`appliance.artifact.spans`) with ``text_coverage`` set; its ``quantization`` compares
micro span F1 (``metric``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from appliance.artifact.head import HEAD_FILE
from appliance.artifact.selfcheck import SELF_CHECK_FILE
from appliance.artifact.spans import TAGGER_FILE, tag_names

SCHEMA_VERSION = 2
Kind = Literal["classifier", "span_extractor"]
Precision = Literal["fp32", "int8"]
DefaultPolicy = Literal["cascade", "specialist_only", "generalist_only"]
Stage = Literal["champion", "challenger"]


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class EncoderRef(_Part):
    """The encoder this specialist is served with."""

    id: str  # content hash of the encoder folder in the store
    precision: Precision
    window: int  # tokens per text; longer texts are truncated
    dim: int


class BaseEncoderRef(_Part):
    name: str
    sha256: str  # of the Hugging Face folder the encoders were exported from


class HeadInfo(_Part):
    file: str = HEAD_FILE
    regularisation_C: float | None = None  # the key as written since schema 1


class Calibration(_Part):
    """The confidence threshold the cascade uses, and what it achieved on held-out data."""

    target_precision: float
    threshold: float
    coverage: float  # share of held-out decisions at or above the threshold
    precision: float  # their accuracy; NaN when no threshold reaches the target
    # Extractors: share of held-out texts whose every word piece is at or above the threshold.
    text_coverage: float | None = None


class OutOfScope(_Part):
    """Rejection of texts that are none of the labels: a top probability below ``threshold`` is
    answered ``label``. Calibrated on held-out in-scope and out-of-scope rows."""

    label: str  # the training data's out-of-scope label (not a class of the head)
    threshold: float
    max_accuracy_loss_points: float  # the constraint the threshold was chosen under
    in_scope_accuracy_loss_points: float  # what rejection cost the held-out in-scope rows
    oos_recall: float  # held-out out-of-scope rows rejected (leave_labels_out: held-out labels' rows)
    heldout_oos: int  # held-out out-of-scope rows it was calibrated on
    # What is compared with the threshold (appliance.artifact.maths.oos_score); manifests from before
    # ``--reject-unknown`` carry none of these and mean the top probability.
    score: Literal["max_prob", "max_prob_knn"] = "max_prob"
    scale: tuple[float, float, float, float] | None = None  # max_prob_knn's standardisation
    references: str | None = None  # max_prob_knn: file of the training rows' normalised embeddings
    calibrated_on: Literal["oos_rows", "leave_labels_out"] = "oos_rows"


class Quantization(_Part):
    # What the two numbers measure: accuracy for classifiers, micro span F1 for extractors.
    metric: Literal["accuracy", "span_f1"] = "accuracy"
    fp32_accuracy: float
    int8_accuracy: float
    drop_points: float
    max_drop_points: float
    decision: Precision
    reason: str


class SelfCheck(_Part):
    """The self-check set every server runs before it serves this version
    (:mod:`appliance.artifact.selfcheck`), and what the published precision scored in the factory."""

    file: str = SELF_CHECK_FILE
    n: int
    min_agreement: float  # below this label agreement with the factory, a server refuses the version
    factory_fp32_agreement: float  # the published precision's labels against fp32's, in the factory
    factory_accuracy: float
    factory_cpu: str  # the instruction sets of the CPU it was built and checked on


class DataFingerprint(_Part):
    """A data set identified without its texts (``appliance.dataset.fingerprint``)."""

    sha256: str
    n_rows: int
    n_labels: int
    label_counts: dict[str, int]


class TrainingData(_Part):
    train: DataFingerprint
    heldout: DataFingerprint
    heldout_source: str


class Columns(_Part):
    """The columns the specialist was trained from: the defaults for evaluating it."""

    text: str
    label: str


class TrainedFrom(_Part):
    fingerprint: str  # sha256 of the training set, as in ``data.train``
    source: str  # the training file's name (not its path)


class Lineage(_Part):
    parent_version: int | None  # the version of this name published before it, if any
    trained_from: TrainedFrom
    # Digests in the dataset store ($APPLIANCE_HOME/datasets): the rows trained on, and the golden
    # set (held out once, never trained on) it was evaluated on. None before the store existed.
    train_dataset: str | None = None
    golden_dataset: str | None = None
    corrections: int = 0  # corrected decisions among the training rows (a retrain)
    distilled: int = 0  # training rows labelled by the generalist (a retrain with distillation)


class SlotScores(_Part):
    precision: float
    recall: float
    f1: float
    support: int  # gold spans


class TaggerInfo(_Part):
    file: str = TAGGER_FILE
    scheme: Literal["BIO"] = "BIO"
    tags: list[str] = Field(min_length=3)  # appliance.artifact.spans.tag_names(labels)


class SpanFormat(_Part):
    """The training file's format: the default for evaluating the extractor."""

    format: Literal["spans_jsonl", "dstc8"]


class ExtractorInfo(_Part):
    """What a span extractor adds to the manifest."""

    tagger: TaggerInfo
    uses_context: bool  # the requested-slot context goes in as the first segment
    micro: SlotScores  # span-level exact match on held-out data
    per_slot: dict[str, SlotScores]
    trained_format: SpanFormat


class SpecialistFields(_Part):
    """What the factory writes; the store adds the publishing fields."""

    kind: Kind = "classifier"
    schema_version: int = 1
    # A challenger is published beside the champion without being served (a retrain's output).
    stage: Stage = "champion"
    mode: Literal["head", "finetune"] = "head"
    labels: list[str] = Field(min_length=1)
    label_descriptions: dict[str, str] = Field(default_factory=dict)
    encoder: EncoderRef
    encoders: dict[Precision, str]
    base_encoder: BaseEncoderRef
    precision: Precision
    head: HeadInfo = Field(default_factory=HeadInfo)
    metrics: dict[str, int | float] = Field(default_factory=dict)
    calibration: Calibration
    quantization: Quantization
    default_policy: DefaultPolicy = "cascade"
    finetune: dict[str, JsonValue] | None = None
    data: TrainingData
    columns: Columns | None = None
    lineage: Lineage | None = None
    extractor: ExtractorInfo | None = None  # kind span_extractor only
    self_check: SelfCheck | None = None  # classifiers published before self-checks have none
    oos: OutOfScope | None = None  # classifiers trained with out-of-scope rows only

    @model_validator(mode="after")
    def _consistent(self) -> SpecialistFields:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.oos is not None and self.oos.label in self.labels:
            raise ValueError(f"the out-of-scope label {self.oos.label!r} must not be a class")
        if (self.kind == "span_extractor") != (self.extractor is not None):
            raise ValueError("a span_extractor, and only one, carries the extractor fields")
        if self.extractor is not None and self.extractor.tagger.tags != tag_names(self.labels):
            raise ValueError("the tagger's tags do not match the slot labels")
        if self.encoders.get(self.encoder.precision, self.encoder.id) != self.encoder.id:
            raise ValueError(f"encoder {self.encoder.id[:12]} is not the {self.encoder.precision} encoder")
        return self


class SpecialistManifest(SpecialistFields):
    """A published specialist's manifest."""

    format: int = 1
    name: str
    version: int
    created_at: str = ""
    files: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"
