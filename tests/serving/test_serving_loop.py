"""The retraining loop on the real Ray Serve app: shadow on live calls, the gate in front of
promotion, promotion under traffic on two replicas, a restart that keeps the promoted version,
and rollback.

Two Serve apps share one APPLIANCE_HOME: two ingress replicas, as on two nodes. Promotion goes
through one replica's LoadModel; the other follows the durable SERVING record by itself.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from specialists import DATA, sample_texts, subset, train_subset
from test_serving_ingress_kill import free_port, replica_pid, wait_for

from appliance.cli import main
from appliance.loop.shadow import read_rows, shadow_db
from appliance.store import ModelStore
from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = [text for text, _ in sample_texts(3)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home of its own: b8:1 (the champion), b8:2 (a peer, seed 1) and b8:3 (3 examples a label)."""
    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import ensure_local_admin_token

    path = tmp_path_factory.mktemp("loop-home")
    previous = os.environ.get("APPLIANCE_HOME")
    os.environ["APPLIANCE_HOME"] = str(path)
    store = ModelStore(path)
    train_subset(store, MODEL, path / "work", per_label=40, seed=0)
    train_subset(store, MODEL, path / "work", per_label=40, seed=1)
    train_subset(store, MODEL, path / "work", per_label=3, seed=2)
    store.set_serving_version(MODEL, 1)  # published after it, the challengers serve nobody yet
    ensure_local_pki(path / "pki")
    ensure_local_admin_token()
    yield path
    if previous is not None:
        os.environ["APPLIANCE_HOME"] = previous
    else:
        os.environ.pop("APPLIANCE_HOME", None)


@pytest.fixture(scope="module")
def replicas(start_app: Callable[..., App]) -> tuple[App, App]:
    return start_app("loop-a", port=free_port()), start_app("loop-b", port=free_port())


def served(app: App, texts: list[str] = TEXTS) -> tuple[int, list[str], float]:
    with app.client() as client:
        started = time.perf_counter()
        result = client.classify(MODEL, texts, timeout=30)
        elapsed = time.perf_counter() - started
    return result.version, [r.label for r in result.results], elapsed


@dataclass
class Traffic:
    """Bare-name Classify calls back to back on each replica, recording versions and failures."""

    apps: tuple[App, ...]
    versions: list[tuple[float, str, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, app: App) -> None:
        with app.client() as client:
            while not self.stop.is_set():
                try:
                    result = client.classify(MODEL, TEXTS[:2], timeout=10)
                except grpc.RpcError as exc:
                    self.failures.append(f"{app.name}: {exc.code().name} {exc.details()}")
                else:
                    self.versions.append((time.monotonic(), app.name, result.version))

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self.run, args=(a,)) for a in self.apps]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def latest(self, app: App) -> int | None:
        seen = [v for _, name, v in self.versions if name == app.name]
        return seen[-1] if seen else None


def test_shadow_answers_beside_the_champion_off_the_callers_path(
    replicas: tuple[App, App], home: Path
) -> None:
    a, _ = replicas
    version, labels_off, _ = served(a)
    assert version == 1
    off = [served(a, TEXTS[:1])[2] for _ in range(30)]

    assert main(["shadow", f"{MODEL}:2", "--fraction", "1"]) == 0
    db = shadow_db(home)
    assert wait_for(lambda: served(a, TEXTS[:1]) is not None and len(read_rows(db, MODEL)) > 0, 60), (
        "no shadow rows: the replica did not follow the shadow record"
    )
    on = [served(a, TEXTS[:1])[2] for _ in range(30)]
    version_on, labels_on, _ = served(a)
    assert (version_on, labels_on) == (1, labels_off)  # the caller still gets the champion's answers
    assert wait_for(lambda: len({r.request_id for r in read_rows(db, MODEL)}) >= 30, 60)
    rows = read_rows(db, MODEL)
    assert {(r.champion_version, r.challenger_version) for r in rows} == {(1, 2)}
    agreement = sum(r.champion_label == r.challenger_label for r in rows) / len(rows)
    assert agreement > 0.5  # a peer trained on other examples of the same labels mostly agrees
    assert all(r.core_seconds > 0 for r in rows)
    p50_off, p50_on = statistics.median(off), statistics.median(on)
    print(f"\nchampion p50 latency: shadow off {1000 * p50_off:.1f} ms, on {1000 * p50_on:.1f} ms")
    assert p50_on < 2.0 * p50_off + 0.010, "the shadow moved the champion's latency"

    assert main(["shadow", MODEL, "--off"]) == 0
    time.sleep(2.5)
    before = len(read_rows(db, MODEL))
    served(a)
    time.sleep(1.0)
    assert len(read_rows(db, MODEL)) == before, "shadow rows after --off"


