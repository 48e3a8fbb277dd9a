"""What the runtime says each configured model waits for, on the real runtime and store (no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from specialists import train_subset

from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from tests.helpers.serving import MODEL

pytestmark = [pytest.mark.integration]


def test_waiting_names_unpublished_and_broken_models_until_they_serve(home: Path, tmp_path: Path) -> None:
    store = ModelStore(home)
    broken = train_subset(store, "broken", tmp_path / "work", per_label=12)
    (broken.folder / "manifest.sig").unlink()

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        runtime = ServingRuntime(RuntimeSettings(models=(MODEL, "unpublished", "broken")), store=store)
        await runtime.start()
        at_start = runtime.waiting()
        store.remove(f"broken:{broken.version}")
        train_subset(store, "broken", tmp_path / "work-2", per_label=12)
        await runtime.load_model("broken")
        after = runtime.waiting()
        await runtime.close()
        return at_start, after

    try:
        at_start, after = asyncio.run(scenario())
    finally:  # the home is shared with the other serving tests
        for version in store.versions("broken"):
            store.remove(f"broken:{version}")
    assert set(at_start) == {"unpublished", "broken"}
    assert at_start["unpublished"].startswith("not published in ")
    assert "did not load at start" in at_start["broken"] and "unsigned" in at_start["broken"]
    assert set(after) == {"unpublished"}
