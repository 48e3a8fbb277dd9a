"""The load generator, briefly, against a real gRPC server on 127.0.0.1 (both APIs).

The server hosts the KServe servicer and a minimal ``appliance.v1`` Classify servicer over the
stand-in keyword Backend (tests/api/standin.py); the checks are on counts and output shape,
never on speed.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "api")]  # `bench` and the stand-in backend

from standin import KeywordBackend, serve_in_thread  # noqa: E402

from appliance._proto.appliance.v1 import appliance_pb2, appliance_pb2_grpc  # noqa: E402
from appliance._proto.inference import grpc_service_pb2_grpc  # noqa: E402
from appliance.api.kserve import KServeServicer  # noqa: E402
from appliance.errors import ApplianceError  # noqa: E402
from bench import load  # noqa: E402

pytestmark = pytest.mark.integration

LATENCY_KEYS = {"p50", "p90", "p99", "p99.9", "mean", "max"}


class MinimalClassifyServicer(appliance_pb2_grpc.InferenceServiceServicer):
    """Just enough of appliance.v1 Classify to put load on; records the request metadata."""

    def __init__(self, backend: KeywordBackend) -> None:
        self.backend = backend
        self.metadata: list[dict[str, str]] = []

    async def Classify(self, request, context):
        self.metadata.append({m.key: m.value for m in context.invocation_metadata()})
        try:
            outcome = await self.backend.classify(
                request.model, list(request.texts), top_k=max(request.top_k, 1)
            )
        except ApplianceError as err:
            await context.abort(err.code, err.message)
        return appliance_pb2.ClassifyResponse(
            model=outcome.model,
            version=outcome.version,
            results=[
                appliance_pb2.Classification(label=d.label, confidence=d.confidence)
                for d in outcome.decisions
            ],
        )


@pytest.fixture(scope="module")
def backend() -> KeywordBackend:
    return KeywordBackend()


@pytest.fixture(scope="module")
def classify(backend: KeywordBackend) -> MinimalClassifyServicer:
    return MinimalClassifyServicer(backend)


@pytest.fixture(scope="module")
def address(backend: KeywordBackend, classify: MinimalClassifyServicer) -> Iterator[str]:
    def register(server: grpc.aio.Server) -> None:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(backend), server)
        appliance_pb2_grpc.add_InferenceServiceServicer_to_server(classify, server)

    with serve_in_thread(register) as port:
        yield f"127.0.0.1:{port}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.load", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _check_result(result: dict, *, api: str, mode: str, requests: int) -> None:
    assert result["api"] == api and result["mode"] == mode and result["model"] == "intents"
    assert result["requests"] == result["ok"] == requests
    assert result["errors"] == {}
    assert set(result["latency_ms"]) == LATENCY_KEYS
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert result["throughput_rps"] > 0 and result["duration_s"] > 0


@pytest.mark.parametrize("api", ["appliance", "kserve"])
def test_closed_loop_cli_counts_every_request(
    api: str, address: str, backend: KeywordBackend, tmp_path: Path
):
    before = len(backend.calls)
    out = tmp_path / "result.json"
    done = _cli(
        "--api", api, "--address", address, "--model", "intents", "--concurrency", "3",
        "--requests", "30", "--warmup", "4", "--batch", "2", "--json", "--json-out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    result = json.loads(done.stdout.strip().splitlines()[-1])
    _check_result(result, api=api, mode="closed", requests=30)
    assert result["concurrency"] == 3 and result["batch"] == 2
    assert result["texts_per_s"] == pytest.approx(2 * result["throughput_rps"])
    assert json.loads(out.read_text()) == result
    # Exactly warm-up plus counted requests reached the backend, each with 2 Banking77 texts.
    calls = backend.calls[before:]
    assert len(calls) == 4 + 30
    assert all(len(texts) == 2 for _, texts, _ in calls)
    with (REPO / "appliance" / "data" / "banking77" / "test.csv").open(encoding="utf-8") as f:
        banking77 = [row["text"] for row in csv.DictReader(f)]
    expected = [tuple(banking77[i : i + 2]) for i in range(0, 2 * len(calls), 2)]
    assert sorted(tuple(texts) for _, texts, _ in calls) == sorted(expected)  # in order, none skipped


def test_open_loop_sweep_writes_json_and_a_plot(address: str, tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    done = _cli(
        "--api", "kserve", "--address", address, "--model", "intents", "--sweep", "50,100",
        "--requests", "12", "--warmup", "2", "--plot", str(plot), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["offered_rate"] for r in document["sweep"]] == [50.0, 100.0]
    for result in document["sweep"]:
        _check_result(result, api="kserve", mode="open", requests=12)
        assert result["concurrency"] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_counted_by_status_code(address: str) -> None:
    done = _cli(
        "--address", address, "--model", "no-such-model", "--rate", "100", "--requests", "8",
        "--warmup", "0", "--json",
    )  # fmt: skip
    assert done.returncode == 1  # nothing succeeded
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] == 0 and result["errors"] == {"NOT_FOUND": 8}
    assert "no-such-model" in result["error_examples"]["NOT_FOUND"]
    assert result["latency_ms"] == {}


def test_the_token_travels_as_bearer_metadata(
    address: str, classify: MinimalClassifyServicer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    before = len(classify.metadata)
    done = _cli(
        "--address", address, "--model", "intents", "--concurrency", "1", "--requests", "3",
        "--warmup", "0", "--token-file", str(token_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = classify.metadata[before:]
    assert len(seen) == 3 and all(m.get("authorization") == "Bearer s3cret" for m in seen)


def test_refuses_a_remote_target_unless_allowed() -> None:
    done = _cli(
        "--address", "192.0.2.10:50051", "--model", "intents", "--concurrency", "1", "--requests", "1"
    )
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr
    assert load.is_loopback("[::1]:9") and load.is_loopback("localhost:9") and load.is_loopback("unix:/tmp/s")
    assert not load.is_loopback("example.com:443")


def test_function_api_runs_both_modes(address: str, backend: KeywordBackend) -> None:
    target = load.Target(address=address, model="intents", api="kserve", channels=2)
    texts = ["my card was stolen", "exchange rate please", "hello"]

    async def both() -> tuple[load.LoadResult, load.LoadResult]:
        closed = await load.run_closed_loop(target, texts, concurrency=4, requests=17, warmup=3)
        opened = await load.run_open_loop(target, texts, rate=200, requests=9, warmup=0, seed=1)
        return closed, opened

    before = len(backend.calls)
    closed, opened = asyncio.run(both())
    assert (closed.ok, closed.requests, closed.concurrency) == (17, 17, 4)
    assert (opened.ok, opened.requests, opened.offered_rate) == (9, 9, 200)
    assert len(backend.calls) - before == 3 + 17 + 9
    assert {t for _, batch, _ in backend.calls[before:] for t in batch} == set(texts)
    with pytest.raises(ValueError, match="requests or duration"):
        asyncio.run(load.run_closed_loop(target, texts, concurrency=1))
