"""A small network of boxes on one machine: network namespaces on a bridge.

A ``switch`` namespace holds the bridge; each box is a namespace with one veth into it and one
address of :data:`SUBNET` (a private range that exists only inside these namespaces: nothing here
routes to the machine's own network). A box may also see its own folder at a shared path (a bind
mount private to the box's processes), so that boxes share no state through the filesystem.

Every process a box starts is tracked by the namespace itself (``ip netns pids``), so that
:meth:`Network.kill` ends all of a box's processes, as a power cut would, and teardown leaves
nothing running even when a test fails half-way.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.system_tools import ensure_tool

SUBNET = "10.231.0"  # /24, only inside the namespaces made here


@dataclass(frozen=True)
class Box:
    name: str
    namespace: str
    address: str
    home: Path | None  # this box's own folder, seen by its processes at Network.home_path


class Network:
    """Use as a context manager; boxes are added with :meth:`add`."""

    def __init__(self, home_path: Path | None = None) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"appl-sw-{self.tag}"
        self.home_path = home_path
        self.boxes: dict[str, Box] = {}

    def __enter__(self) -> Network:
        ensure_tool("ip")
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for box in self.boxes.values():
            self.kill(box.name)
        for box in self.boxes.values():
            subprocess.run(["ip", "netns", "del", box.namespace], check=False)
        subprocess.run(["ip", "netns", "del", self.switch], check=False)

    def add(self, name: str, host: int, home: Path | None = None) -> Box:
        namespace = f"appl-{name}-{self.tag}"
        address = f"{SUBNET}.{host}"
        outside, inside = f"v{host}-{self.tag}", "eth0"
        _ip("netns", "add", namespace)
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            outside,
            "type",
            "veth",
            "peer",
            "name",
            inside,
            "netns",
            namespace,
        )
        _ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        box = Box(name, namespace, address, home)
        self.boxes[name] = box
        return box

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run inside box ``name``, with its own folder bound at ``home_path``."""
        box = self.boxes[name]
        if box.home is None or self.home_path is None:
            return ["ip", "netns", "exec", box.namespace, *argv]
        # `ip netns exec` gives each call its own mount namespace: the bind stays with this tree
        script = f"mount --bind {shlex.quote(str(box.home))} {shlex.quote(str(self.home_path))} && exec "
        script += " ".join(shlex.quote(arg) for arg in argv)
        return ["ip", "netns", "exec", box.namespace, "sh", "-c", script]

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                self.command(name, argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(
        self, name: str, argv: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(name, argv), env=env, capture_output=True, text=True, timeout=timeout
        )

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.boxes[name].namespace],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]

    def kill(self, name: str, timeout: float = 10.0) -> int:
        """SIGKILL every process in box ``name``; returns how many there were."""
        killed = 0
        deadline = time.monotonic() + timeout
        while (pids := self.pids(name)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return killed


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
