"""The model store on its own: names, references, atomic publish, integrity checks, removal.

Models here are small stand-in files (a head, a card): the store hashes and signs bytes, whatever
they hold. Trained models go through the same store in test_pipeline.py and test_cli_factory.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, InvalidArgument, NotFound
from appliance.security import signing
from appliance.store import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    ModelStore,
    iter_staging,
    parse_ref,
    validate_name,
)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    return ModelStore(tmp_path / "home")


def publish(store: ModelStore, name: str, payload: bytes = b"weights", **fields: object) -> Manifest:
    with store.staging(name) as stage:
        (stage.folder / "head.npz").write_bytes(payload)
        (stage.folder / "MODEL_CARD.md").write_text(f"# {name}\n")
        (stage.folder / "sub").mkdir()
        (stage.folder / "sub" / "extra.json").write_text("{}")
        return stage.commit({"kind": "classifier", "labels": ["a", "b"], **fields})


# -- names and references ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "bank77", "b8.v2", "intent_router-1", "0day", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["../x", "..", ".", "a/b", "a\\b", "/abs", "", "A", "Bank", ".hidden", "-x", "_x", "a..b", "x" * 64,
     "a\x00b", "a b", "café", "ｘ", "a\n", "a:1", "~root"],
)  # fmt: skip
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        validate_name(name)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("bank", ("bank", None)), ("bank:1", ("bank", 1)), ("bank:42", ("bank", 42)), ("b.v2:7", ("b.v2", 7))],
)
def test_parse_ref(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["bank:", "bank:0", "bank:-1", "bank:x", "bank:1.5", "bank:1:2", "bank:²", "bank:١"]
)
def test_parse_ref_refuses_bad_versions(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model version"):
        parse_ref(ref)


@pytest.mark.parametrize("ref", ["../etc:1", "a/b:2", ":1", "Bank:1"])
def test_parse_ref_refuses_bad_names(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        parse_ref(ref)


# -- publishing ---------------------------------------------------------------------------------------


def test_publish_and_load_round_trip(store: ModelStore) -> None:
    first = publish(store, "bank", b"one")
    second = publish(store, "bank", b"two")
    assert (first.version, second.version) == (1, 2)
    assert store.versions("bank") == [1, 2]
    assert store.names() == ["bank"]
    assert store.resolve("bank") == ("bank", 2)
    loaded = store.load("bank:1")
    assert loaded.data == first.data
    assert loaded.data["labels"] == ["a", "b"]
    assert (loaded.folder / "head.npz").read_bytes() == b"one"
    assert set(loaded.data["files"]) == {"head.npz", "MODEL_CARD.md", "sub/extra.json"}
    assert list(iter_staging(store.models_root)) == []
    # the signer's public key is trusted locally, so its signature verifies on its own
    signer = signing.verify_file(loaded.folder / MANIFEST, store.keys_dir / "trusted")
    assert json.loads((loaded.folder / SIGNATURE).read_text())["key_id"] == signer


def test_load_of_unknown_model_or_version(store: ModelStore) -> None:
    with pytest.raises(NotFound, match="no published model named 'bank'"):
        store.load("bank")
    publish(store, "bank")
    with pytest.raises(NotFound, match=r"no version 3 \(published: \[1\]\)"):
        store.load("bank:3")


def test_an_exception_inside_staging_publishes_nothing(store: ModelStore) -> None:
    publish(store, "bank")
    with pytest.raises(RuntimeError, match="disk full"), store.staging("bank") as stage:
        (stage.folder / "head.npz").write_bytes(b"half")
        staged = stage.folder
        raise RuntimeError("disk full")
    assert not staged.exists()
    assert store.versions("bank") == [1]
    assert list(iter_staging(store.models_root)) == []
    assert publish(store, "bank").version == 2


def test_an_exception_inside_commit_publishes_nothing(store: ModelStore) -> None:
    # a manifest field that cannot be serialised fails after the files are written
    with pytest.raises(TypeError), store.staging("bank") as stage:
        (stage.folder / "head.npz").write_bytes(b"weights")
        stage.commit({"labels": object()})
    assert store.versions("bank") == []
    assert list(iter_staging(store.models_root)) == []
    assert publish(store, "bank").version == 1


# The child publishes as far as the rename that would make the version visible, says so, and
# waits there to be killed: the worst moment, with every file and the signature written.
_KILLED_PUBLISHER = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    from appliance import store as store_module

    def stop_before_publish(src, dst):
        print("staged", src, flush=True)
        threading.Event().wait()

    store = store_module.ModelStore(Path(sys.argv[1]))
    store_module.os.rename = stop_before_publish
    with store.staging("bank") as stage:
        (stage.folder / "head.npz").write_bytes(b"never published")
        stage.commit({"labels": ["a", "b"]})
    """
)


