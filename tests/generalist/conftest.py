"""A tiny random Llama, built once per session, and an event loop that outlives single tests.

The vLLM engine is bound to the event loop it first runs on, and starting it takes tens of
seconds, so a module starts one engine on its own loop and every test drives that loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import apply_offline_env
from appliance.engines.tiny_llm import build_tiny_llm

apply_offline_env()


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), seed=0)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
