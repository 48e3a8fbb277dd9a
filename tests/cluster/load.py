"""Steady Classify load through one failover channel, run inside the client's network namespace.

    python load.py ENDPOINTS SERVER_NAME CA TOKEN_FILE SECONDS CONCURRENCY OUT [MAX_REQUESTS [PAUSE_S]]

ENDPOINTS is the comma list the client balances over. Each call carries a fresh request id; one
JSON line per call goes to OUT: start and end (seconds from ``origin``, the run's start on the
machine's monotonic clock, which every namespace shares), the status code name ("OK" or the gRPC
code), the model version that answered (0: none) and the request id. Bounded by SECONDS and
MAX_REQUESTS; each caller waits PAUSE_S (default 0.02: steady, not flat out) between its calls.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc

from appliance.client import Client, Connection

TEXTS = [
    "I lost my card",
    "what is the exchange rate",
    "my top up failed",
    "how do I change my PIN",
]


def main() -> None:
    endpoints, server_name, ca, token_file, seconds, concurrency, out = sys.argv[1:8]
    limit = int(sys.argv[8]) if len(sys.argv) > 8 else 100_000
    pause = float(sys.argv[9]) if len(sys.argv) > 9 else 0.02
    token = Path(token_file).read_text().strip()
    conn = Connection(endpoints, tls=True, ca=Path(ca), token=token, server_name=server_name)
    stop_at = time.monotonic() + float(seconds)
    origin = time.monotonic()
    lock = threading.Lock()
    sent = [0]
    with Client(conn) as client, open(out, "w") as sink:

        def worker() -> None:
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= limit:
                        return
                    sent[0] += 1
                request_id = uuid.uuid4().hex
                start = time.monotonic() - origin
                version = 0
                try:
                    answer = client.classify(
                        "b8", TEXTS[sent[0] % len(TEXTS) :][:1], timeout=10, request_id=request_id
                    )
                    code, version = "OK", answer.version
                except grpc.RpcError as exc:
                    code = exc.code().name
                end = time.monotonic() - origin
                with lock:
                    sink.write(
                        json.dumps(
                            {
                                "start": start,
                                "end": end,
                                "code": code,
                                "version": version,
                                "id": request_id,
                                "origin": origin,
                            }
                        )
                        + "\n"
                    )
                    sink.flush()
                time.sleep(pause)

        threads = [threading.Thread(target=worker) for _ in range(int(concurrency))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


if __name__ == "__main__":
    main()
