"""The playbook, for real, on two Debian chroots with no network: a head and a worker.

Converge, then idempotence (a second run changes nothing), then verification of what landed:
the account, folders, wheelhouse, virtualenv, environment file, units, and the egress policy,
which is loaded into network namespaces made here and shown to drop outbound traffic.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from install_harness import REPO, PlaybookRun, chroot_vars, run_adhoc, run_playbook, write_inventory

from appliance.config import OFFLINE_ENV
from tests.helpers.system_tools import ensure_tool

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVE_CONFIG = REPO / "deploy" / "serve" / "appliance.yaml"
HEAD_ADDRESS, WORKER_ADDRESS = "192.0.2.10", "192.0.2.11"  # TEST-NET-1, only inside our namespaces
OUTSIDER = "192.0.2.99"  # not a peer, not a client network
REDIS, REDIS_PASSWORD = "192.0.2.20:6379", "redis-secret-for-the-test"  # the GCS option's external Redis
CLIENT = "198.51.100.7"  # in the client network chroot_vars sets
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
def cluster(
    make_target, bundle_with_model: Path, release_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Cluster:
    targets = {"head": make_target("head"), "worker": make_target("worker")}
    inventory = write_inventory(
        tmp_path_factory.mktemp("inventory") / "cluster.ini",
        heads={
            "head": {
                "ansible_host": str(targets["head"]),
                "appliance_address": HEAD_ADDRESS,
                # GCS fault tolerance on: the unit and its secret file must converge and stay put too
                "appliance_ray_head_gcs_redis_address": REDIS,
                "appliance_ray_head_gcs_redis_password": REDIS_PASSWORD,
            }
        },
        workers={"worker": {"ansible_host": str(targets["worker"]), "appliance_address": WORKER_ADDRESS}},
        **chroot_vars(bundle_with_model, str(SERVE_CONFIG), release_key=release_key),
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


def test_trust_is_root_owned_read_only_and_serving_boxes_cannot_sign(
    cluster: Cluster, bundle_with_model: Path
) -> None:
    for role, target in cluster.targets.items():
        keys = target / "var/lib/appliance/keys"
        trusted = keys / "trusted"
        assert (keys.stat().st_uid, keys.stat().st_mode & 0o777) == (0, 0o750), role
        assert (trusted.stat().st_uid, trusted.stat().st_gid, trusted.stat().st_mode & 0o777) == (0, 0, 0o755)
        shipped = sorted(p.name for p in (bundle_with_model / "keys" / "trusted").iterdir())
        assert sorted(p.name for p in trusted.iterdir()) == shipped, role
        for key in trusted.iterdir():
            assert (key.stat().st_uid, key.stat().st_gid, key.stat().st_mode & 0o777) == (0, 0, 0o444), key
        marker = keys / "SERVING_ONLY"
        assert marker.is_file() and (marker.stat().st_uid, marker.stat().st_mode & 0o777) == (0, 0o444), role
        assert not (keys / "signing.key").exists(), role


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
    for unit in (head_unit, worker_unit):  # one ingress replica per node (serve/placement.py)
        assert """--resources '{"appliance_ingress": 1}'""" in unit
    assert f"Environment=RAY_REDIS_ADDRESS={REDIS}" in head_unit.splitlines()
    assert "--redis-password ${APPLIANCE_RAY_REDIS_PASSWORD}" in head_unit and REDIS_PASSWORD not in head_unit
    secret = cluster.targets["head"] / "etc/appliance/ray-redis.env"
    assert secret.read_text() == f"APPLIANCE_RAY_REDIS_PASSWORD={REDIS_PASSWORD}\n"
    assert (secret.stat().st_uid, secret.stat().st_mode & 0o777) == (0, 0o600)
    assert REDIS_PASSWORD not in cluster.converge.output + cluster.second.output
    assert "RAY_gcs_rpc_server_reconnect_timeout_s=60" in worker_unit


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


def test_egress_policy_drops_udp_datagrams_but_not_to_loopback_or_peers(cluster: Cluster) -> None:
    """UDP sent with sendto() and no connect() (a DNS or NTP query off the box) is dropped and
    counted like TCP; datagrams to loopback and to a cluster peer still pass."""
    head = cluster.targets["head"]
    ports = (53, 123)
    with _namespaces() as (box, net):
        echoes = [_udp_echo(net, "0.0.0.0", ports), _udp_echo(box, "127.0.0.1", ports)]
        try:
            # Before the policy: every datagram is answered, so the checks below can fail.
            assert all(_udp_answered(box, OUTSIDER, port) for port in ports)
            _nft(box, head, "-f", "/etc/appliance/perimeter.nft")
            before = _dropped(box, head, "egress_dropped")
            for port in ports:
                assert _udp_answered(box, "127.0.0.1", port)
                assert _udp_answered(box, WORKER_ADDRESS, port)
                assert not _udp_answered(box, OUTSIDER, port)
            assert _dropped(box, head, "egress_dropped") - before >= len(ports)
        finally:
            for proc in echoes:
                proc.kill()
                proc.wait()


def test_ingress_policy_keeps_ray_for_peers_and_grpc_for_clients(cluster: Cluster) -> None:
    """The head's rendered policy, loaded with its own nft: Ray's GCS port answers a cluster peer
    only, the gRPC port a client network (and peers), SSH everyone; the rest is dropped, counted."""
    head = cluster.targets["head"]
    gcs, grpc_port, ssh = 6379, 50051, 22
    with _namespaces() as (box, net):
        listeners = [_listen(box, "0.0.0.0", port) for port in (gcs, grpc_port, ssh)]
        try:
            # Before the policy every source reaches every port, so the checks below can fail.
            assert all(_connect(net, HEAD_ADDRESS, port, source=OUTSIDER) for port in (gcs, grpc_port))
            _nft(box, head, "-f", "/etc/appliance/perimeter.nft")
            assert _connect(net, HEAD_ADDRESS, gcs, source=WORKER_ADDRESS)
            assert not _connect(net, HEAD_ADDRESS, gcs, source=CLIENT)
            assert not _connect(net, HEAD_ADDRESS, gcs, source=OUTSIDER)
            assert _connect(net, HEAD_ADDRESS, grpc_port, source=CLIENT)
            assert not _connect(net, HEAD_ADDRESS, grpc_port, source=OUTSIDER)
            assert _connect(net, HEAD_ADDRESS, ssh, source=OUTSIDER)
            assert _connect(box, "127.0.0.1", gcs)  # loopback: the local Ray and the server
            counter = _nft(box, head, "list", "counter", "inet", "appliance_perimeter", "ingress_dropped")
            assert int(re.search(r"packets (\d+)", counter).group(1)) >= 3, counter
        finally:
            for proc in listeners:
                proc.kill()
                proc.wait()


def test_ray_token_auth_is_on_with_one_shared_private_token(cluster: Cluster) -> None:
    tokens = set()
    for role, target in cluster.targets.items():
        token_file = target / "etc/appliance/ray-auth-token"
        group = _group_id(target, "appliance")
        stat = token_file.stat()
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, group, 0o640), role
        tokens.add(token_file.read_text())
        env = (target / "etc/appliance/env").read_text()
        assert "RAY_AUTH_MODE=token" in env.splitlines(), role
        assert "RAY_AUTH_TOKEN_PATH=/etc/appliance/ray-auth-token" in env.splitlines(), role
    [token] = tokens  # the same on every box
    assert re.fullmatch(r"[0-9a-f]{64}", token), "256 random bits, as `ray get-auth-token --generate` makes"
    assert token not in cluster.converge.output and token not in cluster.second.output  # never logged


def test_ray_tls_material_is_per_box_and_the_ca_key_stays_on_the_controller(cluster: Cluster) -> None:
    controller = cluster.inventory.parent / "credentials" / "ray-tls"
    assert (controller / "ca.key").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((controller / "ca.crt").read_bytes())
    for role, address in (("head", HEAD_ADDRESS), ("worker", WORKER_ADDRESS)):
        folder = cluster.targets[role] / "etc/appliance/ray-tls"
        assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "node.crt", "node.key"], role
        key = (folder / "node.key").stat()
        assert (key.st_uid, key.st_gid, key.st_mode & 0o777) == (
            0,
            _group_id(cluster.targets[role], "appliance"),
            0o640,
        )
        cert = x509.load_pem_x509_certificate((folder / "node.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert address in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)], role
        env = (cluster.targets[role] / "etc/appliance/env").read_text().splitlines()
        assert "RAY_USE_TLS=1" in env and "RAY_TLS_CA_CERT=/etc/appliance/ray-tls/ca.crt" in env


def test_installed_ray_material_admits_the_cluster_and_no_one_else(cluster: Cluster, tmp_path: Path) -> None:
    """Ray 2.60 itself (this checkout's) with each box's installed environment file, token and
    certificates, in network namespaces holding the boxes' addresses: the worker joins the head
    over TLS with the token; a driver without the token, or without TLS, is refused."""
    head, worker = (_ray_env(cluster.targets[role], tmp_path / role) for role in ("head", "worker"))
    ray = str(Path(sys.executable).with_name("ray"))
    address = f"{HEAD_ADDRESS}:6379"
    # Ray's socket paths must stay short (108 bytes), so not pytest's long folders.
    sessions = Path(tempfile.mkdtemp(prefix="appl-ray-", dir="/tmp"))
    with _namespaces() as (box, net):
        started = []
        try:
            common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
            head_node = [
                "--head",
                "--port",
                "6379",
                "--node-ip-address",
                HEAD_ADDRESS,
                "--include-dashboard",
                "false",
            ]
            started.append(
                _spawn(box, head, [ray, "start", *common, *head_node, "--temp-dir", f"{sessions}/h"])
            )
            assert _driver(box, head, address, "len(ray.nodes())", wait=90) == "1"
            worker_node = [
                "--address",
                address,
                "--node-ip-address",
                WORKER_ADDRESS,
                "--temp-dir",
                f"{sessions}/w",
            ]
            started.append(_spawn(net, worker, [ray, "start", *common, *worker_node]))
            alive = "sum(node['Alive'] for node in ray.nodes())"
            assert _driver(box, head, address, alive, wait=90, expect="2") == "2"
            assert _driver(box, {**head, "RAY_AUTH_TOKEN": "0" * 64}, address, alive) is None
            no_tls = {key: value for key, value in head.items() if key != "RAY_USE_TLS"}
            assert _driver(box, no_tls, address, alive) is None
        finally:
            for proc in started:
                _stop_group(proc)
            shutil.rmtree(sessions, ignore_errors=True)


def test_ray_and_the_server_require_the_perimeter(cluster: Cluster) -> None:
    """Fail closed: without the loaded policy, no unit that opens a port starts."""
    for role, units in UNITS.items():
        for unit in units:
            if unit == "appliance-perimeter.service":
                continue
            text = (cluster.targets[role] / "etc/systemd/system" / unit).read_text()
            assert "Requires=appliance-perimeter.service" in text.splitlines(), unit
            after = next(line for line in text.splitlines() if line.startswith("After="))
            assert "appliance-perimeter.service" in after.split("=", 1)[1].split(), unit


# --- helpers -------------------------------------------------------------------------------------

LISTENER = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.listen(16)
sock.settimeout(120)  # bounded: the listener ends on its own if the test dies
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.close()
"""

CONNECT = """
import socket, sys
source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2, source_address=source).close()
    print("open")
except OSError as exc:
    print("closed", exc)
"""


UDP_ECHO = """
import selectors, socket, sys
selector = selectors.DefaultSelector()
for port in sys.argv[2].split(","):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((sys.argv[1], int(port)))
    selector.register(sock, selectors.EVENT_READ)
print("ready", flush=True)
while events := selector.select(timeout=120):  # bounded: it ends on its own if the test dies
    for key, _ in events:
        data, peer = key.fileobj.recvfrom(512)
        key.fileobj.sendto(data, peer)
"""

# sendto() with the address and no connect(): the way a resolver or an NTP client sends.
UDP_PROBE = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(1.5)
try:
    sock.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
    print("answered" if sock.recvfrom(512)[0] == b"probe" else "garbled")
except OSError as exc:
    print("silent", exc)
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
            ["ip", "-n", self.net, "addr", "add", f"{CLIENT}/24", "dev", "veth-net"],
        ]
        steps += [
            ["ip", "-n", ns, "link", "set", dev, "up"]
            for ns, dev in [(self.box, "lo"), (self.box, "veth-box")]
        ]
        steps += [
            ["ip", "-n", ns, "link", "set", dev, "up"]
            for ns, dev in [(self.net, "lo"), (self.net, "veth-net")]
        ]
        # The client network is one hop away in real life; here it is on the same wire.
        steps.append(["ip", "-n", self.box, "route", "add", f"{CLIENT}/32", "dev", "veth-box"])
        for step in steps:
            subprocess.run(step, check=True)
        return self.box, self.net

    def __exit__(self, *exc: object) -> None:
        for name in (self.box, self.net):
            subprocess.run(["ip", "netns", "del", name], check=False)


