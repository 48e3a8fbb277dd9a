"""Legal but heavy requests do not starve the server: with calls of 256 texts of 64 KiB in flight,
health checks still answer at once, because tokenizing happens off the event loop and on texts
already cut to what the window can use. The cut is reported as truncation.

On the product's own server and runtime (:class:`LiveServer`) with the published specialist.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security_server import MODEL, PROBE, LiveServer, published_home

from appliance.engines.encoder import EncoderConfig
from appliance.engines.specialist import load_specialist
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import CHARS_PER_TOKEN, tokenize_window
from appliance.store import ModelStore
from appliance.types import Limits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMITS = Limits()
# Sentences that tokenize like real text, repeated to the largest text a call may carry.
LONG_TEXT = (PROBE[0] + ". ") * (LIMITS.max_text_bytes // (len(PROBE[0]) + 2))
HEALTH_BUDGET_S = 0.5


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    source = published_home(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("heavy") / "home"
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("audit", "tokens", "client", "run", "work"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


def test_texts_are_cut_to_the_window_and_the_cut_is_reported(home: Path) -> None:
    encoder = load_specialist(MODEL, ModelStore(home), EncoderConfig()).encoder
    bound = encoder.config.max_length * CHARS_PER_TOKEN
    short, one_word = PROBE[0], "a" * (bound + 1)  # the word is one [UNK] token, cut or not
    cut = tokenize_window(encoder, [LONG_TEXT, short, one_word])
    full = encoder.tokenize([LONG_TEXT, short, one_word])
    assert cut.ids[:2] == full.ids[:2]  # the window holds the same tokens as from the whole text
    assert len(cut.ids[0]) == encoder.config.max_length
    assert cut.truncated == [True, False, True]  # the model never saw the end of the long word
    assert full.truncated == [True, False, False]


def test_health_answers_promptly_while_heavy_classify_calls_run(home: Path) -> None:
    texts = [LONG_TEXT] * LIMITS.max_texts_per_call
    assert len(LONG_TEXT.encode()) <= LIMITS.max_text_bytes
    token = TokenStore(home / "tokens" / "tokens.json").create("heavy", [f"classify:{MODEL}"])
    done: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    with LiveServer(home) as live:

        def heavy() -> None:
            with live.client(token) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        result = client.classify(MODEL, texts, timeout=300)
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        return
                    assert all(r.truncated for r in result.results)
                    assert {r.label for r in result.results} == {PROBE[1]}
                    done.append(time.monotonic() - started)

        workers = [threading.Thread(target=heavy) for _ in range(2)]
        latencies: list[float] = []
        with live.client(None) as probe:
            health = health_pb2_grpc.HealthStub(probe.channel)
            request = health_pb2.HealthCheckRequest(service="appliance.v1.InferenceService")
            # the readiness watcher reports the warm model within its poll interval
            while health.Check(request, timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.05)
            for worker in workers:
                worker.start()
            try:
                began = time.monotonic()

                def measuring() -> bool:  # at least 10 s and 3 heavy calls, at most 120 s
                    elapsed = time.monotonic() - began
                    return not failures and elapsed < 120 and (len(done) < 3 or elapsed < 10)

                while measuring():
                    started = time.monotonic()
                    answer = health.Check(request, timeout=10)
                    latencies.append(time.monotonic() - started)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                    time.sleep(0.02)
            finally:
                stop.set()
                for worker in workers:
                    worker.join()
    assert failures == []
    assert len(done) >= 3, f"only {len(done)} heavy calls finished"
    assert max(latencies) < HEALTH_BUDGET_S, (
        f"slowest health check {max(latencies):.3f} s over {len(latencies)} checks, "
        f"while heavy calls took {[round(d, 1) for d in done]} s"
    )


def test_calls_past_max_concurrent_rpcs_are_refused_at_once(home: Path) -> None:
    token = TokenStore(home / "tokens" / "tokens.json").create("one-at-a-time", [f"classify:{MODEL}"])
    texts = [LONG_TEXT] * LIMITS.max_texts_per_call
    request = health_pb2.HealthCheckRequest(service="appliance.v1.InferenceService")
    with LiveServer(home, max_concurrent_rpcs=1) as live, live.client(token) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        answers: list[int] = []
        heavy = threading.Thread(
            target=lambda: answers.append(len(client.classify(MODEL, texts, timeout=300).results))
        )
        heavy.start()
        time.sleep(1.0)  # the heavy call is being served: it takes seconds
        try:
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            heavy.join()
        assert answers == [len(texts)]
        assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
