"""Triton's extensions of KServe v2 (ModelConfig, ModelStatistics) on the real server, spoken to by
Triton's own tools: ``tritonclient.grpc`` (which decodes the answers with Triton's protos) and the
perf_analyzer binary.

The server is the appliance's real one, in this process: the gRPC server with TLS, tokens and the
audit trail, over the serving runtime, its batcher and the ONNX encoder of a small Banking77
specialist trained for the module. It runs on its own event loop in a thread, so that blocking
clients and subprocesses can call it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from appliance.api.server import ApplianceServer, ServerSettings
from appliance.client import Client, Connection
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.helpers.serving import MODEL
from tests.serving.specialists import LABELS, train_subset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["I lost my card", "where is my new card", "what is the exchange rate", "change my pin please"]


@dataclass
class Served:
    address: str
    ca: Path
    token: str  # classify:MODEL and models:read
    home: Path

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.address, ssl=True, root_certificates=str(self.ca))

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import TokenStore

    home = tmp_path_factory.mktemp("triton-home")
    previous = os.environ.get("APPLIANCE_HOME")
    os.environ["APPLIANCE_HOME"] = str(home)
    train_subset(ModelStore(home), MODEL, home / "work")
    ensure_local_pki(home / "pki")
    token = TokenStore().create(f"triton-{uuid.uuid4().hex[:8]}", [f"classify:{MODEL}", "models:read"])

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def start() -> None:
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL,)), store=ModelStore(home))
        server = ApplianceServer(runtime, ServerSettings(port=0, pki_dir=home / "pki", reuse_port=False))
        state["port"] = await server.start()
        await runtime.start()
        state["server"] = server

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:
            state["error"] = exc
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="triton-test-server", daemon=True)
    thread.start()
    ready.wait()
    try:
        if "error" in state:
            raise RuntimeError("the server did not start") from state["error"]  # type: ignore[misc]
        yield Served(f"127.0.0.1:{state['port']}", home / "pki" / "ca.crt", token, home)
    finally:
        server = state.get("server")
        if isinstance(server, ApplianceServer):
            asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        if previous is not None:
            os.environ["APPLIANCE_HOME"] = previous


def statistics(served: Served) -> dict[str, object]:
    with served.client() as client:
        response = client.get_inference_statistics(MODEL, headers=served.headers(), as_json=True)
    (stats,) = response["model_stats"]
    return stats


def count(stats: dict[str, object], *path: str) -> int:
    """A counter from the JSON form (uint64 fields are strings there; zeros are left out)."""
    value: object = stats
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return int(value) if isinstance(value, str | int) else 0


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def test_model_config_describes_the_served_model_in_tritons_terms(served: Served) -> None:
    with served.client() as client:
        config = client.get_model_config(MODEL, headers=served.headers(), as_json=True)["config"]
        metadata = client.get_model_metadata(MODEL, headers=served.headers(), as_json=True)
    assert config["name"] == MODEL
    assert config["platform"] == metadata["platform"] == "appliance_text_classifier"
    assert (
        config.get("max_batch_size", 0) == 0
    )  # dims are whole shapes: TEXT's first axis is the call's texts
    assert config["input"] == [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["-1"]}]
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert outputs == {
        "LABEL": ("TYPE_STRING", ["-1"]),
        "SCORE": ("TYPE_FP32", ["-1"]),
        "PROBS": ("TYPE_FP32", ["-1", str(len(LABELS))]),
    }
    assert [o["shape"] for o in metadata["outputs"]] == [dims for _, dims in outputs.values()]


def test_statistics_count_what_was_served_on_both_apis(served: Served) -> None:
    before = statistics(served)
    sizes = [1, 3, 2, 4]
    started_ms = int(time.time() * 1000)
    with served.client() as client:
        for size in sizes:
            tensor = triton.InferInput("TEXT", [size], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:size]], dtype=object))
            client.infer(MODEL, [tensor], headers=served.headers())
    with Client(Connection(served.address, tls=True, ca=served.ca, token=served.token)) as ours:
        ours.classify(MODEL, TEXTS[:2])
    after = statistics(served)
    calls, texts = len(sizes) + 1, sum(sizes) + 2

    assert after["name"] == MODEL and after["version"] == "1"
    assert count(after, "inference_count") - count(before, "inference_count") == texts
    assert (
        count(after, "inference_stats", "success", "count")
        - count(before, "inference_stats", "success", "count")
        == calls
    )
    assert count(after, "inference_stats", "fail", "count") == 0
    # one call's texts fit one batch when nothing else is queued; calls may share none here
    executions = count(after, "execution_count") - count(before, "execution_count")
    assert 1 <= executions <= calls
    spent = {
        s: count(after, "inference_stats", s, "ns") - count(before, "inference_stats", s, "ns")
        for s in STAGES
    }
    for stage in STAGES:
        assert (
            count(after, "inference_stats", stage, "count") - count(before, "inference_stats", stage, "count")
            == calls
        )
    assert spent["compute_infer"] > 0 and spent["compute_input"] > 0
    total = count(after, "inference_stats", "success", "ns") - count(
        before, "inference_stats", "success", "ns"
    )
    assert sum(spent.values()) <= total  # the stages are parts of each request's time
    assert started_ms <= count(after, "last_inference") <= int(time.time() * 1000)


def test_unknown_models_and_versions_are_not_found(served: Served) -> None:
    with served.client() as client:
        for call in (
            lambda: client.get_inference_statistics("no-such-model", headers=served.headers()),
            lambda: client.get_inference_statistics(MODEL, "7", headers=served.headers()),
            lambda: client.get_model_config("no-such-model", headers=served.headers()),
        ):
            with pytest.raises(InferenceServerException) as failed:
                call()
            assert failed.value.status() == "StatusCode.NOT_FOUND"
        everything = client.get_inference_statistics(headers=served.headers(), as_json=True)
    assert [(s["name"], s["version"]) for s in everything["model_stats"]] == [(MODEL, "1")]


def test_a_token_without_models_read_is_denied(served: Served) -> None:
    from appliance.security.tokens import TokenStore

    narrow = TokenStore().create(f"narrow-{uuid.uuid4().hex[:8]}", [f"classify:{MODEL}"])
    with served.client() as client:
        for call in (client.get_inference_statistics, client.get_model_config):
            with pytest.raises(InferenceServerException) as denied:
                call(MODEL, headers=served.headers(narrow))
            assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "models:read" in denied.value.message()


def test_perf_analyzer_measures_the_appliance_and_reads_its_statistics(
    served: Served, tmp_path: Path
) -> None:
    from bench.perf_analyzer import command

    requests, per_request = 40, 3
    data = {"data": [{"TEXT": {"content": TEXTS[:per_request], "shape": [per_request]}}]}
    (tmp_path / "input.json").write_text(json.dumps(data))
    before = statistics(served)
    argv = [
        *command(),
        "-m", MODEL, "-u", served.address, "-i", "grpc",
        "--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(served.ca),
        "-H", f"authorization:Bearer {served.token}",  # sent as gRPC metadata too
        "--input-data", str(tmp_path / "input.json"),
        "--request-count", str(requests), "--concurrency-range", "2",
        "-f", str(tmp_path / "report.csv"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    assert throughput is not None and float(throughput.group(1)) > 0, done.stdout
    # perf_analyzer's server-side section comes from ModelStatistics
    assert re.search(rf"Successful request count: {requests}\b", done.stdout), done.stdout
    assert re.search(rf"Inference count: {requests * per_request}\b", done.stdout), done.stdout
    after = statistics(served)
    sent = count(after, "inference_stats", "success", "count") - count(
        before, "inference_stats", "success", "count"
    )
    assert sent == requests
    assert count(after, "inference_count") - count(before, "inference_count") == requests * per_request
    assert (tmp_path / "report.csv").read_text().startswith("Concurrency,Inferences/Second")
