"""``bench.ingress --quick`` end to end: real ingress processes on one port (TLS, token, audit),
pinned and unpinned, the load generator and the engine in their own processes.

Checks the shape of the report and that every figure was measured; never the speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "serving")]  # `bench` and the small specialist

from specialists import train_subset  # noqa: E402

from appliance.config import OFFLINE_ENV  # noqa: E402
from appliance.store import ModelStore  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BENCH = (sys.executable, "-m", "bench.ingress")
FIGURES = ("texts_per_s_c32", "p99_ms_c32", "p50_ms_c1", "server_cpu_ms_per_request", "engine_per_s")


def test_quick_ingress_bench_reports_every_setting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    train_subset(ModelStore(home), "b8", tmp_path / "work", per_label=20)
    done = subprocess.run(
        [*BENCH, "--home", str(home), "--model", "b8", "--quick", "--processes", "1,2", "--json"],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["transport"] == "TLS + bearer token + durable audit"
    assert len(report["loadavg_start_end"]) == 2 and isinstance(report["isa"], list)
    settings = report["settings"]
    pinnings = {"unpinned", "pinned"} if len(os.sched_getaffinity(0)) > 1 else {"unpinned"}
    assert {(s["processes"], s["pinning"]) for s in settings} == {(n, p) for n in (1, 2) for p in pinnings}
    for setting in settings:
        for key in FIGURES:
            assert math.isfinite(setting[key]) and setting[key] > 0, (setting["processes"], key)
        assert setting["served_over_engine"] == pytest.approx(
            setting["texts_per_s_c32"] / setting["engine_per_s"]
        )
        assert len(setting["rss_mib_per_process_warm"]) == setting["processes"]
        assert setting["raw"] and all(r["loadavg_before"] for r in setting["raw"])
