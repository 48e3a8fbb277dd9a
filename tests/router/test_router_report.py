"""``appliance report`` over a database filled with known decisions, checked against hand sums."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.router.escalations import DecisionRecord, EscalationStore
from appliance.types import Cost

HOUR = 3600.0


def fill(db: Path, now: float) -> None:
    spec = Cost(core_seconds=0.02, price=0.00001)
    gen = Cost(core_seconds=1.0, price=0.0005)

    def row(model: str, route: str, cost: Cost, hours_ago: float, **kw: object) -> DecisionRecord:
        return DecisionRecord(
            model, 1, route, "cascade", cost, 2.0, "req", created_epoch=now - hours_ago * HOUR, **kw
        )

    rows = (
        # model bank, within the last 24 hours: 6 specialist, 1 fallback, 2 generalist
        [row("bank", "specialist", spec, 1)] * 6
        + [row("bank", "specialist", spec, 1, fallback=True)]
        + [row("bank", "generalist", gen, 2, escalation_id="e")] * 2
        # another model, same window
        + [row("other", "generalist", gen, 1)]
        # bank, two days ago: outside the default window
        + [row("bank", "specialist", spec, 48)] * 10
    )
    with EscalationStore(db) as store:
        store.record_decisions(rows)


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["report", *args, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_rates_and_costs_for_one_model_match_the_hand_computed_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "e.db"
    fill(db, time.time())
    got = report_json(capsys, "--db", str(db), "--model", "bank")
    assert got["decisions"] == 9
    assert got["automation_rate"] == pytest.approx(7 / 9)
    assert got["escalation_rate"] == pytest.approx(2 / 9)
    assert got["fallbacks"] == 1
    assert got["currency"] == "USD"
    routes = got["routes"]
    assert routes["specialist"]["decisions"] == 7
    assert routes["specialist"]["price_per_1000"] == pytest.approx(1000 * 7 * 0.00001 / 7)  # 0.01
    assert routes["specialist"]["core_seconds_per_1000"] == pytest.approx(20.0)
    assert routes["generalist"]["price_per_1000"] == pytest.approx(0.5)
    assert routes["generalist"]["core_seconds_per_1000"] == pytest.approx(1000.0)
    assert got["total"]["price_per_1000"] == pytest.approx(1000 * (7 * 0.00001 + 2 * 0.0005) / 9)
    assert got["total"]["price"] == pytest.approx(7 * 0.00001 + 2 * 0.0005)


def test_all_models_and_a_longer_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "e.db"
    now = time.time()
    fill(db, now)
    assert report_json(capsys, "--db", str(db))["decisions"] == 10  # both models, last 24 h
    wide = report_json(capsys, "--db", str(db), "--hours", "72")
    assert wide["decisions"] == 20
    assert wide["automation_rate"] == pytest.approx(17 / 20)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 1.5 * HOUR))
    narrow = report_json(capsys, "--db", str(db), "--since", since)
    assert narrow["decisions"] == 8  # the 7 bank specialist rows and the other model's one
    assert narrow["escalation_rate"] == pytest.approx(1 / 8)


def test_the_text_report_shows_the_rates_and_the_cost_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "e.db"
    fill(db, time.time())
    assert main(["report", "--db", str(db), "--model", "bank"]) == 0
    out = capsys.readouterr().out
    assert "automation  77.8%  (7 answered by the specialist alone, 1 of them fallbacks)" in out
    assert "escalation  22.2%  (2 answered by the generalist)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-3:]}
    assert rows["specialist"] == ["7", "20.000", "0.000", "0.010000"]
    assert rows["generalist"] == ["2", "1000.000", "0.000", "0.500000"]
    assert rows["all"][0] == "9"


def test_the_default_database_lives_under_appliance_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    fill(tmp_path / "home" / "escalations" / "escalations.db", time.time())
    assert report_json(capsys)["decisions"] == 10


def test_an_empty_window_reports_no_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "e.db"
    fill(db, time.time())
    got = report_json(capsys, "--db", str(db), "--model", "nobody")
    assert (got["decisions"], got["automation_rate"], got["escalation_rate"]) == (0, None, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "{tmp}/missing.db"], "no escalation database at"),
        (["--since", "yesterday"], "is not an ISO 8601 time"),
        (["--hours", "0"], "--hours must be positive"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    db = tmp_path / "e.db"
    fill(db, time.time())
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--db" not in args:
        args += ["--db", str(db)]
    assert main(["report", *args]) == 1
    assert message in capsys.readouterr().err
