"""Typed Python clients for ``appliance.v1``: :class:`Client` (blocking) and :class:`AsyncClient`.

With no arguments they find the local appliance: the address in ``$APPLIANCE_HOME/run/
server.json``, the local CA for TLS, and the admin token that ``appliance serve`` created (or
``$APPLIANCE_TOKEN``). Errors surface as ``grpc.RpcError`` with the server's status and message.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.config import appliance_home
from appliance.failover import channel_options, channel_target

POLICIES = {
    None: pb.POLICY_UNSPECIFIED,
    "specialist_only": pb.POLICY_SPECIALIST_ONLY,
    "cascade": pb.POLICY_CASCADE,
    "generalist_only": pb.POLICY_GENERALIST_ONLY,
}
ROUTES = {pb.ROUTE_SPECIALIST: "specialist", pb.ROUTE_GENERALIST: "generalist", pb.ROUTE_UNSPECIFIED: ""}


@dataclass(frozen=True)
class Result:
    """One text's answer."""

    label: str
    confidence: float
    top: list[tuple[str, float]]
    route: str
    truncated: bool
    latency_ms: float
    core_seconds: float
    accelerator_seconds: float
    price: float
    currency: str
    escalation_id: str
    fallback: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": self.confidence,
            "top": [{"label": label, "score": score} for label, score in self.top],
            "route": self.route,
            "truncated": self.truncated,
            "latency_ms": self.latency_ms,
            "cost": {
                "core_seconds": self.core_seconds,
                "accelerator_seconds": self.accelerator_seconds,
                "price": self.price,
                "currency": self.currency,
            },
            "escalation_id": self.escalation_id,
            "fallback": self.fallback,
        }


@dataclass(frozen=True)
class Classified:
    model: str
    version: int
    results: list[Result]
    request_id: str


def _result(c: pb.Classification) -> Result:
    return Result(
        label=c.label,
        confidence=c.confidence,
        top=[(t.label, t.score) for t in c.top],
        route=ROUTES.get(c.route, ""),
        truncated=c.truncated,
        latency_ms=c.latency_ms,
        core_seconds=c.cost.core_seconds,
        accelerator_seconds=c.cost.accelerator_seconds,
        price=c.cost.price,
        currency=c.cost.currency,
        escalation_id=c.escalation_id,
        fallback=c.fallback,
    )


def _classified(r: pb.ClassifyResponse) -> Classified:
    return Classified(r.model, r.version, [_result(c) for c in r.results], r.request_id)


@dataclass(frozen=True)
class SpanResult:
    """One extracted field; ``start``/``end`` count characters of the text as sent (end exclusive)."""

    label: str
    start: int
    end: int
    text: str
    confidence: float
    route: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "confidence": self.confidence,
            "route": self.route,
        }


@dataclass(frozen=True)
class ExtractResult:
    """One text's spans (and its classification, when the call named a classifier)."""

    spans: list[SpanResult]
    truncated: bool
    latency_ms: float
    core_seconds: float
    accelerator_seconds: float
    price: float
    currency: str
    escalation_id: str
    fallback: bool
    classification: Result | None
    dropped_generalist_spans: int = 0  # the generalist's spans that were not in the text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spans": [span.to_dict() for span in self.spans],
            "truncated": self.truncated,
            "latency_ms": self.latency_ms,
            "cost": {
                "core_seconds": self.core_seconds,
                "accelerator_seconds": self.accelerator_seconds,
                "price": self.price,
                "currency": self.currency,
            },
            "escalation_id": self.escalation_id,
            "fallback": self.fallback,
            "dropped_generalist_spans": self.dropped_generalist_spans,
        }
        if self.classification is not None:
            out["classification"] = self.classification.to_dict()
        return out


@dataclass(frozen=True)
class Extracted:
    model: str
    version: int
    results: list[ExtractResult]
    request_id: str
    classify_model: str = ""  # the classifier that answered each result's classification
    classify_version: int = 0


