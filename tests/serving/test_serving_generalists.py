"""Two generalists served side by side (real Ray Serve, two real vLLM engines), chosen by name.

The two are tiny random Llamas of different seeds: their answers are noise, but different noise,
which is what shows which engine answered. The second is priced at ten times the box's rate.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from appliance.config import OFFLINE_ENV
from appliance.engines.tiny_llm import build_tiny_llm
from appliance.router.cost import CostModel
from tests.helpers.serving import MODEL, App
from tests.serving.specialists import sample_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = [
    "I still have not received my card",
    "what exchange rate do you use",
    "my top up did not go through",
    "can you tell me something",
    "transfer pending",
    "refund please",
    "why was I charged twice",
    "how do I close my account",
]
BOX_PRICE = 2.0
SECOND_PRICE = 20.0


@pytest.fixture(scope="module")
def ray_cluster(home: Path) -> Iterator[None]:
    """As tests/serving/conftest.py's, with room for two generalist replicas beside the ingress."""
    import ray
    from ray import serve

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {**OFFLINE_ENV, "APPLIANCE_HOME": str(home)}},
    )
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def two(start_app, tmp_path_factory: pytest.TempPathFactory) -> App:
    common = {"max_model_len": 1024, "kv_cache_gib": 1.0, "enforce_eager": True}
    first = build_tiny_llm(tmp_path_factory.mktemp("llm-first"), seed=0)
    second = build_tiny_llm(tmp_path_factory.mktemp("llm-second"), seed=1)
    return start_app(
        "two-generalists",
        price_per_hour=BOX_PRICE,
        generalist={"path": str(first), **common},
        generalists=[{"name": "second", "path": str(second), "price_per_hour": SECOND_PRICE, **common}],
        escalation={MODEL: {"generalist": "second"}},
    )


def labels_from(app: App, generalist: str = "") -> tuple[list[str], list[float]]:
    with app.client() as client:
        out = client.classify(MODEL, TEXTS, policy="generalist_only", generalist=generalist, timeout=300)
    assert all(r.route == "generalist" for r in out.results)
    return [r.label for r in out.results], [r.price / r.core_seconds for r in out.results]


def test_the_model_escalates_to_its_named_generalist_and_a_request_may_choose(two: App) -> None:
    per_core_second = CostModel(price_per_hour=BOX_PRICE, cores=os.cpu_count() or 1).price_per_core_second
    by_setting, setting_rates = labels_from(two)
    second, second_rates = labels_from(two, "second")
    default, default_rates = labels_from(two, "default")
    assert by_setting == second  # greedy decoding: the same engine gives the same labels
    assert default != second  # two different models did answer
    # The default is priced at the box's rate; the second's engine time at ten times it (the
    # specialist's few core-seconds at the box's rate pull the ratio a little under ten).
    assert all(r == pytest.approx(per_core_second, rel=1e-6) for r in default_rates)
    assert all(5 * per_core_second < r <= 10 * per_core_second * (1 + 1e-6) for r in second_rates)
    assert setting_rates and all(r > 5 * per_core_second for r in setting_rates)


def test_an_unknown_generalist_is_invalid_argument(two: App) -> None:
    with two.client() as client, pytest.raises(grpc.RpcError) as err:
        client.classify(MODEL, TEXTS[:1], policy="cascade", generalist="third")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'third', which is not configured; known: default, second" in (err.value.details() or "")


def test_tune_gives_a_frontier_whose_chosen_mix_meets_its_target(two: App, tmp_path: Path) -> None:
    from appliance.cli import main
    from appliance.workflows.spec import load_spec
    from appliance.workflows.store import publish_text

    publish_text(
        f"name: tickets\nsteps:\n  - id: intent\n    kind: classify\n    model: {MODEL}\n", "tickets.yaml"
    )
    rows = sample_texts(per_label=3)
    data = tmp_path / "sample.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    out, png = tmp_path / "tuned.yaml", tmp_path / "frontier.png"
    target = 0.5
    argv = ["workflows", "tune", "tickets", "--data", str(data), "--target", str(target), "--json"]
    argv += ["--generalist", "default", "--generalist", "second", "--thresholds", "0.5,0.9"]
    argv += ["--address", f"127.0.0.1:{two.port}", "--out", str(out), "--plot", str(png)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(argv) == 0
    report = json.loads(stdout.getvalue().strip().splitlines()[-1])
    points = report["frontier"]
    assert [p["price_per_1000"] for p in points] == sorted(p["price_per_1000"] for p in points)
    assert [p["accuracy"] for p in points] == sorted({p["accuracy"] for p in points})
    chosen = report["chosen"]["steps"]["intent"]
    assert report["chosen"]["accuracy"] >= target
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    step = load_spec(out).step("intent")
    assert (step.policy.value, step.threshold, step.generalist) == (  # type: ignore[union-attr]
        chosen["policy"],
        chosen["threshold"],
        chosen["generalist"],
    )

    # The chosen mix's accuracy, recomputed here from the server's own answers on the same texts.
    texts, truth = [t for t, _ in rows], [label for _, label in rows]
    with two.client() as client:
        spec = client.classify(MODEL, texts, policy="specialist_only").results
        gen = {
            name: client.classify(
                MODEL, texts, policy="generalist_only", generalist=name, timeout=300
            ).results
            for name in ("default", "second")
        }
    if chosen["policy"] == "specialist":
        labels = [r.label for r in spec]
    elif chosen["policy"] == "generalist":
        labels = [r.label for r in gen[chosen["generalist"]]]
    else:
        labels = [
            s.label if s.top[0][1] >= chosen["threshold"] else g.label
            for s, g in zip(spec, gen[chosen["generalist"]], strict=True)
        ]
    right = sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)
    assert right == pytest.approx(report["chosen"]["accuracy"]) and right >= target


def test_a_workflow_step_runs_on_the_generalist_it_names(two: App) -> None:
    from appliance.workflows.store import publish_text

    publish_text(
        "name: replies\nsteps:\n"
        f"  - id: intent\n    kind: classify\n    model: {MODEL}\n    policy: generalist\n"
        "    generalist: second\n"
        "  - id: reply\n    kind: generate\n    generalist: second\n    max_tokens: 8\n"
        "    prompt: 'Reply to {{input}} about {{intent.label}}'\n",
        "replies.yaml",
    )
    with two.client() as client:
        out = client.run_workflow("replies", TEXTS[:2], timeout=300)
        direct = client.classify(MODEL, TEXTS[:2], policy="generalist_only", generalist="second", timeout=300)
    for result, answer in zip(out.results, direct.results, strict=True):
        intent, reply = result.steps
        assert json.loads(intent.output_json)["label"] == answer.label  # the second engine's answer
        assert (reply.model, reply.status) == ("second", 1) and json.loads(reply.output_json)[
            "text"
        ] is not None
