"""A token may have at most ``max_calls_per_token`` calls in progress: one more is refused
RESOURCE_EXHAUSTED at once and audited, other tokens are served meanwhile, and the token is
served again once its calls end. On the real gRPC server, interceptor, runtime and ONNX encoder,
in-process, with the encoder held at a gate so that calls stay in progress."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.api.server import ApplianceServer, ServerSettings
from appliance.client import AsyncClient, Connection
from appliance.engines.encoder import OnnxEncoder
from appliance.engines.generalist_api import GenerationChunk
from appliance.security import audit
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.helpers.serving import MODEL
from tests.router.scripted_generalist import ScriptedGeneralist

pytestmark = [pytest.mark.integration]

BOUND = 30.0  # seconds: the most any step below may take; never reached when things work
LIMIT = 2


async def until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        await asyncio.sleep(0.005)


def test_a_token_past_its_limit_is_refused_while_other_tokens_are_served(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = TokenStore()
    busy, other = f"busy-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    busy_secret = tokens.create(busy, [f"classify:{MODEL}", "models:read"])
    other_secret = tokens.create(other, [f"classify:{MODEL}", "models:read"])
    inside, gate = threading.Event(), threading.Event()
    run_padded = OnnxEncoder.run_padded

    def gated(self: OnnxEncoder, rows: Sequence[Sequence[int]]) -> np.ndarray:
        inside.set()
        assert gate.wait(BOUND), "the test never opened the gate"
        return run_padded(self, rows)

    async def scenario() -> tuple[grpc.aio.AioRpcError, int, int, list[str]]:
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(home))
        settings = ServerSettings(port=0, insecure_loopback=True, max_calls_per_token=LIMIT)
        server = ApplianceServer(runtime, settings)
        port = await server.start()
        await runtime.start()
        assert server.auth is not None
        auth = server.auth
        monkeypatch.setattr(OnnxEncoder, "run_padded", gated)  # after the warm-up, which runs freely
        address = f"127.0.0.1:{port}"
        try:
            async with (
                AsyncClient(Connection(address, tls=False, token=busy_secret)) as a,
                AsyncClient(Connection(address, tls=False, token=other_secret)) as b,
            ):
                held = [
                    asyncio.ensure_future(a.classify(MODEL, ["where is my new card"])) for _ in range(LIMIT)
                ]
                await until(lambda: inside.is_set() and auth.calls_in_progress(busy) == LIMIT)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await a.list_models(timeout=BOUND)  # any method: the limit counts the token's calls
                # the other token is served while the busy one's calls are held
                listed = await b.list_models(timeout=BOUND)
                assert auth.calls_in_progress(busy) == LIMIT
                gate.set()
                finished = [len((await call).results) for call in held]
                assert auth.calls_in_progress(busy) == 0
                again = await a.classify(MODEL, ["where is my new card"], timeout=BOUND)
        finally:
            gate.set()
            await server.stop(grace=BOUND)
        mine = [
            r for r in audit.call_records(audit.stream_dir(home / "audit")) if r["caller"]["token"] == busy
        ]
        return (
            refused.value,
            len(listed.models),
            sum(finished) + len(again.results),
            [r["code"] for r in mine],
        )

    refused, models, answered, codes = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details() == f"token {busy!r} has {LIMIT} calls in progress; the limit is {LIMIT}"
    assert models >= 1
    assert answered == LIMIT + 1
    assert sorted(codes) == sorted(["OK"] * (LIMIT + 1) + ["RESOURCE_EXHAUSTED"])  # every call audited


class HeldGeneralist(ScriptedGeneralist):
    """Streams its first word, then holds the rest until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def generate(self, prompt: str | None = None, **kwargs: object) -> AsyncIterator[GenerationChunk]:
        first = True
        async for chunk in super().generate(prompt, **kwargs):  # type: ignore[arg-type]
            if not first:
                await self.gate.wait()
            first = False
            yield chunk


def test_a_streaming_call_holds_its_place_until_it_ends_or_is_cancelled(home: Path) -> None:
    name = f"stream-{uuid.uuid4().hex[:8]}"
    secret = TokenStore().create(name, ["generate"])
    metadata = (("authorization", f"Bearer {secret}"),)
    request = pb.GenerateRequest(prompt="one two three")

    async def scenario() -> list[str]:
        runtime = ServingRuntime(RuntimeSettings(models=()), store=ModelStore(home))
        generalist = HeldGeneralist()
        settings = ServerSettings(port=0, insecure_loopback=True, max_calls_per_token=1)
        server = ApplianceServer(runtime, settings, generalist=generalist)
        port = await server.start()
        assert server.auth is not None
        auth = server.auth
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                cancelled = stub.Generate(request, metadata=metadata, timeout=BOUND)
                assert (await cancelled.read()).text == "one "  # the stream is open and held
                assert auth.calls_in_progress(name) == 1
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(request, metadata=metadata, timeout=BOUND).read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                cancelled.cancel()
                await until(lambda: auth.calls_in_progress(name) == 0)
                finishing = stub.Generate(request, metadata=metadata, timeout=BOUND)
                assert (await finishing.read()).text == "one "
                generalist.gate.set()
                words = []
                while (chunk := await finishing.read()) is not grpc.aio.EOF:
                    words.append(chunk.text)
                assert auth.calls_in_progress(name) == 0
        finally:
            await server.stop(grace=BOUND)
        return words

    assert "".join(asyncio.run(scenario())) == "two three "