def test_a_publisher_killed_mid_publish_leaves_no_version(store: ModelStore) -> None:
    publish(store, "bank", b"v1")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISHER, str(store.home)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("staged "), line
        staged = Path(line.split(" ", 1)[1].strip())
        assert (staged / MANIFEST).is_file() and (staged / SIGNATURE).is_file()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    # the fully written folder is still there, but it is not a version
    assert staged.is_dir() and staged in list(iter_staging(store.models_root))
    assert store.versions("bank") == [1]
    assert store.resolve("bank") == ("bank", 1)
    assert (store.load("bank").folder / "head.npz").read_bytes() == b"v1"
    # and the next publish takes the next version regardless of the leftover
    assert publish(store, "bank", b"v2").version == 2
    assert store.versions("bank") == [1, 2]


def test_concurrent_publishes_get_distinct_versions(store: ModelStore) -> None:
    publishers = 8
    start = threading.Barrier(publishers)

    def one(i: int) -> int:
        with store.staging("bank") as stage:
            (stage.folder / "head.npz").write_bytes(f"publisher {i}".encode())
            start.wait()  # every publisher picks its version from the same listing
            return stage.commit({"labels": ["a"], "publisher": i}).version

    with ThreadPoolExecutor(publishers) as pool:
        versions = list(pool.map(one, range(publishers)))
    assert sorted(versions) == list(range(1, publishers + 1))
    assert store.versions("bank") == list(range(1, publishers + 1))
    for i, version in enumerate(versions):
        loaded = store.load(f"bank:{version}")  # each verifies against its own manifest
        assert loaded.data["publisher"] == i
        assert (loaded.folder / "head.npz").read_bytes() == f"publisher {i}".encode()
    assert list(iter_staging(store.models_root)) == []


