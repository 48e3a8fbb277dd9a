"""The generalist deployment on a real local Ray cluster and Ray Serve, called through its handle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray import serve

from appliance.config import OFFLINE_ENV
from appliance.engines.generalist_api import GenerationChunk, ZeroShotResult
from appliance.engines.generalist_args import GeneralistArgs
from appliance.errors import InvalidArgument
from appliance.serve.generalist import generalist_app

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LABELS = ["card_arrival", "exchange_rate", "refund"]


@pytest.fixture(scope="module")
def handle(tiny_llm: Path) -> Iterator[serve.handle.DeploymentHandle]:
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(OFFLINE_ENV)})
    try:
        serve.start(proxy_location="Disabled")
        args = GeneralistArgs(
            path=str(tiny_llm), max_model_len=512, kv_cache_gib=1, max_concurrency=4, enforce_eager=True
        )
        app = generalist_app(args)
        yield serve.run(app, name="generalist", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_classify_and_streaming_generate_through_the_handle(handle) -> None:
    assert handle.ready.remote().result(timeout_s=60) is True

    result = handle.classify.remote("my card still has not come", LABELS, None).result(timeout_s=120)
    assert isinstance(result, ZeroShotResult)
    assert result.label in LABELS and 0.0 < result.confidence <= 1.0

    stream = handle.options(stream=True).generate.remote({"prompt": "where is my card", "max_tokens": 12})
    chunks = list(stream)
    assert all(isinstance(c, GenerationChunk) for c in chunks)
    assert len(chunks) >= 2 and chunks[-1].finished
    assert not any(c.finished for c in chunks[:-1])
    assert chunks[-1].completion_tokens <= 12 and chunks[-1].prompt_tokens > 0


def test_engine_errors_keep_their_type_across_the_handle(handle) -> None:
    stream = handle.options(stream=True).generate.remote({"prompt": "block my card " * 400, "max_tokens": 4})
    with pytest.raises(InvalidArgument, match="window is 512"):
        list(stream)
    stream = handle.options(stream=True).generate.remote({"prompt": "hi", "top_p": 0.5})
    with pytest.raises(InvalidArgument, match="unknown generate fields"):
        list(stream)
    with pytest.raises(InvalidArgument, match="window"):
        handle.check_label_set.remote([f"intent_{i}" for i in range(300)]).result(timeout_s=60)
