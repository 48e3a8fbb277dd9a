"""The KServe v2 (Open Inference Protocol) gRPC front end for text classifiers and span extractors.

A classifier is exposed as one model with the tensor signature

    inputs:  TEXT  BYTES [-1]             UTF-8 texts, one per element
    outputs: LABEL BYTES [-1]             the decided label per text
             SCORE FP32  [-1]             its confidence
             PROBS FP32  [-1, n_classes]  the specialist's distribution, in label order

and a span extractor with

    inputs:  TEXT  BYTES [-1]
    outputs: SPANS BYTES [-1]             per text one JSON document, {"spans": [{"label", "start",
                                          "end", "text", "confidence", "route"}], "truncated"},
                                          offsets in characters (code points) of the text as sent

A model answers only its own kind's outputs; asking for the other kind's is INVALID_ARGUMENT.

Tensors travel either typed (``contents.bytes_contents`` / ``fp32_contents``) or raw
(``raw_input_contents``: BYTES elements as a 4-byte little-endian length and the bytes, FP32 as
little-endian floats). The response uses the encoding the request used. Like the
``appliance.v1`` servicers, this one talks only to a :class:`~appliance.backend.Backend`, so
the same bad input gets the same status on both APIs.

Two of Triton's extensions are answered, so that Triton's tools (perf_analyzer, model analyzer)
work against the appliance: ``ModelConfig`` describes a model in Triton's terms
(``max_batch_size`` 0 and each tensor's full shape as ``dims``: the texts of one call are the
first dimension of ``TEXT``, as in the metadata), and ``ModelStatistics`` reports the runtime's
cumulative counts and times per loaded model version (:mod:`appliance.serve.statistics` defines
each one).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import grpc
import numpy as np
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from appliance._proto.inference import grpc_service_pb2 as pb
from appliance._proto.inference import grpc_service_pb2_grpc as pb_grpc
from appliance.api.boundary import Boundary
from appliance.api.servicers import request_id
from appliance.api.workflows import Workflows, infer_workflow, require_model_scope
from appliance.backend import Backend
from appliance.errors import ApplianceError, InvalidArgument, NotFound
from appliance.serve.metrics import ServingMetrics
from appliance.serve.statistics import Duration, ModelCounters, ModelKey
from appliance.store import parse_version
from appliance.types import ClassifyOutcome, ExtractOutcome, Limits, ModelDescription

INPUT_TEXT = "TEXT"
OUTPUT_LABEL = "LABEL"
OUTPUT_SCORE = "SCORE"
OUTPUT_PROBS = "PROBS"
OUTPUT_SPANS = "SPANS"
OUTPUT_NAMES: tuple[str, ...] = (OUTPUT_LABEL, OUTPUT_SCORE, OUTPUT_PROBS)  # a classifier's
OUTPUTS_BY_KIND: dict[str, tuple[str, ...]] = {"classifier": OUTPUT_NAMES, "span_extractor": (OUTPUT_SPANS,)}
EXTRACTOR = "span_extractor"

SERVER_NAME = "appliance"
PLATFORM = "appliance_text_classifier"
PLATFORMS = {"classifier": PLATFORM, EXTRACTOR: "appliance_span_extractor"}
# Triton's names for the extensions answered; perf_analyzer asks for statistics only if listed
EXTENSIONS = ("model_configuration", "statistics")
_LENGTH = struct.Struct("<I")  # the length prefix of one raw BYTES element


def _server_version() -> str:
    try:
        return metadata.version("appliance")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------- BYTES tensor codec


def encode_raw_bytes(elements: Sequence[bytes]) -> bytes:
    """Serialise BYTES elements the way raw tensor contents carry them."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def decode_raw_bytes(raw: bytes, count: int | None = None) -> list[bytes]:
    """Split raw BYTES contents into elements; InvalidArgument if a length runs past the end, or
    if there are more than ``count`` elements (found after ``count`` steps, however many follow)."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if count is not None and len(elements) == count:
            raise InvalidArgument(
                f"input {INPUT_TEXT!r} has shape [{count}] but carries more than {count} element(s)"
            )
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(
                f"malformed raw BYTES contents: {len(raw) - offset} trailing byte(s) at offset {offset} "
                f"cannot hold a 4-byte length prefix"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidArgument(
                f"malformed raw BYTES contents: element {len(elements)} claims {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


# ---------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class _ParsedInfer:
    model_ref: str  # "NAME" or "NAME:VERSION", as the Backend takes it
    texts: list[str]
    outputs: tuple[str, ...]  # requested output names, in response order; empty: the model's all
    raw: bool  # answer with raw_output_contents


def _model_ref(name: str, version: str) -> str:
    if not name:
        raise InvalidArgument("model name is empty")
    return f"{name}:{_version(version)}" if version else name


def _version(version: str) -> int:
    """A request's ``model_version``, which must be set for this to be called."""
    return parse_version(version, where=f"model_version {version}")


