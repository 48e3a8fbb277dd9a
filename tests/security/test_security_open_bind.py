"""A server without tokens (``auth: false``) binds to loopback only: anyone who can reach the port
of such a server may classify, and load and unload models. The product's ApplianceServer is
started for real, over the keyword stand-in backend (tests/api/standin.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.api.server import ApplianceServer, ServerSettings
from appliance.errors import FailedPrecondition
from tests.api.standin import KeywordBackend


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_auth_false_on_a_non_loopback_bind_refuses_to_start(host: str, pki_dir: Path) -> None:
    server = ApplianceServer(KeywordBackend(), ServerSettings(host=host, port=0, pki_dir=pki_dir, auth=False))

    async def start_and_stop() -> None:
        try:
            await server.start()
        finally:
            await server.stop(grace=0)  # had it started, the test must not leave it listening

    with pytest.raises(FailedPrecondition, match=rf"refusing auth: false on {host}: .* loopback only"):
        asyncio.run(start_and_stop())
    assert server.port == 0


def test_auth_false_on_loopback_still_serves() -> None:
    async def run() -> int:
        server = ApplianceServer(
            KeywordBackend(), ServerSettings(host="127.0.0.1", port=0, insecure_loopback=True, auth=False)
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                return int(reply.status)
        finally:
            await server.stop(grace=0)

    assert asyncio.run(run()) in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
