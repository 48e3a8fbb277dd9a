"""Graceful shutdown on the real gRPC server and runtime: calls in flight finish, new ones get
UNAVAILABLE. Runs in-process (no Ray) so the test controls the moment the shutdown starts: the
encoder is held at a gate while the in-flight call's batch is inside it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from appliance.api.server import ApplianceServer, ServerSettings
from appliance.client import AsyncClient, Connection
from appliance.engines.encoder import OnnxEncoder
from appliance.errors import FailedPrecondition
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.helpers.serving import MODEL

pytestmark = [pytest.mark.integration]

BOUND = 30.0  # seconds: the most any step below may take; never reached when things work


async def until(check: Callable[[], bool]) -> None:
    """Wait, bounded, for ``check()`` to come true, leaving the event loop free meanwhile."""
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        await asyncio.sleep(0.005)


def test_requests_during_shutdown_are_unavailable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside, gate = threading.Event(), threading.Event()
    run_padded = OnnxEncoder.run_padded

    def gated(self: OnnxEncoder, rows: Sequence[Sequence[int]]) -> np.ndarray:
        inside.set()
        assert gate.wait(BOUND), "the test never opened the gate"
        return run_padded(self, rows)

    async def scenario() -> tuple[int, grpc.StatusCode, str]:
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(home))
        server = ApplianceServer(runtime, ServerSettings(port=0, insecure_loopback=True, auth=False))
        port = await server.start()
        await runtime.start()
        monkeypatch.setattr(OnnxEncoder, "run_padded", gated)  # after the warm-up, which runs freely
        async with AsyncClient(Connection(f"127.0.0.1:{port}", tls=False)) as client:
            in_flight = asyncio.ensure_future(client.classify(MODEL, ["where is my new card"] * 256))
            await until(inside.is_set)  # its first batch is in the encoder: the call is in flight
            stopping = asyncio.ensure_future(server.stop(grace=BOUND))
            await until(lambda: runtime.draining)  # the shutdown has begun
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await client.classify(MODEL, ["hello"])
            gate.set()
            finished = await in_flight
            await stopping
        return len(finished.results), late.value.code(), late.value.details() or ""

    try:
        n, code, details = asyncio.run(scenario())
    finally:
        gate.set()
    assert n == 256  # the call in flight completed
    assert code == grpc.StatusCode.UNAVAILABLE, details


def test_plaintext_is_refused_off_loopback(home: Path) -> None:
    runtime = ServingRuntime(RuntimeSettings(), store=ModelStore(home))
    server = ApplianceServer(runtime, ServerSettings(host="0.0.0.0", port=0, insecure_loopback=True))
    with pytest.raises(FailedPrecondition, match="loopback only"):
        asyncio.run(server.start())
