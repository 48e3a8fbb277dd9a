from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_CLASSIFIER: _ClassVar[ModelKind]
    MODEL_KIND_SPAN_EXTRACTOR: _ClassVar[ModelKind]

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_SPECIALIST_ONLY: _ClassVar[Policy]
    POLICY_CASCADE: _ClassVar[Policy]
    POLICY_GENERALIST_ONLY: _ClassVar[Policy]

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_SPECIALIST: _ClassVar[Route]
    ROUTE_GENERALIST: _ClassVar[Route]

class StepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATUS_UNSPECIFIED: _ClassVar[StepStatus]
    STEP_STATUS_OK: _ClassVar[StepStatus]
    STEP_STATUS_SKIPPED: _ClassVar[StepStatus]
    STEP_STATUS_FAILED: _ClassVar[StepStatus]
    STEP_STATUS_FALLBACK: _ClassVar[StepStatus]
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_INT8: Precision
PRECISION_FP16: Precision
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_CLASSIFIER: ModelKind
MODEL_KIND_SPAN_EXTRACTOR: ModelKind
POLICY_UNSPECIFIED: Policy
POLICY_SPECIALIST_ONLY: Policy
POLICY_CASCADE: Policy
POLICY_GENERALIST_ONLY: Policy
ROUTE_UNSPECIFIED: Route
ROUTE_SPECIALIST: Route
ROUTE_GENERALIST: Route
STEP_STATUS_UNSPECIFIED: StepStatus
STEP_STATUS_OK: StepStatus
STEP_STATUS_SKIPPED: StepStatus
STEP_STATUS_FAILED: StepStatus
STEP_STATUS_FALLBACK: StepStatus

