"""Inventory mistakes fail in preflight, with a clear message, before anything is installed.

Every case runs the real playbook against a real (fresh) chroot and then checks that the box is
untouched: no account, no /opt/appliance, no /etc/appliance.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from install_harness import assert_untouched, chroot_vars, run_playbook, write_inventory

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HostSpec = dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def box(make_target) -> Path:
    return make_target("untouched")


@pytest.fixture(scope="module")
def wrong_python_wheelhouse(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same wheels, described as built for another Python."""
    other = tmp_path_factory.mktemp("bundle-py312") / "wheelhouse"
    shutil.copytree(wheelhouse, other)
    meta = json.loads((other / "bundle.json").read_text())
    meta.update(python="3.12", python_tag="cp312")
    (other / "bundle.json").write_text(json.dumps(meta))
    return other


def _head(box: Path, **extra: str) -> HostSpec:
    return {"head": {"ansible_host": str(box), "appliance_address": "192.0.2.10", **extra}}


def _worker(box: Path, name: str = "worker", **extra: str) -> HostSpec:
    return {name: {"ansible_host": str(box), "appliance_address": "192.0.2.11", **extra}}


# Each case: the inventory (heads, workers, variable overrides) and the words the failure must say.
Case = Callable[[Path, Path, Path], tuple[HostSpec, HostSpec, dict[str, str]]]
CASES: dict[str, tuple[Case, list[str]]] = {
    "no head": (
        lambda box, wh, _: ({}, _worker(box), {}),
        ["group appliance_head must hold exactly one host", "it holds 0"],
    ),
    "two heads": (
        lambda box, wh, _: (
            {**_head(box), "head2": {"ansible_host": str(box), "appliance_address": "192.0.2.12"}},
            {},
            {},
        ),
        ["must hold exactly one host", "it holds 2", "head, head2"],
    ),
    "head also a worker": (
        lambda box, wh, _: (_head(box), _worker(box, name="head"), {}),
        ["head", "is in both appliance_head and appliance_workers"],
    ),
    "missing wheelhouse": (
        lambda box, wh, _: (_head(box), {}, {"appliance_wheelhouse": str(wh.parent / "no-such-bundle")}),
        ["the wheelhouse", "no-such-bundle", "is missing or incomplete", "appliance bundle --profile core"],
    ),
    "wrong profile": (
        lambda box, wh, _: (_head(box), {}, {"appliance_profile": "cpu"}),
        ["was built for profile core", "head needs profile cpu"],
    ),
    "wrong Python": (
        lambda box, wh, py312: (_head(box), {}, {"appliance_wheelhouse": str(py312)}),
        ["is for Python 3.12", "head has Python 3.11"],
    ),
    "unreachable host": (
        lambda box, wh, _: (_head(box), _worker(box.parent / "no-such-box"), {}),
        ["UNREACHABLE", "no-such-box does not exist or has no /bin/sh"],
    ),
    "GPU box without a GPU": (
        lambda box, wh, _: (_head(box, gpu="true"), {}, {}),
        ["head lacks nvidia-smi", "GPU group: gpu=true"],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_inventory_fails_in_preflight_and_installs_nothing(
    case: str,
    box: Path,
    wheelhouse: Path,
    wrong_python_wheelhouse: Path,
    release_key: Path,
    tmp_path: Path,
) -> None:
    build, expected = CASES[case]
    heads, workers, overrides = build(box, wheelhouse, wrong_python_wheelhouse)
    common = {**chroot_vars(wheelhouse, release_key=release_key), **overrides}
    inventory = write_inventory(tmp_path / "inventory.ini", heads=heads, workers=workers, **common)

    run = run_playbook(inventory)

    assert run.returncode != 0, run.output[-3000:]
    flat = " ".join(run.output.split())  # Ansible wraps long messages
    missing = [words for words in expected if words not in flat]
    assert not missing, f"{missing} not in:\n{run.output[-3000:]}"
    assert "TASK [appliance_common" not in run.output, "the install started after a failed preflight"
    assert_untouched(box)


def test_good_inventory_passes_preflight_in_check_mode(
    box: Path, wheelhouse: Path, release_key: Path, tmp_path: Path
) -> None:
    """The control case: the same box and wheelhouse with a correct inventory gets past preflight."""
    inventory = write_inventory(
        tmp_path / "inventory.ini",
        heads=_head(box),
        workers={},
        **chroot_vars(wheelhouse, release_key=release_key),
    )
    run = run_playbook(inventory, "--check")
    assert run.returncode == 0, run.output[-3000:]
    assert "TASK [appliance_common : Create the appliance service account]" in run.output
    assert_untouched(box)  # check mode changed nothing either
