"""The playbook, for real, on two Debian chroots with no network: a head and a worker.

Converge, then idempotence (a second run changes nothing), then verification of what landed:
the account, folders, wheelhouse, virtualenv, environment file, units, and the egress policy,
which is loaded into network namespaces made here and shown to drop outbound traffic.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from install_harness import REPO, PlaybookRun, chroot_vars, run_adhoc, run_playbook, write_inventory

from appliance.config import OFFLINE_ENV
from tests.helpers.system_tools import ensure_tool

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVE_CONFIG = REPO / "deploy" / "serve" / "appliance.yaml"
HEAD_ADDRESS, WORKER_ADDRESS = "192.0.2.10", "192.0.2.11"  # TEST-NET-1, only inside our namespaces
OUTSIDER = "192.0.2.99"  # not a peer, not a client network
UNITS = {
    "head": ("appliance-ray-head.service", "appliance-server.service", "appliance-perimeter.service"),
    "worker": ("appliance-ray-worker.service", "appliance-perimeter.service"),
}


@dataclass
class Cluster:
    targets: dict[str, Path]
    inventory: Path
    check_first: PlaybookRun
    converge: PlaybookRun
    second: PlaybookRun


@pytest.fixture(scope="module")
def cluster(make_target, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    targets = {"head": make_target("head"), "worker": make_target("worker")}
    inventory = write_inventory(
        tmp_path_factory.mktemp("inventory") / "cluster.ini",
        heads={"head": {"ansible_host": str(targets["head"]), "appliance_address": HEAD_ADDRESS}},
        workers={"worker": {"ansible_host": str(targets["worker"]), "appliance_address": WORKER_ADDRESS}},
        **chroot_vars(wheelhouse, str(SERVE_CONFIG)),
    )
    check_first = run_playbook(inventory, "--check")
    converge = run_playbook(inventory)
    assert converge.returncode == 0, converge.output[-6000:]
    second = run_playbook(inventory)
    return Cluster(targets, inventory, check_first, converge, second)


def test_check_mode_on_a_fresh_box_runs_and_changes_nothing(cluster: Cluster) -> None:
    # The check run went first, on the pristine trees; the converge run that followed had work to do.
    assert cluster.check_first.returncode == 0, cluster.check_first.output[-4000:]
    assert cluster.check_first.recap()["head"]["changed"] > 0  # it reports what it would do
    assert cluster.converge.recap()["head"]["changed"] > 0
    assert cluster.converge.recap()["worker"]["changed"] > 0


def test_second_run_changes_nothing(cluster: Cluster) -> None:
    assert cluster.second.returncode == 0, cluster.second.output[-4000:]
    recap = cluster.second.recap()
    assert set(recap) >= {"head", "worker"}
    changed = {host: counts["changed"] for host, counts in recap.items() if counts["changed"]}
    assert changed == {}, _changed_tasks(cluster.second.output)


def test_service_account_and_folders(cluster: Cluster) -> None:
    for target in cluster.targets.values():
        passwd = (target / "etc" / "passwd").read_text()
        entry = next(line for line in passwd.splitlines() if line.startswith("appliance:"))
        _, _, uid, _, _, home, shell = entry.split(":")
        assert (int(uid) < 1000, home, shell) == (True, "/var/lib/appliance", "/usr/sbin/nologin")
        for folder, mode in [
            ("var/lib/appliance", 0o750),
            ("var/lib/appliance/pki", 0o700),
            ("etc/appliance", 0o750),
        ]:
            assert (target / folder).is_dir(), folder
            assert (target / folder).stat().st_mode & 0o777 == mode, folder
        home_dir = target / "var/lib/appliance"
        assert {p.name for p in home_dir.iterdir()} >= {
            "models",
            "encoders",
            "pki",
            "tokens",
            "audit",
            "keys",
        }
        assert (home_dir / "keys" / "trusted").is_dir()
        assert home_dir.stat().st_uid == int(uid)


def test_wheelhouse_copied_and_installed_from_it(cluster: Cluster, wheelhouse: Path) -> None:
    for target in cluster.targets.values():
        copied = target / "opt/appliance/wheelhouse"
        assert sorted(p.name for p in (copied / "wheels").iterdir()) == sorted(
            p.name for p in (wheelhouse / "wheels").iterdir()
        )
        assert (copied / "requirements.lock").read_text() == (wheelhouse / "requirements.lock").read_text()
        code = "import appliance, appliance.config, ray; print(appliance.__file__, ray.__version__)"
        out = _in_target(target, "/opt/appliance/venv/bin/python", "-c", code)
        assert out.startswith("/opt/appliance/venv/lib/python3.11/site-packages/appliance/"), out
        assert out.split()[1] == "2.60.0"


def test_environment_file_is_the_offline_environment(cluster: Cluster) -> None:
    for target in cluster.targets.values():
        env_file = target / "etc/appliance/env"
        pairs = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        assert {key: pairs.get(key) for key in OFFLINE_ENV} == OFFLINE_ENV
        assert pairs["APPLIANCE_HOME"] == "/var/lib/appliance"
        assert env_file.stat().st_mode & 0o777 == 0o640


def test_units_are_installed_enabled_and_valid(cluster: Cluster) -> None:
    analyze = ensure_tool("systemd-analyze")
    for role, units in UNITS.items():
        target = cluster.targets[role]
        for unit in units:
            text = (target / "etc/systemd/system" / unit).read_text()
            wants = target / "etc/systemd/system/multi-user.target.wants" / unit
            assert wants.is_symlink(), f"{unit} is not enabled on the {role}"
            if unit != "appliance-perimeter.service":
                assert "Restart=on-failure" in text
                assert re.search(r"^LimitNOFILE=\d+$", text, re.MULTILINE)
                assert re.search(r"^MemoryMax=\S+$", text, re.MULTILINE)
                assert "EnvironmentFile=/etc/appliance/env" in text
        # checks syntax, and that every ExecStart program exists in the tree
        paths = [f"/etc/systemd/system/{unit}" for unit in units]
        proc = subprocess.run(
            [analyze, "verify", f"--root={target}", *paths], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    worker_unit = (cluster.targets["worker"] / "etc/systemd/system/appliance-ray-worker.service").read_text()
    assert f"--address {HEAD_ADDRESS}:6379" in worker_unit
    head_unit = (cluster.targets["head"] / "etc/systemd/system/appliance-ray-head.service").read_text()
    assert "--dashboard-host 127.0.0.1" in head_unit and "--include-dashboard false" in head_unit


def test_serve_config_installed(cluster: Cluster) -> None:
    installed = cluster.targets["head"] / "etc/appliance/serve.yaml"
    assert installed.read_text() == SERVE_CONFIG.read_text()
    unit = (cluster.targets["head"] / "etc/systemd/system/appliance-server.service").read_text()
    assert "--config /etc/appliance/serve.yaml" in unit


def test_the_target_had_no_network(cluster: Cluster) -> None:
    """Every target command ran in an empty network namespace: even a loopback connect fails."""
    probe = "import socket; print(socket.socket().connect_ex(('127.0.0.1', 9)))"
    run = run_adhoc(
        cluster.inventory, "head", "ansible.builtin.command", {"argv": ["/usr/bin/python3", "-c", probe]}
    )
    assert run.returncode == 0, run.output
    assert re.search(r"^101$", run.output, re.MULTILINE), run.output  # ENETUNREACH: no interface is up


def test_egress_policy_drops_outbound_but_not_loopback_or_peers(cluster: Cluster) -> None:
    """Load the head's rendered policy with the head's own nft into a namespace that stands for
    the head, wired to a namespace holding a peer and an outsider: the peer and loopback answer,
    the outsider's packets are dropped and counted."""
    head = cluster.targets["head"]
    with _namespaces() as (box, net):
        server = _listen(net, "0.0.0.0")
        local = _listen(box, "127.0.0.1")
        try:
            # Before the policy: everything connects, so the checks below can fail.
            assert _connect(box, WORKER_ADDRESS) and _connect(box, OUTSIDER)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    box,
                    "chroot",
                    str(head),
                    "nft",
                    "-f",
                    "/etc/appliance/perimeter.nft",
                ],
                check=True,
            )
            assert _connect(box, "127.0.0.1")
            assert _connect(box, WORKER_ADDRESS)
            assert not _connect(box, OUTSIDER)
            counter = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    box,
                    "chroot",
                    str(head),
                    "nft",
                    "list",
                    "counter",
                    "inet",
                    "appliance_perimeter",
                    "egress_dropped",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert int(re.search(r"packets (\d+)", counter).group(1)) >= 1, counter
        finally:
            for proc in (server, local):
                proc.kill()
                proc.wait()


