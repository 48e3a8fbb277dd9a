"""The KServe v2 front end, spoken to by the standard client (``tritonclient.grpc``).

A real ``grpc.aio`` server on 127.0.0.1 hosts :class:`KServeServicer` over the stand-in
:class:`KeywordBackend`; the client is Triton's, plus the generated stub for what that client
cannot send (typed contents, malformed raw bytes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from standin import LABELS, LIMITS, KeywordBackend, keyword_probs, serve_in_thread
from tritonclient.utils import InferenceServerException

from appliance._proto.inference import grpc_service_pb2 as pb
from appliance._proto.inference import grpc_service_pb2_grpc as pb_grpc
from appliance.api.kserve import KServeServicer, decode_raw_bytes, encode_raw_bytes
from appliance.errors import InvalidArgument

pytestmark = pytest.mark.integration

TEXTS = [
    "My card still has not arrived",
    "what exchange rate do you use for currency?",
    "I think my card was stolen",
    "hello there",
    "Où est ma carte ? Elle est perdue, lost 💳",
]


def _serve(backend: KeywordBackend) -> contextlib.AbstractContextManager[int]:
    servicer = KServeServicer(backend)
    return serve_in_thread(
        lambda server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    )


@pytest.fixture(scope="module")
def backend() -> KeywordBackend:
    return KeywordBackend()


@pytest.fixture(scope="module")
def port(backend: KeywordBackend) -> Iterator[int]:
    with _serve(backend) as bound:
        yield bound


@pytest.fixture(scope="module")
def client(port: int) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(f"127.0.0.1:{port}") as c:
        yield c


@pytest.fixture(scope="module")
def stub(port: int) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _text_input(texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def _typed_request(texts: list[str], **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="intents", **fields)
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    return request


def _expect_status(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    assert caught.value.status() == str(code), caught.value.message()
    return caught.value.message()


# ---------------------------------------------------------------- codec


def test_raw_bytes_round_trip_and_malformed_input() -> None:
    elements = [b"", b"a", "ü💳".encode(), b"x" * 300]
    raw = encode_raw_bytes(elements)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == b"\x01\x00\x00\x00"
    assert decode_raw_bytes(raw) == elements
    with pytest.raises(InvalidArgument, match="claims 9 bytes but only 2 remain"):
        decode_raw_bytes(b"\x09\x00\x00\x00ab")
    with pytest.raises(InvalidArgument, match="cannot hold a 4-byte length prefix"):
        decode_raw_bytes(b"\x01\x00\x00\x00a\x02\x00")


# ---------------------------------------------------------------- health and metadata


def test_liveness_readiness_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("intents")
    assert client.is_model_ready("intents", "3")
    assert not client.is_model_ready("intents", "1")  # published, but not the version serving
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "appliance"
    assert metadata["version"]


def test_model_metadata_describes_the_tensor_signature(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("intents", as_json=True)
    assert metadata["name"] == "intents"
    assert metadata["versions"] == ["1", "3"]
    assert metadata["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": ["-1"]}]
    assert metadata["outputs"] == [
        {"name": "LABEL", "datatype": "BYTES", "shape": ["-1"]},
        {"name": "SCORE", "datatype": "FP32", "shape": ["-1"]},
        {"name": "PROBS", "datatype": "FP32", "shape": ["-1", str(len(LABELS))]},
    ]
    _expect_status(grpc.StatusCode.NOT_FOUND, client.get_model_metadata, "no-such-model")
    _expect_status(grpc.StatusCode.NOT_FOUND, client.get_model_metadata, "intents", "2")
    _expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.get_model_metadata, "intents", "v2")


def test_a_cold_backend_is_live_but_not_ready() -> None:
    with (
        _serve(KeywordBackend(warm=False)) as port,
        triton.InferenceServerClient(f"127.0.0.1:{port}") as cold,
    ):
        assert cold.is_server_live()
        assert not cold.is_server_ready()
        assert not cold.is_model_ready("intents")


# ---------------------------------------------------------------- inference


def test_infer_with_raw_contents_returns_the_backends_decisions(
    client: triton.InferenceServerClient, backend: KeywordBackend
) -> None:
    result = client.infer("intents", [_text_input(TEXTS)], request_id="req-42", client_timeout=30)

    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("intents", "3", "req-42")
    assert [o.name for o in response.outputs] == ["LABEL", "SCORE", "PROBS"]
    assert len(response.raw_output_contents) == 3  # raw in, raw out

    expected = np.stack([keyword_probs(t) for t in TEXTS])
    probs = result.as_numpy("PROBS")
    assert probs.dtype == np.float32 and probs.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    labels = [label.decode() for label in result.as_numpy("LABEL")]
    assert labels == ["card_arrival", "exchange_rate", "lost_or_stolen_card", "other", "lost_or_stolen_card"]
    np.testing.assert_allclose(result.as_numpy("SCORE"), expected.max(axis=1), rtol=1e-6)

    model, texts, timeout = backend.calls[-1]
    assert (model, texts) == ("intents", TEXTS)  # UTF-8 survives the trip
    # The client's deadline reaches the backend (grpc-timeout is rounded up on the wire).
    assert timeout is not None and 0 < timeout <= 31


def test_infer_honours_the_requested_outputs_and_version(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "intents",
        [_text_input(TEXTS[:2])],
        model_version="3",
        outputs=[triton.InferRequestedOutput("SCORE"), triton.InferRequestedOutput("LABEL")],
    )
    assert [o.name for o in result.get_response().outputs] == ["SCORE", "LABEL"]
    assert result.as_numpy("PROBS") is None
    assert [label.decode() for label in result.as_numpy("LABEL")] == ["card_arrival", "exchange_rate"]


def test_typed_contents_are_answered_with_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(_typed_request(TEXTS, model_version="3", id="typed"), timeout=30)

    assert not response.raw_output_contents
    assert response.id == "typed"
    by_name = {o.name: o for o in response.outputs}
    assert list(by_name["LABEL"].shape) == [len(TEXTS)]
    assert list(by_name["PROBS"].shape) == [len(TEXTS), len(LABELS)]
    expected = np.stack([keyword_probs(t) for t in TEXTS])
    assert [b.decode() for b in by_name["LABEL"].contents.bytes_contents] == [
        LABELS[i] for i in expected.argmax(axis=1)
    ]
    np.testing.assert_allclose(by_name["SCORE"].contents.fp32_contents, expected.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(
        np.reshape(by_name["PROBS"].contents.fp32_contents, (len(TEXTS), len(LABELS))), expected, rtol=1e-6
    )


# ---------------------------------------------------------------- errors


def test_unknown_model_and_version_are_not_found(client: triton.InferenceServerClient) -> None:
    message = _expect_status(grpc.StatusCode.NOT_FOUND, client.infer, "no-such-model", [_text_input(["hi"])])
    assert "no-such-model" in message
    _expect_status(
        grpc.StatusCode.NOT_FOUND, client.infer, "intents", [_text_input(["hi"])], model_version="7"
    )
    message = _expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.infer,
        "intents",
        [_text_input(["hi"])],
        model_version="latest",
    )
    assert "positive integer" in message


@pytest.mark.parametrize(
    ("name", "shape", "datatype", "data", "complaint"),
    [
        ("QUERY", [1], "BYTES", np.array([b"hi"], dtype=object), "unknown input 'QUERY'"),
        ("TEXT", [1], "FP32", np.array([1.0], dtype=np.float32), "datatype BYTES"),
        ("TEXT", [1, 1], "BYTES", np.array([[b"hi"]], dtype=object), "shape [-1]"),
        ("TEXT", [0], "BYTES", np.array([], dtype=object), "at least one text"),
    ],
)
def test_wrong_input_tensors_are_invalid_arguments(
    client: triton.InferenceServerClient, name, shape, datatype, data, complaint
) -> None:
    tensor = triton.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(data)
    message = _expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "intents", [tensor])
    assert complaint in message


def test_unknown_output_and_backend_limits_are_invalid_arguments(
    client: triton.InferenceServerClient,
) -> None:
    message = _expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.infer,
        "intents",
        [_text_input(["hi"])],
        outputs=[triton.InferRequestedOutput("EMBEDDING")],
    )
    assert "unknown output 'EMBEDDING'" in message
    # The backend's limits, checked before any text is decoded.
    message = _expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "intents", [_text_input(["x"] * 65)]
    )
    assert "65 texts in one call; the limit is 64" in message


def test_limits_are_checked_before_any_text_is_decoded(
    stub: pb_grpc.GRPCInferenceServiceStub, backend: KeywordBackend
) -> None:
    calls = len(backend.calls)
    oversized = b"\xff" * (LIMITS.max_text_bytes + 1)  # not UTF-8 either: its size is the complaint
    typed_big = _typed_request(["ok"])
    typed_big.inputs[0].contents.bytes_contents.append(oversized)
    typed_big.inputs[0].shape[0] = 2
    raw_big = pb.ModelInferRequest(model_name="intents", raw_input_contents=[encode_raw_bytes([oversized])])
    raw_big.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    raw_three = pb.ModelInferRequest(model_name="intents", raw_input_contents=[encode_raw_bytes([b"a"] * 3)])
    raw_three.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    cases = [
        (typed_big, f"text 1 is {len(oversized)} bytes; the limit is {LIMITS.max_text_bytes} bytes"),
        (raw_big, f"text 0 is {len(oversized)} bytes; the limit is {LIMITS.max_text_bytes} bytes"),
        (_typed_request(["a"] * 65), "65 texts in one call; the limit is 64"),
        (raw_three, "shape [2] but carries more than 2 element(s)"),
    ]
    for request, complaint in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert complaint in caught.value.details()
    assert len(backend.calls) == calls  # refused in the front end, before the backend


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda r: r.raw_input_contents.append(encode_raw_bytes([b"a"])), "both typed contents and raw"),
        (lambda r: r.inputs[0].contents.bytes_contents.append(b"extra"), "carries 3 element(s)"),
        (lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b"\xff\xfe"), "not valid UTF-8"),
        (lambda r: r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]), "exactly one input"),
    ],
)
def test_malformed_requests_are_invalid_arguments(stub: pb_grpc.GRPCInferenceServiceStub, mutate, complaint):
    request = _typed_request(["a", "b"])
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in caught.value.details()


def test_malformed_raw_bytes_without_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="intents", raw_input_contents=[b"\x02\x00\x00\x00a"])
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claims 2 bytes but only 1 remain" in caught.value.details()


def test_reflection_describes_both_apis() -> None:
    from grpc_reflection.v1alpha import reflection
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from appliance._proto.appliance.v1 import appliance_pb2
    from appliance.api.kserve import reflection_pool

    names = ("inference.GRPCInferenceService", "appliance.v1.InferenceService", reflection.SERVICE_NAME)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(KeywordBackend()), server)
        reflection.enable_server_reflection(names, server, pool=reflection_pool(appliance_pb2.DESCRIPTOR))

    with serve_in_thread(register) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == set(names)
        infer = database.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert infer.name == "inference/grpc_service.proto"
        assert "ModelInfer" in [m.name for m in infer.service[0].method]
        classify = database.FindFileContainingSymbol("appliance.v1.InferenceService")
        assert classify.name == "appliance/v1/appliance.proto"
