"""Which version a bare model name serves: only an admin chooses it (a classify token pinning
``NAME:VERSION`` is answered by that version and changes nothing else), the choice survives a
restart, and a version that no longer verifies gives way to the previous good one.

On the product's own server and runtime (:class:`LiveServer`), with real tokens and a store of
three signed versions whose heads answer the probe text differently, so every answer shows which
version gave it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_security_server import MODEL, PROBE, LiveServer, published_home

from appliance._proto.inference import grpc_service_pb2 as kserve_pb
from appliance._proto.inference import grpc_service_pb2_grpc as kserve_grpc
from appliance.artifact.selfcheck import SELF_CHECK_FILE
from appliance.files import private_mode
from appliance.security.tokens import TokenStore
from appliance.store import SERVING, Manifest, ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The label each version gives PROBE: v1 is the trained specialist, v2 and v3 are its copies with
# one label's bias raised far enough to win for every text.
ANSWERS = {1: PROBE[1], 2: "exchange_rate", 3: "change_pin"}
_STORE_FIELDS = ("format", "name", "version", "created_at", "files")


def republish(store: ModelStore, source: Manifest, favour: str) -> Manifest:
    """Publish the next version of ``source``'s model from its files, its head biased to ``favour``.

    Without the source's self-check set: the biased head is meant to answer differently, which the
    set would refuse (test_security_self_check covers that)."""
    with store.staging(source.name) as stage:
        for rel in source.data["files"]:
            if rel == SELF_CHECK_FILE:
                continue
            (stage.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.folder / rel, stage.folder / rel)
        with np.load(stage.folder / "head.npz") as head:
            weight, bias = head["weight"], head["bias"].copy()
        bias[list(source.data["labels"]).index(favour)] += 100.0
        with (stage.folder / "head.npz").open("wb") as handle:
            np.savez(handle, weight=weight, bias=bias)
        return stage.commit({k: v for k, v in source.data.items() if k not in (*_STORE_FIELDS, "self_check")})


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    source = published_home(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("serving-choice") / "home"
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("audit", "tokens", "client", "run", "work"))
    store = ModelStore(path)
    assert store.versions(MODEL) == [1]
    first = store.load(f"{MODEL}:1")
    for version in (2, 3):
        assert republish(store, first, ANSWERS[version]).version == version
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))  # the server's token store and audit trail
        yield path


@pytest.fixture(scope="module")
def tokens(home: Path) -> TokenStore:
    return TokenStore(home / "tokens" / "tokens.json")


@pytest.fixture(scope="module")
def admin(tokens: TokenStore) -> str:
    return tokens.create("choice-admin", ["admin"])


@pytest.fixture(scope="module")
def reader(tokens: TokenStore) -> str:
    return tokens.create("choice-reader", [f"classify:{MODEL}"])


@pytest.fixture
def no_choice(home: Path) -> Path:
    """Start each test from a store where no admin has chosen a version yet."""
    (home / "models" / MODEL / SERVING).unlink(missing_ok=True)
    return home


def answer(live: LiveServer, token: str, model: str) -> tuple[int, str]:
    with live.client(token) as client:
        result = client.classify(model, [PROBE[0]], timeout=60)
    return result.version, result.results[0].label


def kserve_answer(live: LiveServer, token: str, version: str) -> tuple[str, str]:
    request = kserve_pb.ModelInferRequest(model_name=MODEL, model_version=version)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        PROBE[0].encode()
    )
    request.outputs.add(name="LABEL")
    with live.client(token) as client:
        stub = kserve_grpc.GRPCInferenceServiceStub(client.channel)
        reply = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
    return reply.model_version, reply.outputs[0].contents.bytes_contents[0].decode()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_a_pinned_request_is_served_by_its_version_and_bare_callers_keep_theirs(
    no_choice: Path, admin: str, reader: str
) -> None:
    with LiveServer(no_choice) as live:
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])  # no choice recorded: the newest
        assert answer(live, reader, f"{MODEL}:1") == (1, ANSWERS[1])
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])
        assert answer(live, reader, f"{MODEL}:2") == (2, ANSWERS[2])
        assert kserve_answer(live, reader, "1") == ("1", ANSWERS[1])
        assert kserve_answer(live, reader, "") == ("3", ANSWERS[3])
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])
        with live.client(admin) as client:
            assert client.get_model(MODEL).version == 3
        # making a version the serving one is an admin's call
        with live.client(reader) as client:
            assert code_of(lambda: client.load_model(f"{MODEL}:1")) == grpc.StatusCode.PERMISSION_DENIED
    assert ModelStore(no_choice).serving_version(MODEL) is None


def test_an_admin_choice_is_served_again_after_a_restart(no_choice: Path, admin: str, reader: str) -> None:
    with LiveServer(no_choice) as live:
        with live.client(admin) as client:
            loaded = client.load_model(f"{MODEL}:1")
        assert (loaded.model.version, loaded.previous_version) == (1, 3)
        assert answer(live, reader, MODEL) == (1, ANSWERS[1])
    record = no_choice / "models" / MODEL / SERVING
    assert record.read_text().strip() == "1"
    # private like every file of the store: the folder's group may read it, others get no bit
    assert record.stat().st_mode & 0o777 == private_mode(record.parent, folder=False)
    assert record.stat().st_mode & 0o007 == 0
    with LiveServer(no_choice) as live:  # a new runtime over the same store
        assert answer(live, reader, MODEL) == (1, ANSWERS[1])
        with live.client(admin) as client:
            assert client.get_model(MODEL).version == 1
            assert client.load_model(MODEL).model.version == 3  # a bare LoadModel: the newest
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])
    with LiveServer(no_choice) as live:
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])


def test_a_tampered_chosen_version_leaves_the_previous_one_serving_after_a_restart(
    no_choice: Path, admin: str, reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    with LiveServer(no_choice) as live, live.client(admin) as client:
        assert client.load_model(f"{MODEL}:3").model.version == 3
    head = no_choice / "models" / MODEL / "3" / "head.npz"
    original = head.read_bytes()
    tampered = bytearray(original)
    tampered[-20] ^= 0xFF  # flip bits inside the stored weights
    head.write_bytes(bytes(tampered))
    try:
        with (
            caplog.at_level(logging.WARNING, logger="appliance.serve.runtime"),
            LiveServer(no_choice) as live,
        ):
            assert answer(live, reader, MODEL) == (2, ANSWERS[2])
            assert answer(live, reader, f"{MODEL}:2") == (2, ANSWERS[2])
            with live.client(reader) as client:  # the tampered version is refused, not served
                refused = code_of(lambda: client.classify(f"{MODEL}:3", [PROBE[0]], timeout=60))
            assert refused == grpc.StatusCode.FAILED_PRECONDITION
        logged = [r.getMessage() for r in caplog.records if r.name == "appliance.serve.runtime"]
        assert any(f"{MODEL}:3" in m and "do not match the manifest" in m for m in logged), logged
        assert any(f"serving {MODEL}:2 instead of {MODEL}:3" in m for m in logged), logged
        assert ModelStore(no_choice).serving_version(MODEL) == 3  # the admin's choice is kept
    finally:
        head.write_bytes(original)
    with LiveServer(no_choice) as live:  # repaired: the choice serves again
        assert answer(live, reader, MODEL) == (3, ANSWERS[3])


def test_removing_the_chosen_version_forgets_the_choice(tmp_path: Path, home: Path) -> None:
    store = ModelStore(tmp_path / "home")
    shutil.copytree(home / "models", store.models_root)
    shutil.copytree(home / "keys", store.keys_dir)
    store.set_serving_version(MODEL, 2)
    store.remove(f"{MODEL}:3")
    assert store.serving_version(MODEL) == 2
    store.remove(f"{MODEL}:2")
    assert store.serving_version(MODEL) is None
    store.remove(MODEL)
    assert not (store.models_root / MODEL).exists()


def test_pins_after_unloads_are_answered_never_unknown(no_choice: Path, admin: str, reader: str) -> None:
    with LiveServer(no_choice) as live:
        with live.client(admin) as client:
            assert client.unload_model(MODEL).unloaded_version == 3
            assert answer(live, reader, f"{MODEL}:1") == (1, ANSWERS[1])
            assert answer(live, reader, MODEL) == (3, ANSWERS[3])  # the choice reloads on demand
            assert answer(live, reader, f"{MODEL}:2") == (2, ANSWERS[2])
            assert answer(live, reader, f"{MODEL}:1") == (1, ANSWERS[1])  # three loaded, two kept
            client.unload_model(f"{MODEL}:3")
            assert answer(live, reader, f"{MODEL}:1") == (1, ANSWERS[1])
            assert answer(live, reader, MODEL) == (3, ANSWERS[3])
            with live.client(reader) as pinned:
                missing = code_of(lambda: pinned.classify(f"{MODEL}:9", [PROBE[0]], timeout=60))
            assert missing == grpc.StatusCode.NOT_FOUND

        # pins and bare calls racing an admin who keeps unloading everything
        stop = threading.Event()
        failures: list[str] = []
        served: list[tuple[str, int, str]] = []

        def traffic(model: str) -> None:
            with live.client(reader) as client:
                while not stop.is_set():
                    try:
                        result = client.classify(model, [PROBE[0]], timeout=60)
                        served.append((model, result.version, result.results[0].label))
                    except grpc.RpcError as exc:
                        failures.append(f"{model}: {exc.code().name} {exc.details()}")

        workers = [threading.Thread(target=traffic, args=(m,)) for m in (f"{MODEL}:1", f"{MODEL}:2", MODEL)]
        for worker in workers:
            worker.start()
        try:
            with live.client(admin) as client:
                for _ in range(3):
                    try:
                        client.unload_model(MODEL)
                    except grpc.RpcError as exc:  # nothing loaded at that instant
                        assert exc.code() == grpc.StatusCode.NOT_FOUND
        finally:
            stop.set()
            for worker in workers:
                worker.join()
    assert failures == []
    expected = {f"{MODEL}:1": (1, ANSWERS[1]), f"{MODEL}:2": (2, ANSWERS[2]), MODEL: (3, ANSWERS[3])}
    assert {model for model, _, _ in served} == set(expected)
    assert all((version, label) == expected[model] for model, version, label in served)
