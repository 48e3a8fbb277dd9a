"""The per-node ingress count: its default, its bounds in the Serve config, its share of the cores
and one metrics port per process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from appliance.serve.app import AppArgs, _start_metrics
from appliance.serve.metrics import ServingMetrics
from appliance.serve.node import (
    MAX_DEFAULT_INGRESS,
    MAX_INGRESS_PER_NODE,
    cores_per_ingress,
    default_ingress_per_node,
    ingress_per_node,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (96, 8)])
def test_the_default_is_one_process_per_two_cores_capped(cores: int, expected: int) -> None:
    assert default_ingress_per_node(cores) == expected
    assert ingress_per_node(None, cores) == expected
    assert ingress_per_node(3, cores) == 3  # a configured count wins


@pytest.mark.parametrize(
    ("count", "cores", "expected"), [(1, 2, 2), (2, 2, 1), (4, 2, 1), (4, 16, 4), (3, 8, 2)]
)
def test_each_process_takes_its_share_of_the_cores(count: int, cores: int, expected: int) -> None:
    assert cores_per_ingress(count, cores) == expected


@pytest.mark.parametrize("bad", [0, -1, MAX_INGRESS_PER_NODE + 1, "many", 1.5])
def test_the_serve_config_refuses_a_bad_count(bad: object) -> None:
    with pytest.raises(ValidationError, match="ingress_per_node"):
        AppArgs.model_validate({"ingress_per_node": bad})


def test_the_serve_config_takes_a_count_or_none() -> None:
    assert AppArgs.model_validate({"ingress_per_node": 4}).ingress_count == 4
    assert 1 <= AppArgs.model_validate({}).ingress_count <= MAX_DEFAULT_INGRESS


@pytest.mark.parametrize("config", ["serve/appliance.yaml", "kuberay/rayservice.yaml"])
def test_the_shipped_configs_name_the_knob(config: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / config).read_text()))
    serve = yaml.safe_load(docs[0]["spec"]["serveConfigV2"]) if "spec" in docs[0] else docs[0]
    args = serve["applications"][0]["args"]
    assert "ingress_per_node" in args
    AppArgs.model_validate(args)


def test_sibling_processes_take_the_next_metrics_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1]
        if base >= 65535:
            pytest.skip("no port above the one taken")
        port = _start_metrics(ServingMetrics(), base, processes=2)
        assert port == base + 1
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{base}: "):
            _start_metrics(ServingMetrics(), base, processes=1)


def test_appliance_serve_takes_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.cli import build_parser
    from appliance.serve.commands import app_args_from

    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))
    parser = build_parser()
    assert app_args_from(parser.parse_args(["serve", "--ingress-per-node", "3"])).ingress_count == 3
    assert app_args_from(parser.parse_args(["serve"])).ingress_per_node is None
    with pytest.raises(ValueError, match="ingress_per_node"):
        app_args_from(parser.parse_args(["serve", "--ingress-per-node", "0"]))
