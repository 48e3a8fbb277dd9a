"""Calls to one node's endpoint alone, run inside the client's network namespace.

    python node_call.py ENDPOINT SERVER_NAME CA TOKEN_FILE version
    python node_call.py ENDPOINT SERVER_NAME CA TOKEN_FILE correct REQUEST_ID [LABEL]

``version``: the b8 version that answers a Classify there (or the gRPC code). ``correct``: without
LABEL, classifies one text under REQUEST_ID and corrects the answer to its second-best label; with
LABEL, sends only that correction again. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance.client import Client, Connection

TEXT = "I lost my card"


def correct(client: Client, request_id: str, label: str) -> dict[str, object]:
    if not label:
        answer = client.classify("b8", [TEXT], top_k=2, timeout=10, request_id=request_id)
        label = answer.results[0].top[1][0]
    correction = pb.Correction(request_id=request_id, item=0, label=label, source="human:cluster-test")
    result = client.correct("b8", [correction], timeout=10).results[0]
    return {
        "request_id": request_id,
        "label": label,
        "id": result.id,
        "duplicate": result.duplicate,
        "version": result.version,
    }


def main() -> None:
    endpoint, server_name, ca, token_file, command, *rest = sys.argv[1:]
    token = Path(token_file).read_text().strip()
    conn = Connection(endpoint, tls=True, ca=Path(ca), token=token, server_name=server_name)
    with Client(conn) as client:
        if command == "version":
            try:
                out: dict[str, object] = {"version": client.classify("b8", [TEXT], timeout=5).version}
            except grpc.RpcError as exc:
                out = {"code": exc.code().name}
        else:
            out = correct(client, rest[0], rest[1] if len(rest) > 1 else "")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