def test_concurrent_publisher_processes_get_distinct_versions(store: ModelStore) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from appliance.store import ModelStore
        store = ModelStore(Path(sys.argv[1]))
        for i in range(3):
            with store.staging("bank") as stage:
                (stage.folder / "head.npz").write_bytes(sys.argv[2].encode() + bytes([i]))
                print(stage.commit({"labels": ["a"]}).version)
        """
    )
    publish(store, "bank")  # the signing key exists before the children start
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(store.home), f"p{n}"], stdout=subprocess.PIPE, text=True
        )
        for n in range(3)
    ]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    versions = sorted(int(v) for out in outputs for v in out.split())
    assert versions == list(range(2, 11))
    assert store.versions("bank") == list(range(1, 11))


# -- integrity ----------------------------------------------------------------------------------------


@pytest.fixture
def published(store: ModelStore) -> Manifest:
    return publish(store, "bank")


def test_a_modified_file_is_refused(store: ModelStore, published: Manifest) -> None:
    (published.folder / "head.npz").write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match=r"do not match the manifest: modified \['head.npz'\]"):
        store.load("bank")


def test_a_missing_file_is_refused(store: ModelStore, published: Manifest) -> None:
    (published.folder / "sub" / "extra.json").unlink()
    with pytest.raises(IntegrityError, match=r"missing \['sub/extra.json'\]"):
        store.load("bank")


def test_an_extra_file_is_refused(store: ModelStore, published: Manifest) -> None:
    (published.folder / "sub" / "payload.py").write_text("print('hello')")
    with pytest.raises(IntegrityError, match=r"unexpected \['sub/payload.py'\]"):
        store.load("bank")


def test_an_edited_manifest_is_refused(store: ModelStore, published: Manifest) -> None:
    path = published.folder / MANIFEST
    data = json.loads(path.read_text())
    data["labels"] = ["a", "evil"]
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        store.load("bank")


def test_a_manifest_that_is_not_json_is_refused(store: ModelStore, published: Manifest) -> None:
    (published.folder / MANIFEST).write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        store.load("bank")


def test_a_missing_signature_is_refused(store: ModelStore, published: Manifest) -> None:
    (published.folder / SIGNATURE).unlink()
    with pytest.raises(IntegrityError, match=r"unsigned model \(no manifest.sig\)"):
        store.load("bank")
    # only a store told to accept unsigned models loads it
    assert ModelStore(store.home, require_signature=False).load("bank").version == 1


@pytest.mark.parametrize(
    "garbled",
    ["", "not json", '{"alg": "ed25519"}', '{"alg": "ed25519", "key_id": "00", "sig": "%%%"}'],
)
def test_a_garbled_signature_is_refused(store: ModelStore, published: Manifest, garbled: str) -> None:
    (published.folder / SIGNATURE).write_text(garbled)
    with pytest.raises(IntegrityError, match=r"not signed|malformed manifest signature|unsupported"):
        store.load("bank")


def test_a_signature_by_an_untrusted_key_is_refused(
    store: ModelStore, published: Manifest, tmp_path: Path
) -> None:
    stranger = signing.ensure_signing_key(tmp_path / "stranger-keys")
    raw = (published.folder / MANIFEST).read_bytes()
    (published.folder / SIGNATURE).write_text(signing.sign_manifest(raw, stranger))
    with pytest.raises(IntegrityError, match=f"untrusted key {signing.key_id(stranger.public_key())}"):
        store.load("bank")


def test_a_store_that_no_longer_trusts_its_signer_refuses(store: ModelStore, published: Manifest) -> None:
    for pub in (store.keys_dir / "trusted").glob("*.pub"):
        pub.unlink()
    with pytest.raises(IntegrityError, match="untrusted key"):
        store.load("bank")


def test_a_version_copied_under_another_number_is_refused(store: ModelStore, published: Manifest) -> None:
    # every file and the signature are genuine, but they describe version 1
    os.rename(published.folder, store.path("bank", 5))
    with pytest.raises(IntegrityError, match="manifest names bank:1"):
        store.load("bank:5")


def test_load_without_verify_skips_the_checks(store: ModelStore, published: Manifest) -> None:
    (published.folder / "head.npz").write_bytes(b"tampered")
    assert store.load("bank", verify=False).version == 1


# -- shared encoders ------------------------------------------------------------------------------------


def fake_encoder(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(weights)
    (folder / "tokenizer.json").write_text('{"model": {}}')
    return folder


def test_put_encoder_stores_content_once(store: ModelStore, tmp_path: Path) -> None:
    info = {"pooling": "mean", "precision": "fp32"}
    first = store.put_encoder(fake_encoder(tmp_path / "a", b"onnx-1"), info)
    again = store.put_encoder(fake_encoder(tmp_path / "b", b"onnx-1"), info)  # same bytes elsewhere
    other = store.put_encoder(fake_encoder(tmp_path / "c", b"onnx-2"), info)
    assert first == again != other
    assert sorted(p.name for p in store.encoders_root.iterdir()) == sorted([first, other])
    folder = store.encoder_folder(first)
    assert (folder / "model.onnx").read_bytes() == b"onnx-1"
    assert store.encoder_info(first)["precision"] == "fp32"


def test_a_tampered_encoder_is_refused(store: ModelStore, tmp_path: Path) -> None:
    encoder_id = store.put_encoder(fake_encoder(tmp_path / "a", b"onnx-1"), {"precision": "int8"})
    (store.encoders_root / encoder_id / "model.onnx").write_bytes(b"onnx-X")
    with pytest.raises(IntegrityError, match=r"modified \['model.onnx'\]"):
        store.encoder_folder(encoder_id)


def test_an_encoder_manifest_that_lies_about_its_content_is_refused(
    store: ModelStore, tmp_path: Path
) -> None:
    encoder_id = store.put_encoder(fake_encoder(tmp_path / "a", b"onnx-1"), {"precision": "int8"})
    path = store.encoders_root / encoder_id / "encoder.json"
    info = json.loads(path.read_text())
    (store.encoders_root / encoder_id / "model.onnx").write_bytes(b"onnx-X")
    info["files"]["model.onnx"] = "0" * 64
    path.write_text(json.dumps(info))
    with pytest.raises(IntegrityError, match="does not match its content hash"):
        store.encoder_folder(encoder_id)


@pytest.mark.parametrize("encoder_id", ["../models", "abc", "A" * 64])
def test_encoder_ids_must_be_hashes(store: ModelStore, encoder_id: str) -> None:
    with pytest.raises(IntegrityError, match="invalid encoder id"):
        store.encoder_folder(encoder_id)


def test_a_missing_encoder_is_refused(store: ModelStore) -> None:
    with pytest.raises(IntegrityError, match="is missing"):
        store.encoder_folder("0" * 64)


# -- removal ---------------------------------------------------------------------------------------------


def test_remove_one_version_then_all(store: ModelStore) -> None:
    for _ in range(3):
        publish(store, "bank")
    assert store.remove("bank:2") == [2]
    assert store.versions("bank") == [1, 3]
    assert store.remove("bank") == [1, 3]
    assert store.versions("bank") == []
    assert store.names() == []
    assert not (store.models_root / "bank").exists()
    # a removed name publishes again from version 1
    assert publish(store, "bank").version == 1


def test_remove_of_something_absent(store: ModelStore) -> None:
    with pytest.raises(NotFound):
        store.remove("bank")
    publish(store, "bank")
    with pytest.raises(NotFound, match="no published model 'bank:2'"):
        store.remove("bank:2")
    with pytest.raises(InvalidArgument):
        store.remove("../bank")
    assert store.versions("bank") == [1]


def test_remove_after_an_interrupted_remove(store: ModelStore) -> None:
    publish(store, "bank")
    publish(store, "bank")
    # what an rm killed half way through its delete leaves behind
    leftover = store.models_root / "bank" / ".staging-rm-1"
    leftover.mkdir()
    (leftover / "head.npz").write_bytes(b"half deleted")
    assert store.remove("bank:1") == [1]
    assert store.versions("bank") == [2]


def test_removing_every_version_keeps_a_concurrent_staging(store: ModelStore) -> None:
    publish(store, "bank")
    with store.staging("bank") as stage:
        (stage.folder / "head.npz").write_bytes(b"new")
        store.remove("bank")
        assert stage.commit({"labels": ["a"]}).version == 1
    assert store.versions("bank") == [1]
