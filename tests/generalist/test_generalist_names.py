"""Several generalists from the command line and the Serve config: names, merging, refusals."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from appliance.cli import build_parser
from appliance.errors import InvalidArgument
from appliance.serve.app import AppArgs, generalist_costs
from appliance.serve.commands import app_args_from
from tests.generalist.test_generalist_args import model_folder


def parsed(*argv: str) -> AppArgs:
    return app_args_from(build_parser().parse_args(["serve", *argv]))


def test_a_bare_path_is_default_and_named_ones_are_listed(tmp_path: Path) -> None:
    small = model_folder(tmp_path / "small", max_position_embeddings=1024)
    large = model_folder(tmp_path / "large", max_position_embeddings=2048)
    args = parsed("--generalist", str(small), "--generalist", f"large={large}")
    assert args.generalist is not None and (args.generalist.name, args.generalist.path) == (
        "default",
        str(small),
    )
    assert [(g.name, g.path) for g in args.generalists] == [("large", str(large))]
    assert [g.name for g in args.all_generalists()] == ["default", "large"]
    # the window flag applies to the generalists given on the command line
    both = parsed(
        "--generalist", f"a={small}", "--generalist", f"b={large}", "--generalist-max-model-len", "512"
    )
    assert [g.window() for g in both.all_generalists()] == [512, 512]


def test_flags_override_the_config_by_name_and_keep_its_other_settings(tmp_path: Path) -> None:
    first = model_folder(tmp_path / "first")
    second = model_folder(tmp_path / "second")
    replaced = model_folder(tmp_path / "replaced")
    config = tmp_path / "serve.yaml"
    generalists = [{"name": "large", "path": str(second), "num_replicas": 2, "price_per_hour": 6.0}]
    app = {
        "generalist": {"path": str(first)},
        "generalists": generalists,
        "escalation": {"b8": {"generalist": "large"}},
    }
    config.write_text(yaml.safe_dump({"applications": [{"args": app}]}))
    args = parsed("--config", str(config), "--generalist", f"large={replaced}")
    large = args.generalists[0]
    assert (large.path, large.num_replicas, large.price_per_hour) == (str(replaced), 2, 6.0)
    assert args.generalist is not None and args.generalist.path == str(first)
    box, own = generalist_costs(args)
    assert own["large"].price_per_hour == 6.0 and box.price_per_hour == args.price_per_hour
    assert "default" not in own  # priced as the box


def test_bad_names_and_settings_are_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    with pytest.raises(InvalidArgument, match="names default more than once"):
        parsed("--generalist", str(folder), "--generalist", f"default={folder}")
    with pytest.raises(pydantic.ValidationError, match="generalist names must be distinct"):
        AppArgs.model_validate({"generalist": {"path": str(folder)}, "generalists": [{"path": str(folder)}]})
    with pytest.raises(pydantic.ValidationError, match="pattern"):
        parsed("--generalist", f"Big Model={folder}")
    with pytest.raises(pydantic.ValidationError, match=r"escalation\.b8\.generalist names 'huge'"):
        AppArgs.model_validate(
            {"generalist": {"path": str(folder)}, "escalation": {"b8": {"generalist": "huge"}}}
        )
    with pytest.raises(pydantic.ValidationError):
        AppArgs.model_validate({"escalation": {"b8": {"demonstrations": 99}}})
    with pytest.raises(InvalidArgument, match="needs a generalist"):
        parsed("--generalist-max-model-len", "512")
