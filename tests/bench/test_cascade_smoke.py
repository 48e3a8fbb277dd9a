"""The cascade benchmark in its quick mode, end to end: a few-shot specialist on a Banking77
subset, the real vLLM engine on the tiny random Llama for 5 escalated texts, and the real
``appliance report`` pricing both routes. The checks are on consistency, never on speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # `bench`

from bench import cascade  # noqa: E402

CATEGORIES = json.loads((REPO / "appliance" / "data" / "banking77" / "categories.json").read_text())


def float_params(path: Path) -> int:
    """Floating-point parameters stored in a safetensors file (buffers such as int64 ids excluded)."""
    with safe_open(str(path), "np") as f:
        slices = [f.get_slice(k) for k in f.keys()]  # noqa: SIM118 (safe_open is not a mapping)
        return sum(math.prod(s.get_shape()) for s in slices if s.get_dtype() in ("F32", "F16", "BF16"))


def minilm_folder() -> Path:
    from appliance.factory.pipeline import default_base

    return default_base()


# --------------------------------------------------------------------------- fast checks


def test_the_encoder_parameter_count_matches_the_shipped_weights() -> None:
    shape = cascade.EncoderShape.from_config(minilm_folder())
    assert shape.params == float_params(minilm_folder() / "model.safetensors")


def test_llama3_8b_shape_gives_its_published_parameter_count() -> None:
    assert cascade.LLAMA3_8B.params == 8_030_261_248  # meta-llama/Meta-Llama-3-8B


def test_decoder_flops_by_hand_on_a_small_shape() -> None:
    shape = cascade.DecoderShape(
        "toy", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10
    )
    per_layer = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16  # q+o, k+v, gated MLP
    assert shape.matmul_params_per_layer == per_layer
    # 3 prompt tokens, 2 generated: 4 passes through the layers, positions attend to 1..4.
    expected = 2 * 2 * per_layer * 4 + 4 * 2 * 8 * (1 + 2 + 3 + 4) + 2 * 10 * 8 * 2
    assert shape.flops(3, 2) == expected
    assert shape.flops_rule_of_thumb(3, 2) == 2 * shape.params * 5


def test_encoder_flops_grow_with_the_square_of_the_length_only_through_attention() -> None:
    shape = cascade.EncoderShape.from_config(minilm_folder())
    linear = 2 * shape.layers * shape.matmul_params_per_layer
    head = 2 * shape.hidden * 77
    for n in (1, 16, 128):
        assert shape.flops(n, 77) == linear * n + 4 * shape.layers * shape.hidden * n * n + head


def test_wilson_interval_brackets_the_proportion() -> None:
    assert cascade.wilson(0, 5)[0] == 0.0 and 0.4 < cascade.wilson(0, 5)[1] < 0.45
    low, high = cascade.wilson(50, 100)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)


def test_bad_assumed_accuracy_is_refused_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.cascade", "--assumed-generalist-accuracy", "0.6,1.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "must lie in [0, 1]" in done.stderr


# --------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    home = tmp_path_factory.mktemp("cascade-home")
    out = home / "cascade.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cascade",
            "--quick",
            "--json",
            "--json-out",
            str(out),
            "--home",
            str(home),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    last_line = json.loads(done.stdout.strip().splitlines()[-1])
    return last_line, json.loads(out.read_text()), home


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_prints_and_writes_the_same_result(quick: tuple[dict, dict, Path]) -> None:
    printed, written, _ = quick
    assert printed == written
    assert printed["quick"] is True and printed["routes_seen"] == ["generalist", "specialist"]


@pytest.mark.slow
@pytest.mark.integration
def test_accuracy_figures_add_up(quick: tuple[dict, dict, Path]) -> None:
    result, _, _ = quick
    acc = result["accuracy"]
    assert acc["test_texts"] == 4 * len(CATEGORIES)
    assert acc["automated"] + acc["escalated"] == acc["test_texts"]
    assert acc["automation_rate"] == pytest.approx(acc["automated"] / acc["test_texts"])
    assert acc["threshold"] == result["manifest_calibration"]["threshold"]

    sample = result["sample"]
    assert len(sample) == acc["generalist_sample"] == min(5, acc["escalated"])
    assert all(row["generalist"] in CATEGORIES and row["truth"] in CATEGORIES for row in sample)
    hits = sum(row["generalist"] == row["truth"] for row in sample)
    assert acc["generalist_correct"] == hits
    assert acc["generalist_accuracy_escalated"] == pytest.approx(hits / len(sample))

    cov = acc["automation_rate"]
    expected = cov * acc["specialist_accuracy_automated"] + (1 - cov) * acc["generalist_accuracy_escalated"]
    assert acc["end_to_end_accuracy"] == pytest.approx(expected)
    low, high = acc["end_to_end_accuracy_ci95"]
    assert low <= acc["end_to_end_accuracy"] <= high
    for row in acc["assumed"]:
        assert row["computed"] is True
        a = row["generalist_accuracy"]
        assert row["end_to_end_accuracy"] == pytest.approx(
            cov * acc["specialist_accuracy_automated"] + (1 - cov) * a
        )
    # The specialist answering everything is the blend of its two shares.
    blended = cov * acc["specialist_accuracy_automated"] + (1 - cov) * acc["specialist_accuracy_escalated"]
    assert acc["specialist_accuracy_all"] == pytest.approx(blended)
    assert acc["test_calibrated"]["precision"] >= 0.99


@pytest.mark.slow
@pytest.mark.integration
def test_routes_are_priced_by_the_cost_model_and_the_report(quick: tuple[dict, dict, Path]) -> None:
    result, _, _ = quick
    cost, acc = result["cost"], result["accuracy"]
    rate = cost["price_per_core_second"]
    assert rate == pytest.approx(cost["price_per_hour"] / 3600 / cost["cores"])
    for route in ("specialist", "generalist_tiny"):
        assert cost[route]["core_seconds"] > 0
        assert cost[route]["price"] == pytest.approx(cost[route]["core_seconds"] * rate)

    report = cost["appliance_report"]
    assert report["specialist"]["decisions"] == acc["automated"]
    assert report["generalist"]["decisions"] == acc["generalist_sample"]
    for row in report.values():
        assert row["price_per_1000"] == pytest.approx(row["core_seconds_per_1000"] * rate)
    # A generalist decision carries the specialist's part as well as its own.
    assert report["generalist"]["core_seconds_per_1000"] > 1000 * cost["generalist_tiny"]["core_seconds"]

    tiny = cost["generalist_tiny"]
    assert tiny["prompt_tokens"] > 77 and tiny["completion_tokens"] >= 1  # every label is in the prompt


@pytest.mark.slow
@pytest.mark.integration
def test_flop_counts_follow_the_model_shapes(quick: tuple[dict, dict, Path]) -> None:
    result, _, home = quick
    shapes, cost = result["shapes"], result["cost"]
    assert shapes["generalist_tiny"]["params"] == float_params(home / "tiny_llm" / "model.safetensors")
    assert shapes["specialist_encoder"]["params"] == float_params(minilm_folder() / "model.safetensors")

    tiny, big = cost["generalist_tiny"], cost["generalist_8b_estimate"]
    assert big["prompt_tokens"] == tiny["prompt_tokens"]
    assert big["completion_tokens"] == tiny["completion_tokens"]
    decoder = cascade.DecoderShape(**{k: v for k, v in shapes["generalist_tiny"].items() if k != "params"})
    assert tiny["flops"] == pytest.approx(decoder.flops(tiny["prompt_tokens"], tiny["completion_tokens"]))
    assert big["flops"] == pytest.approx(
        cascade.LLAMA3_8B.flops(big["prompt_tokens"], big["completion_tokens"])
    )
    # The rule of thumb and the shape count agree within the embedding and attention terms.
    assert 0.7 < big["flops"] / big["flops_rule_of_thumb"] < 1.3
    assert big["flops_vs_specialist"] == pytest.approx(big["flops"] / cost["specialist"]["flops"])
    assert big["flops"] > 1000 * tiny["flops"]
    assert big["this_box_price_lower_bound"] == pytest.approx(
        big["this_box_core_seconds_lower_bound"] * cost["price_per_core_second"]
    )
