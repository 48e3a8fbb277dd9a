"""The standard KServe v2 client, tritonclient.grpc, against the real appliance."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from specialists import LABELS

from tests.helpers.serving import MODEL, App

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def client_for(app: App) -> triton.InferenceServerClient:
    assert app.connection.ca is not None
    return triton.InferenceServerClient(
        url=app.connection.address, ssl=True, root_certificates=str(app.connection.ca)
    )


def headers(app: App) -> dict[str, str]:
    return {"authorization": f"Bearer {app.connection.token}"}


def test_metadata_and_readiness(app: App) -> None:
    client = client_for(app)
    assert client.is_server_live(headers=headers(app))
    assert client.is_model_ready(MODEL, headers=headers(app))
    meta = client.get_model_metadata(MODEL, headers=headers(app), as_json=True)
    assert meta["inputs"][0]["name"] == "TEXT" and meta["inputs"][0]["datatype"] == "BYTES"
    probs = next(o for o in meta["outputs"] if o["name"] == "PROBS")
    assert probs["shape"] == ["-1", str(len(LABELS))]


def test_infer_with_raw_contents(app: App) -> None:
    client = client_for(app)
    texts = np.array([b"my card still has not arrived", b"how do I change my pin"], dtype=object)
    inp = triton.InferInput("TEXT", [2], "BYTES")
    inp.set_data_from_numpy(texts)  # tritonclient sends raw_input_contents
    outputs = [triton.InferRequestedOutput(n) for n in ("LABEL", "SCORE", "PROBS")]
    result = client.infer(MODEL, [inp], outputs=outputs, headers=headers(app))
    labels = [x.decode() for x in result.as_numpy("LABEL")]
    with app.client() as ours:
        expected = [r.label for r in ours.classify(MODEL, [t.decode() for t in texts]).results]
    assert labels == expected
    probs = result.as_numpy("PROBS")
    assert probs.shape == (2, len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("SCORE"), probs.max(axis=1), atol=1e-5)


def test_infer_with_typed_contents(app: App) -> None:
    from appliance._proto.inference import grpc_service_pb2 as pb
    from appliance._proto.inference import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"I lost my card")
    with app.client() as ours:
        stub = pb_grpc.GRPCInferenceServiceStub(ours.channel)
        response = stub.ModelInfer(request, metadata=app.connection.metadata(), timeout=30)
        expected = ours.classify(MODEL, ["I lost my card"]).results[0].label
    by_name = {o.name: o for o in response.outputs}
    assert not response.raw_output_contents
    assert by_name["LABEL"].contents.bytes_contents[0].decode() == expected
