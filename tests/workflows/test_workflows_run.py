"""Workflows over the real server: the product's ApplianceServer and ServingRuntime (no Ray) with
b8, b8-shared and the r8k extractor, called over TLS with scoped tokens, on WorkflowService, KServe
ModelInfer and the command line. What each step answers is compared with the Inference API's own
answer for the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.inference import grpc_service_pb2 as kpb
from appliance._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from appliance.workflows.runner import StepFailed, WorkflowRunner
from appliance.workflows.store import WorkflowStore, load, publish_text
from tests.helpers.extractor import EXTRACTOR
from tests.security.test_security_server import MODEL, PROBE, LiveServer, audit_records
from tests.workflows.conftest import SHARED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOST, OTHER = PROBE[0], "I'd like a table for 4 people on Friday at 7pm, what is the exchange rate?"

TICKET = """\
name: ticket
steps:
  - id: intent
    kind: classify
    model: {shared}
  - id: slots
    kind: extract
    model: {extractor}
  - id: similar
    kind: retrieve
    model: {model}
    dataset: "{dataset}"
    k: 3
  - id: lost
    kind: branch
    when: {{step: intent, label_in: [lost_or_stolen_card]}}
    then: [second]
    else: [other]
  - id: second
    kind: classify
    model: {model}
  - id: other
    kind: classify
    model: {model}
    policy: generalist
    on_failure: fallback
"""
PAIR = """\
name: {name}
steps:
  - id: intent
    kind: classify
    model: {shared}
    {after}
  - id: slots
    kind: extract
    model: {extractor}
"""
HASTY = """\
name: hasty
steps:
  - id: intent
    kind: classify
    model: {model}
  - id: similar
    kind: retrieve
    model: {model}
    dataset: "{dataset}"
    timeout: 1ms
    on_failure: skip
  - id: again
    kind: classify
    model: {model}
    after: [similar]
"""
STRICT = """\
name: strict
steps:
  - id: intent
    kind: classify
    model: {model}
  - id: escalate
    kind: classify
    model: {model}
    policy: generalist
