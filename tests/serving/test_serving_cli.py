"""What an operator sees from the real ``appliance serve`` process: which configured model it waits
for, where its metrics are, why a deploy failed, and a clean exit status on stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.serving import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNPUBLISHED = "absent"


def cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    command = [sys.executable, "-m", "appliance.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


class Served:
    """``appliance serve`` in its own process; its stdout and stderr go to files."""

    def __init__(self, home: Path, logs: Path, *args: str) -> None:
        self.home = home
        self.stdout, self.stderr = logs / "serve.out", logs / "serve.err"
        env = {**os.environ, "APPLIANCE_HOME": str(home)}
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "serve", "--port", "0", *args],
                env=env,
                stdout=out,
                stderr=err,
            )

    def run_file(self) -> dict[str, Any] | None:
        path = self.home / "run" / "server.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def wait_for(self, ready: Callable[[dict[str, Any]], bool], timeout: float = 300.0) -> dict[str, Any]:
        """The run file once ``ready`` holds for it; fails early if the server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.run_file()
            if info is not None and ready(info):
                return info
            assert self.process.poll() is None, f"serve exited {self.process.returncode}: {self.output()}"
            time.sleep(0.5)
        raise AssertionError(f"timed out; run file {self.run_file()}; output {self.output()}")

    def finish(self, timeout: float = 120.0) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def serve(home: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str) -> Served:
        served = Served(home, tmp_path, *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def test_serve_says_which_model_it_waits_for_reports_its_metrics_port_and_stops_with_0(
    serve: Callable[..., Served], home: Path
) -> None:
    served = serve("--metrics-port", "0", "--model", MODEL, "--model", UNPUBLISHED)
    info = served.wait_for(lambda i: "not published" in i.get("waiting", {}).get(UNPUBLISHED, ""))
    assert list(info["waiting"]) == [UNPUBLISHED]  # the published model serves

    status = cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["health"] == "NOT_SERVING"
    assert "not published" in report["waiting"][UNPUBLISHED]
    text = cli(home, "status").stdout
    assert f"waiting for {UNPUBLISHED}: not published" in text
    assert f"127.0.0.1:{info['metrics_port']}/metrics" in text

    # port 0 picked a free port, reported in the run file, and it is scrapable
    assert info["metrics_port"] > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10) as answer:
        assert f'appliance_model_version_loaded{{model="{MODEL}"' in answer.read().decode()

    stopped = cli(home, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, (stopped.stdout, served.output())
    assert served.finish() == 0, served.output()
    assert f"waiting for model '{UNPUBLISHED}': not published" in served.stdout.read_text()


def test_sigterm_stops_serve_with_exit_status_0(serve: Callable[..., Served]) -> None:
    served = serve("--metrics-port", "0", "--model", MODEL)
    info = served.wait_for(lambda i: i.get("waiting") == {})
    assert "appliance ready" in served.stdout.read_text()
    os.kill(info["pid"], signal.SIGTERM)
    assert served.finish() == 0, served.output()  # not 134 (SIGABRT) from Ray's own SIGTERM handler


def test_a_failed_deploy_names_the_replicas_error(serve: Callable[..., Served]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = serve("--metrics-port", str(port), "--model", MODEL)
        code = served.finish(timeout=300)
    errors = served.stderr.read_text()
    assert code != 0
    first_error = next(line for line in errors.splitlines() if line.startswith("error:"))
    assert "Address already in use" in first_error and f"127.0.0.1:{port}" in first_error, errors
    assert served.run_file() is None
