"""``appliance train``, ``appliance eval`` and ``appliance models``, run as a user runs them.

Each command is a real ``appliance`` process. To keep the module fast, the specialist here is
built on a small random BERT (2 layers, hidden 32, MiniLM's tokenizer) passed with ``--base``:
these tests are about the commands, their output and their refusals; the MiniLM specialist and its
accuracy are covered in test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import apply_offline_env
from appliance.factory.export import TOKENIZER_FILES
from appliance.factory.pipeline import default_base
from appliance.store import ModelStore

DATA = Path(__file__).resolve().parents[2] / "appliance" / "data" / "banking77"
LABELS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "change_pin")
APPLIANCE = [sys.executable, "-m", "appliance.cli"]
EVAL_KEYS = {
    "model",
    "n",
    "accuracy",
    "macro_f1",
    "ece",
    "threshold",
    "coverage_at_threshold",
    "precision_at_threshold",
    "precision",
}


def run(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = apply_offline_env({**os.environ, "APPLIANCE_HOME": str(home)})
    return subprocess.run(
        [*APPLIANCE, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _no_constants(name: str) -> Any:
    raise AssertionError(f"not strict JSON: {name}")


def last_json(stdout: str) -> Any:
    """The last line of stdout, parsed as strict JSON (no NaN or Infinity)."""
    lines = stdout.strip().splitlines()
    assert lines, "no output on stdout"
    return json.loads(lines[-1], parse_constant=_no_constants)


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,category") -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(header + "\n")
        handle.writelines(f'"{text}",{label}\n' for text, label in rows)
    return path


def banking_rows(source: str, per_label: int) -> list[tuple[str, str]]:
    import csv

    taken: dict[str, int] = dict.fromkeys(LABELS, 0)
    rows = []
    with (DATA / source).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            label = row["category"]
            if label in taken and taken[label] < per_label and '"' not in row["text"]:
                taken[label] += 1
                rows.append((row["text"], label))
    return rows


# -- one trained model shared by the module ---------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_base(workdir: Path) -> Path:
    """A random 2-layer BERT with MiniLM's tokenizer: a real encoder folder, exported in seconds."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = workdir / "tiny-bert"
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (default_base() / name).exists():
            shutil.copy2(default_base() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def files(workdir: Path) -> dict[str, Path]:
    return {
        "train": write_csv(workdir / "train.csv", banking_rows("train.csv", 20)),
        "test": write_csv(workdir / "test.csv", banking_rows("test.csv", 10)),
    }


@pytest.fixture(scope="module")
def home(workdir: Path) -> Path:
    return workdir / "home"


@pytest.fixture(scope="module")
def trained(home: Path, tiny_base: Path, files: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    done = run(
        home, "train", "--data", files["train"], "--eval-data", files["test"], "--label-column", "category",
        "--name", "bank4", "--base", tiny_base, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def scratch_home(home: Path, trained: subprocess.CompletedProcess[str], tmp_path: Path) -> Path:
    """A copy of the trained home, for tests that change or break it."""
    return Path(shutil.copytree(home, tmp_path / "home", symlinks=True))


# -- train and eval -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_json(trained: subprocess.CompletedProcess[str], home: Path) -> None:
    out = last_json(trained.stdout)
    assert isinstance(out, dict)
    assert out["model"] == "bank4:1"
    assert out["precision"] in {"int8", "fp32"}
    for key in ("n", "accuracy", "macro_f1", "threshold", "coverage_at_threshold", "quantization"):
        assert key in out, key
    assert out["n"] == 40
    assert out["quantization"]["decision"] == out["precision"]
    # progress went to stderr, so stdout holds the result alone
    assert "validating" in trained.stderr and "published bank4:1" in trained.stderr
    assert len(trained.stdout.strip().splitlines()) == 1
    manifest = ModelStore(home).load("bank4")
    assert out["path"] == str(manifest.folder)
    assert out["accuracy"] == manifest.data["metrics"]["accuracy"]
    assert out["precision"] == manifest.data["precision"]
    assert manifest.data["base_encoder"]["name"] == "tiny-bert"


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["bank4", "bank4:1"])
def test_eval_json(
    trained: subprocess.CompletedProcess[str], home: Path, files: dict[str, Path], ref: str
) -> None:
    done = run(home, "eval", ref, "--data", files["test"], "--label-column", "category", "--json")
    assert done.returncode == 0, done.stderr
    out = last_json(done.stdout)
    assert set(out) >= EVAL_KEYS, EVAL_KEYS - set(out)
    assert out["model"] == "bank4:1" and out["n"] == 40
    assert out["precision"] in {"int8", "fp32"}
    manifest = ModelStore(home).load("bank4").data
    assert out["precision"] == manifest["precision"]
    assert out["threshold"] == manifest["calibration"]["threshold"]
    # the same model on the same held-out file: the numbers training reported
    trained_out = last_json(trained.stdout)
    assert out["accuracy"] == pytest.approx(trained_out["accuracy"])
    assert out["macro_f1"] == pytest.approx(trained_out["macro_f1"])
    assert out["coverage_at_threshold"] == pytest.approx(manifest["calibration"]["coverage"])
    for key in ("accuracy", "macro_f1", "coverage_at_threshold"):
        assert 0.0 <= out[key] <= 1.0
    assert out["precision_at_threshold"] is None or 0.0 <= out["precision_at_threshold"] <= 1.0


@pytest.mark.slow
def test_eval_defaults_to_the_columns_the_model_was_trained_from(
    trained: subprocess.CompletedProcess[str], home: Path, files: dict[str, Path]
) -> None:
    """Trained with --label-column category: eval reads that column without being told."""
    done = run(home, "eval", "bank4", "--data", files["test"], "--json")
    assert done.returncode == 0, done.stderr
    out = last_json(done.stdout)
    assert out["n"] == 40
    assert out["accuracy"] == pytest.approx(last_json(trained.stdout)["accuracy"])
    # a column given on the command line still wins
    done = run(home, "eval", "bank4", "--data", files["test"], "--label-column", "label", "--json")
    assert done.returncode == 2 and "no label column 'label'" in done.stderr


@pytest.mark.slow
def test_eval_for_people(
    trained: subprocess.CompletedProcess[str], home: Path, files: dict[str, Path]
) -> None:
    done = run(home, "eval", "bank4", "--data", files["test"], "--label-column", "category")
    assert done.returncode == 0, done.stderr
    assert "accuracy:" in done.stdout and "model: bank4:1" in done.stdout


@pytest.mark.slow
def test_eval_refuses_labels_the_model_does_not_know(
    trained: subprocess.CompletedProcess[str], home: Path, tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "other.csv", [("where is my card", "card_arrival"), ("hi", "greeting")] * 2)
    done = run(home, "eval", "bank4", "--data", data, "--label-column", "category", "--json")
    assert done.returncode == 2
    assert "labels unknown to bank4: ['greeting']" in done.stderr
    assert done.stdout == ""


def test_json_output_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    """A metric with nothing to measure is NaN inside; on the JSON line it is null."""
    import numpy as np

    from appliance.factory.commands import _emit

    _emit(
        {"p": float("nan"), "q": np.float32("inf"), "r": [np.float64(0.5)], "n": np.int64(3), "ok": True},
        True,
    )
    assert last_json(capsys.readouterr().out) == {"p": None, "q": None, "r": [0.5], "n": 3, "ok": True}


# -- bad input: a precise message, a non-zero exit, nothing published -----------------------------------


VALID = "text,category\na,x\nb,y\nc,x\nd,y\n"
BAD_TRAIN_INPUTS = {
    "malformed": (
        'text,category\n"card not here",card_arrival\nrate,exchange_rate,extra\n"pin",change_pin\n',
        [],
        "bad.csv:3: the row has 3 fields, the header has 2",
    ),
    "missing column": (
        VALID,
        ["--label-column", "label"],
        "bad.csv:1: no label column 'label'; the header has: 'text', 'category'",
    ),
    "single label": (
        "text,category\na,x\nb,x\nc,x\n",
        [],
        "bad.csv: every row has the label 'x'; a classifier needs at least 2",
    ),
    "name is a path": (VALID, ["--name", "../../evil"], "invalid model name '../../evil'"),
    "absolute path name": (VALID, ["--name", "/tmp/evil"], "invalid model name '/tmp/evil'"),
    "target precision": (
        VALID,
        ["--target-precision", "1.5"],
        "target precision 1.5: must be in (0, 1]",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_TRAIN_INPUTS)
def test_bad_training_input_is_refused(tmp_path: Path, case: str) -> None:
    content, extra, message = BAD_TRAIN_INPUTS[case]
    data = tmp_path / "bad.csv"
    data.write_text(content)
    home = tmp_path / "home"
    args = ["train", "--data", data, "--label-column", "category", "--name", "bank", "--json", *extra]
    done = run(home, *args)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") or "error: " in done.stderr
    assert done.stdout == ""
    assert ModelStore(home).names() == []
    assert not (home / "encoders").exists()  # refused before any export
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_training_from_a_missing_or_unsupported_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = run(home, "train", "--data", tmp_path / "nope.csv", "--name", "bank")
    assert missing.returncode == 2 and "nope.csv: no such file" in missing.stderr
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    unsupported = run(home, "train", "--data", tmp_path / "data.xlsx", "--name", "bank")
    assert unsupported.returncode == 2 and "unsupported file type '.xlsx'" in unsupported.stderr
    assert ModelStore(home).names() == []


def test_eval_of_a_model_that_does_not_exist(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "y")])
    done = run(tmp_path / "home", "eval", "bank", "--data", data, "--label-column", "category")
    assert done.returncode == 2 and "error: no published model named 'bank'" in done.stderr
    done = run(tmp_path / "home", "eval", "../bank", "--data", data, "--label-column", "category")
    assert done.returncode == 2 and "invalid model name '../bank'" in done.stderr


# -- appliance models --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_list_show_rm(scratch_home: Path, tiny_base: Path, files: dict[str, Path]) -> None:
    second = run(
        scratch_home, "train", "--data", files["train"], "--label-column", "category", "--name", "bank4",
        "--base", tiny_base, "--json",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert last_json(second.stdout)["model"] == "bank4:2"
    assert "exporting" not in second.stderr  # the encoders were stored by the first run

    listed = run(scratch_home, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = last_json(listed.stdout)
    latest = ModelStore(scratch_home).load("bank4:2").data
    assert row["name"] == "bank4" and row["versions"] == [1, 2] and row["latest"] == 2
    assert row["precision"] == latest["precision"]
    assert row["accuracy"] == latest["metrics"]["accuracy"]
    table = run(scratch_home, "models", "list")
    assert table.stdout.splitlines()[0].split() == [
        "NAME",
        "LATEST",
        "VERSIONS",
        "PRECISION",
        "ACCURACY",
        "CREATED",
    ]
    assert table.stdout.splitlines()[1].split()[:3] == ["bank4", "2", "1,2"]

    shown = run(scratch_home, "models", "show", "bank4:1")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == ModelStore(scratch_home).load("bank4:1").data
    assert json.loads(run(scratch_home, "models", "show", "bank4").stdout)["version"] == 2

    removed = run(scratch_home, "models", "rm", "bank4:1")
    assert removed.returncode == 0 and removed.stdout.strip() == "removed bank4 versions 1"
    assert ModelStore(scratch_home).versions("bank4") == [2]
    gone = run(scratch_home, "models", "show", "bank4:1")
    assert gone.returncode == 2 and "model 'bank4' has no version 1 (published: [2])" in gone.stderr

    removed = run(scratch_home, "models", "rm", "bank4")
    assert removed.returncode == 0 and removed.stdout.strip() == "removed bank4 versions 2"
    assert last_json(run(scratch_home, "models", "list", "--json").stdout) == []
    again = run(scratch_home, "models", "rm", "bank4")
    assert again.returncode == 2 and "no published model 'bank4'" in again.stderr
    # the shared encoders stay for the next specialist
    assert any((scratch_home / "encoders").iterdir())


def test_models_commands_refuse_bad_names(tmp_path: Path) -> None:
    for command in ("show", "rm"):
        done = run(tmp_path / "home", "models", command, "../../etc")
        assert done.returncode == 2 and "invalid model name '../../etc'" in done.stderr
        done = run(tmp_path / "home", "models", command, "bank:²")
        assert done.returncode == 2 and "invalid model version in 'bank:²'" in done.stderr


# -- tampering -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_edited_head_is_refused(scratch_home: Path, files: dict[str, Path]) -> None:
    head = scratch_home / "models" / "bank4" / "1" / "head.npz"
    original = head.read_bytes()
    head.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    for args in (
        ("eval", "bank4", "--data", files["test"], "--label-column", "category", "--json"),
        ("models", "show", "bank4"),
    ):
        done = run(scratch_home, *args)
        assert done.returncode == 2, args
        assert "files do not match the manifest: modified ['head.npz']" in done.stderr, done.stderr
        assert done.stdout == ""


@pytest.mark.slow
def test_an_edited_manifest_is_refused(scratch_home: Path, files: dict[str, Path]) -> None:
    path = scratch_home / "models" / "bank4" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    data["calibration"]["threshold"] = 0.0  # automate everything
    path.write_text(json.dumps(data))
    for args in (
        ("eval", "bank4", "--data", files["test"], "--label-column", "category"),
        ("models", "show", "bank4"),
    ):
        done = run(scratch_home, *args)
        assert done.returncode == 2
        assert "does not match the manifest" in done.stderr, done.stderr


@pytest.mark.slow
def test_an_edited_encoder_is_refused_by_eval(scratch_home: Path, files: dict[str, Path]) -> None:
    manifest = ModelStore(scratch_home).load("bank4").data
    onnx_file = scratch_home / "encoders" / manifest["encoder"]["id"] / "model.onnx"
    with onnx_file.open("ab") as handle:
        handle.write(b"\x00")
    done = run(scratch_home, "eval", "bank4", "--data", files["test"], "--label-column", "category")
    assert done.returncode == 2
    assert "modified ['model.onnx']" in done.stderr, done.stderr
