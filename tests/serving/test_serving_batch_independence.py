"""Through the real server, a text's answer does not depend on who else is being served.

Each text is first sent alone, one call at a time (a batch of one, no padding). Then the same
texts go in shuffled calls of 1 to 64 texts from 8 client threads at once, Classify and Embed
mixed, so the server's batcher packs texts of different calls and lengths into each encoder run.
Every label, confidence and embedding must match the lone answer. The server is the product's
``ApplianceServer`` over a ``ServingRuntime`` (no Ray), serving the published int8 b8 specialist.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from appliance.client import Client
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from tests.security.test_security_server import MODEL, LiveServer, published_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
N_TEXTS = 256
THREADS = 8
MIN_COSINE = 0.9999
MAX_CONFIDENCE_GAP = 1e-4


def banking_texts(n: int) -> list[str]:
    with (DATA / "test.csv").open(newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    return texts[:: len(texts) // n][:n]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    home = published_home(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_HOME", str(home))
        token = TokenStore(home / "tokens" / "tokens.json").create("batch-independence", ["admin"])
        with LiveServer(home) as server:
            yield server, token


def answers(client: Client, texts: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    results = client.classify(MODEL, texts).results
    vectors = np.array([e.values for e in client.embed(MODEL, texts).embeddings], dtype=np.float32)
    return [r.label for r in results], np.array([r.confidence for r in results]), vectors


def test_answers_under_concurrent_mixed_batches_equal_the_lone_answers(live: tuple[LiveServer, str]) -> None:
    server, token = live
    assert ModelStore(server.home).load(MODEL).spec.precision == "int8"
    texts = banking_texts(N_TEXTS)
    with server.client(token) as client:
        lone = [answers(client, [text]) for text in texts]
    alone_labels = [a[0][0] for a in lone]
    alone_conf = np.array([a[1][0] for a in lone])
    alone_vec = np.stack([a[2][0] for a in lone])

    rng = random.Random(11)
    order = list(range(len(texts)))
    calls: list[list[int]] = []
    for _ in range(3):  # every text three times, in different company
        rng.shuffle(order)
        start = 0
        while start < len(order):
            size = rng.randint(1, 64)
            calls.append(order[start : start + size])
            start += size
    rng.shuffle(calls)

    def run(call: list[int]) -> tuple[list[int], tuple[list[str], np.ndarray, np.ndarray]]:
        with server.client(token) as client:
            return call, answers(client, [texts[i] for i in call])

    with ThreadPoolExecutor(THREADS) as pool:
        for call, (labels, confidence, vectors) in pool.map(run, calls):
            for j, i in enumerate(call):
                assert labels[j] == alone_labels[i], f"label of {texts[i]!r} moved in a call of {len(call)}"
                assert abs(confidence[j] - alone_conf[i]) <= MAX_CONFIDENCE_GAP, texts[i]
                cosine = float(vectors[j] @ alone_vec[i])
                assert cosine >= MIN_COSINE, f"{texts[i]!r}: cosine {cosine:.6f} in a call of {len(call)}"
