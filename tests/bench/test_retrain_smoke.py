"""The retraining benchmark in its quick mode, end to end: a few intents of Banking77, embedded
once by the real ONNX encoder, five review rounds per queue through the real gate, the ceiling and
a noisy round, a JSON result and a PNG. The checks are on consistency, never on the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_run_writes_a_consistent_result_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench.retrain", "--quick", "--out-dir", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--home", str(tmp_path / "home")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (out / "retrain.png").stat().st_size > 10_000
    result = json.loads((out / "retrain.json").read_text())
    setting = result["setting"]
    assert setting["labels"] == 8 and setting["seed_examples"] == 8 * 10
    for queue in ("uncertainty", "random"):
        rows = result["arms"][queue]
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
        assert [r["labels_spent"] for r in rows] == [0, 20, 40, 60, 80, 100]
        for r in rows[1:]:
            assert 0.0 <= r["answered_alone"] <= 1.0
            gate = r["gate"]
            assert 0.0 <= gate["p_mid"] <= gate["p_exact"] <= 1.0
            # promoted exactly when the gate passed
            assert (r["serving"] == r["challenger"]) == gate["passed"]
    noisy = result["noisy_round"]
    assert len(noisy) == 1 and noisy[0]["noise"] == pytest.approx(0.3) and noisy[0]["round"] == 5
    assert "COMPUTED" in result["costs"]["generalist"]
    assert result["costs"]["specialist_cpu_s"] > 0
    assert 0.5 < result["ceiling"]["test_accuracy"] <= 1.0

    # a second run reads the cached embeddings and gives the same figures
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    second = json.loads((out / "retrain.json").read_text())

    def figures(res: dict) -> dict:  # everything but the wall times
        return {
            q: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
            for q, rows in res["arms"].items()
        }

    assert figures(second) == figures(result) and second["ceiling"] == result["ceiling"]
    assert "exporting" not in again.stderr
