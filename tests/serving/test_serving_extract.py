"""Extract over the real server: a span extractor and a classifier on one shared encoder, served by
the product's :class:`ApplianceServer` and :class:`ServingRuntime` (no Ray), called over TLS with
scoped tokens, on both APIs and from the command line.

The extractor is the factory's own (head mode on a Restaurant8k subset, tests/helpers/extractor.py);
its offline predictions (``appliance.factory.extract.load_tagger``) are the reference the served
spans must equal.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from appliance._proto.inference import grpc_service_pb2 as kpb
from appliance._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from appliance.client import AsyncClient, Client, Extracted
from appliance.dataset.spans import load_spans
from appliance.factory import pipeline
from appliance.factory.extract import load_tagger
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from appliance.types import Limits
from tests.helpers.extractor import EXTRACTOR, RESTAURANT8K, build_extractor
from tests.security.test_security_server import MODEL, LiveServer, audit_records, published_home
from tests.serving.specialists import train_subset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOOKING = "I'd like a table for 4 people on Friday at 7pm"
# Two emoji (one code point each, four UTF-8 bytes, two UTF-16 units) before the fields and
# letters outside ASCII among them: a span's offsets are right only if they count code points.
EMOJI = "🎉🎉 Table for 4 people tomorrow at 8pm please, Zoë Ünal 🍕"
# b8 again, published at the extractor's precision: the int8 gate decides per model (extractors
# often keep fp32), and only a classifier on the very same encoder can share its pass.
SHARED = "b8-shared"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The security tests' published home (b8) plus the extractor, on the same base encoder."""
    path = published_home(tmp_path_factory.getbasetemp())
    store = ModelStore(path)
    if not store.versions(EXTRACTOR):
        build_extractor(store)
    if not store.versions(SHARED):
        precision = store.load(EXTRACTOR).spec.precision
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline, "gate", lambda *_: (precision, f"{precision}: the extractor's encoder"))
            train_subset(store, SHARED, path / "work-shared")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def live(home: Path) -> Iterator[LiveServer]:
    with LiveServer(home, models=(MODEL, EXTRACTOR, SHARED)) as server:
        yield server


@pytest.fixture(scope="module")
def tokens(home: Path) -> TokenStore:
    return TokenStore(home / "tokens" / "tokens.json")


@pytest.fixture(scope="module")
def client(live: LiveServer, tokens: TokenStore) -> Iterator[Client]:
    scopes = [f"extract:{EXTRACTOR}", f"classify:{MODEL}", f"classify:{SHARED}", "models:read"]
    secret = tokens.create("extractor-user", scopes)
    with live.client(secret) as c:
        yield c


def heldout(n: int) -> tuple[list[str], list[list[str]]]:
    """Restaurant8k test texts (with their requested slots) of a few words or more."""
    data = load_spans(RESTAURANT8K / "test.json")
    chosen = [e for e in data.examples if len(e.text.split()) >= 4][:n]
    return [e.text for e in chosen], [list(e.requested_slots) for e in chosen]


def spans_of(extracted: Extracted) -> list[list[tuple[str, int, int, str]]]:
    return [[(s.label, s.start, s.end, s.text) for s in r.spans] for r in extracted.results]


