"""Metrics and statuses of the real server under hostile names, versions and tokens.

The product's :class:`ApplianceServer` over a :class:`ServingRuntime` with the small real ``b8``
specialist, behind TLS, tokens and the audit trail, with its Prometheus registry. A caller with
only ``models:read`` and ``classify:b8`` floods it with unique junk model names: every call must
be refused precisely, and neither the number of metric series nor the process's memory may grow
with the number of names.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from test_security_server import MODEL, PROBE, audit_records, published_home
from tritonclient.utils import InferenceServerException

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance.api.server import ApplianceServer, ServerSettings
from appliance.security import audit
from appliance.security.tokens import TokenStore, format_secret, parse_secret
from appliance.serve.metrics import OTHER, ServingMetrics, start_metrics_server
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOOD = 20_000
WARM_UP = 2_000
RSS_BOUND_MIB = 24  # the old per-name labels took ~100 MiB for 20,000 such names


class MeteredServer:
    """The server on a private event loop in a background thread, with metrics on a loopback port."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.metrics = ServingMetrics()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="metered-server", daemon=True)
        self.server: ApplianceServer | None = None

    def __enter__(self) -> MeteredServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(600)
        self.metrics_port = start_metrics_server(self.metrics, 0)
        return self

    async def _start(self) -> int:
        runtime = ServingRuntime(
            RuntimeSettings(models=(MODEL,)), store=ModelStore(self.home), metrics=self.metrics
        )
        settings = ServerSettings(host="127.0.0.1", port=0, pki_dir=self.home / "pki")
        self.server = ApplianceServer(runtime, settings, metrics=self.metrics)
        port = await self.server.start()
        await runtime.start()
        if not runtime.is_ready():
            raise RuntimeError(f"{MODEL} did not load; see the log")
        return port

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=2.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.crt"

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for f in self.metrics.registry.collect() if f.name == name for s in f.samples]


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = published_home(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))  # the server's token store and audit trail live here
        yield path


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[MeteredServer]:
    with MeteredServer(home) as server:
        yield server


@pytest.fixture(scope="module")
def reader(home: Path) -> str:
    """A token that may read model descriptions and classify with b8 only."""
    return TokenStore(home / "tokens" / "tokens.json").create(
        "metrics-reader", ["models:read", f"classify:{MODEL}"]
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call, request, token: str) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=bearer(token), timeout=30)
    return caught.value.code()


# --------------------------------------------------------------------------------------- tests


def test_a_flood_of_junk_model_names_leaves_series_and_memory_bounded(
    live: MeteredServer, reader: str
) -> None:
    async def flood(first: int, count: int) -> dict[str, dict[grpc.StatusCode, int]]:
        codes: dict[str, dict[grpc.StatusCode, int]] = {"valid": {}, "long": {}, "version": {}}
        credentials = grpc.ssl_channel_credentials(live.ca.read_bytes())
        async with grpc.aio.secure_channel(live.address, credentials) as channel:
            models, inference = pb_grpc.ModelServiceStub(channel), pb_grpc.InferenceServiceStub(channel)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(first, first + count):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    kind = ("valid", "long", "version")[i % 3]
                    try:
                        if kind == "valid":  # a well-formed name nobody published
                            await models.GetModel(
                                pb.GetModelRequest(model=f"junk{i}"), metadata=bearer(reader)
                            )
                        elif kind == "long":
                            await models.GetModel(
                                pb.GetModelRequest(model=f"J{i}" + "x" * 200), metadata=bearer(reader)
                            )
                        else:  # allowed by classify:b8, which grants every version of b8
                            await inference.Classify(
                                pb.ClassifyRequest(model=f"{MODEL}:junk{i}" + "y" * 100, texts=["x"]),
                                metadata=bearer(reader),
                            )
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as err:
                        code = err.code()
                    codes[kind][code] = codes[kind].get(code, 0) + 1

            await asyncio.gather(*(worker() for _ in range(32)))
        return codes

    def settle() -> tuple[int, float]:
        gc.collect()
        return len(live.series("appliance_requests")) + len(
            live.series("appliance_request_seconds")
        ), rss_mib()

    asyncio.run(flood(0, WARM_UP))
    series_before, rss_before = settle()
    codes = asyncio.run(flood(WARM_UP, FLOOD))
    series_after, rss_after = settle()

    unpublished = sum(1 for i in range(WARM_UP, WARM_UP + FLOOD) if i % 3 == 0)
    assert codes["valid"] == {grpc.StatusCode.NOT_FOUND: unpublished}, codes
    assert set(codes["long"]) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert set(codes["version"]) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert sum(sum(c.values()) for c in codes.values()) == FLOOD
    assert series_after == series_before
    assert {labels["model"] for labels in live.series("appliance_requests")} <= {MODEL, OTHER, ""}
    assert rss_after - rss_before < RSS_BOUND_MIB, (rss_before, rss_after)


