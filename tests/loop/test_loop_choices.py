"""The durable shadow choice, the serving history that rollback replays, the shadow runner's
bounded queue (drops, never waits) and the follower that keeps a replica on the recorded choice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.errors import FailedPrecondition, InvalidArgument, NotFound
from appliance.loop import follow
from appliance.loop.choices import (
    ServingChange,
    ShadowChoice,
    append_history,
    champions,
    read_history,
    read_shadow,
    rollback_target,
    set_shadow,
)
from appliance.loop.follow import ChoiceFollower
from appliance.loop.promotion import rollback
from appliance.loop.shadow import ShadowRunner, ShadowStore, read_rows, text_sha256
from appliance.store import ModelStore
from appliance.types import Cost, Decision, Route, SpecialistAnswer


def _publish(store: ModelStore, name: str, *versions: int) -> None:
    for v in versions:
        folder = store.path(name, v)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")


def test_shadow_choice_round_trip_and_bad_values(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert read_shadow(store, "m") is None
    set_shadow(store, "m", ShadowChoice(3, 0.25))
    assert read_shadow(store, "m") == ShadowChoice(3, 0.25)
    set_shadow(store, "m", None)
    assert read_shadow(store, "m") is None
    (tmp_path / "models" / "m" / "SHADOW").write_text("{not json")
    assert read_shadow(store, "m") is None  # a damaged record turns shadow off, never breaks serving
    for fraction in (0.0, 1.5, -1.0):
        with pytest.raises(InvalidArgument, match="fraction"):
            ShadowChoice(2, fraction)


def test_history_stack_and_rollback_target(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "m", 1, 2, 3)
    with pytest.raises(FailedPrecondition, match="no previous champion"):
        rollback_target(store, "m", 1)
    append_history(store, "m", ServingChange(2, 1, "promote"))
    append_history(store, "m", ServingChange(3, 2, "promote", forced=True))
    assert champions(read_history(store, "m")) == [1, 2, 3]
    assert rollback_target(store, "m", 3) == 2
    append_history(store, "m", ServingChange(2, 3, "rollback"))
    assert champions(read_history(store, "m")) == [1, 2]
    assert rollback_target(store, "m", 2) == 1
    # a torn last line (a crash mid-append) is skipped
    with (tmp_path / "models" / "m" / "HISTORY.jsonl").open("a") as handle:
        handle.write('{"version": 3, "prev')
    assert len(read_history(store, "m")) == 3


def test_rollback_loads_the_previous_champion_and_records_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "m", 1, 2)
    append_history(store, "m", ServingChange(2, 1, "promote"))
    store.set_serving_version("m", 2)
    loads: list[str] = []

    def load(ref: str) -> int:
        loads.append(ref)
        store.set_serving_version("m", int(ref.split(":")[1]))  # as LoadModel records it
        return 2

    assert rollback(store, "m", load) == (1, 2)
    assert loads == ["m:1"]
    assert read_history(store, "m")[-1].action == "rollback"
    with pytest.raises(FailedPrecondition):
        rollback(store, "m", load)  # nothing before 1


class FakeRuntime:
    """The runtime's hooks, answering with a fixed label and counting core time."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.serving = {"m": 1}
        self.followed: list[tuple[str, int]] = []
        self.attempts: list[int] = []
        self.shadow_choices: dict[str, ShadowChoice | None] = {}

    async def shadow_answers(
        self, name: str, version: int, texts: Sequence[str]
    ) -> tuple[list[SpecialistAnswer], float]:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise NotFound("challenger gone")
        return [SpecialistAnswer([("b", 0.9)], None, False, 0.002, 1.0) for _ in texts], 0.8

    def served_versions(self) -> dict[str, int]:
        return dict(self.serving)

    async def follow_serving(self, name: str, version: int) -> None:
        self.attempts.append(version)
        if version == 9:
            raise FailedPrecondition("signature check failed")
        self.followed.append((name, version))
        self.serving[name] = version

    def follow_shadow(self, name: str, choice: ShadowChoice | None) -> None:
        self.shadow_choices[name] = choice


