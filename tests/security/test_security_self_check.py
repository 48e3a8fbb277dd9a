"""Every server runs a version's self-check set on its own CPU before it serves it.

A version whose expected labels were changed (and re-signed with the store's own key, so the
signature and file hashes pass) agrees with this CPU on far fewer texts than the bound: the
product's server refuses it with FAILED_PRECONDITION naming the agreement and the bound, the
previous version keeps serving, and ``appliance models verify`` prints the agreement and exits 1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_security_server import MODEL, PROBE, LiveServer, published_home

from appliance.artifact.selfcheck import SELF_CHECK_FILE, SelfCheckSet
from appliance.security.tokens import TokenStore
from appliance.store import Manifest, ModelStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_STORE_FIELDS = ("format", "name", "version", "created_at", "files")


def publish_with_shifted_labels(store: ModelStore, source: Manifest) -> Manifest:
    """The next version of ``source``: the same files, every expected label moved to the next label."""
    n_labels = len(source.spec.labels)
    with store.staging(source.name) as stage:
        for rel in source.data["files"]:
            shutil.copy2(source.folder / rel, stage.folder / rel)
        check = SelfCheckSet.load(stage.folder / SELF_CHECK_FILE)
        shifted = [r.model_copy(update={"expected": (r.expected + 1) % n_labels}) for r in check.rows]
        SelfCheckSet(rows=shifted).save(stage.folder)
        return stage.commit({k: v for k, v in source.data.items() if k not in _STORE_FIELDS})


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    source = published_home(tmp_path_factory.getbasetemp())
    path = tmp_path_factory.mktemp("self-check") / "home"
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("audit", "tokens", "client", "run", "work"))
    store = ModelStore(path)
    assert store.versions(MODEL) == [1]
    assert publish_with_shifted_labels(store, store.load(f"{MODEL}:1")).version == 2
    store.load(f"{MODEL}:2")  # signed and hashed: only the self-check can tell
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


def test_a_version_that_fails_its_self_check_is_refused_and_the_old_one_keeps_serving(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = TokenStore(home / "tokens" / "tokens.json")
    admin = tokens.create("self-check-admin", ["admin"])
    # a bare name: the newest version (2) is tried first, refused, and 1 serves instead
    with caplog.at_level(logging.ERROR, logger="appliance.serve.runtime"), LiveServer(home) as live:
        refused = [r.getMessage() for r in caplog.records if f"{MODEL}:2 cannot serve" in r.getMessage()]
        assert refused and "agreement 0.0000" in refused[0] and "bound 0.98" in refused[0], refused
        with live.client(admin) as client:
            result = client.classify(MODEL, [PROBE[0]])
            assert (result.version, result.results[0].label) == (1, PROBE[1])
            with pytest.raises(grpc.RpcError) as err:
                client.load_model(f"{MODEL}:2")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "self-check label agreement" in err.value.details()
            assert "below the bound 0.98" in err.value.details()
            assert client.classify(MODEL, [PROBE[0]]).version == 1


def verify(home: Path, ref: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "models", "verify", ref, "--json"],
        env={**os.environ, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-2000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_verify_prints_agreement_on_this_cpu(home: Path) -> None:
    code, good = verify(home, f"{MODEL}:1")
    assert code == 0 and good["passed"] is True
    stored = SelfCheckSet.load(home / "models" / MODEL / "1" / SELF_CHECK_FILE)
    assert good["agreement"] == 1.0 and good["n"] == len(stored.rows)
    assert 0.0 < float(good["accuracy"]) <= 1.0 and good["bound"] == 0.98 and good["cpu"]
    code, bad = verify(home, f"{MODEL}:2")
    assert code == 1 and bad["passed"] is False and float(bad["agreement"]) < 0.98
    assert bad["accuracy"] == good["accuracy"]  # the same answers; only the stored labels moved