class Cost(_message.Message):
    __slots__ = ("core_seconds", "accelerator_seconds", "price", "currency")
    CORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    core_seconds: float
    accelerator_seconds: float
    price: float
    currency: str
    def __init__(self, core_seconds: _Optional[float] = ..., accelerator_seconds: _Optional[float] = ..., price: _Optional[float] = ..., currency: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_call", "max_text_bytes", "max_input_tokens")
    MAX_TEXTS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_call: int
    max_text_bytes: int
    max_input_tokens: int
    def __init__(self, max_texts_per_call: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_input_tokens: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "texts", "top_k", "policy", "request_id", "allow_fallback", "generalist")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    GENERALIST_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    policy: Policy
    request_id: str
    allow_fallback: bool
    generalist: str
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., policy: _Optional[_Union[Policy, str]] = ..., request_id: _Optional[str] = ..., allow_fallback: _Optional[bool] = ..., generalist: _Optional[str] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("label", "confidence", "top", "truncated", "route", "latency_ms", "cost", "escalation_id", "fallback")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    label: str
    confidence: float
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    truncated: bool
    route: Route
    latency_ms: float
    cost: Cost
    escalation_id: str
    fallback: bool
    def __init__(self, label: _Optional[str] = ..., confidence: _Optional[float] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., truncated: _Optional[bool] = ..., route: _Optional[_Union[Route, str]] = ..., latency_ms: _Optional[float] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., escalation_id: _Optional[str] = ..., fallback: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "precision", "results", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    precision: Precision
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RequestedSlots(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slots: _Optional[_Iterable[str]] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("model", "texts", "requested_slots", "policy", "request_id", "allow_fallback", "classify_model", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    requested_slots: _containers.RepeatedCompositeFieldContainer[RequestedSlots]
    policy: Policy
    request_id: str
    allow_fallback: bool
    classify_model: str
    top_k: int
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., requested_slots: _Optional[_Iterable[_Union[RequestedSlots, _Mapping]]] = ..., policy: _Optional[_Union[Policy, str]] = ..., request_id: _Optional[str] = ..., allow_fallback: _Optional[bool] = ..., classify_model: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("label", "start", "end", "text", "confidence", "route")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    label: str
    start: int
    end: int
    text: str
    confidence: float
    route: Route
    def __init__(self, label: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., confidence: _Optional[float] = ..., route: _Optional[_Union[Route, str]] = ...) -> None: ...

class Extraction(_message.Message):
    __slots__ = ("spans", "truncated", "latency_ms", "cost", "escalation_id", "fallback", "classification", "dropped_generalist_spans")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    DROPPED_GENERALIST_SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    truncated: bool
    latency_ms: float
    cost: Cost
    escalation_id: str
    fallback: bool
    classification: Classification
    dropped_generalist_spans: int
    def __init__(self, spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., truncated: _Optional[bool] = ..., latency_ms: _Optional[float] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., escalation_id: _Optional[str] = ..., fallback: _Optional[bool] = ..., classification: _Optional[_Union[Classification, _Mapping]] = ..., dropped_generalist_spans: _Optional[int] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("model", "version", "precision", "results", "request_id", "classify_model", "classify_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFY_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    precision: Precision
    results: _containers.RepeatedCompositeFieldContainer[Extraction]
    request_id: str
    classify_model: str
    classify_version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., results: _Optional[_Iterable[_Union[Extraction, _Mapping]]] = ..., request_id: _Optional[str] = ..., classify_model: _Optional[str] = ..., classify_version: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "texts", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "truncated")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    truncated: bool
    def __init__(self, values: _Optional[_Iterable[float]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "version", "dim", "embeddings", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    dim: int
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., dim: _Optional[int] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "max_tokens", "temperature", "stop", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finished", "finish_reason", "usage", "cost", "request_id", "prompt_truncated")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    text: str
    finished: bool
    finish_reason: str
    usage: Usage
    cost: Cost
    request_id: str
    prompt_truncated: bool
    def __init__(self, text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., request_id: _Optional[str] = ..., prompt_truncated: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "available_versions", "kind", "precision", "loaded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    kind: ModelKind
    precision: Precision
    loaded: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., available_versions: _Optional[_Iterable[int]] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., precision: _Optional[_Union[Precision, str]] = ..., loaded: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "labels", "metrics", "threshold", "coverage_at_threshold", "precision_at_threshold", "precision", "limits", "default_policy", "encoder_id", "created_at", "loaded")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_AT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRECISION_AT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: ModelKind
    labels: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.ScalarMap[str, float]
    threshold: float
    coverage_at_threshold: float
    precision_at_threshold: float
    precision: Precision
    limits: Limits
    default_policy: Policy
    encoder_id: str
    created_at: str
    loaded: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., labels: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., threshold: _Optional[float] = ..., coverage_at_threshold: _Optional[float] = ..., precision_at_threshold: _Optional[float] = ..., precision: _Optional[_Union[Precision, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., default_policy: _Optional[_Union[Policy, str]] = ..., encoder_id: _Optional[str] = ..., created_at: _Optional[str] = ..., loaded: _Optional[bool] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model", "previous_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    previous_version: int
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., previous_version: _Optional[int] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("unloaded_version",)
    UNLOADED_VERSION_FIELD_NUMBER: _ClassVar[int]
    unloaded_version: int
    def __init__(self, unloaded_version: _Optional[int] = ...) -> None: ...

class CorrectedSpan(_message.Message):
    __slots__ = ("label", "start", "end")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    label: str
    start: int
    end: int
    def __init__(self, label: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("escalation_id", "request_id", "item", "label", "spans", "source")
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    escalation_id: str
    request_id: str
    item: int
    label: str
    spans: _containers.RepeatedCompositeFieldContainer[CorrectedSpan]
    source: str
    def __init__(self, escalation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., item: _Optional[int] = ..., label: _Optional[str] = ..., spans: _Optional[_Iterable[_Union[CorrectedSpan, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class CorrectRequest(_message.Message):
    __slots__ = ("model", "corrections", "allow_new_label")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NEW_LABEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    corrections: _containers.RepeatedCompositeFieldContainer[Correction]
    allow_new_label: bool
    def __init__(self, model: _Optional[str] = ..., corrections: _Optional[_Iterable[_Union[Correction, _Mapping]]] = ..., allow_new_label: _Optional[bool] = ...) -> None: ...

class CorrectResult(_message.Message):
    __slots__ = ("id", "duplicate", "version", "trainable", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: int
    duplicate: bool
    version: int
    trainable: bool
    note: str
    def __init__(self, id: _Optional[int] = ..., duplicate: _Optional[bool] = ..., version: _Optional[int] = ..., trainable: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class CorrectResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CorrectResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CorrectResult, _Mapping]]] = ...) -> None: ...

class RunWorkflowRequest(_message.Message):
    __slots__ = ("workflow", "texts", "request_id")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, workflow: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StepReceipt(_message.Message):
    __slots__ = ("step", "kind", "status", "model", "version", "route", "confidence", "latency_ms", "cost", "started_ms", "detail", "output_json")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    step: str
    kind: str
    status: StepStatus
    model: str
    version: int
    route: Route
    confidence: float
    latency_ms: float
    cost: Cost
    started_ms: float
    detail: str
    output_json: str
    def __init__(self, step: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[_Union[StepStatus, str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., route: _Optional[_Union[Route, str]] = ..., confidence: _Optional[float] = ..., latency_ms: _Optional[float] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., started_ms: _Optional[float] = ..., detail: _Optional[str] = ..., output_json: _Optional[str] = ...) -> None: ...

class WorkflowResult(_message.Message):
    __slots__ = ("steps", "cost")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepReceipt]
    cost: Cost
    def __init__(self, steps: _Optional[_Iterable[_Union[StepReceipt, _Mapping]]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ...) -> None: ...

class RunWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "version", "results", "total_cost", "request_id", "latency_ms")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[WorkflowResult]
    total_cost: Cost
    request_id: str
    latency_ms: float
    def __init__(self, workflow: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[WorkflowResult, _Mapping]]] = ..., total_cost: _Optional[_Union[Cost, _Mapping]] = ..., request_id: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class GeneratedDelta(_message.Message):
    __slots__ = ("text_index", "step", "text")
    TEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text_index: int
    step: str
    text: str
    def __init__(self, text_index: _Optional[int] = ..., step: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RunWorkflowEvent(_message.Message):
    __slots__ = ("delta", "done")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    delta: GeneratedDelta
    done: RunWorkflowResponse
    def __init__(self, delta: _Optional[_Union[GeneratedDelta, _Mapping]] = ..., done: _Optional[_Union[RunWorkflowResponse, _Mapping]] = ...) -> None: ...
