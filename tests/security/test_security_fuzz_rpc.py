"""Hostile input against every RPC of the real server: random, oversized, malformed and
undecodable requests, path traversal in model names, invalid UTF-8.

After every attack the server must still classify a fixed text correctly, and the audit trail
must hold exactly one record per call that reached the server: a call grpc itself refuses for
its size (RESOURCE_EXHAUSTED, before any application code runs) is the only kind without one.
Hypothesis runs derandomized with bounded examples, so CI sees the same inputs every time.
(The data loaders are fuzzed in tests/data.)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security_server import MODEL, PROBE, LiveServer, audit_records, published_home

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.inference import grpc_service_pb2 as kpb
from appliance.security import audit
from appliance.security.tokens import TokenStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

V1 = "/appliance.v1."
METHODS = {
    "Classify": f"{V1}InferenceService/Classify",
    "Embed": f"{V1}InferenceService/Embed",
    "ListModels": f"{V1}ModelService/ListModels",
    "GetModel": f"{V1}ModelService/GetModel",
    "LoadModel": f"{V1}AdminService/LoadModel",
    "UnloadModel": f"{V1}AdminService/UnloadModel",
    "Generate": f"{V1}GenerationService/Generate",
    "ModelInfer": "/inference.GRPCInferenceService/ModelInfer",
}
STREAMING = {"Generate"}
# Statuses a hostile request may earn. UNKNOWN or INTERNAL would mean an unhandled exception;
# UNAVAILABLE or DEADLINE_EXCEEDED a server that stopped answering.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
HOSTILE_NAMES = [
    "../../etc/passwd",
    "..",
    ".",
    "a/b",
    "/etc/passwd",
    "%2e%2e%2f%2e%2e",
    "..%2f..%2fetc",
    "b8\x00../../x",
    "\x00",
    "a\\..\\..\\b",
    "~root",
    "b8:../../1",
    "b8:-1",
    "b8:0",
    "b8:99999999999999999999999",
    ":",
    "x" * 10_000,
    "模型",
    "",
]


@dataclass
class Target:
    """The live server and what a fuzzer needs to call it and account for its audit records."""

    live: LiveServer
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    models_root: Path
    audited_calls: int = 0

    def call(self, method: str, request: bytes, audited: bool = True) -> tuple[grpc.StatusCode, bytes]:
        """Send raw request bytes; returns the status and, on OK, the (first) response bytes."""
        path = METHODS[method]
        if audited:
            self.audited_calls += 1
        try:
            if method in STREAMING:
                chunks = list(self.channel.unary_stream(path)(request, metadata=self.metadata, timeout=60))
                return grpc.StatusCode.OK, chunks[0] if chunks else b""
            return grpc.StatusCode.OK, self.channel.unary_unary(path)(
                request, metadata=self.metadata, timeout=60
            )
        except grpc.RpcError as exc:
            return exc.code(), b""

    def still_serving(self) -> None:
        """The server answers a normal request correctly, and no audit record went missing."""
        code, raw = self.call(
            "Classify", pb.ClassifyRequest(model=MODEL, texts=[PROBE[0]]).SerializeToString()
        )
        assert code == grpc.StatusCode.OK
        assert pb.ClassifyResponse.FromString(raw).results[0].label == PROBE[1]
        assert len(audit_records(self.live.audit_dir)) == self.audited_calls


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    source = published_home(tmp_path_factory.getbasetemp())
    home = tmp_path_factory.mktemp("fuzz") / "home"
    shutil.copytree(source, home, ignore=shutil.ignore_patterns("audit", "tokens", "client", "run", "work"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(home))
        token = TokenStore(home / "tokens" / "tokens.json").create("fuzzer", ["admin"])
        with LiveServer(home) as live:
            conn = live.connection(token, cert=False)
            with grpc.secure_channel(conn.address, conn.credentials()) as channel:
                fuzz = Target(live, channel, tuple(conn.metadata()), home / "models")
                yield fuzz
                fuzz.still_serving()
        # the server is stopped and its trail closed: every record is there, and the chain holds
        result = audit.verify(live.audit_dir)
        assert result.ok, result.first_error
        assert result.n_records == fuzz.audited_calls


def attack(target: Target, method: str, request: bytes, audited: bool = True) -> grpc.StatusCode:
    code, _ = target.call(method, request, audited)
    target.still_serving()
    return code


# ----------------------------------------------------------------------------------- strategies

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # protobuf strings are UTF-8
names = st.one_of(st.sampled_from(HOSTILE_NAMES), texts).filter(lambda n: n.partition(":")[0] != MODEL)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)


# ---------------------------------------------------------------------------- field-level fuzzing


@FUZZ
@given(
    model=st.one_of(st.just(MODEL), names),
    batch=st.lists(texts, max_size=300),
    top_k=st.integers(0, 2**32 - 1),
    policy=int32,
    allow_fallback=st.booleans(),
    request_id=texts,
)
def test_classify_fields(target: Target, model, batch, top_k, policy, allow_fallback, request_id) -> None:
    request = pb.ClassifyRequest(
        model=model,
        texts=batch,
        top_k=top_k,
        policy=policy,
        allow_fallback=allow_fallback,
        request_id=request_id,
    )
    code, raw = target.call("Classify", request.SerializeToString())
    if code == grpc.StatusCode.OK:
        response = pb.ClassifyResponse.FromString(raw)
        assert model.partition(":")[0] == MODEL and len(response.results) == len(batch)
        assert all(r.label and 0.0 <= r.confidence <= 1.0 for r in response.results)
    else:
        assert code in REFUSALS
    target.still_serving()


@FUZZ
@given(model=st.one_of(st.just(MODEL), names), batch=st.lists(texts, max_size=300), request_id=texts)
def test_embed_fields(target: Target, model, batch, request_id) -> None:
    request = pb.EmbedRequest(model=model, texts=batch, request_id=request_id)
    code, raw = target.call("Embed", request.SerializeToString())
    if code == grpc.StatusCode.OK:
        assert len(pb.EmbedResponse.FromString(raw).embeddings) == len(batch)
    else:
        assert code in REFUSALS
    target.still_serving()


@FUZZ
@given(
    method=st.sampled_from(["GetModel", "LoadModel", "UnloadModel"]),
    name=names,
)
def test_model_names_never_reach_outside_the_store(target: Target, method: str, name: str) -> None:
    before = sorted(p.name for p in target.models_root.iterdir())
    message = {
        "GetModel": pb.GetModelRequest,
        "LoadModel": pb.LoadModelRequest,
        "UnloadModel": pb.UnloadModelRequest,
    }
    code = attack(target, method, message[method](model=name).SerializeToString())
    assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, (name, code)
    assert sorted(p.name for p in target.models_root.iterdir()) == before


tensor_contents = st.builds(
    kpb.InferTensorContents,
    bytes_contents=st.lists(st.binary(max_size=300), max_size=20),
    fp32_contents=st.lists(st.floats(width=32, allow_nan=True), max_size=5),
    int64_contents=st.lists(int64, max_size=5),
)
input_tensors = st.builds(
    kpb.ModelInferRequest.InferInputTensor,
    name=st.one_of(st.just("TEXT"), texts),
    datatype=st.sampled_from(["BYTES", "FP32", "INT64", "", "bytes", "BYTES\x00"]),
    shape=st.lists(int64, max_size=3),
    contents=tensor_contents,
)


@FUZZ
@given(
    model_name=st.one_of(st.just(MODEL), names),
    model_version=st.one_of(st.just(""), st.just("1"), texts),
    inputs=st.lists(input_tensors, max_size=3),
    outputs=st.lists(st.sampled_from(["LABEL", "SCORE", "PROBS", "OTHER", ""]), max_size=4),
    raw=st.lists(st.binary(max_size=300), max_size=2),
)
def test_kserve_model_infer_fields(target: Target, model_name, model_version, inputs, outputs, raw) -> None:
    request = kpb.ModelInferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=raw,
    )
    code, _ = target.call("ModelInfer", request.SerializeToString())
    assert code == grpc.StatusCode.OK or code in REFUSALS
    target.still_serving()


# ------------------------------------------------------------------------------ bytes on the wire


@FUZZ
@given(method=st.sampled_from(sorted(METHODS)), raw=st.binary(max_size=2048))
def test_random_bytes_as_the_serialized_request(target: Target, method: str, raw: bytes) -> None:
    code = attack(target, method, raw)
    if method == "Generate":  # this server has no generalist
        assert code in {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT}
    elif method == "ListModels":  # no fields: any well-formed bytes are a valid (empty) request
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    else:
        assert code == grpc.StatusCode.OK or code in REFUSALS


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (so it can hold anything)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"card\x80arrival", b"\xf8\x88\x80\x80\x80"]


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=lambda b: b.hex())
@pytest.mark.parametrize(
    "method, request_of",
    [
        ("Classify", lambda bad: field(1, MODEL.encode()) + field(2, bad)),  # a text
        ("Classify", lambda bad: field(1, bad) + field(2, b"hello")),  # the model name
        ("Embed", lambda bad: field(1, MODEL.encode()) + field(2, bad)),
        ("GetModel", lambda bad: field(1, bad)),
        ("LoadModel", lambda bad: field(1, bad)),
    ],
    ids=["classify-text", "classify-model", "embed-text", "get-model", "load-model"],
)
def test_invalid_utf8_in_strings_is_invalid_argument(
    target: Target, method: str, request_of: Callable[[bytes], bytes], bad: bytes
) -> None:
    assert attack(target, method, request_of(bad)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=lambda b: b.hex())
def test_invalid_utf8_in_kserve_bytes_tensors_is_invalid_argument(target: Target, bad: bytes) -> None:
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="TEXT",
        datatype="BYTES",
        shape=[2],
        contents=kpb.InferTensorContents(bytes_contents=[b"ok", bad]),
    )
    request = kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
    assert attack(target, "ModelInfer", request.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT


# ----------------------------------------------------------------------------------- big and deep


def classify_bytes(batch: list[str]) -> bytes:
    return pb.ClassifyRequest(model=MODEL, texts=batch).SerializeToString()


def infer_bytes(batch: list[bytes]) -> bytes:
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="TEXT",
        datatype="BYTES",
        shape=[len(batch)],
        contents=kpb.InferTensorContents(bytes_contents=batch),
    )
    return kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor]).SerializeToString()


BIG_AND_DEEP: dict[str, tuple[str, Callable[[], bytes]]] = {
    "10MB-in-one-text": ("Classify", lambda: classify_bytes(["card " * 2_000_000])),
    "10MB-of-texts": ("Classify", lambda: classify_bytes(["where is my card? " * 4000] * 150)),
    "100k-texts": ("Classify", lambda: classify_bytes(["card"] * 100_000)),
    "100k-embed-texts": (
        "Embed",
        lambda: pb.EmbedRequest(model=MODEL, texts=["a"] * 100_000).SerializeToString(),
    ),
    "100k-kserve-texts": ("ModelInfer", lambda: infer_bytes([b"card"] * 100_000)),
    "10MB-model-name": ("GetModel", lambda: pb.GetModelRequest(model="a" * 10_000_000).SerializeToString()),
    # 100k nested unknown groups: the parser's recursion limit, not the stack, must stop it
    "nested-groups": ("Classify", lambda: varint(99 << 3 | 3) * 100_000),
    "nested-groups-kserve": ("ModelInfer", lambda: varint(99 << 3 | 3) * 100_000),
    # a length prefix claiming far more bytes than follow
    "lying-length": ("Classify", lambda: varint(2 << 3 | 2) + varint(2**40) + b"abc"),
}


@pytest.mark.parametrize("case", sorted(BIG_AND_DEEP))
def test_big_and_deep_requests_are_refused_cleanly(target: Target, case: str) -> None:
    method, build = BIG_AND_DEEP[case]
    assert attack(target, method, build()) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_message_over_the_size_limit_is_resource_exhausted_by_grpc(target: Target) -> None:
    """40 MB against the server's 32 MiB limit: grpc refuses it before the interceptor or any
    servicer sees it, so it is the one call that leaves no audit record."""
    limit = target.live.settings.max_message_bytes
    request = classify_bytes(["my card has not arrived yet " * 1000] * 1500)
    assert len(request) > limit
    assert attack(target, "Classify", request, audited=False) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_generate_without_a_generalist_is_unimplemented(target: Target) -> None:
    request = pb.GenerateRequest(prompt="hello").SerializeToString()
    assert attack(target, "Generate", request) == grpc.StatusCode.UNIMPLEMENTED


def test_a_request_id_is_echoed_whatever_it_holds(target: Target) -> None:
    rid = "\u202e\x00" + "r" * 1000
    code, raw = target.call(
        "Classify", pb.ClassifyRequest(model=MODEL, texts=["hi"], request_id=rid).SerializeToString()
    )
    assert code == grpc.StatusCode.OK and pb.ClassifyResponse.FromString(raw).request_id == rid
    recorded = audit_records(target.live.audit_dir)[-1]["request_id"]
    assert recorded.startswith(rid[:256]) and recorded.endswith(f"[{len(rid) - 256} more characters]")
