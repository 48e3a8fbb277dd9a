"""A real grpc.aio server and client for the perimeter tests.

The services are small, but the requests are real protobuf messages built at run time from
descriptors: wire-compatible subsets (same names and field numbers) of appliance.v1 and the
KServe ``inference`` protos, kept in a private descriptor pool so they never clash with the
generated modules of the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from appliance.errors import NotFound
from appliance.security.interceptor import AuthAuditInterceptor

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# package -> message -> [(field, number, type, label)]
_MESSAGES: dict[str, dict[str, list[tuple[str, int, int, int]]]] = {
    "appliance.v1": {
        "ClassifyRequest": [
            ("model", 1, _STRING, _OPTIONAL),
            ("texts", 2, _STRING, _REPEATED),
            ("request_id", 5, _STRING, _OPTIONAL),
        ],
        "ClassifyResponse": [("model", 1, _STRING, _OPTIONAL), ("request_id", 5, _STRING, _OPTIONAL)],
        "GenerateRequest": [("prompt", 1, _STRING, _OPTIONAL), ("request_id", 6, _STRING, _OPTIONAL)],
        "GenerateResponse": [
            ("text", 1, _STRING, _OPTIONAL),
            ("finished", 2, _BOOL, _OPTIONAL),
            ("request_id", 6, _STRING, _OPTIONAL),
        ],
        "ListModelsRequest": [],
        "ListModelsResponse": [],
        "LoadModelRequest": [("model", 1, _STRING, _OPTIONAL)],
        "LoadModelResponse": [],
    },
    "inference": {
        "ModelInferRequest": [
            ("model_name", 1, _STRING, _OPTIONAL),
            ("model_version", 2, _STRING, _OPTIONAL),
            ("id", 3, _STRING, _OPTIONAL),
        ],
        "ModelInferResponse": [("model_name", 1, _STRING, _OPTIONAL), ("id", 3, _STRING, _OPTIONAL)],
    },
}


def _build_messages() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    classes: dict[str, Any] = {}
    for package, messages in _MESSAGES.items():
        proto = descriptor_pb2.FileDescriptorProto(
            name=f"test_{package}.proto", package=package, syntax="proto3"
        )
        for name, fields in messages.items():
            message = proto.message_type.add(name=name)
            for field, number, kind, label in fields:
                message.field.add(name=field, number=number, type=kind, label=label)
        pool.Add(proto)
        for name in messages:
            classes[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
    return classes


MSG = _build_messages()


# ------------------------------------------------------------------------------------ behaviours


async def _classify(request: Any, context: grpc.aio.ServicerContext) -> Any:
    if request.model == "missing":
        raise NotFound(f"model {request.model!r} is not loaded")
    return MSG["ClassifyResponse"](model=request.model, request_id=request.request_id)


async def _generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    for word in request.prompt.split():
        yield MSG["GenerateResponse"](text=word, request_id=request.request_id)
    yield MSG["GenerateResponse"](finished=True, request_id=request.request_id)


async def _list_models(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return MSG["ListModelsResponse"]()


async def _load_model(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return MSG["LoadModelResponse"]()


async def _model_infer(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return MSG["ModelInferResponse"](model_name=request.model_name, id=request.id)


def _unary(behavior: Any, request: str, response: str) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=MSG[request].FromString,
        response_serializer=MSG[response].SerializeToString,
    )


def _handlers() -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            "appliance.v1.InferenceService",
            {"Classify": _unary(_classify, "ClassifyRequest", "ClassifyResponse")},
        ),
        grpc.method_handlers_generic_handler(
            "appliance.v1.GenerationService",
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    _generate,
                    request_deserializer=MSG["GenerateRequest"].FromString,
                    response_serializer=MSG["GenerateResponse"].SerializeToString,
                )
            },
        ),
        grpc.method_handlers_generic_handler(
            "appliance.v1.ModelService",
            {"ListModels": _unary(_list_models, "ListModelsRequest", "ListModelsResponse")},
        ),
        grpc.method_handlers_generic_handler(
            "appliance.v1.AdminService",
            {"LoadModel": _unary(_load_model, "LoadModelRequest", "LoadModelResponse")},
        ),
        grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": _unary(_model_infer, "ModelInferRequest", "ModelInferResponse")},
        ),
        # served, but absent from the scope table: must be denied
        grpc.method_handlers_generic_handler(
            "appliance.v1.DebugService",
            {"Dump": _unary(_list_models, "ListModelsRequest", "ListModelsResponse")},
        ),
    ]


@contextlib.asynccontextmanager
async def run_server(
    interceptor: AuthAuditInterceptor,
    credentials: grpc.ServerCredentials | None,
    extra: list[grpc.GenericRpcHandler] | None = None,
) -> AsyncIterator[int]:
    """A real server on 127.0.0.1, port 0; yields the bound port."""
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([*_handlers(), *(extra or [])])
    address = "127.0.0.1:0"
    port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


class Client:
    """Typed-enough calls over a real channel."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        self.channel = channel
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )

    def _unary(self, method: str, request: Any, response: str) -> Any:
        return self.channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=MSG[response].FromString,
        )(request, metadata=self.metadata, timeout=20)

    async def classify(self, model: str, texts: list[str] | None = None, request_id: str = "") -> Any:
        request = MSG["ClassifyRequest"](model=model, texts=texts or ["hello"], request_id=request_id)
        return await self._unary("/appliance.v1.InferenceService/Classify", request, "ClassifyResponse")

    async def embed(self, model: str) -> Any:
        """Embed is in the scope table, but these test servers do not serve it."""
        request = MSG["ClassifyRequest"](model=model, texts=["hello"])
        return await self._unary("/appliance.v1.InferenceService/Embed", request, "ClassifyResponse")

    async def generate(self, prompt: str) -> list[Any]:
        call = self.channel.unary_stream(
            "/appliance.v1.GenerationService/Generate",
            request_serializer=MSG["GenerateRequest"].SerializeToString,
            response_deserializer=MSG["GenerateResponse"].FromString,
        )(MSG["GenerateRequest"](prompt=prompt), metadata=self.metadata, timeout=20)
        return [response async for response in call]

    async def list_models(self) -> Any:
        return await self._unary(
            "/appliance.v1.ModelService/ListModels", MSG["ListModelsRequest"](), "ListModelsResponse"
        )

    async def load_model(self, model: str) -> Any:
        return await self._unary(
            "/appliance.v1.AdminService/LoadModel", MSG["LoadModelRequest"](model=model), "LoadModelResponse"
        )

    async def model_infer(self, model_name: str, request_id: str = "") -> Any:
        request = MSG["ModelInferRequest"](model_name=model_name, id=request_id)
        return await self._unary("/inference.GRPCInferenceService/ModelInfer", request, "ModelInferResponse")

    async def debug_dump(self) -> Any:
        return await self._unary(
            "/appliance.v1.DebugService/Dump", MSG["ListModelsRequest"](), "ListModelsResponse"
        )


async def status_of(awaitable: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def run(coro: Any) -> Any:
    return asyncio.run(coro)
