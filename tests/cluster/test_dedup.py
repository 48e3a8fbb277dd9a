"""A retried call is answered once: the servicer's recent answers by request id."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.api.dedup import RecentAnswers
from appliance.api.servicers import InferenceServicer


def test_once_per_key_concurrent_or_not_and_failures_are_not_kept() -> None:
    async def scenario() -> None:
        recent = RecentAnswers(size=2, ttl_s=60)
        calls: list[str] = []

        async def call(answer: str) -> str:
            calls.append(answer)
            await asyncio.sleep(0.01)
            return answer

        first = await asyncio.gather(
            recent.once(b"a", lambda: call("a1")), recent.once(b"a", lambda: call("a2"))
        )
        assert first == ["a1", "a1"] and calls == ["a1"]  # the second waited for the first
        assert await recent.once(b"a", lambda: call("a3")) == "a1"

        async def broken() -> str:
            calls.append("boom")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await recent.once(b"b", broken)
        assert await recent.once(b"b", lambda: call("b2")) == "b2"  # a failure may be retried
        await recent.once(b"c", lambda: call("c1"))  # size 2: "a" is evicted
        assert await recent.once(b"a", lambda: call("a4")) == "a4"
        expired = RecentAnswers(ttl_s=0)
        await expired.once(b"k", lambda: call("k1"))
        await asyncio.sleep(0.01)
        assert await expired.once(b"k", lambda: call("k2")) == "k2"

    asyncio.run(scenario())


def test_keys_separate_callers_and_contents() -> None:
    key = RecentAnswers.key
    alice = [("authorization", "Bearer a"), ("x-other", "1")]
    assert key("Classify", b"r", alice) == key(
        "Classify", b"r", [("x-other", "2"), ("authorization", "Bearer a")]
    )
    assert key("Classify", b"r", alice) != key("Classify", b"r", [("authorization", "Bearer b")])
    assert key("Classify", b"r", alice) != key("Classify", b"s", alice)
    assert key("Classify", b"r", alice) != key("Extract", b"r", alice)


class CountingBackend:
    def __init__(self) -> None:
        self.calls = 0

    async def classify(self, model: str, texts: list[str], **_: Any) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(model=model, version=1, precision="int8", decisions=[])


@pytest.mark.integration  # real gRPC servers on loopback
def test_the_servicer_answers_a_repeated_request_id_once_over_grpc() -> None:
    async def scenario() -> int:
        backend = CountingBackend()
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(backend), server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                same = pb.ClassifyRequest(model="m", texts=["x"], request_id="r-1")
                for _ in range(3):
                    assert (await stub.Classify(same)).request_id == "r-1"
                await stub.Classify(pb.ClassifyRequest(model="m", texts=["other"], request_id="r-1"))
                for _ in range(2):  # no request id: every call is its own
                    await stub.Classify(pb.ClassifyRequest(model="m", texts=["x"]))
        finally:
            await server.stop(None)
        return backend.calls

    assert asyncio.run(scenario()) == 1 + 1 + 2
