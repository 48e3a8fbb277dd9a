"""The generalist engine on a real vLLM engine (CPU), with the tiny random Llama.

The model folder says it has 1024 positions and no window is configured: the engine must derive
its window from the folder (the default, 2048, would not start).

One engine serves the whole module: it takes tens of seconds to start on two cores. The model is
random, so the tests check properties that hold for any model: streaming shape, usage counts,
greedy determinism, stop strings, the label constraint, and the errors for bad input.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import psutil
import pytest

from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_api import GenerationChunk
from appliance.engines.generalist_args import GeneralistArgs
from appliance.errors import InvalidArgument, ResourceExhausted, Unavailable

pytestmark = [pytest.mark.slow, pytest.mark.integration]

WINDOW = 1024  # the model folder's max_position_embeddings (conftest.SHORT_POSITIONS)
MAX_CONCURRENCY = 3
LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "refund"]
DESCRIPTIONS = {
    "card_arrival": "the customer is waiting for a card to be delivered",
    "exchange_rate": "questions about currency conversion rates",
}


@pytest.fixture(scope="module")
def engine(short_llm: Path, loop: asyncio.AbstractEventLoop) -> Iterator[GeneralistEngine]:
    args = GeneralistArgs(
        path=str(short_llm), kv_cache_gib=1, max_concurrency=MAX_CONCURRENCY, enforce_eager=True
    )
    eng = GeneralistEngine(args)
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.stop())


def collect(loop: asyncio.AbstractEventLoop, stream: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    async def drain() -> list[GenerationChunk]:
        return [chunk async for chunk in stream]

    return loop.run_until_complete(drain())


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def banking_texts(n: int) -> list[str]:
    path = resources.files("appliance") / "data" / "banking77" / "test.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = [row["text"] for row in csv.DictReader(f)]
    stride = len(rows) // n
    return rows[::stride][:n]


def test_the_window_comes_from_the_model_folder_and_vllm_runs_with_it(engine, loop) -> None:
    assert engine.max_model_len == WINDOW
    # A prompt that leaves a few tokens of room: vLLM takes it, and the output stops at the window.
    prompt = "please block my"
    while len(engine.tokenizer(prompt + " card")["input_ids"]) <= WINDOW - 4:
        prompt += " card"
    n = len(engine.tokenizer(prompt)["input_ids"])
    assert WINDOW - 6 <= n <= WINDOW - 4
    final = collect(loop, engine.generate(prompt=prompt, max_tokens=64))[-1]
    assert final.prompt_tokens == n
    assert 1 <= final.completion_tokens <= WINDOW - n
    assert final.finish_reason == ("length" if final.completion_tokens == WINDOW - n else "stop")


def test_streaming_generate_yields_deltas_then_a_final_chunk_with_usage(engine, loop) -> None:
    prompt = "my card has not arrived yet"
    chunks = collect(loop, engine.generate(prompt=prompt, max_tokens=24))
    assert len(chunks) >= 3
    assert not any(c.finished for c in chunks[:-1])
    final = chunks[-1]
    assert final.finished
    assert final.prompt_tokens == len(engine.tokenizer(prompt)["input_ids"])
    assert final.engine_seconds > 0
    if final.finish_reason == "length":
        assert final.completion_tokens == 24
    else:
        assert final.finish_reason == "stop" and 0 < final.completion_tokens < 24
    assert text_of(chunks)


def test_chat_messages_are_rendered_with_the_chat_template(engine, loop) -> None:
    messages = [
        {"role": "system", "content": "You are a bank assistant."},
        {"role": "user", "content": "How do I top up?"},
    ]
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = len(engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    final = collect(loop, engine.generate(messages=messages, max_tokens=4))[-1]
    assert final.prompt_tokens == expected
    assert final.completion_tokens <= 4


def test_max_tokens_cuts_the_greedy_output_short(engine, loop) -> None:
    prompt = "what is the exchange rate for euros"
    full = collect(loop, engine.generate(prompt=prompt, max_tokens=24))
    for limit in (1, 5, 11):
        short = collect(loop, engine.generate(prompt=prompt, max_tokens=limit))
        assert short[-1].completion_tokens <= limit
        assert text_of(full).startswith(text_of(short))
        if full[-1].completion_tokens > limit:
            assert short[-1].finish_reason == "length" and short[-1].completion_tokens == limit


def test_stop_string_ends_the_output_before_it(engine, loop) -> None:
    prompt = "I lost my card yesterday"
    full = text_of(collect(loop, engine.generate(prompt=prompt, max_tokens=32)))
    assert len(full) >= 12, f"the greedy output is too short to cut: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    chunks = collect(loop, engine.generate(prompt=prompt, max_tokens=32, stop=[stop]))
    assert text_of(chunks) == expected
    assert chunks[-1].finish_reason == "stop"


def test_classify_always_answers_with_one_of_the_labels(engine, loop) -> None:
    texts = banking_texts(20)
    assert len(set(texts)) == 20
    for text in texts:
        result = loop.run_until_complete(engine.classify(text, LABELS, DESCRIPTIONS))
        assert result.label in LABELS
        assert 0.0 < result.confidence <= 1.0
        assert result.prompt_tokens > 0 and result.completion_tokens >= 1
        assert result.engine_seconds > 0


def test_classify_is_deterministic_and_the_confidence_matches_a_two_way_choice(engine, loop) -> None:
    text = "Can I get a refund for this purchase?"
    first = loop.run_until_complete(engine.classify(text, LABELS))
    again = loop.run_until_complete(engine.classify(text, LABELS))
    assert (first.label, first.confidence) == (again.label, again.confidence)

    # With two one-character labels the constraint leaves exactly two tokens at the first step,
    # then only end-of-sequence: the answers' probabilities are p and 1 - p, so the greedy one
    # has a confidence of at least one half, and the answer is two tokens long.
    result = loop.run_until_complete(engine.classify(text, ["A", "B"]))
    assert result.label in ("A", "B")
    assert 0.5 <= result.confidence <= 1.0
    assert result.completion_tokens == 2


def test_a_prompt_longer_than_the_window_is_invalid_with_the_token_counts(engine, loop) -> None:
    prompt = "please block my card " * 300
    n = len(engine.tokenizer(prompt)["input_ids"])
    assert n > WINDOW
    with pytest.raises(InvalidArgument) as info:
        collect(loop, engine.generate(prompt=prompt, max_tokens=8))
    assert str(n) in info.value.message and str(WINDOW) in info.value.message

    with pytest.raises(InvalidArgument, match=r"is \d+ tokens.*window is 1024"):
        loop.run_until_complete(engine.classify(prompt, LABELS))


def test_bad_generate_arguments_are_invalid(engine, loop) -> None:
    bad = [
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {},
        {"prompt": ""},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": -1.0},
        {"prompt": "hi", "stop": [""]},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidArgument):
            collect(loop, engine.generate(**kwargs))


def test_more_requests_than_the_limit_are_refused_at_once(engine, loop) -> None:
    async def scenario() -> None:
        streams = [engine.generate(prompt=f"request {i}", max_tokens=200) for i in range(MAX_CONCURRENCY)]
        for stream in streams:
            await anext(stream)  # each is now admitted and holds a slot
        assert engine.in_flight == MAX_CONCURRENCY
        with pytest.raises(ResourceExhausted, match="limit"):
            await anext(engine.generate(prompt="one too many", max_tokens=4))
        with pytest.raises(ResourceExhausted):
            await engine.classify("where is my card", LABELS)
        for stream in streams:
            await stream.aclose()  # the client went away: the request is aborted, its slot freed
        assert engine.in_flight == 0
        chunks = [c async for c in engine.generate(prompt="after the rush", max_tokens=3)]
        assert chunks[-1].finished

    loop.run_until_complete(scenario())


def test_label_sets_are_checked_at_set_up_time(engine, loop) -> None:
    loop.run_until_complete(engine.check_label_set(LABELS, DESCRIPTIONS))  # fits: no error
    too_many = [f"intent_{i:04d}" for i in range(400)]
    with pytest.raises(InvalidArgument, match=r"needs \d+ tokens .* window is 1024"):
        loop.run_until_complete(engine.check_label_set(too_many))
    long_descriptions = {label: "a long description of this intent " * 30 for label in LABELS}
    with pytest.raises(InvalidArgument, match="window"):
        loop.run_until_complete(engine.check_label_set(LABELS, long_descriptions))
    for labels, descriptions in [
        (["only_one"], None),
        (["a", "a"], None),
        (["a", " b"], None),
        (["a", "b"], {"c": "not a label"}),
    ]:
        with pytest.raises(InvalidArgument):
            loop.run_until_complete(engine.check_label_set(labels, descriptions))


def test_an_engine_that_is_not_started_is_unavailable(tiny_llm, loop) -> None:
    idle = GeneralistEngine(GeneralistArgs(path=str(tiny_llm), max_model_len=WINDOW))
    assert not idle.ready
    with pytest.raises(Unavailable, match="not started"):
        loop.run_until_complete(idle.check_health())
    with pytest.raises(Unavailable):
        collect(loop, idle.generate(prompt="hello"))


def test_a_dead_engine_is_unavailable_until_restarted(engine, loop) -> None:
    # Last in the module: it kills the engine core process, as a crash would.
    loop.run_until_complete(engine.check_health())
    children = psutil.Process().children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert len(cores) == 1, [(p.name(), p.cmdline()) for p in children]
    cores[0].kill()

    async def wait_until_dead() -> None:
        deadline = time.monotonic() + 60
        while engine.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    loop.run_until_complete(wait_until_dead())
    assert not engine.ready
    with pytest.raises(Unavailable):
        loop.run_until_complete(engine.check_health())
    with pytest.raises(Unavailable):
        collect(loop, engine.generate(prompt="anyone there?", max_tokens=4))

    loop.run_until_complete(engine.restart())
    assert engine.ready
    loop.run_until_complete(engine.check_health())
    assert collect(loop, engine.generate(prompt="back again", max_tokens=4))[-1].finished
