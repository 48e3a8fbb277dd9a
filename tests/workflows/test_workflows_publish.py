"""Publishing workflows against a real model store: checked, versioned, signed; bad ones located
and never published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, NotFound
from appliance.store import ModelStore
from appliance.workflows.spec import WorkflowInvalid
from appliance.workflows.store import WORKFLOW_FILE, WorkflowStore, load, publish
from tests.helpers.extractor import EXTRACTOR
from tests.security.test_security_server import MODEL

pytestmark = [pytest.mark.slow]

WORKFLOW = """\
name: triage
steps:
  - id: intent
    kind: classify
    model: {model}
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
    when: {{step: intent, label_in: [lost_or_stolen_card, card_arrival]}}
    then: [reply]
  - id: reply
    kind: generate
    prompt: "{{{{input}}}} is {{{{intent.label}}}}; when: {{{{slots.time}}}}; like: {{{{similar.examples}}}}"
"""


def write(folder: Path, text: str, name: str = "w.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def stores(home: Path, tmp_path: Path) -> tuple[WorkflowStore, ModelStore]:
    return WorkflowStore(tmp_path / "wf-home"), ModelStore(home)


def good(dataset: str) -> str:
    return WORKFLOW.format(model=MODEL, extractor=EXTRACTOR, dataset=dataset)


def test_publish_checks_signs_and_versions(stores, tmp_path: Path, dataset_digest: str) -> None:
    workflows, models = stores
    path = write(tmp_path, good(dataset_digest[:12]))
    first = publish(path, store=workflows, models=models)
    second = publish(path, store=workflows, models=models)
    assert (first.ref, second.ref) == ("triage:1", "triage:2")
    assert first.manifest.data["models"] == {
        "intent": f"{MODEL}:{models.resolve(MODEL)[1]}",
        "slots": f"{EXTRACTOR}:{models.resolve(EXTRACTOR)[1]}",
        "similar": f"{MODEL}:{models.resolve(MODEL)[1]}",
    }
    loaded = load("triage", workflows)
    assert loaded.version == 2 and loaded.spec == first.spec and loaded.text == path.read_text()
    # the definition is covered by the signed manifest, as a model's files are
    (loaded.manifest.folder / WORKFLOW_FILE).write_text(loaded.text + "# edited\n", encoding="utf-8")
    with pytest.raises(IntegrityError, match="modified"):
        load("triage:2", workflows)
    assert workflows.remove("triage:2") == [2]
    assert load("triage", workflows).version == 1
    with pytest.raises(NotFound, match="workflow"):
        load("nothing", workflows)


def bad(stores, tmp_path: Path, text: str) -> list[str]:
    workflows, models = stores
    with pytest.raises(WorkflowInvalid) as info:
        publish(write(tmp_path, text), store=workflows, models=models)
    assert workflows.names() == []  # nothing published
    return [str(p).removeprefix(f"{tmp_path}/") for p in info.value.problems]


def test_an_unknown_model_or_version_is_located(stores, tmp_path: Path) -> None:
    found = bad(
        stores,
        tmp_path,
        f"""\
        name: w
        steps:
          - id: a
            kind: classify
            model: nosuchmodel
          - id: b
            kind: classify
            model: {MODEL}:999
        """,
    )
    assert found[0].startswith("w.yaml:5: step 'a': model 'nosuchmodel': no published model named")
    assert found[1].startswith(f"w.yaml:8: step 'b': model '{MODEL}:999': model '{MODEL}' has no version 999")


def test_a_condition_on_a_label_the_model_cannot_produce_is_located(stores, tmp_path: Path) -> None:
    found = bad(
        stores,
        tmp_path,
        f"""\
        name: w
        steps:
          - id: intent
            kind: classify
            model: {MODEL}
          - id: slots
            kind: extract
            model: {EXTRACTOR}
          - id: route
            kind: branch
            when:
              - {{step: intent, label_in: [card_arrival, refund_not_showing_up]}}
              - {{step: slots, field_present: shoe_size}}
            then: [intent2]
          - id: intent2
            kind: classify
            model: {MODEL}
        """,
    )
    assert len(found) == 2, found
    assert found[0].startswith(
        f"w.yaml:12: branch 'route': {MODEL}:1 (step 'intent') cannot produce label 'refund_not_showing_up'"
    )
    assert found[1].startswith(
        f"w.yaml:13: branch 'route': {EXTRACTOR}:1 (step 'slots') cannot produce slot 'shoe_size'"
    )


def test_wrong_kinds_unknown_slots_and_datasets_are_located(stores, tmp_path: Path) -> None:
    found = bad(
        stores,
        tmp_path,
        f"""\
        name: w
        steps:
          - id: intent
            kind: classify
            model: {EXTRACTOR}
          - id: slots
            kind: extract
            model: {EXTRACTOR}
          - id: similar
            kind: retrieve
            model: {MODEL}
            dataset: "0123456789abcdef"
          - id: reply
            kind: generate
            prompt: "at {{{{slots.wristwatch}}}}"
        """,
    )
    assert found[0] == (
        f"w.yaml:5: step 'intent': a classify step needs a classifier, and '{EXTRACTOR}' is a span_extractor"
    )
    assert found[1].startswith("w.yaml:12: step 'similar': dataset '0123456789abcdef': no dataset starting")
    assert found[2].startswith("w.yaml:15: step 'reply': prompt names {{slots.wristwatch}}, but model 'r8k'")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_cli_publishes_lists_shows_and_removes(home: Path, tmp_path: Path, dataset_digest: str) -> None:
    text = good(dataset_digest).replace("name: triage", "name: cli-triage")
    path = write(tmp_path, text)
    published = cli(home, "workflows", "publish", str(path), "--json")
    assert published.returncode == 0, published.stderr
    version = json.loads(published.stdout)["version"]
    listed = json.loads(cli(home, "workflows", "list", "--json").stdout)
    assert {"name": "cli-triage", "latest": version}.items() <= next(
        r for r in listed if r["name"] == "cli-triage"
    ).items()
    shown = cli(home, "workflows", "show", f"cli-triage:{version}")
    assert shown.returncode == 0 and "signature verified" in shown.stdout and "kind: retrieve" in shown.stdout
    broken = write(tmp_path, text.replace("kind: retrieve", "kind: retreive"), "broken.yaml")
    refused = cli(home, "workflows", "publish", str(broken))
    assert refused.returncode == 1
    assert f"{broken}:10: steps.2: unknown step kind" in refused.stderr
    assert cli(home, "workflows", "rm", "cli-triage").returncode == 0
    assert cli(home, "workflows", "show", "cli-triage").returncode == 1