def _decisions(n: int) -> list[Decision]:
    return [Decision("a", 0.95, [("a", 0.95)], False, Route.SPECIALIST, 1.0, Cost()) for _ in range(n)]


def test_shadow_runner_records_rows_and_drops_when_full(tmp_path: Path) -> None:
    async def scenario() -> tuple[ShadowRunner, ShadowRunner]:
        runner = ShadowRunner(FakeRuntime(), ShadowStore(tmp_path / "a.db"), queue_size=8, seed=0)
        runner.set_choice("m", ShadowChoice(2, 1.0))
        runner.offer("m", 1, ["x", "y"], _decisions(2), "r1")
        runner.offer("m", 2, ["z"], _decisions(1), "r2")  # the challenger serving already: no shadow
        runner.offer("other", 1, ["z"], _decisions(1), "r3")  # no shadow for this model
        await runner.drain()
        slow = ShadowRunner(FakeRuntime(delay=0.2), ShadowStore(tmp_path / "b.db"), queue_size=2, seed=0)
        slow.set_choice("m", ShadowChoice(2, 1.0))
        started = asyncio.get_running_loop().time()
        for i in range(10):
            slow.offer("m", 1, [f"t{i}"], _decisions(1), f"s{i}")
        offered_in = asyncio.get_running_loop().time() - started
        assert offered_in < 0.05, "offering must never wait for the challenger"
        await slow.drain()
        await runner.close()
        await slow.close()
        return runner, slow

    _, slow = asyncio.run(scenario())
    rows = read_rows(tmp_path / "a.db", "m")
    assert [(r.request_id, r.item) for r in rows] == [("r1", 0), ("r1", 1)]
    assert rows[0].text_sha256 == text_sha256("x")
    assert (rows[0].champion_label, rows[0].challenger_label, rows[0].challenger_threshold) == ("a", "b", 0.8)
    assert rows[0].core_seconds == pytest.approx(0.002)
    assert slow.dropped >= 6 and slow.answered == 10 - slow.dropped
    assert len(read_rows(tmp_path / "b.db", "m")) == slow.answered


def test_shadow_fraction_samples_requests_and_failures_stay_in_shadow(tmp_path: Path) -> None:
    async def scenario() -> ShadowRunner:
        runner = ShadowRunner(FakeRuntime(), ShadowStore(tmp_path / "f.db"), queue_size=1000, seed=1)
        runner.set_choice("m", ShadowChoice(2, 0.2))
        for i in range(500):
            runner.offer("m", 1, ["x"], _decisions(1), f"r{i}")
        await runner.drain()
        failing = ShadowRunner(FakeRuntime(fail=True), ShadowStore(tmp_path / "g.db"), seed=1)
        failing.set_choice("m", ShadowChoice(2, 1.0))
        failing.offer("m", 1, ["x"], _decisions(1), "r")
        await failing.drain()
        assert failing.failed == 1
        await runner.close()
        await failing.close()
        return runner

    runner = asyncio.run(scenario())
    assert 60 <= runner.answered <= 140  # 20% of 500, binomial spread


def test_follower_switches_to_the_recorded_choice_and_keeps_serving_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    runtime = FakeRuntime()
    follower = ChoiceFollower(runtime, store, interval=0.05)

    async def scenario() -> None:
        await follower.check()
        assert runtime.followed == []  # no record: nothing to follow
        store.set_serving_version("m", 3)
        set_shadow(store, "m", ShadowChoice(4, 0.5))
        follower.start()
        await asyncio.sleep(0.3)
        assert runtime.followed == [("m", 3)]
        assert runtime.shadow_choices["m"] == ShadowChoice(4, 0.5)
        store.set_serving_version("m", 9)  # cannot load here: 3 keeps serving, tried once
        await asyncio.sleep(0.3)
        assert runtime.serving["m"] == 3 and runtime.followed == [("m", 3)]
        assert runtime.attempts == [3, 9]  # 9 tried once, not at every pass
        monkeypatch.setattr(follow, "RETRY_S", 0.0)  # after RETRY_S it is tried again
        await asyncio.sleep(0.2)
        assert runtime.attempts.count(9) >= 2 and runtime.serving["m"] == 3
        await follower.close()

    asyncio.run(scenario())