# --- helpers -------------------------------------------------------------------------------------

LISTENER = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((sys.argv[1], 7070))
sock.listen(16)
sock.settimeout(120)  # bounded: the listener ends on its own if the test dies
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.close()
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 7070), timeout=2).close()
    print("open")
except OSError as exc:
    print("closed", exc)
"""


def _in_target(target: Path, *argv: str) -> str:
    return subprocess.run(["chroot", str(target), *argv], capture_output=True, text=True, check=True).stdout


class _namespaces:
    """Two network namespaces joined by a veth pair: `box` (the head) and `net` (the others)."""

    def __enter__(self) -> tuple[str, str]:
        tag = uuid.uuid4().hex[:8]
        self.box, self.net = f"appl-box-{tag}", f"appl-net-{tag}"
        for name in (self.box, self.net):
            subprocess.run(["ip", "netns", "add", name], check=True)
        steps = [
            [
                "ip",
                "link",
                "add",
                "veth-box",
                "netns",
                self.box,
                "type",
                "veth",
                "peer",
                "name",
                "veth-net",
                "netns",
                self.net,
            ],
            ["ip", "-n", self.box, "addr", "add", f"{HEAD_ADDRESS}/24", "dev", "veth-box"],
            ["ip", "-n", self.net, "addr", "add", f"{WORKER_ADDRESS}/24", "dev", "veth-net"],
            ["ip", "-n", self.net, "addr", "add", f"{OUTSIDER}/24", "dev", "veth-net"],
        ]
        steps += [
            ["ip", "-n", ns, "link", "set", dev, "up"]
            for ns, dev in [(self.box, "lo"), (self.box, "veth-box")]
        ]
        steps += [
            ["ip", "-n", ns, "link", "set", dev, "up"]
            for ns, dev in [(self.net, "lo"), (self.net, "veth-net")]
        ]
        for step in steps:
            subprocess.run(step, check=True)
        return self.box, self.net

    def __exit__(self, *exc: object) -> None:
        for name in (self.box, self.net):
            subprocess.run(["ip", "netns", "del", name], check=False)


def _listen(namespace: str, address: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", LISTENER, address],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _connect(namespace: str, address: str) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", CONNECT, address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.startswith("open")


def _changed_tasks(output: str) -> str:
    """The tasks that reported a change, for a readable failure."""
    blocks = output.split("\n\n")
    return "\n".join(block.splitlines()[0] for block in blocks if "\nchanged:" in "\n" + block)
