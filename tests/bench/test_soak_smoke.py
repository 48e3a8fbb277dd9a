"""The soak benchmark, briefly (~20 s at a small rate), against a real gRPC server on 127.0.0.1.

The server is the stand-in keyword backend behind the real KServe and Classify servicers of
tests/bench/test_load_smoke.py, in this test process; the soak measures this process's tree.
The checks are on the report's shape and counts, never on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "api"), str(REPO / "tests" / "bench")]

from standin import KeywordBackend, serve_in_thread  # noqa: E402
from test_load_smoke import MinimalClassifyServicer  # noqa: E402

from appliance._proto.appliance.v1 import appliance_pb2_grpc  # noqa: E402
from bench import soak  # noqa: E402

pytestmark = pytest.mark.integration

SAMPLE_FIELDS = {
    "t_s", "rss_bytes", "open_fds", "processes", "requests", "ok", "errors", "p50_ms", "p99_ms",
    "throughput_rps", "load_avg",
}  # fmt: skip


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    classify = MinimalClassifyServicer(KeywordBackend())

    def register(server: grpc.aio.Server) -> None:
        appliance_pb2_grpc.add_InferenceServiceServicer_to_server(classify, server)

    with serve_in_thread(register) as port:
        yield f"127.0.0.1:{port}"


def test_a_short_soak_reports_every_field_and_draws_the_curves(address: str, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.soak", "--address", address, "--model", "intents",
            "--minutes", str(18 / 60), "--interval", "6", "--probe-seconds", "2", "--probe-concurrency", "2",
            "--pid", str(os.getpid()), "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "isa {" in done.stdout and "load average" in done.stdout

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["measured_max_rps"] > 0
    assert report["rate"] == pytest.approx(report["measured_max_rps"] / 2)
    assert set(report["cpu"]["isa"]) == {"avx2", "avx512", "vnni", "amx"}
    assert report["pid"] == os.getpid()
    samples = report["samples"]
    assert len(samples) == 3
    for sample in samples:
        assert set(sample) == SAMPLE_FIELDS
        assert sample["rss_bytes"] > 0 and sample["open_fds"] > 0 and sample["processes"] >= 1
        assert sample["requests"] == sample["ok"] > 0 and sample["errors"] == {}
        assert 0 < sample["p50_ms"] <= sample["p99_ms"]
        assert len(sample["load_avg"]) == 3
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert set(report["growth"]) == {"rss_bytes", "open_fds"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_process_tree_holds_a_child_and_an_absent_pid_is_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in soak.process_tree(os.getpid())
        rss, fds, processes = soak.tree_usage(os.getpid())
        assert rss > 0 and fds > 0 and processes >= 2
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessLookupError):
        soak.tree_usage(2**22 + 12345)  # above the default pid_max
