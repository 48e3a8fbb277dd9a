"""Graceful shutdown on the real gRPC server and runtime: calls in flight finish, new ones get
UNAVAILABLE. Runs in-process (no Ray) so the test controls the moment the shutdown starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from conftest import MODEL

from appliance.api.server import ApplianceServer, ServerSettings
from appliance.client import AsyncClient, Connection
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore

pytestmark = [pytest.mark.integration]


def test_requests_during_shutdown_are_unavailable(home: Path) -> None:
    async def scenario() -> tuple[int, grpc.StatusCode, str]:
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(home))
        server = ApplianceServer(runtime, ServerSettings(port=0, insecure_loopback=True, auth=False))
        port = await server.start()
        await runtime.start()
        async with AsyncClient(Connection(f"127.0.0.1:{port}", tls=False)) as client:
            in_flight = asyncio.ensure_future(client.classify(MODEL, ["where is my new card"] * 256))
            await asyncio.sleep(0.05)
            stopping = asyncio.ensure_future(server.stop(grace=10.0))
            await asyncio.sleep(0.05)
            try:
                await client.classify(MODEL, ["hello"])
                late = (grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as exc:
                late = (exc.code(), exc.details() or "")
            finished = await in_flight
            await stopping
        return len(finished.results), *late

    n, code, details = asyncio.run(scenario())
    assert n == 256  # the call in flight completed
    assert code == grpc.StatusCode.UNAVAILABLE, details


def test_plaintext_is_refused_off_loopback(home: Path) -> None:
    runtime = ServingRuntime(RuntimeSettings(), store=ModelStore(home))
    server = ApplianceServer(runtime, ServerSettings(host="0.0.0.0", port=0, insecure_loopback=True))
    with pytest.raises(Exception, match="loopback only"):
        asyncio.run(server.start())
