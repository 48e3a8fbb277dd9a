"""Generate steps and a cascade at a step's own threshold, on the real vLLM engine (the tiny random
Llama of tests/generalist) in the server's process, over WorkflowService Run and RunStream."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance.config import apply_offline_env
from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_args import GeneralistArgs
from appliance.engines.tiny_llm import build_tiny_llm
from appliance.router.cascade import Cascade
from appliance.router.cost import CostModel
from appliance.router.escalations import EscalationStore
from appliance.router.metrics import RouterMetrics
from appliance.security.tokens import TokenStore
from appliance.serve.runtime import RuntimeSettings, ServingRuntime
from appliance.store import ModelStore
from appliance.workflows.store import WorkflowStore, publish_text
from tests.security.test_security_server import MODEL, PROBE, LiveServer
from tests.serving.specialists import LABELS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

apply_offline_env()

REPLY = """\
name: reply
steps:
  - id: intent
    kind: classify
    model: {model}
    policy: cascade
    threshold: 0.9999
  - id: answer
    kind: generate
    prompt: "Customer: {{{{input}}}}\\nIntent: {{{{intent.label}}}}\\nReply:"
    max_tokens: 8
"""


class GeneralistServer(LiveServer):
    """The live server with the cascade over a real vLLM engine, which also serves Generate."""

    def __init__(self, home: Path, llm: Path) -> None:
        super().__init__(home, models=(MODEL,))
        self.llm = llm

    async def _start(self) -> int:
        from appliance.api.server import ApplianceServer

        self.engine = GeneralistEngine(GeneralistArgs(path=str(self.llm), kv_cache_gib=1, enforce_eager=True))
        await self.engine.start()
        self.escalations = EscalationStore(self.home / "escalations" / "generate.db", strict=False)
        router = Cascade(
            self.engine, self.escalations, CostModel(cores=2), RouterMetrics(CollectorRegistry())
        )
        self.runtime = ServingRuntime(
            RuntimeSettings(models=self.models), store=ModelStore(self.home), router=router
        )
        self.server = ApplianceServer(self.runtime, self.settings, generalist=self.engine)
        port = await self.server.start()
        await self.runtime.start()
        return port

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:  # the server first, then the engine, both on the server's loop
            self._run(self.server.stop(grace=2.0), timeout=60)
            self.server = None
        self._run(self.engine.stop(), timeout=120)
        super().__exit__(*exc)
        self.escalations.close()


@pytest.fixture(scope="module")
def served(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneralistServer]:
    llm = build_tiny_llm(tmp_path_factory.mktemp("workflow-llm"), seed=0)
    publish_text(textwrap.dedent(REPLY).format(model=MODEL), "reply.yaml", store=WorkflowStore(home))
    with GeneralistServer(home, llm) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: GeneralistServer, tokens: TokenStore):
    secret = tokens.create("generate-user", ["workflow:reply", "generate"])
    with served.client(secret) as c:
        yield c


def test_a_generate_step_answers_as_the_generalist_does_for_its_rendered_prompt(client) -> None:
    (result,) = client.run_workflow("reply", [PROBE[0]], timeout=120).results
    intent, answer = result.steps
    label = json.loads(intent.output_json)["label"]
    # threshold 0.9999: the specialist is never that sure, so the cascade asked the generalist
    assert intent.route == pb.ROUTE_GENERALIST and label in LABELS
    assert answer.route == pb.ROUTE_GENERALIST and answer.model == "default" and answer.cost.price > 0
    prompt = f"Customer: {PROBE[0]}\nIntent: {label}\nReply:"
    direct = "".join(c.text for c in client.generate(prompt, max_tokens=8, temperature=0.0))
    assert json.loads(answer.output_json)["text"] == direct
    assert answer.started_ms >= intent.started_ms + intent.latency_ms - 1.0
    assert result.cost.price == pytest.approx(intent.cost.price + answer.cost.price)


def test_run_stream_sends_generated_text_as_it_comes_then_the_response(client) -> None:
    texts = [PROBE[0], "how do I change my PIN?"]
    events = list(client.run_workflow_stream("reply", texts, timeout=120))
    *deltas, last = events
    assert last.WhichOneof("event") == "done" and all(e.WhichOneof("event") == "delta" for e in deltas)
    for i, result in enumerate(last.done.results):
        streamed = "".join(
            e.delta.text for e in deltas if e.delta.text_index == i and e.delta.step == "answer"
        )
        assert streamed == json.loads(result.steps[1].output_json)["text"]
