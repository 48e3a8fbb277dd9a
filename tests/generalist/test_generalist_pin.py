"""The generalist's model folder is pinned by hash and checked before the engine loads it."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.engines import model_pin
from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_args import GeneralistArgs
from appliance.errors import IntegrityError


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"max_position_embeddings": 2048}')
    (root / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "sub").mkdir()
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


def test_pin_lives_outside_the_folder_and_verifies(tmp_path: Path, keys: Path) -> None:
    model = _folder(tmp_path / "model")
    pin = model_pin.pin_model(model, keys)
    assert pin.parent == keys / "generalist" and not pin.is_relative_to(model)
    assert sorted(json.loads(pin.read_text())["files"]) == [
        "config.json",
        "model.safetensors",
        "sub/tokenizer.json",
    ]
    assert model_pin.verify_model(model, keys) == 3


def test_unpinned_folder_is_reported_as_such(tmp_path: Path, keys: Path) -> None:
    assert model_pin.verify_model(_folder(tmp_path / "model"), keys) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: (m / "model.safetensors").write_bytes(b"\x01" * 64), "model.safetensors was modified"),
        (lambda m: (m / "config.json").write_text("{}"), "config.json was modified"),
        (lambda m: (m / "sub" / "tokenizer.json").unlink(), "sub/tokenizer.json is missing"),
        (lambda m: (m / "extra.bin").write_bytes(b"x"), "extra.bin is not pinned (added)"),
    ],
)
def test_any_change_is_refused_with_the_file_named(tmp_path: Path, keys: Path, change, message: str) -> None:
    model = _folder(tmp_path / "model")
    model_pin.pin_model(model, keys)
    change(model)
    with pytest.raises(IntegrityError, match=re.escape(message)):
        model_pin.verify_model(model, keys)


def test_pin_and_verify_commands(tmp_path: Path) -> None:
    model = _folder(tmp_path / "model")
    env = {"APPLIANCE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "generalist", *argv, str(model)],
            capture_output=True, text=True, check=False, env=env,
        )  # fmt: skip

    unpinned = cli("verify")
    assert unpinned.returncode == 1 and "is not pinned" in unpinned.stderr, unpinned.stderr
    pinned = cli("pin")
    assert pinned.returncode == 0 and "3 files" in pinned.stdout, pinned.stderr
    assert cli("verify").returncode == 0
    (model / "config.json").write_text('{"max_position_embeddings": 4096}')
    refused = cli("verify")
    assert refused.returncode == 1 and "config.json was modified" in refused.stderr


@pytest.mark.slow
def test_engine_refuses_to_start_on_a_modified_tiny_llm(
    tiny_llm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine class on the real tiny Llama: the weights were changed after the pin, so
    the start stops, naming the file, before vLLM is imported or any weight is read."""
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    model = Path(shutil.copytree(tiny_llm, tmp_path / "model"))
    model_pin.pin_model(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    engine = GeneralistEngine(GeneralistArgs(path=str(model)))
    with pytest.raises(IntegrityError, match=r"model\.safetensors was modified"):
        asyncio.run(engine.start())
    assert not engine.ready
