"""``appliance report NAME`` per version over known decision, correction and shadow rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.loop.shadow import ShadowRow, ShadowStore, shadow_db, text_sha256
from appliance.router.escalations import CorrectionRequest, DecisionRecord, EscalationStore
from appliance.types import Cost


def _decision(version: int, route: str, rid: str, label: str, text: str, price: float) -> DecisionRecord:
    return DecisionRecord(
        "bank", version, route, "cascade", Cost(core_seconds=0.01, price=price), 2.0, rid,
        item=0, label=label, confidence=0.9, text=text,
    )  # fmt: skip


def test_report_per_version_with_corrections_and_shadow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))
    db = tmp_path / "escalations" / "escalations.db"
    now = time.time()
    with EscalationStore(db, store_texts=True) as store:
        # v1: 3 specialist + 1 generalist; v2: 2 specialist
        rows = [_decision(1, "specialist", f"a{i}", "card", f"text {i}", 0.001) for i in range(3)]
        rows += [_decision(1, "generalist", "a3", "pin", "text 3", 0.01)]
        rows += [_decision(2, "specialist", f"b{i}", "card", f"other {i}", 0.001) for i in range(2)]
        store.record_decisions(rows)
        # reviewers: v1 was right on a0, wrong on a1 and a3; v2 wrong on b0
        for rid, label in [("a0", "card"), ("a1", "pin"), ("a3", "card"), ("b0", "pin")]:
            store.correct(
                CorrectionRequest(source="human:t", request_id=rid, item=0, model="bank", label=label)
            )
    # v2 in shadow beside v1 on a0..a2: agrees on a0, a2; right on a1 where v1 was wrong
    shadow = ShadowStore(shadow_db(tmp_path))
    shadow.write(
        [
            ShadowRow(
                now,
                "bank",
                1,
                2,
                f"a{i}",
                0,
                text_sha256(f"text {i}"),
                "card",
                "specialist",
                label,
                conf,
                0.8,
                0.004,
            )
            for i, label, conf in [(0, "card", 0.95), (1, "pin", 0.7), (2, "card", 0.9)]
        ]
    )
    shadow.close()

    assert main(["report", "bank", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    versions = {v["version"]: v for v in report["versions"]}
    v1, v2 = versions[1], versions[2]
    assert v1["decisions"] == 4 and v1["automation_rate"] == pytest.approx(0.75)
    assert v1["escalation_rate"] == pytest.approx(0.25)
    assert v1["price_per_1000"] == pytest.approx(1000 * 0.013 / 4)
    assert (v1["corrected"], v1["accuracy_on_corrected"]) == (3, pytest.approx(1 / 3))
    assert (v2["corrected"], v2["accuracy_on_corrected"]) == (1, 0.0)
    assert v1["shadow"] is None
    s = v2["shadow"]
    assert s["texts"] == 3 and s["agreement"] == pytest.approx(2 / 3)
    assert s["coverage"] == pytest.approx(2 / 3)  # 0.95 and 0.9 reach its 0.8 threshold
    assert (s["corrected"], s["accuracy_on_corrected"]) == (2, 1.0)  # a0 right, a1 right
    assert s["core_seconds_per_1000"] == pytest.approx(4.0)
    assert s["champion_versions"] == [1]

    assert main(["report", "bank"]) == 0
    text = capsys.readouterr().out
    assert "acc(corr)" in text and "agree" in text and "counted apart" in text

    assert main(["report", "bank", "--model", "other"]) == 1
    assert "two models" in capsys.readouterr().err