"""


def publish(home: Path, template: str, **values: str) -> str:
    text = textwrap.dedent(template).format(shared=SHARED, extractor=EXTRACTOR, model=MODEL, **values)
    return publish_text(text, "test.yaml", store=WorkflowStore(home)).name


@pytest.fixture(scope="module")
def workflows(home: Path, dataset_digest: str) -> dict[str, str]:
    return {
        "ticket": publish(home, TICKET, dataset=dataset_digest),
        "pair": publish(home, PAIR, name="pair", after=""),
        "apart": publish(home, PAIR, name="apart", after="after: [slots]"),
        "strict": publish(home, STRICT),
        "hasty": publish(home, HASTY, dataset=dataset_digest),
    }


@pytest.fixture(scope="module")
def client(live: LiveServer, tokens: TokenStore, workflows: dict[str, str]):
    secret = tokens.create(
        "workflow-user", ["workflow:*", f"classify:{MODEL}", f"classify:{SHARED}", f"extract:{EXTRACTOR}"]
    )
    with live.client(secret) as c:
        yield c


def receipts(result: pb.WorkflowResult) -> dict[str, pb.StepReceipt]:
    return {r.step: r for r in result.steps}


def output(receipt: pb.StepReceipt) -> dict:
    return json.loads(receipt.output_json)


# ------------------------------------------------------------------------------------ answers


def test_each_step_answers_as_its_model_does_and_branches_select_steps(client) -> None:
    response = client.run_workflow("ticket", [LOST, OTHER])
    assert response.workflow == "ticket" and response.version >= 1 and len(response.results) == 2
    direct = client.classify(SHARED, [LOST, OTHER], policy="specialist_only")
    spans = client.extract(EXTRACTOR, [LOST, OTHER], policy="specialist_only")
    for result, decided, found in zip(response.results, direct.results, spans.results, strict=True):
        steps = receipts(result)
        assert [s.step for s in result.steps] == ["intent", "slots", "similar", "lost", "second", "other"]
        intent = steps["intent"]
        assert (output(intent)["label"], intent.model, intent.route) == (
            decided.label,
            SHARED,
            pb.ROUTE_SPECIALIST,
        )
        assert intent.confidence == pytest.approx(decided.confidence, abs=1e-4)
        assert [(s["label"], s["start"], s["end"]) for s in output(steps["slots"])["spans"]] == [
            (s.label, s.start, s.end) for s in found.spans
        ]
        neighbours = output(steps["similar"])["neighbours"]
        assert len(neighbours) == 3 and neighbours[0]["score"] >= neighbours[-1]["score"]
        assert result.cost.price == pytest.approx(sum(s.cost.price for s in result.steps))
        assert intent.cost.price > 0 and intent.cost.core_seconds > 0 and intent.latency_ms > 0
    lost, other = (receipts(r) for r in response.results)
    assert output(lost["similar"])["labels"][0] == "lost_or_stolen_card"
    assert output(lost["lost"]) == {"taken": "then"} and output(other["lost"]) == {"taken": "else"}
    assert (
        lost["second"].status == pb.STEP_STATUS_OK
        and output(lost["second"])["label"] == "lost_or_stolen_card"
    )
    assert (lost["other"].status, lost["other"].detail) == (pb.STEP_STATUS_SKIPPED, "branch 'lost' took then")
    assert (other["second"].status, other["second"].detail) == (
        pb.STEP_STATUS_SKIPPED,
        "branch 'lost' took else",
    )
    # generalist_only on a server without one: on_failure fallback lets the specialist answer
    assert other["other"].status == pb.STEP_STATUS_FALLBACK and other["other"].route == pb.ROUTE_SPECIALIST
    assert other["other"].detail.startswith("FAILED_PRECONDITION")
    assert response.total_cost.price == pytest.approx(sum(r.cost.price for r in response.results))


def test_independent_steps_run_at_once_and_dependent_ones_after(client) -> None:
    client.run_workflow("ticket", [LOST])  # the retrieval index is built by then
    steps = receipts(client.run_workflow("ticket", [LOST] * 8).results[0])
    first_wave = [steps[s] for s in ("intent", "slots", "similar")]
    first_done = min(s.started_ms + s.latency_ms for s in first_wave)
    assert all(s.started_ms < first_done for s in first_wave), first_wave  # they overlapped
    intent_done = steps["intent"].started_ms + steps["intent"].latency_ms
    assert steps["lost"].started_ms >= intent_done - 1.0
    assert steps["second"].started_ms >= steps["lost"].started_ms


def rows_through(live: LiveServer, model: str) -> float:
    encoder = ModelStore(live.home).load(model).encoder_id[:12]
    return (
        live.runtime.metrics.registry.get_sample_value("appliance_batch_rows_sum", {"encoder": encoder})
        or 0.0
    )


def test_classify_and_extract_on_one_encoder_share_one_pass(live: LiveServer, client) -> None:
    texts = [LOST, OTHER, "where is my new card?"]
    before = rows_through(live, EXTRACTOR)
    together = client.run_workflow("pair", texts)
    shared = rows_through(live, EXTRACTOR) - before
    apart = client.run_workflow("apart", texts)
    separate = rows_through(live, EXTRACTOR) - before - shared
    assert (shared, separate) == (len(texts), 2 * len(texts))
    for a, b in zip(together.results, apart.results, strict=True):
        assert output(receipts(a)["intent"])["label"] == output(receipts(b)["intent"])["label"]
        assert output(receipts(a)["slots"]) == output(receipts(b)["slots"])


# ------------------------------------------------------------------------------------ failures


def test_a_failing_step_fails_the_run_naming_the_step_and_its_status(client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.run_workflow("strict", [LOST])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("workflow step 'escalate' failed (FAILED_PRECONDITION):")


def test_a_step_past_its_own_timeout_follows_on_failure_skip(client) -> None:
    steps = receipts(client.run_workflow("hasty", [LOST]).results[0])
    assert steps["intent"].status == pb.STEP_STATUS_OK
    assert steps["similar"].status == pb.STEP_STATUS_FAILED and steps["similar"].detail.startswith(
        "DEADLINE_EXCEEDED"
    )
    assert (steps["again"].status, steps["again"].detail) == (
        pb.STEP_STATUS_SKIPPED,
        "needs step 'similar', which did not answer",
    )


def test_bad_input_and_unknown_workflows(client) -> None:
    for texts, code in (([], grpc.StatusCode.INVALID_ARGUMENT), (["  "], grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            client.run_workflow("ticket", texts)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as info:
        client.run_workflow("nosuchworkflow", [LOST])
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.run_workflow("ticket:99", [LOST])
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_deadline_covers_the_run_and_reaches_every_step(live: LiveServer, home: Path, client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.run_workflow("ticket", [LOST] * 64, timeout=0.02)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    runner = WorkflowRunner(live.runtime)
    ticket = load("ticket", WorkflowStore(home))
    with pytest.raises(StepFailed, match="deadline expired before step") as info:
        live._run(runner.run(ticket, [LOST], timeout=1e-6), timeout=30)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    done = live._run(runner.run(ticket, [LOST], timeout=30.0), timeout=60)
    assert [r.status for r in done.runs[0].receipts][:3] == ["ok", "ok", "ok"]


# ------------------------------------------------------------------------------------ security


def test_scopes_and_one_audit_record_with_its_steps(live: LiveServer, tokens: TokenStore, workflows) -> None:
    narrow = tokens.create("ticket-only", ["workflow:ticket"])
    models_only = tokens.create(
        "models-only", [f"classify:{MODEL}", f"classify:{SHARED}", f"extract:{EXTRACTOR}"]
    )
    with live.client(narrow) as c:
        ran = c.run_workflow("ticket", [LOST], request_id="audited-run")
        with pytest.raises(grpc.RpcError) as info:
            c.run_workflow("pair", [LOST])
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:  # a workflow scope does not reach its models
            c.classify(MODEL, [LOST], policy="specialist_only")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with live.client(models_only) as c, pytest.raises(grpc.RpcError) as info:
        c.run_workflow("ticket", [LOST])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ran.request_id == "audited-run"
    (record,) = [r for r in audit_records(live.audit_dir) if r["request_id"] == "audited-run"]
    assert (record["rpc"], record["model"], record["code"]) == (
        "/appliance.v1.WorkflowService/Run",
        "ticket",
        "OK",
    )
    steps = {s["step"]: s for s in record["steps"]}
    assert list(steps) == ["intent", "slots", "similar", "lost", "second", "other"]
    assert steps["intent"]["model"] == SHARED and steps["intent"]["statuses"] == {"ok": 1}
    assert steps["other"]["statuses"] == {"skipped": 1}


def test_kserve_model_infer_on_a_workflow(live: LiveServer, tokens: TokenStore, workflows) -> None:
    secret = tokens.create("kserve-ticket", ["workflow:ticket"])
    channel = live.client(secret).channel
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    metadata = [("authorization", f"Bearer {secret}")]
    request = kpb.ModelInferRequest(model_name="ticket", id="kserve-1")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [LOST.encode(), OTHER.encode()]
    )
    response = stub.ModelInfer(request, metadata=metadata, timeout=60)
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("RESULT", "BYTES", [2])
    documents = [json.loads(b) for b in tensor.contents.bytes_contents]
    assert documents[0]["workflow"] == "ticket" and response.model_name == "ticket"
    assert {s["step"]: s["status"] for s in documents[1]["steps"]}["other"] == "fallback"
    # the workflow scope does not open ModelInfer on a model
    request.model_name = MODEL
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()


def test_appliance_run_prints_json(live: LiveServer, home: Path, tokens: TokenStore, workflows) -> None:
    secret = tokens.create("cli-runner", ["workflow:ticket"])
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_TOKEN": secret}
    command = [sys.executable, "-m", "appliance.cli", "run", "ticket", LOST, "--address", live.address]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    steps = {s["step"]: s for s in out["results"][0]["steps"]}
    assert steps["intent"]["output"]["label"] == "lost_or_stolen_card" and out["workflow"] == "ticket"
    refused = subprocess.run(
        [*command[:4], "pair", LOST, "--address", live.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr


def test_the_report_counts_runs_routes_and_cost_per_workflow(live: LiveServer, home: Path, client) -> None:
    client.run_workflow("ticket", [LOST, OTHER])
    with pytest.raises(grpc.RpcError):
        client.run_workflow("strict", [LOST])
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    command = [sys.executable, "-m", "appliance.cli", "report", "--hours", "1", "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {row["workflow"]: row for row in json.loads(done.stdout.splitlines()[-1])["workflows"]}
    ticket = rows["ticket"]
    assert ticket["runs"] >= 2 and ticket["price_per_1000_runs"] > 0
    assert ticket["steps"]["other"]["statuses"]["fallback"] >= 1
    assert ticket["steps"]["intent"]["routes"]["specialist"] == ticket["runs"] - ticket["failed_runs"]
    assert rows["strict"]["failed_runs"] >= 1
    text = subprocess.run(command[:-1], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "workflows" in text and "ticket" in text and "per 1,000 runs" in text


def test_the_report_measures_accuracy_where_corrections_exist(live: LiveServer, home: Path, client) -> None:
    from appliance.router.escalations import CorrectionRequest
    from appliance.workflows import runs

    response = client.run_workflow("ticket", [LOST, OTHER], request_id="corrected-run")
    served = [output(receipts(r)["intent"])["label"] for r in response.results]
    live._run(live.runtime.router.flush(), timeout=30)  # decision rows are written in the background
    wrong = next(label for label in ("card_arrival", "change_pin") if label != served[1])
    for item, label in ((0, served[0]), (1, wrong)):
        request = CorrectionRequest(
            "human:test", request_id="corrected-run", item=item, model=SHARED, label=label
        )
        live.escalations.correct(request)
    now = time.time()
    (ticket,) = [
        r
        for r in runs.summarize(runs.default_db(), now - 60, now + 1, live.escalations.path)
        if r["workflow"] == "ticket"
    ]
    assert (ticket["steps"]["intent"]["corrected"], ticket["steps"]["intent"]["accuracy"]) == (2, 0.5)