def _extract_result(e: pb.Extraction) -> ExtractResult:
    return ExtractResult(
        spans=[
            SpanResult(s.label, s.start, s.end, s.text, s.confidence, ROUTES.get(s.route, ""))
            for s in e.spans
        ],
        truncated=e.truncated,
        latency_ms=e.latency_ms,
        core_seconds=e.cost.core_seconds,
        accelerator_seconds=e.cost.accelerator_seconds,
        price=e.cost.price,
        currency=e.cost.currency,
        escalation_id=e.escalation_id,
        fallback=e.fallback,
        classification=_result(e.classification) if e.HasField("classification") else None,
        dropped_generalist_spans=e.dropped_generalist_spans,
    )


def _extracted(r: pb.ExtractResponse) -> Extracted:
    results = [_extract_result(e) for e in r.results]
    return Extracted(r.model, r.version, results, r.request_id, r.classify_model, r.classify_version)


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the appliance."""

    address: str
    tls: bool = True
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    server_name: str | None = None

    @classmethod
    def discover(
        cls,
        address: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        client_name: str | None = None,
        server_name: str | None = None,
    ) -> Connection:
        home = appliance_home()
        run = home / "run" / "server.json"
        info: dict[str, Any] = json.loads(run.read_text()) if run.is_file() else {}
        if address is None:
            if not info:
                raise ConnectionError(
                    f"no running appliance found ({run} is absent); start one with `appliance serve`"
                )
            address = f"{info['host']}:{info['port']}"
        if tls is None:
            tls = bool(info.get("tls", True))
        if token is None:
            token = os.environ.get("APPLIANCE_TOKEN")
        token_file = home / "client" / "token"
        if token is None and token_file.is_file():
            token = token_file.read_text().strip()
        pki = home / "pki"
        cert = key = None
        if client_name:
            cert, key = pki / "clients" / f"{client_name}.crt", pki / "clients" / f"{client_name}.key"
        return cls(address, tls, pki / "ca.crt" if tls else None, cert, key, token, server_name)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    @property
    def target(self) -> str:
        """The gRPC target: one endpoint, or several balanced by one channel (appliance/failover.py)."""
        return channel_target(self.address)

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts + channel_options(self.address)


def _classify_request(
    model: str,
    texts: Sequence[str],
    top_k: int,
    policy: str | None,
    allow_fallback: bool,
    request_id: str,
    generalist: str = "",
) -> pb.ClassifyRequest:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {[p for p in POLICIES if p]}")
    return pb.ClassifyRequest(
        model=model,
        texts=list(texts),
        top_k=top_k,
        policy=POLICIES[policy],
        allow_fallback=allow_fallback,
        request_id=request_id,
        generalist=generalist,
    )


def _extract_request(
    model: str,
    texts: Sequence[str],
    requested_slots: Sequence[Sequence[str]],
    policy: str | None,
    allow_fallback: bool,
    request_id: str,
    classify_model: str,
    top_k: int,
) -> pb.ExtractRequest:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {[p for p in POLICIES if p]}")
    return pb.ExtractRequest(
        model=model,
        texts=list(texts),
        requested_slots=[pb.RequestedSlots(slots=list(slots)) for slots in requested_slots],
        policy=POLICIES[policy],
        allow_fallback=allow_fallback,
        request_id=request_id,
        classify_model=classify_model,
        top_k=top_k,
    )


class Client:
    """Blocking client. Use as a context manager, or call :meth:`close`."""

    def __init__(self, connection: Connection | None = None) -> None:
        self.connection = connection or Connection.discover()
        c = self.connection
        self.channel = (
            grpc.secure_channel(c.target, c.credentials(), c.options())
            if c.tls
            else grpc.insecure_channel(c.target, c.options())
        )
        self._inference = pb_grpc.InferenceServiceStub(self.channel)
        self._models = pb_grpc.ModelServiceStub(self.channel)
        self._admin = pb_grpc.AdminServiceStub(self.channel)
        self._generation = pb_grpc.GenerationServiceStub(self.channel)
        self._feedback = pb_grpc.FeedbackServiceStub(self.channel)
        self._workflows = pb_grpc.WorkflowServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def classify(
        self,
        model: str,
        texts: Sequence[str],
        *,
        top_k: int = 1,
        policy: str | None = None,
        allow_fallback: bool = False,
        timeout: float | None = 30.0,
        request_id: str = "",
        generalist: str = "",
    ) -> Classified:
        request = _classify_request(model, texts, top_k, policy, allow_fallback, request_id, generalist)
        return _classified(
            self._inference.Classify(request, timeout=timeout, metadata=self.connection.metadata())
        )

    def extract(
        self,
        model: str,
        texts: Sequence[str],
        *,
        requested_slots: Sequence[Sequence[str]] = (),
        policy: str | None = None,
        allow_fallback: bool = False,
        classify_model: str = "",
        top_k: int = 1,
        timeout: float | None = 30.0,
        request_id: str = "",
    ) -> Extracted:
        """Spans per text. ``requested_slots``: empty or one list per text; ``classify_model``:
        also classify each text with that classifier (one encoder pass when they share one)."""
        request = _extract_request(
            model, texts, requested_slots, policy, allow_fallback, request_id, classify_model, top_k
        )
        return _extracted(
            self._inference.Extract(request, timeout=timeout, metadata=self.connection.metadata())
        )

    def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = 30.0) -> pb.EmbedResponse:
        request = pb.EmbedRequest(model=model, texts=list(texts))
        return self._inference.Embed(request, timeout=timeout, metadata=self.connection.metadata())

    def list_models(self, *, timeout: float | None = 10.0) -> pb.ListModelsResponse:
        return self._models.ListModels(
            pb.ListModelsRequest(), timeout=timeout, metadata=self.connection.metadata()
        )

    def get_model(self, model: str, *, timeout: float | None = 10.0) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model)
        return self._models.GetModel(request, timeout=timeout, metadata=self.connection.metadata())

    def load_model(self, model: str, *, timeout: float | None = 300.0) -> pb.LoadModelResponse:
        request = pb.LoadModelRequest(model=model)
        return self._admin.LoadModel(request, timeout=timeout, metadata=self.connection.metadata())

    def unload_model(self, model: str, *, timeout: float | None = 30.0) -> pb.UnloadModelResponse:
        request = pb.UnloadModelRequest(model=model)
        return self._admin.UnloadModel(request, timeout=timeout, metadata=self.connection.metadata())

    def correct(
        self,
        model: str,
        corrections: Sequence[pb.Correction],
        *,
        allow_new_label: bool = False,
        timeout: float | None = 30.0,
    ) -> pb.CorrectResponse:
        """Record corrections of ``model``'s decisions (each on disk before this returns)."""
        request = pb.CorrectRequest(
            model=model, corrections=list(corrections), allow_new_label=allow_new_label
        )
        return self._feedback.Correct(request, timeout=timeout, metadata=self.connection.metadata())

    def generate(
        self,
        prompt: str = "",
        *,
        messages: Sequence[tuple[str, str]] = (),
        max_tokens: int = 0,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        timeout: float | None = 120.0,
    ) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            prompt=prompt,
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop),
        )
        yield from self._generation.Generate(request, timeout=timeout, metadata=self.connection.metadata())

    def run_workflow(
        self, workflow: str, texts: Sequence[str], *, timeout: float | None = 60.0, request_id: str = ""
    ) -> pb.RunWorkflowResponse:
        """A published workflow over ``texts``: per text each step's receipt, and the total cost."""
        request = pb.RunWorkflowRequest(workflow=workflow, texts=list(texts), request_id=request_id)
        return self._workflows.Run(request, timeout=timeout, metadata=self.connection.metadata())

    def run_workflow_stream(
        self, workflow: str, texts: Sequence[str], *, timeout: float | None = 120.0, request_id: str = ""
    ) -> Iterator[pb.RunWorkflowEvent]:
        """As :meth:`run_workflow`, with generate steps' text as it comes; the last event is ``done``."""
        request = pb.RunWorkflowRequest(workflow=workflow, texts=list(texts), request_id=request_id)
        yield from self._workflows.RunStream(request, timeout=timeout, metadata=self.connection.metadata())

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout,
            metadata=self.connection.metadata(),
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class AsyncClient:
    """asyncio client with the same methods as :class:`Client`."""

    def __init__(self, connection: Connection | None = None) -> None:
        self.connection = connection or Connection.discover()
        c = self.connection
        self.channel = (
            grpc.aio.secure_channel(c.target, c.credentials(), c.options())
            if c.tls
            else grpc.aio.insecure_channel(c.target, c.options())
        )
        self._inference = pb_grpc.InferenceServiceStub(self.channel)
        self._models = pb_grpc.ModelServiceStub(self.channel)
        self._admin = pb_grpc.AdminServiceStub(self.channel)
        self._generation = pb_grpc.GenerationServiceStub(self.channel)
        self._feedback = pb_grpc.FeedbackServiceStub(self.channel)
        self._workflows = pb_grpc.WorkflowServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def classify(
        self,
        model: str,
        texts: Sequence[str],
        *,
        top_k: int = 1,
        policy: str | None = None,
        allow_fallback: bool = False,
        timeout: float | None = 30.0,
        request_id: str = "",
        generalist: str = "",
    ) -> Classified:
        request = _classify_request(model, texts, top_k, policy, allow_fallback, request_id, generalist)
        response = await self._inference.Classify(
            request, timeout=timeout, metadata=self.connection.metadata()
        )
        return _classified(response)

    async def extract(
        self,
        model: str,
        texts: Sequence[str],
        *,
        requested_slots: Sequence[Sequence[str]] = (),
        policy: str | None = None,
        allow_fallback: bool = False,
        classify_model: str = "",
        top_k: int = 1,
        timeout: float | None = 30.0,
        request_id: str = "",
    ) -> Extracted:
        request = _extract_request(
            model, texts, requested_slots, policy, allow_fallback, request_id, classify_model, top_k
        )
        response = await self._inference.Extract(
            request, timeout=timeout, metadata=self.connection.metadata()
        )
        return _extracted(response)

    async def embed(
        self, model: str, texts: Sequence[str], *, timeout: float | None = 30.0
    ) -> pb.EmbedResponse:
        request = pb.EmbedRequest(model=model, texts=list(texts))
        return await self._inference.Embed(request, timeout=timeout, metadata=self.connection.metadata())

    async def list_models(self, *, timeout: float | None = 10.0) -> pb.ListModelsResponse:
        request = pb.ListModelsRequest()
        return await self._models.ListModels(request, timeout=timeout, metadata=self.connection.metadata())

    async def get_model(self, model: str, *, timeout: float | None = 10.0) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model)
        return await self._models.GetModel(request, timeout=timeout, metadata=self.connection.metadata())

    async def load_model(self, model: str, *, timeout: float | None = 300.0) -> pb.LoadModelResponse:
        request = pb.LoadModelRequest(model=model)
        return await self._admin.LoadModel(request, timeout=timeout, metadata=self.connection.metadata())

    async def unload_model(self, model: str, *, timeout: float | None = 30.0) -> pb.UnloadModelResponse:
        request = pb.UnloadModelRequest(model=model)
        return await self._admin.UnloadModel(request, timeout=timeout, metadata=self.connection.metadata())

    async def correct(
        self,
        model: str,
        corrections: Sequence[pb.Correction],
        *,
        allow_new_label: bool = False,
        timeout: float | None = 30.0,
    ) -> pb.CorrectResponse:
        request = pb.CorrectRequest(
            model=model, corrections=list(corrections), allow_new_label=allow_new_label
        )
        return await self._feedback.Correct(request, timeout=timeout, metadata=self.connection.metadata())

    async def generate(
        self,
        prompt: str = "",
        *,
        messages: Sequence[tuple[str, str]] = (),
        max_tokens: int = 0,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        timeout: float | None = 120.0,
    ) -> AsyncIterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            prompt=prompt,
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop),
        )
        async for chunk in self._generation.Generate(
            request, timeout=timeout, metadata=self.connection.metadata()
        ):
            yield chunk

    async def run_workflow(
        self, workflow: str, texts: Sequence[str], *, timeout: float | None = 60.0, request_id: str = ""
    ) -> pb.RunWorkflowResponse:
        request = pb.RunWorkflowRequest(workflow=workflow, texts=list(texts), request_id=request_id)
        return await self._workflows.Run(request, timeout=timeout, metadata=self.connection.metadata())

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        response = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout,
            metadata=self.connection.metadata(),
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
