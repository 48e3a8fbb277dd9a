"""A tiny random Llama, built once per session, and an event loop that outlives single tests.

``short_llm`` is the same model with a 1024-token ``max_position_embeddings`` in its config: the
weights do not depend on it (Llama's positions are rotary), so it is a real model trained, as far
as any loader can tell, for a window shorter than the appliance's default.

The vLLM engine is bound to the event loop it first runs on, and starting it takes tens of
seconds, so a module starts one engine on its own loop and every test drives that loop.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import apply_offline_env
from appliance.engines.tiny_llm import build_tiny_llm

apply_offline_env()


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), seed=0)


SHORT_POSITIONS = 1024


@pytest.fixture(scope="session")
def short_llm(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(shutil.copytree(tiny_llm, tmp_path_factory.mktemp("short_llm") / "model"))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["max_position_embeddings"] = SHORT_POSITIONS
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
