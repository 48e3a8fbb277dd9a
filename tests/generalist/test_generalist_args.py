"""The generalist's settings: its window derived from the model folder, and overrides checked early.

No engine starts here: the point is that a bad window fails before vLLM loads anything. The
real engine running with a derived window is in test_generalist_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_args import DEFAULT_MAX_MODEL_LEN, GeneralistArgs, model_positions
from appliance.errors import InvalidArgument


def model_folder(root: Path, **config: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", **config}), encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("config", "window"),
    [
        ({"max_position_embeddings": 1024}, 1024),  # the model allows less than the default
        ({"max_position_embeddings": 32768}, DEFAULT_MAX_MODEL_LEN),  # more: the default
        ({"n_positions": 512}, 512),  # GPT-2's spelling
        ({"max_position_embeddings": 4096, "seq_length": 768}, 768),  # the tighter bound
        ({"text_config": {"max_position_embeddings": 640}}, 640),  # a multimodal checkpoint
        ({}, DEFAULT_MAX_MODEL_LEN),  # no bound named: the default, and vLLM has the last word
    ],
)
def test_the_window_is_the_smaller_of_the_default_and_the_model(
    tmp_path: Path, config: dict[str, object], window: int
) -> None:
    args = GeneralistArgs(path=str(model_folder(tmp_path / "m", **config)))
    assert args.window() == window


def test_an_explicit_window_may_shrink_it_but_not_exceed_the_model(tmp_path: Path) -> None:
    path = str(model_folder(tmp_path / "m", max_position_embeddings=1024))
    assert GeneralistArgs(path=path, max_model_len=512).window() == 512
    assert GeneralistArgs(path=path, max_model_len=1024).window() == 1024
    with pytest.raises(InvalidArgument, match=r"max_model_len 4096 is more than the 1024 positions"):
        GeneralistArgs(path=path, max_model_len=4096).window()


def test_the_engine_refuses_a_window_the_model_cannot_take_before_vllm_starts(tmp_path: Path) -> None:
    path = str(model_folder(tmp_path / "m", max_position_embeddings=1024))
    with pytest.raises(InvalidArgument, match="1024 positions"):
        GeneralistEngine(GeneralistArgs(path=path, max_model_len=2048))
    assert GeneralistEngine(GeneralistArgs(path=path)).max_model_len == 1024
    with pytest.raises(InvalidArgument, match="not a model folder"):
        GeneralistEngine(GeneralistArgs(path=str(tmp_path / "empty")))


def test_unreadable_configs_and_bad_settings_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="cannot read"):
        model_positions(broken)
    for bad in (
        {"max_model_len": 8},
        {"kv_cache_gib": 0},
        {"max_concurrency": 0},
        {"num_gpus": 2, "tensor_parallel_size": 1},
        {"max_num_seqs": 4},  # not a field
    ):
        with pytest.raises(pydantic.ValidationError):
            GeneralistArgs(path=str(tmp_path), **bad)


def test_serve_refuses_a_window_larger_than_the_model_before_starting_anything(tmp_path: Path) -> None:
    model = model_folder(tmp_path / "llm", max_position_embeddings=1024)
    home = tmp_path / "home"
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    command = [sys.executable, "-m", "appliance.cli", "serve", "--generalist", str(model), "--port", "0"]
    out = subprocess.run(
        [*command, "--generalist-max-model-len", "4096"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 2, out.stderr
    assert "max_model_len 4096 is more than the 1024 positions" in out.stderr
    assert not (home / "run").exists() or not any((home / "run").iterdir())  # nothing was started


def test_the_cli_passes_the_window_through_to_the_app_args(tmp_path: Path) -> None:
    from appliance.cli import build_parser
    from appliance.serve.commands import app_args_from

    model = model_folder(tmp_path / "llm", max_position_embeddings=1024)
    ns = build_parser().parse_args(["serve", "--generalist", str(model), "--generalist-max-model-len", "600"])
    args = app_args_from(ns)
    assert args.generalist is not None
    assert (args.generalist.path, args.generalist.max_model_len) == (str(model.resolve()), 600)
    assert args.generalist.window() == 600
    derived = app_args_from(build_parser().parse_args(["serve", "--generalist", str(model)]))
    assert derived.generalist is not None and derived.generalist.window() == 1024