def test_bad_versions_are_invalid_argument_over_the_real_server(live: MeteredServer, reader: str) -> None:
    with live.channel() as channel:
        classify = pb_grpc.InferenceServiceStub(channel).Classify
        for version in ("²", "٣", "9" * 5000, "9" * 10, "0", "-1", " 1"):
            request = pb.ClassifyRequest(model=f"{MODEL}:{version}", texts=[PROBE[0]])
            assert code_of(classify, request, reader) == grpc.StatusCode.INVALID_ARGUMENT, version
        nine_digits = pb.ClassifyRequest(model=f"{MODEL}:{'9' * 9}", texts=[PROBE[0]])
        assert code_of(classify, nine_digits, reader) == grpc.StatusCode.NOT_FOUND

    with triton.InferenceServerClient(live.address, ssl=True, root_certificates=str(live.ca)) as client:
        text = triton.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROBE[0].encode()], dtype=object))
        for version in ("²", "9" * 5000):
            with pytest.raises(InferenceServerException) as caught:
                client.infer(MODEL, [text], model_version=version, headers=dict(bearer(reader)))
            assert caught.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), caught.value.message()


def test_kserve_calls_show_up_in_the_scrape_like_appliance_v1(live: MeteredServer, reader: str) -> None:
    with triton.InferenceServerClient(live.address, ssl=True, root_certificates=str(live.ca)) as client:
        text = triton.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([PROBE[0].encode()], dtype=object))
        result = client.infer(MODEL, [text], headers=dict(bearer(reader)))
        assert result.as_numpy("LABEL")[0].decode() == PROBE[1]
    with live.channel() as channel:
        pb_grpc.InferenceServiceStub(channel).Classify(
            pb.ClassifyRequest(model=MODEL, texts=[PROBE[0]]), metadata=bearer(reader), timeout=30
        )
    lines = live.scrape().splitlines()

    def value(labels: str) -> float:
        prefix = f"appliance_requests_total{{{labels}}}"
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    kserve = 'method="ModelInfer",model="{}",service="GRPCInferenceService"'
    assert value(f'code="OK",{kserve.format(MODEL)}') >= 1
    assert value(f'code="OK",method="Classify",model="{MODEL}",service="InferenceService"') >= 1
    assert any(
        line.startswith("appliance_request_seconds_count{") and kserve.format(MODEL) in line for line in lines
    )


def test_a_wrong_token_is_refused_without_stretching(live: MeteredServer, home: Path, reader: str) -> None:
    """Each wrong secret for a real token id misses the cache and is checked in full; the audit
    record's latency shows what the check cost the event loop (PBKDF2 took ~2 ms here)."""
    token_id, _ = parse_secret(reader)
    with live.channel() as channel:
        classify = pb_grpc.InferenceServiceStub(channel).Classify
        for i in range(200):
            request = pb.ClassifyRequest(model=MODEL, texts=["x"], request_id=f"wrong-token-{i}")
            wrong = format_secret(token_id, f"{i:043d}")
            assert code_of(classify, request, wrong) == grpc.StatusCode.UNAUTHENTICATED
    records = [
        r
        for r in audit_records(audit.stream_dir(home / "audit"))
        if str(r.get("request_id", "")).startswith("wrong-token-")
    ]
    assert len(records) == 200 and {r["code"] for r in records} == {"UNAUTHENTICATED"}
    assert statistics.median(float(r["latency_ms"]) for r in records) < 1.0
