"""The appliance.v1 API against the real Ray Serve app, over TLS with a real token."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import pytest
from specialists import LABELS, sample_texts

from appliance.engines.specialist import load_specialist
from appliance.store import ModelStore
from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def wait_serving(app: App, service: str = "appliance.v1.InferenceService", timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    with app.client() as client:
        while time.monotonic() < deadline:
            status = client.health(service)
            if status == "SERVING":
                return status
            time.sleep(0.25)
    return status


def test_classify_matches_the_offline_artifact(app: App) -> None:
    assert wait_serving(app) == "SERVING"
    pairs = sample_texts(per_label=5)
    texts = [t for t, _ in pairs]
    offline = load_specialist(MODEL, ModelStore(app.home))
    probs, _ = offline.probs(texts)
    expected = [offline.labels[i] for i in probs.argmax(axis=1)]
    with app.client() as client:
        response = client.classify(MODEL, texts, top_k=3)
    assert response.model == MODEL and response.version == offline.version
    assert [r.label for r in response.results] == expected
    for r, p in zip(response.results, probs, strict=True):
        assert r.route == "specialist"
        assert len(r.top) == 3 and r.top[0][0] == r.label
        assert r.top[0][1] == pytest.approx(float(p.max()), abs=2e-3)
        assert r.core_seconds > 0 and r.latency_ms > 0
    accuracy = sum(r.label == y for r, (_, y) in zip(response.results, pairs, strict=True)) / len(pairs)
    assert accuracy >= 0.7  # 8 easy intents, 40 examples each


def test_models_are_listed_and_described(app: App) -> None:
    with app.client() as client:
        listed = {m.name: m for m in client.list_models().models}
        info = client.get_model(MODEL)
    assert listed[MODEL].loaded and listed[MODEL].version == info.version
    assert sorted(info.labels) == sorted(LABELS)
    assert 0.0 < info.threshold <= 1.0
    assert info.limits.max_texts_per_call == 256 and info.limits.max_input_tokens == 256
    assert info.precision in (1, 2)  # FP32 or INT8, whichever the gate chose


def test_embed_matches_the_offline_encoder(app: App) -> None:
    assert wait_serving(app) == "SERVING"
    texts = [t for t, _ in sample_texts(per_label=3)]
    # One call the size of one batch, so the server pads exactly as the offline encoder does.
    expected, _ = load_specialist(MODEL, ModelStore(app.home)).encoder.embed(texts)
    with app.client() as client:
        response = client.embed(MODEL, texts)
    got = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_embed_returns_unit_vectors(app: App) -> None:
    with app.client() as client:
        response = client.embed(MODEL, ["where is my card", "how do I change my PIN"])
    assert response.dim == 384 and len(response.embeddings) == 2
    for e in response.embeddings:
        norm = sum(v * v for v in e.values) ** 0.5
        assert norm == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("texts", "model", "code", "fragment"),
    [
        ([], MODEL, grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 256"),
        (["x"] * 257, MODEL, grpc.StatusCode.INVALID_ARGUMENT, "the limit is 256"),
        (["fine", "   "], MODEL, grpc.StatusCode.INVALID_ARGUMENT, "text 1 is empty"),
        (["a" * 70_000], MODEL, grpc.StatusCode.INVALID_ARGUMENT, "65536 bytes"),
        (["hello"], "no-such-model", grpc.StatusCode.NOT_FOUND, "not published"),
        (["hello"], f"{MODEL}:99", grpc.StatusCode.NOT_FOUND, "version 99"),
        (["hello"], "../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    ],
)
def test_bad_input_gets_its_status_and_the_server_stays_up(
    app: App, texts: list[str], model: str, code: grpc.StatusCode, fragment: str
) -> None:
    with app.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(model, texts)
        assert err.value.code() == code
        assert fragment in err.value.details()
        assert client.classify(MODEL, ["my card has not arrived yet"]).results[0].label


def test_a_text_longer_than_the_window_is_truncated_and_flagged(app: App) -> None:
    long_text = "I lost my card yesterday and " * 200  # ~1,400 word pieces, 6 kB: under the byte cap
    with app.client() as client:
        response = client.classify(MODEL, [long_text, "short text about my pin"])
    assert [r.truncated for r in response.results] == [True, False]


def test_an_expired_deadline_is_deadline_exceeded(app: App) -> None:
    with app.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.classify(MODEL, ["where is my card"] * 200, timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.classify(MODEL, ["where is my card"]).results


def test_concurrent_callers_get_consistent_answers(app: App) -> None:
    pairs = sample_texts(per_label=4)
    with app.client() as client:
        expected = [r.label for r in client.classify(MODEL, [t for t, _ in pairs]).results]

        def one(i: int) -> str:
            return client.classify(MODEL, [pairs[i % len(pairs)][0]]).results[0].label

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, range(320)))
    assert got == [expected[i % len(pairs)] for i in range(320)]


def test_reflection_lists_both_apis(app: App) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with app.client() as client:
        services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {
        "appliance.v1.InferenceService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= services


def test_prometheus_metrics_count_requests_batches_and_versions(app: App) -> None:
    import urllib.request

    with app.client() as client:
        client.classify(MODEL, ["where is my card", "change my pin"])
        with pytest.raises(grpc.RpcError):
            client.classify("no-such-model", ["x"])
        version = client.get_model(MODEL).version
    assert app.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    classify = 'method="Classify",model="{}",service="InferenceService"'
    assert value(f'appliance_requests_total{{code="OK",{classify.format(MODEL)}}}') >= 1
    # a name that is not loaded gets no series of its own
    assert value(f'appliance_requests_total{{code="NOT_FOUND",{classify.format("other")}}}') >= 1
    assert "no-such-model" not in text
    assert value("appliance_batch_rows_count") >= 1
    assert value(f'appliance_model_version_loaded{{model="{MODEL}",version="{version}"}}') == 1
    assert value(f'appliance_decisions_total{{model="{MODEL}",route="specialist"}}') >= 2
