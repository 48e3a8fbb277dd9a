"""The servicers' one error and metrics boundary, over a real ``grpc.aio`` server.

Every service (``appliance.v1`` and KServe v2) hosts the stand-in backend, changed only where a
test needs it to fail in a particular way. Statuses are read from real client calls, metrics from
the servers' Prometheus registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from standin import MODEL, VERSION, KeywordBackend, serve_in_thread

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance._proto.inference import grpc_service_pb2 as kpb
from appliance._proto.inference import grpc_service_pb2_grpc as kserve_grpc
from appliance.api.kserve import KServeServicer
from appliance.api.servicers import AdminServicer, GenerationServicer, InferenceServicer, ModelServicer
from appliance.errors import ResourceExhausted
from appliance.serve.metrics import OTHER, ServingMetrics

pytestmark = pytest.mark.integration


class FaultyBackend(KeywordBackend):
    """The stand-in, with a fault chosen per model name: a bug, a timeout, or a caller error."""

    async def classify(self, model: str, texts, *args, **kwargs):  # type: ignore[no-untyped-def]
        if model == "bug":
            raise KeyError("internal detail that must not reach the caller")
        if model == "slow":
            await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)
        if model == "hang":
            await asyncio.sleep(30)
        return await super().classify(model, texts, *args, **kwargs)


class Generalist:
    """Streams two chunks, then fails the way a busy engine does."""

    async def generate(self, **_: object) -> AsyncIterator[object]:
        yield _Chunk("a")
        raise ResourceExhausted("the generalist is at capacity")


class _Chunk:
    def __init__(self, text: str) -> None:
        self.text, self.finished, self.finish_reason = text, False, None
        self.prompt_tokens = self.completion_tokens = 1
        self.cost = None


@pytest.fixture(scope="module")
def metrics() -> ServingMetrics:
    metrics = ServingMetrics()
    metrics.model_loaded(MODEL, VERSION)  # what the runtime reports when it installs a version
    return metrics


@pytest.fixture(scope="module")
def channel(metrics: ServingMetrics) -> Iterator[grpc.Channel]:
    backend = FaultyBackend()

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(backend, metrics), server)
        pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(backend, metrics), server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(backend, metrics), server)
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(Generalist(), metrics), server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(backend, metrics), server)

    with serve_in_thread(register) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


def _status(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def _count(metrics: ServingMetrics, service: str, method: str, model: str, code: str) -> float:
    labels = {"service": service, "method": method, "model": model, "code": code}
    return metrics.registry.get_sample_value("appliance_requests_total", labels) or 0.0


def test_a_bug_is_internal_with_no_internals_and_logged_once(
    channel: grpc.Channel, metrics: ServingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="appliance.api.boundary"):
        error = _status(
            pb_grpc.InferenceServiceStub(channel).Classify, pb.ClassifyRequest(model="bug", texts=["x"])
        )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in error.details() and "internal detail" not in error.details()
    logged = [r for r in caplog.records if r.exc_info and "Classify" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info[0] is KeyError
    assert _count(metrics, "InferenceService", "Classify", OTHER, "INTERNAL") == 1


def test_a_timeout_below_is_deadline_exceeded(channel: grpc.Channel) -> None:
    error = _status(
        pb_grpc.InferenceServiceStub(channel).Classify, pb.ClassifyRequest(model="slow", texts=["x"])
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_call_the_client_abandons_is_counted_cancelled_not_internal(
    channel: grpc.Channel, metrics: ServingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    classify = pb_grpc.InferenceServiceStub(channel).Classify
    with caplog.at_level(logging.ERROR, logger="appliance.api.boundary"):
        error = _status(classify, pb.ClassifyRequest(model="hang", texts=["x"]), timeout=0.2)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10  # the server learns of it a moment after the client
        while _count(metrics, "InferenceService", "Classify", OTHER, "CANCELLED") < 1:
            assert time.monotonic() < deadline, "the abandoned call was never counted"
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.name == "appliance.api.boundary"]


def test_a_stream_that_fails_midway_ends_with_the_errors_status(
    channel: grpc.Channel, metrics: ServingMetrics
) -> None:
    before = _count(metrics, "GenerationService", "Generate", "generalist", "RESOURCE_EXHAUSTED")
    stream = pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="hi"))
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in stream:
            received.append(response.text)
    assert received == ["a"]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in caught.value.details()
    assert _count(metrics, "GenerationService", "Generate", "generalist", "RESOURCE_EXHAUSTED") == before + 1


def test_kserve_calls_are_counted_like_appliance_v1(channel: grpc.Channel, metrics: ServingMetrics) -> None:
    kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"lost card")
    before = _count(metrics, "GRPCInferenceService", "ModelInfer", MODEL, "OK")
    kserve.ModelInfer(request, timeout=30)
    kserve.ServerLive(kpb.ServerLiveRequest(), timeout=30)
    assert _count(metrics, "GRPCInferenceService", "ModelInfer", MODEL, "OK") == before + 1
    assert _count(metrics, "GRPCInferenceService", "ServerLive", "", "OK") >= 1
    seconds = metrics.registry.get_sample_value(
        "appliance_request_seconds_count",
        {"service": "GRPCInferenceService", "method": "ModelInfer", "model": MODEL},
    )
    assert seconds is not None and seconds >= 1


@pytest.mark.parametrize("version", ["²", "٣", "9" * 5000, "9" * 10, "0", "-1"])
def test_a_bad_version_is_invalid_argument_on_both_apis(channel: grpc.Channel, version: str) -> None:
    classify = _status(
        pb_grpc.InferenceServiceStub(channel).Classify,
        pb.ClassifyRequest(model=f"{MODEL}:{version}", texts=["x"]),
    )
    kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
    request = kpb.ModelInferRequest(model_name=MODEL, model_version=version)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    infer = _status(kserve.ModelInfer, request)
    metadata = _status(kserve.ModelMetadata, kpb.ModelMetadataRequest(name=MODEL, version=version))
    for error in (classify, infer, metadata):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert len(classify.details()) < 300  # a 5,000-digit version is not echoed whole


def test_unknown_model_names_share_one_label(channel: grpc.Channel, metrics: ServingMetrics) -> None:
    models = pb_grpc.ModelServiceStub(channel)
    for i in range(50):
        assert (
            _status(models.GetModel, pb.GetModelRequest(model=f"junk-{i}")).code()
            == grpc.StatusCode.NOT_FOUND
        )
    models.GetModel(pb.GetModelRequest(model=MODEL), timeout=30)
    labels = {
        s.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "appliance_requests"
        for s in family.samples
        if s.labels["method"] == "GetModel"
    }
    assert labels == {OTHER, MODEL}
    assert _count(metrics, "ModelService", "GetModel", OTHER, "NOT_FOUND") >= 50
