"""The running server's run file, and stopping that server.

Kept apart from ``appliance.serve.lifecycle`` so that ``appliance status`` and ``appliance stop``
import neither Ray nor the serving stack: a command that only reads a file and sends a signal
starts no library threads (which may resolve names) and costs no second of imports.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Literal

from appliance.config import state_dir

RUN_FILE = "server.json"


def run_file() -> Path:
    return state_dir("run") / RUN_FILE


def read_run_file() -> dict[str, Any] | None:
    path = run_file()
    if not path.is_file():
        return None
    info: dict[str, Any] = json.loads(path.read_text())
    if not _alive(int(info.get("pid", 0))):
        return None  # a stale file from a server that died without cleaning up
    return info


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """An exited process its parent has not reaped yet (Linux; elsewhere never)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]  # the state follows the parenthesised name


def write_run_file(info: dict[str, Any]) -> None:
    path = run_file()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)  # readers never see half a file


StopOutcome = Literal["stopped", "not running", "still running"]


def stop_server(timeout: float = 60.0) -> StopOutcome:
    """SIGTERM the running server and wait up to ``timeout`` seconds for it to exit."""
    info = read_run_file()
    if info is None:
        return "not running"
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return "still running" if _alive(pid) else "stopped"