def _listen(namespace: str, address: str, port: int = 7070) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", LISTENER, address, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _connect(namespace: str, address: str, port: int = 7070, source: str | None = None) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", CONNECT, address, str(port)]
        + ([source] if source else []),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.startswith("open")


def _udp_echo(namespace: str, address: str, ports: tuple[int, ...]) -> subprocess.Popen[str]:
    listed = ",".join(map(str, ports))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", UDP_ECHO, address, listed],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _udp_answered(namespace: str, address: str, port: int) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", UDP_PROBE, address, str(port)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.startswith("answered")


def _dropped(namespace: str, target: Path, counter: str) -> int:
    """Packets the policy's named counter has dropped so far."""
    listing = _nft(namespace, target, "list", "counter", "inet", "appliance_perimeter", counter)
    return int(re.search(r"packets (\d+)", listing).group(1))


def _changed_tasks(output: str) -> str:
    """The tasks that reported a change, for a readable failure."""
    blocks = output.split("\n\n")
    return "\n".join(block.splitlines()[0] for block in blocks if "\nchanged:" in "\n" + block)


def _nft(namespace: str, target: Path, *args: str) -> str:
    """The target's own nft, run in ``namespace``."""
    argv = ["ip", "netns", "exec", namespace, "chroot", str(target), "nft", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _group_id(target: Path, name: str) -> int:
    line = next(
        line for line in (target / "etc/group").read_text().splitlines() if line.startswith(f"{name}:")
    )
    return int(line.split(":")[2])


def _ray_env(target: Path, home: Path) -> dict[str, str]:
    """The RAY_* settings of the box's environment file, with its files read from the tree."""
    home.mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    for line in (target / "etc/appliance/env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.startswith("RAY_") and key != "RAY_DASHBOARD_ENABLED":
            env[key] = str(target) + value if value.startswith("/") else value
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USE_TLS", "RAY_TLS_SERVER_CERT"} <= env.keys(), env
    return env


def _spawn(namespace: str, env: dict[str, str], argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: every Ray process stops with it
    )


DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("RESULT", eval(sys.argv[2]), flush=True)
"""


def _driver(
    namespace: str, env: dict[str, str], address: str, expression: str, wait: float = 0, expect: str = ""
) -> str | None:
    """``expression`` evaluated by a driver connected to ``address``; None if it cannot connect
    within 40 s. With ``wait``, retried until it connects (and equals ``expect``, if given)."""
    deadline = time.monotonic() + wait
    while True:
        argv = ["ip", "netns", "exec", namespace, sys.executable, "-c", DRIVER, address, expression]
        try:
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=40).stdout
        except subprocess.TimeoutExpired:
            out = ""
        found = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
        value = found.group(1) if found else None
        if (value is not None and (not expect or value == expect)) or time.monotonic() > deadline:
            return value
        time.sleep(2)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop `ray start --block` (it stops what it started), then sweep its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