def test_the_gate_refuses_a_worse_challenger_and_promotion_needs_it(
    replicas: tuple[App, App], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = replicas
    # the golden set the champion's lineage names in the dataset store
    assert main(["gate", f"{MODEL}:3", "--json"]) == 2
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["passed"] is False and verdict["champion_version"] == 1
    assert verdict["golden"]["source"].startswith("golden set ")
    assert verdict["golden"]["accuracy_delta_points"] < -0.2
    assert 0.0 <= verdict["golden"]["test"]["p_mid"] <= verdict["golden"]["test"]["p_exact"] <= 1.0
    assert (home / "models" / MODEL / "3.gate.json").is_file()
    # or a labelled file of one's own
    golden = subset(DATA / "test.csv", home / "golden.csv", 10, 1)
    assert main(["gate", f"{MODEL}:2", "--golden", str(golden)]) in (0, 2)
    assert "golden file golden.csv" in capsys.readouterr().out
    assert main(["promote", f"{MODEL}:3", "--address", f"127.0.0.1:{a.port}"]) == 1
    assert "failed the gate" in capsys.readouterr().err
    assert served(a)[0] == 1


def test_promotion_under_traffic_reaches_both_replicas_without_a_failed_call(
    replicas: tuple[App, App], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = replicas
    with Traffic((a, b)) as traffic:
        assert wait_for(lambda: len(traffic.versions) >= 20, 60)
        assert main(["promote", f"{MODEL}:2", "--force", "--address", f"127.0.0.1:{a.port}"]) == 0
        promoted_at = time.monotonic()
        assert wait_for(lambda: traffic.latest(a) == 2 and traffic.latest(b) == 2, 30), traffic.versions[-5:]
        followed_in = next(t for t, name, v in traffic.versions if name == b.name and v == 2) - promoted_at
        time.sleep(1.0)
    with capsys.disabled():
        print(f"\nreplica b served the promoted version {followed_in:.2f} s after LoadModel on replica a")
    assert traffic.failures == [], traffic.failures[:5]
    for app in (a, b):  # once a replica answers with 2 it never answers with 1 again
        seen = [v for _, name, v in traffic.versions if name == app.name]
        assert seen == sorted(seen), Counter(seen)
    assert ModelStore(home).serving_version(MODEL) == 2

    # a version whose files were tampered with is refused by LoadModel; 2 keeps serving
    head = home / "models" / MODEL / "3" / "head.npz"
    head.write_bytes(head.read_bytes() + b"x")
    capsys.readouterr()
    assert main(["promote", f"{MODEL}:3", "--force", "--address", f"127.0.0.1:{a.port}"]) == 1
    assert "refused" in capsys.readouterr().err
    assert served(a)[0] == 2 and served(b)[0] == 2


def test_a_restarted_replica_serves_the_promoted_version_and_rollback_returns(
    replicas: tuple[App, App], home: Path
) -> None:
    a, b = replicas
    old = replica_pid(a.name)
    os.kill(old, signal.SIGKILL)

    def answers_again() -> bool:
        try:
            return served(a)[0] == 2
        except grpc.RpcError:
            return False

    assert wait_for(answers_again, 120), "the restarted replica does not serve the promoted version"
    assert replica_pid(a.name) != old

    assert main(["rollback", MODEL, "--address", f"127.0.0.1:{b.port}"]) == 0
    assert served(b)[0] == 1
    assert wait_for(lambda: served(a)[0] == 1, 30)
    assert ModelStore(home).serving_version(MODEL) == 1


def test_auto_promotion_is_off_by_default_and_goes_through_the_gate(
    replicas: tuple[App, App], home: Path
) -> None:
    a, b = replicas
    lenient = {"max_accuracy_drop_points": 100.0, "min_coverage_gain_points": -100.0, "alpha": 1e-9}
    assert served(b)[0] == 1
    assert main(["gate", f"{MODEL}:2", "--address", f"127.0.0.1:{b.port}"]) in (0, 2)
    assert served(b)[0] == 1  # a verdict alone promotes nothing
    policy = home / "loop" / "policy.json"
    policy.write_text(
        json.dumps({"auto_promote": True, "gate": {**lenient, "max_accuracy_drop_points": -100.0}})
    )
    assert main(["gate", f"{MODEL}:2", "--address", f"127.0.0.1:{b.port}"]) == 2  # refused: not promoted
    assert served(b)[0] == 1
    policy.write_text(json.dumps({"auto_promote": True, "gate": lenient}))
    try:
        assert main(["gate", f"{MODEL}:2", "--address", f"127.0.0.1:{b.port}"]) == 0
        assert served(b)[0] == 2
        assert wait_for(lambda: served(a)[0] == 2, 30)
    finally:
        policy.unlink()
