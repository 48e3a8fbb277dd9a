"""State the appliance creates is private whatever the umask: files 0600, folders 0700, and group
read only inside a folder an installer shared with its group (as Ansible does with mode 0750).

Each case runs the product's own writers in a fresh process with umask 022 (the common default,
under which a plain open() makes 0644 files) and then checks st_mode of everything under the home.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

WRITERS = r"""
import sys
from pathlib import Path

from appliance.router.escalations import EscalationRecord, EscalationStore
from appliance.security.audit import AuditLog, stream_dir
from appliance.security.tokens import TokenStore
from appliance.store import ModelStore
from appliance.types import Cost

home = Path(sys.argv[1])
TokenStore().create("bob", ["generate"])
with EscalationStore(home / "escalations" / "escalations.db") as store:
    store.record_escalation(
        EscalationRecord(
            model="m", model_version=1, text="a text", specialist_top=[("a", 0.4)],
            specialist_confidence=0.4, threshold=0.9, generalist_label="a", generalist_confidence=0.8,
            final_label="a", route="generalist", policy="cascade", cost=Cost(), request_id="r1",
        )
    )
    wal = sorted(p.name for p in (home / "escalations").iterdir())
    assert "escalations.db-wal" in wal, wal  # checked while open: SQLite removes it on close
    import os, stat
    print("wal", oct(stat.S_IMODE(os.stat(home / "escalations" / "escalations.db-wal").st_mode)))
audit = AuditLog(stream_dir())
audit.append({"event": "call", "rpc": "/x", "code": "OK"})
audit.flush()
audit.close()
encoder = home / "source-encoder"
encoder.mkdir()
(encoder / "model.onnx").write_bytes(b"not really onnx")
models = ModelStore(home)
models.put_encoder(encoder, {"name": "tiny"})
models.set_serving_version("m", 1)
"""


def run_writers(home: Path) -> list[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    code = f"import os; os.umask(0o022); exec(compile({WRITERS!r}, 'writers', 'exec'))"
    run = subprocess.run(
        [sys.executable, "-c", code, str(home)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def modes(home: Path) -> dict[str, int]:
    """Mode of every entry the writers made under ``home`` (the encoder source aside)."""
    found = {}
    for path in home.rglob("*"):
        rel = path.relative_to(home).as_posix()
        if not rel.startswith("source-encoder") and not path.is_symlink():
            found[rel] = stat.S_IMODE(path.stat().st_mode)
    return found


def expected_kinds(home: Path, found: dict[str, int]) -> None:
    names = set(found)
    for wanted in ("tokens/tokens.json", "escalations/escalations.db", "models/m/SERVING", "audit"):
        assert wanted in names, sorted(names)
    assert any(n.startswith("encoders/") and n.endswith("model.onnx") for n in names)
    assert any(n.startswith("audit/") and (home / n).is_file() for n in names)


def test_a_fresh_home_is_private_under_umask_022(tmp_path: Path) -> None:
    home = tmp_path / "home"  # made by the product itself
    out = run_writers(home)
    found = modes(home)
    expected_kinds(home, found)
    wrong = {
        name: oct(mode)
        for name, mode in found.items()
        if mode & ~(0o700 if (home / name).is_dir() else 0o600) and not name.endswith(".pub")
    }
    assert wrong == {}  # (a public key may be read by anyone)
    assert found["escalations/escalations.db"] == found["models/m/SERVING"] == 0o600
    assert found["escalations"] == found["models"] == found["encoders"] == found["audit"] == 0o700
    assert "wal 0o600" in out  # SQLite gives its write-ahead log the database's mode


def test_a_group_shared_home_keeps_group_read_and_nothing_for_others(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o750)  # what the Ansible role gives the appliance home
    out = run_writers(home)
    found = modes(home)
    expected_kinds(home, found)
    assert {n: oct(m) for n, m in found.items() if m & 0o007 and not n.endswith(".pub")} == {}
    assert {n: oct(m) for n, m in found.items() if m & 0o002} == {}  # nobody else may write
    # what the appliance's group reads (Ansible's models.yml: folders 0750, files 0640) stays readable
    shared = ("escalations", "models", "encoders", "audit")
    wrong = {
        name: oct(mode)
        for name, mode in found.items()
        if name.startswith(shared)
        and not Path(name).name.startswith(".")  # lock files: the writer's alone
        and mode != (0o750 if (home / name).is_dir() else 0o640)
    }
    assert wrong == {}
    assert "wal 0o640" in out


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_the_mode_does_not_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from appliance.files import create_private_file, make_private_dir

    previous = os.umask(umask)
    try:
        make_private_dir(tmp_path / "a" / "b")
        create_private_file(tmp_path / "a" / "b" / "f")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b" / "f").stat().st_mode) == 0o600