def _text_elements(request: pb.ModelInferRequest, limits: Limits) -> list[bytes]:
    """The TEXT elements, undecoded, after the shape and every size are checked against ``limits``."""
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise InvalidArgument(f"expected exactly one input tensor {INPUT_TEXT!r}, got {names}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_TEXT:
        raise InvalidArgument(f"unknown input {tensor.name!r}; the only input is {INPUT_TEXT!r}")
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input {INPUT_TEXT!r} has datatype BYTES, got {tensor.datatype!r}")
    if len(tensor.shape) != 1:
        raise InvalidArgument(
            f"input {INPUT_TEXT!r} has shape [-1] (one dimension), got {list(tensor.shape)}"
        )
    count = tensor.shape[0]
    if count < 1:
        raise InvalidArgument(f"input {INPUT_TEXT!r} must hold at least one text, shape is [{count}]")
    if count > limits.max_texts_per_call:
        raise InvalidArgument(f"{count} texts in one call; the limit is {limits.max_texts_per_call}")

    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise InvalidArgument("input has both typed contents and raw_input_contents; use one")
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input"
            )
        elements = decode_raw_bytes(request.raw_input_contents[0], count)
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != count:
        raise InvalidArgument(
            f"input {INPUT_TEXT!r} has shape [{count}] but carries {len(elements)} element(s)"
        )
    most = limits.max_text_bytes
    for i, element in enumerate(elements):
        if len(element) > most:
            raise InvalidArgument(f"text {i} is {len(element)} bytes; the limit is {most} bytes")
    return elements


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    known = [name for names in OUTPUTS_BY_KIND.values() for name in names]
    names: list[str] = []
    for wanted in request.outputs:
        if wanted.name not in known:
            raise InvalidArgument(f"unknown output {wanted.name!r}; outputs are {known}")
        if "classification" in wanted.parameters:
            raise InvalidArgument("the classification extension is not supported; request PROBS instead")
        if wanted.name not in names:
            names.append(wanted.name)
    return tuple(names)


def parse_infer_request(request: pb.ModelInferRequest, limits: Limits) -> _ParsedInfer:
    """Validate a ModelInferRequest; raises InvalidArgument with a message for the caller. Texts
    are decoded only once their count and sizes are within ``limits``."""
    ref = _model_ref(request.model_name, request.model_version)
    elements = _text_elements(request, limits)
    texts: list[str] = []
    for i, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{INPUT_TEXT}[{i}] is not valid UTF-8: {exc.reason}") from None
    return _ParsedInfer(ref, texts, _requested_outputs(request), raw=bool(request.raw_input_contents))


# ---------------------------------------------------------------- response building


