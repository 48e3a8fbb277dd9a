"""Health transitions, hot load, rollback on a bad artifact, and overload, on the real Ray app."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from specialists import train_subset

from appliance.client import AsyncClient
from appliance.store import ModelStore
from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def poll_health(app: App, service: str, want: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    with app.client() as client:
        status = client.health(service)
        while status != want and time.monotonic() < deadline:
            time.sleep(0.25)
            status = client.health(service)
    return status


def poll(check: Callable[[], bool], timeout: float = 120.0) -> bool:
    """Whether ``check`` came true within ``timeout``; NOT_FOUND (not loaded yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        time.sleep(0.25)
    return False


def test_inference_health_waits_for_every_configured_model(start_app, home: Path) -> None:
    # The runtime loads configured models in order: once MODEL answers, "late" (not published
    # yet) has been tried and left out, so NOT_SERVING below means "a model is missing", not
    # "still warming up".
    app = start_app("health", models=["late", MODEL])
    assert poll_health(app, "appliance.v1.ModelService", "SERVING") == "SERVING"
    with app.client() as client:
        assert poll(lambda: client.get_model(MODEL).loaded), f"{MODEL} never loaded"
        assert client.health("appliance.v1.InferenceService") == "NOT_SERVING"
        assert client.health("inference.GRPCInferenceService") == "NOT_SERVING"
        # the model that did load answers anyway
        assert client.classify(MODEL, ["where is my card"]).results[0].label
    train_subset(ModelStore(home), "late", home / "work-late", per_label=12)
    with app.client() as client:
        loaded = client.load_model("late")
    assert loaded.model.name == "late" and loaded.previous_version == 0
    assert poll_health(app, "appliance.v1.InferenceService", "SERVING") == "SERVING"


def test_hot_load_swaps_versions_without_failing_a_request(app: App, home: Path) -> None:
    store = ModelStore(home)
    before = store.versions(MODEL)[-1]
    errors: list[str] = []
    versions: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with app.client() as client:
            while not stop.is_set():
                try:
                    versions.append(client.classify(MODEL, ["I want to change my PIN"]).version)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        new = train_subset(store, MODEL, home / "work-v2", seed=1)
        with app.client() as client:
            response = client.load_model(MODEL)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
    assert response.previous_version == before and response.model.version == new.version
    assert errors == []
    assert versions[0] == before and versions[-1] == new.version


def test_a_tampered_version_is_refused_and_the_old_one_keeps_serving(app: App, home: Path) -> None:
    store = ModelStore(home)
    serving = app.client().get_model(MODEL).version
    bad = train_subset(store, MODEL, home / "work-bad", seed=2)
    head = bad.folder / "head.npz"
    data = bytearray(head.read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the stored weights
    head.write_bytes(bytes(data))
    with app.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.load_model(f"{MODEL}:{bad.version}")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "do not match the manifest" in err.value.details()
        assert client.classify(MODEL, ["my card is lost"]).version == serving
        assert client.get_model(MODEL).version == serving
    store.remove(f"{MODEL}:{bad.version}")


def test_an_unsigned_version_is_refused(app: App, home: Path) -> None:
    store = ModelStore(home)
    serving = app.client().get_model(MODEL).version
    unsigned = train_subset(store, MODEL, home / "work-unsigned", seed=3)
    (unsigned.folder / "manifest.sig").unlink()
    with app.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.load_model(f"{MODEL}:{unsigned.version}")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "unsigned" in err.value.details()
        assert client.classify(MODEL, ["my card is lost"]).version == serving
    store.remove(f"{MODEL}:{unsigned.version}")


@pytest.fixture(scope="module")
def tight(start_app) -> App:
    """An app whose batcher queues at most 8 texts."""
    app = start_app("tight", batch={"max_batch_texts": 4, "max_queue_texts": 8})
    assert poll_health(app, "appliance.v1.InferenceService", "SERVING") == "SERVING"
    return app


@pytest.mark.parametrize("method", ["classify", "embed"])
def test_overload_is_a_fast_resource_exhausted(tight: App, method: str) -> None:
    app = tight
    texts = ["I would like to know why my top up failed this morning, it says declined"] * 4

    async def flood() -> list[grpc.StatusCode]:
        async with AsyncClient(app.connection) as client:
            call = getattr(client, method)

            async def one() -> grpc.StatusCode:
                try:
                    await call(MODEL, texts)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "retry" in exc.details()
                    return exc.code()

            return await asyncio.gather(*(one() for _ in range(64)))

    codes = asyncio.run(flood())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    with app.client() as client:
        assert client.classify(MODEL, ["where is my card"]).results