def cli(home: Path, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    """The real ``appliance`` command in its own process, with ``token`` as its credential."""
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_TOKEN": token}
    command = [sys.executable, "-m", "appliance.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


# ------------------------------------------------------------------------------------ answers


def test_served_spans_equal_the_published_artifacts_offline_spans(home: Path, client: Client) -> None:
    texts, slots = heldout(40)
    texts += [BOOKING, EMOJI]
    slots += [[], []]
    _, tagger = load_tagger(EXTRACTOR, ModelStore(home))
    offline, _, truncated = tagger.predict(texts, slots)

    served = client.extract(EXTRACTOR, texts, requested_slots=slots)

    assert served.model == EXTRACTOR and served.version >= 1
    assert spans_of(served) == [[(s.label, s.start, s.end, s.text) for s in row] for row in offline]
    for result, row in zip(served.results, offline, strict=True):
        assert [s.confidence for s in result.spans] == pytest.approx([s.confidence for s in row], abs=1e-4)
        assert all(s.route == "specialist" for s in result.spans)
    assert [r.truncated for r in served.results] == truncated
    assert sum(len(r.spans) for r in served.results) >= len(texts) // 2  # a model that finds fields
    assert all(r.core_seconds > 0 and r.latency_ms > 0 for r in served.results)


def test_offsets_count_characters_of_the_text_as_sent(client: Client) -> None:
    (result,) = client.extract(EXTRACTOR, [EMOJI]).results
    assert result.spans, "the booking fields after the emoji were not found"
    for span in result.spans:
        assert EMOJI[span.start : span.end] == span.text
    after = [s for s in result.spans if s.start > EMOJI.index("Table")]
    assert after, result.spans
    # the same offsets counted in UTF-8 bytes or UTF-16 units would point elsewhere
    first = after[0]
    assert EMOJI.encode()[first.start : first.end].decode(errors="replace") != first.text
    assert EMOJI.encode("utf-16-le")[2 * first.start : 2 * first.end].decode("utf-16-le") != first.text


def test_the_requested_slots_are_context_for_a_bare_answer(client: Client) -> None:
    """ "13" is a party size when the dialogue asked for people, a time when it asked for the time."""
    data = load_spans(RESTAURANT8K / "test.json")
    bare = [e for e in data.examples if e.text.strip().isdigit() and e.requested_slots][:20]
    served = client.extract(
        EXTRACTOR, [e.text for e in bare], requested_slots=[e.requested_slots for e in bare]
    )
    labels = [[s.label for s in r.spans] for r in served.results]
    hits = sum(e.requested_slots[0] in found for e, found in zip(bare, labels, strict=True))
    assert hits >= len(bare) * 0.6, list(zip([e.requested_slots for e in bare], labels, strict=True))


# ------------------------------------------------------------------------------------ one pass


def _rows_through(registry: CollectorRegistry) -> float:
    """Rows the encoder sessions have run, over every encoder lane."""
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "appliance_batch_rows"
        for sample in metric.samples
        if sample.name.endswith("_sum")
    )


def test_classify_and_extract_in_one_call_cost_one_encoder_pass(live: LiveServer, client: Client) -> None:
    texts, _ = heldout(12)
    assert live.runtime.describe(SHARED).encoder_id == live.runtime.describe(EXTRACTOR).encoder_id
    registry = live.runtime.metrics.registry
    start = _rows_through(registry)
    both = client.extract(EXTRACTOR, texts, classify_model=SHARED, top_k=2)
    one_call = _rows_through(registry) - start
    separate_extract = client.extract(EXTRACTOR, texts)
    separate_classify = client.classify(SHARED, texts, top_k=2)
    two_calls = _rows_through(registry) - start - one_call

    assert one_call == len(texts)
    assert two_calls == 2 * len(texts)
    assert both.classify_model == SHARED and both.classify_version == separate_classify.version
    assert spans_of(both) == spans_of(separate_extract)
    for result, alone in zip(both.results, separate_classify.results, strict=True):
        assert result.classification is not None
        assert result.classification.label == alone.label
        assert [label for label, _ in result.classification.top] == [label for label, _ in alone.top]
        assert result.classification.confidence == pytest.approx(alone.confidence, abs=1e-4)


def test_with_requested_slots_the_classifier_gets_its_own_pass(live: LiveServer, client: Client) -> None:
    """Context changes the extractor's tokens, so the classifier cannot share its rows: two passes,
    and the classification is still the classifier's own."""
    texts, slots = heldout(6)
    assert any(slots), "the held-out texts carry no requested slots"
    registry = live.runtime.metrics.registry
    start = _rows_through(registry)
    both = client.extract(EXTRACTOR, texts, requested_slots=slots, classify_model=SHARED)
    assert _rows_through(registry) - start == 2 * len(texts)
    alone = client.classify(SHARED, texts)
    assert [r.classification.label for r in both.results if r.classification] == [
        r.label for r in alone.results
    ]
    assert spans_of(both) == spans_of(client.extract(EXTRACTOR, texts, requested_slots=slots))


def test_the_async_client_extracts_the_same_spans(live: LiveServer, client: Client) -> None:
    async def extract() -> Extracted:
        async with AsyncClient(client.connection) as c:
            return await c.extract(EXTRACTOR, [BOOKING, EMOJI], request_id="async-extract")

    extracted = asyncio.run(extract())
    assert extracted.request_id == "async-extract"
    assert spans_of(extracted) == spans_of(client.extract(EXTRACTOR, [BOOKING, EMOJI]))


# ------------------------------------------------------------------------------------ bad input


def test_bad_requests_get_the_classify_statuses(live: LiveServer, tokens: TokenStore) -> None:
    limits = Limits()
    client = live.client(tokens.create("extract-any-model", ["extract:*"]))  # an unknown name is in scope
    cases = {
        "unknown model": (lambda: client.extract("no-such-model", [BOOKING]), grpc.StatusCode.NOT_FOUND),
        "no texts": (lambda: client.extract(EXTRACTOR, []), grpc.StatusCode.INVALID_ARGUMENT),
        "empty text": (lambda: client.extract(EXTRACTOR, ["  "]), grpc.StatusCode.INVALID_ARGUMENT),
        "huge text": (
            lambda: client.extract(EXTRACTOR, ["a" * (limits.max_text_bytes + 1)]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "too many texts": (
            lambda: client.extract(EXTRACTOR, [BOOKING] * (limits.max_texts_per_call + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "slots for some texts": (
            lambda: client.extract(EXTRACTOR, [BOOKING, BOOKING], requested_slots=[["people"]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "no generalist": (
            lambda: client.extract(EXTRACTOR, [BOOKING], policy="generalist_only"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "expired deadline": (
            lambda: client.extract(EXTRACTOR, [BOOKING] * 64, timeout=0.001),
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ),
    }
    with client:
        got = {name: code_of(call)[0] for name, (call, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}


def test_each_kind_refuses_the_others_call_naming_its_kind(live: LiveServer, tokens: TokenStore) -> None:
    secret = tokens.create("both-kinds", [f"extract:{MODEL}", f"classify:{EXTRACTOR}"])
    with live.client(secret) as c:
        code, details = code_of(lambda: c.extract(MODEL, [BOOKING]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "classifier" in details and "Classify" in details
        code, details = code_of(lambda: c.classify(EXTRACTOR, [BOOKING]))
        assert (
            code == grpc.StatusCode.INVALID_ARGUMENT and "span_extractor" in details and "Extract" in details
        )


def test_scopes(live: LiveServer, tokens: TokenStore) -> None:
    classify_only = tokens.create("classify-only", [f"classify:{EXTRACTOR}", f"classify:{MODEL}"])
    extract_only = tokens.create("extract-only", [f"extract:{EXTRACTOR}"])
    wildcard = tokens.create("extract-any", ["extract:*"])
    with live.client(classify_only) as c:
        code, details = code_of(lambda: c.extract(EXTRACTOR, [BOOKING]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"extract:{EXTRACTOR}" in details
    with live.client(extract_only) as c:
        assert c.extract(EXTRACTOR, [BOOKING]).results[0].spans
        code, details = code_of(lambda: c.extract(EXTRACTOR, [BOOKING], classify_model=MODEL))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"classify:{MODEL}" in details
        assert code_of(lambda: c.classify(MODEL, [BOOKING]))[0] == grpc.StatusCode.PERMISSION_DENIED
    with live.client(wildcard) as c:
        assert c.extract(EXTRACTOR, [BOOKING]).model == EXTRACTOR


def test_extract_calls_are_audited(live: LiveServer, client: Client) -> None:
    before = len(audit_records(live.audit_dir))
    client.extract(EXTRACTOR, [BOOKING], request_id="extract-audit")
    code_of(lambda: client.extract(EXTRACTOR, [" "], request_id="extract-empty"))
    mine = audit_records(live.audit_dir)[before:]
    assert [(r["rpc"], r["model"], r["code"], r["request_id"]) for r in mine] == [
        ("/appliance.v1.InferenceService/Extract", EXTRACTOR, "OK", "extract-audit"),
        ("/appliance.v1.InferenceService/Extract", EXTRACTOR, "INVALID_ARGUMENT", "extract-empty"),
    ]
    assert all(r["caller"]["token"] == "extractor-user" for r in mine)  # type: ignore[index]


# ------------------------------------------------------------------------------------ KServe v2


def _kserve(live: LiveServer, secret: str) -> tuple[grpc.Channel, kpb_grpc.GRPCInferenceServiceStub]:
    conn = live.connection(secret)
    channel = grpc.secure_channel(conn.address, conn.credentials(), conn.options())
    return channel, kpb_grpc.GRPCInferenceServiceStub(channel)


def test_kserve_serves_the_extractor_with_a_spans_output(live: LiveServer, tokens: TokenStore) -> None:
    secret = tokens.create("kserve-extract", [f"extract:{EXTRACTOR}", "models:read"])
    metadata = [("authorization", f"Bearer {secret}")]
    texts = [BOOKING, EMOJI]
    channel, stub = _kserve(live, secret)
    with channel:
        described = stub.ModelMetadata(kpb.ModelMetadataRequest(name=EXTRACTOR), metadata=metadata)
        assert described.platform == "appliance_span_extractor"
        assert [(t.name, t.datatype, list(t.shape)) for t in described.outputs] == [("SPANS", "BYTES", [-1])]
        assert [(t.name, t.datatype) for t in described.inputs] == [("TEXT", "BYTES")]

        request = kpb.ModelInferRequest(model_name=EXTRACTOR, id="kserve-spans")
        tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)
        response = stub.ModelInfer(request, metadata=metadata)
        assert [o.name for o in response.outputs] == ["SPANS"] and response.id == "kserve-spans"
        documents = [json.loads(b) for b in response.outputs[0].contents.bytes_contents]

        wrong = kpb.ModelInferRequest(model_name=EXTRACTOR)
        wrong.CopyFrom(request)
        wrong.outputs.add(name="LABEL")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(wrong, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "span_extractor" in (info.value.details() or "")

    with live.client(secret) as c:
        expected = spans_of(c.extract(EXTRACTOR, texts))
    assert [
        [(s["label"], s["start"], s["end"], s["text"]) for s in d["spans"]] for d in documents
    ] == expected
    assert [d["truncated"] for d in documents] == [False, False]


# ------------------------------------------------------------------------------------ command line


def test_the_extract_command_prints_json_lines(live: LiveServer, tokens: TokenStore, home: Path) -> None:
    secret = tokens.create("cli-extract", [f"extract:{EXTRACTOR}"])
    texts = home / "texts.txt"
    texts.write_text(f"{EMOJI}\n", encoding="utf-8")
    done = cli(
        home,
        "extract",
        "--model",
        EXTRACTOR,
        "--address",
        live.address,
        BOOKING,
        "--file",
        str(texts),
        token=secret,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == [BOOKING, EMOJI]
    with live.client(secret) as c:
        expected = spans_of(c.extract(EXTRACTOR, [BOOKING, EMOJI]))
    assert [[(s["label"], s["start"], s["end"], s["text"]) for s in r["spans"]] for r in rows] == expected
    assert all(r["model"].startswith(f"{EXTRACTOR}:") for r in rows)

    refused = cli(home, "extract", "--model", MODEL, "--address", live.address, BOOKING, token=secret)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
