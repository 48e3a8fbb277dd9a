"""``bench.compare --quick`` end to end: a small real specialist, the real Ray Serve app over TLS
with a token, the torch-eager baseline server, the engine and the ceiling.

Checks the shape of the report and that both servers answered every request with the same
model; never the speed (that is what the benchmark itself reports).
"""

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
from bench.compare import SUMMARY_KEYS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_quick_compare_reports_every_figure(tmp_path: Path) -> None:
    home = tmp_path / "home"
    train_subset(ModelStore(home), "b8", tmp_path / "work", per_label=20)

    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--home", str(home), "--model", "b8", "--quick", "--json"],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, "APPLIANCE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["served_over_engine"] == pytest.approx(summary["served_per_s"] / summary["engine_per_s"])
    assert summary["speedup_vs_baseline"] == pytest.approx(
        summary["served_per_s"] / summary["baseline_per_s"]
    )
    assert summary["engine_over_ceiling"] == pytest.approx(summary["engine_per_s"] / summary["ceiling_per_s"])
    assert summary["transport"] == "TLS + bearer token"
    # Same weights and head in two runtimes (int8 or fp32 ONNX against torch eager fp32).
    assert summary["label_agreement"] >= 0.9
    for server in ("ours", "baseline"):
        for shape in ("c32", "c1", "half"):
            runs = summary["raw"][server][shape]
            assert runs and all(r["ok"] > 0 and r["errors"] == {} for r in runs), (server, shape)
    assert "max throughput, c=32" in done.stdout and "physical ceiling" in done.stdout
