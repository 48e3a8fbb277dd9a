"""The ingress replica SIGKILLed in the middle of a steady load, on the real Ray Serve app.

A client loop sends Classify calls back to back; the replica's process (a Ray actor) is killed
with SIGKILL. Callers must see only UNAVAILABLE (or DEADLINE_EXCEEDED for a call in flight), Serve
must start a new replica on the same port that answers again within a bounded time, and the audit
trail, the killed process's chain included, must verify.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_BOUND_S = 120.0  # a new replica: process start, model load and warm-up on 2 busy cores
TEXT = "I lost my card, someone may have stolen it"
ALLOWED = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


@dataclass
class Outcome:
    at: float  # time.monotonic() when the call ended
    code: str  # "OK" or the status name
    details: str = ""


@dataclass
class Traffic:
    """Classify calls back to back, one at a time, until stopped."""

    app: App
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.app.client() as client:
            while not self.stop.is_set():
                try:
                    client.classify(MODEL, [TEXT], timeout=2.0)
                except grpc.RpcError as exc:
                    self.outcomes.append(Outcome(time.monotonic(), exc.code().name, exc.details() or ""))
                    time.sleep(0.05)  # a dead server answers at once; don't spin
                else:
                    self.outcomes.append(Outcome(time.monotonic(), "OK"))

    def successes_after(self, moment: float) -> int:
        return sum(1 for o in self.outcomes if o.code == "OK" and o.at > moment)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def replica_pid(name: str) -> int:
    from ray import serve

    return int(serve.get_app_handle(name).address.remote().result(timeout_s=60)["pid"])


def test_a_killed_ingress_replica_is_replaced_and_callers_see_only_unavailable(
    start_app: Callable[..., App], home: Path
) -> None:
    # a fixed port: the new replica must listen where the clients already connect
    app = start_app("killed", port=free_port())
    old_pid = replica_pid("killed")
    traffic = Traffic(app)
    worker = threading.Thread(target=traffic.run, name="classify-loop")
    worker.start()
    try:
        assert wait_for(lambda: traffic.successes_after(0) >= 20, 120), "no steady traffic before the kill"
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        recovered = wait_for(lambda: traffic.successes_after(killed_at) >= 20, RECOVERY_BOUND_S)
    finally:
        traffic.stop.set()
        worker.join(timeout=30)

    after = [o for o in traffic.outcomes if o.at > killed_at]
    first_ok = next((o.at for o in after if o.code == "OK"), None)
    failures = Counter(o.code for o in after if o.code != "OK")
    seconds = None if first_ok is None else first_ok - killed_at
    print(f"\ningress SIGKILLed: answers again after {seconds} s; failures meanwhile {dict(failures)}")
    assert recovered, f"no 20 answers within {RECOVERY_BOUND_S} s of the kill; failures {dict(failures)}"
    assert seconds is not None and seconds < RECOVERY_BOUND_S
    unexpected = [f"{o.code}: {o.details}" for o in traffic.outcomes if o.code not in ALLOWED | {"OK"}]
    assert unexpected == [], unexpected[:5]
    assert failures, "the kill was not seen at all: was the replica really killed?"
    new_pid = replica_pid("killed")
    assert new_pid != old_pid

    # the killed replica's own chain, cut off mid-stream, is among those that must verify
    killed_chain = home / "audit" / f"{socket.gethostname()}-{old_pid}"
    assert any(killed_chain.glob("audit-*.jsonl")), f"no audit chain of the killed replica in {killed_chain}"
    done = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", "verify"],
        env={**os.environ, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