def outputs_for(kind: str, model: str, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs to answer: the requested ones, which must be the model kind's, or all of them."""
    own = OUTPUTS_BY_KIND.get(kind, OUTPUT_NAMES)
    foreign = [name for name in requested if name not in own]
    if foreign:
        raise InvalidArgument(f"model {model!r} is a {kind}; its outputs are {list(own)}, not {foreign}")
    return requested or own


def _spans_array(outcome: ExtractOutcome) -> np.ndarray:
    documents = [
        {
            "spans": [
                {
                    "label": s.label,
                    "start": s.start,
                    "end": s.end,
                    "text": s.text,
                    "confidence": s.confidence,
                    "route": s.route.value,
                }
                for s in e.spans
            ],
            "truncated": e.truncated,
        }
        for e in outcome.extractions
    ]
    return np.array([json.dumps(d, ensure_ascii=False).encode("utf-8") for d in documents], dtype=object)


def _output_arrays(outcome: ClassifyOutcome, names: Sequence[str]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    decisions = outcome.decisions
    if OUTPUT_LABEL in names:
        arrays[OUTPUT_LABEL] = np.array([d.label.encode("utf-8") for d in decisions], dtype=object)
    if OUTPUT_SCORE in names:
        arrays[OUTPUT_SCORE] = np.array([d.confidence for d in decisions], dtype=np.float32)
    if OUTPUT_PROBS in names:
        n_classes = len(outcome.labels)
        rows = []
        for i, d in enumerate(decisions):
            if d.probs is None or np.shape(d.probs) != (n_classes,):
                raise ApplianceError(f"the backend returned no {n_classes}-class distribution for text {i}")
            rows.append(np.asarray(d.probs, dtype=np.float32))
        arrays[OUTPUT_PROBS] = np.stack(rows).reshape(len(decisions), n_classes)
    return arrays


def build_infer_response(
    request: pb.ModelInferRequest,
    parsed: _ParsedInfer,
    outcome: ClassifyOutcome | ExtractOutcome,
    outputs: Sequence[str] = OUTPUT_NAMES,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=outcome.model, model_version=str(outcome.version), id=request.id
    )
    if isinstance(outcome, ExtractOutcome):
        arrays = {OUTPUT_SPANS: _spans_array(outcome)}
    else:
        arrays = _output_arrays(outcome, outputs)
    for name in outputs:
        array = arrays[name]
        is_bytes = array.dtype == object
        tensor = response.outputs.add(name=name, datatype="BYTES" if is_bytes else "FP32", shape=array.shape)
        if parsed.raw:
            raw = encode_raw_bytes(array.tolist()) if is_bytes else array.astype("<f4").tobytes()
            response.raw_output_contents.append(raw)
        elif is_bytes:
            tensor.contents.bytes_contents.extend(array.tolist())
        else:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return response


def _tensor(name: str, datatype: str, shape: Sequence[int]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=list(shape))


def model_metadata(description: ModelDescription) -> pb.ModelMetadataResponse:
    versions = sorted({description.version, *description.available_versions})
    if description.kind == EXTRACTOR:
        outputs = [_tensor(OUTPUT_SPANS, "BYTES", [-1])]
    else:
        outputs = [
            _tensor(OUTPUT_LABEL, "BYTES", [-1]),
            _tensor(OUTPUT_SCORE, "FP32", [-1]),
            _tensor(OUTPUT_PROBS, "FP32", [-1, len(description.labels)]),
        ]
    return pb.ModelMetadataResponse(
        name=description.name,
        versions=[str(v) for v in versions],
        platform=PLATFORMS.get(description.kind, PLATFORM),
        inputs=[_tensor(INPUT_TEXT, "BYTES", [-1])],
        outputs=outputs,
    )


_DATA_TYPES = {"BYTES": pb.TYPE_STRING, "FP32": pb.TYPE_FP32}


def model_config(description: ModelDescription) -> pb.ModelConfig:
    """Triton's view of a model. ``max_batch_size`` 0 says that ``dims`` are the whole shapes, the
    metadata's: Triton's batched form would give each text a shape of its own (``[-1, 1]``), which
    KServe clients of ``TEXT [-1]`` do not send."""
    metadata = model_metadata(description)

    def dims(tensor: pb.ModelMetadataResponse.TensorMetadata) -> list[int]:
        return list(tensor.shape)

    return pb.ModelConfig(
        name=description.name,
        platform=metadata.platform,
        backend=SERVER_NAME,
        max_batch_size=0,
        input=[
            pb.ModelInput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=dims(t))
            for t in metadata.inputs
        ],
        output=[
            pb.ModelOutput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=dims(t))
            for t in metadata.outputs
        ],
        dynamic_batching=pb.ModelDynamicBatching(),  # texts of many calls share encoder batches
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(key: ModelKey, counters: ModelCounters) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=key[0],
        version=str(key[1]),
        last_inference=counters.last_inference_ms,
        inference_count=counters.inference_count,
        execution_count=counters.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(counters.success),
            fail=_duration(counters.fail),
            queue=_duration(counters.queue),
            compute_input=_duration(counters.compute_input),
            compute_infer=_duration(counters.compute_infer),
            compute_output=_duration(counters.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
    )


def reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A descriptor pool for server reflection: the KServe proto plus ``files`` and their imports.

    The KServe messages live in a private pool (see :mod:`appliance.protogen`), which the default
    reflection pool cannot see. Give every other served proto (``appliance_pb2.DESCRIPTOR``,
    ``health_pb2.DESCRIPTOR``, ...) and pass the result as ``pool=`` to
    ``grpc_reflection.v1alpha.reflection.enable_server_reflection``.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in (pb.DESCRIPTOR, *files):
        add(file)
    return pool


# ---------------------------------------------------------------- the servicer


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a Backend."""

    def __init__(
        self, backend: Backend, metrics: ServingMetrics | None = None, workflows: Workflows | None = None
    ) -> None:
        self._backend = backend
        self._workflows = workflows  # ModelInfer on a published workflow's name runs it
        self._version = _server_version()
        self._boundary = Boundary("GRPCInferenceService", metrics)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        async def run() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)  # answering at all is the proof

        return await self._boundary.unary(context, "ServerLive", run)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        async def run() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self._backend.is_ready(None))

        return await self._boundary.unary(context, "ServerReady", run)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def run() -> pb.ModelReadyResponse:
            _model_ref(request.name, request.version)
            # Triton's convention: an unknown model is simply not ready, not an error.
            try:
                description = self._backend.describe(request.name)
            except NotFound:
                return pb.ModelReadyResponse(ready=False)
            version_ok = not request.version or _version(request.version) == description.version
            return pb.ModelReadyResponse(ready=version_ok and self._backend.is_ready(request.name))

        return await self._boundary.unary(context, "ModelReady", run, request.name)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async def run() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

        return await self._boundary.unary(context, "ServerMetadata", run)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def run() -> pb.ModelMetadataResponse:
            _model_ref(request.name, request.version)
            description = self._backend.describe(request.name)
            if request.version and _version(request.version) not in {
                description.version,
                *description.available_versions,
            }:
                raise NotFound(f"model {request.name!r} has no version {request.version}")
            return model_metadata(description)

        return await self._boundary.unary(context, "ModelMetadata", run, request.name)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        async def run() -> pb.ModelConfigResponse:
            ref = _model_ref(request.name, request.version)
            return pb.ModelConfigResponse(config=model_config(self._backend.describe(ref)))

        return await self._boundary.unary(context, "ModelConfig", run, request.name)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        async def run() -> pb.ModelStatisticsResponse:
            if request.version and not request.name:
                raise InvalidArgument("model_version needs a model name")
            ref = _model_ref(request.name, request.version) if request.name else ""
            stats = self._backend.statistics_of(ref)
            return pb.ModelStatisticsResponse(model_stats=[model_statistics(k, c) for k, c in stats])

        return await self._boundary.unary(context, "ModelStatistics", run, request.name)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async def run() -> pb.ModelInferResponse:
            if self._workflows is not None and self._workflows.exists(request.model_name):
                return await infer_workflow(self._workflows, request, context, self._backend.limits)
            require_model_scope(context, request.model_name)
            _model_ref(request.model_name, request.model_version)
            try:
                parsed = parse_infer_request(request, self._backend.limits)
            except InvalidArgument:
                # An unknown model is NOT_FOUND even when the tensors are also wrong.
                self._backend.describe(request.model_name)
                raise
            kind = self._kind(parsed)
            outputs = outputs_for(kind, parsed.model_ref, parsed.outputs)
            outcome: ClassifyOutcome | ExtractOutcome
            if kind == EXTRACTOR:
                outcome = await self._backend.extract(
                    parsed.model_ref,
                    parsed.texts,
                    timeout=context.time_remaining(),
                    request_id=request_id(request.id),
                )
            else:
                outcome = await self._backend.classify(
                    parsed.model_ref,
                    parsed.texts,
                    top_k=1,
                    want_probs=True,
                    timeout=context.time_remaining(),
                    request_id=request_id(request.id),  # so escalation rows name the caller's id
                )
            return build_infer_response(request, parsed, outcome, outputs)

        return await self._boundary.unary(context, "ModelInfer", run, request.model_name)

    def _kind(self, parsed: _ParsedInfer) -> str:
        """The model's kind; for one not loaded yet (the backend loads it on demand), the kind
        whose outputs the caller asked for."""
        try:
            return self._backend.describe(parsed.model_ref).kind
        except NotFound:
            return EXTRACTOR if OUTPUT_SPANS in parsed.outputs else "classifier"
