"""The appliance on a real Ray cluster of network-namespace boxes, started as the roles start it.

The head box runs ``ray start --head`` and ``appliance serve --address`` (the server unit); each
worker box runs ``ray start --address``; every box declares one ``appliance_ingress`` unit and
has one small object store and one CPU. Each box sees its own folder as ``APPLIANCE_HOME``: the
head's holds the published model, the token store and the PKI; a worker's holds only what the
roles install on every box (the CA, its server certificate, the trusted signing keys), so models
and tokens can reach it only through the cluster.

A client box (no Ray) runs probes and load; the test process itself only reads files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import OFFLINE_ENV
from appliance.security.tokens import ensure_local_admin_token
from appliance.store import ModelStore
from tests.helpers.netns import SUBNET, Network

PORT = 50051
RAY_PORT = 6379
SERVER_NAME = "appliance.test"  # the name every node's certificate carries, for balanced clients
BIN = Path(sys.executable).parent
NODES = {"head": 10, "w1": 11, "w2": 12}

PROBE = """
import sys, grpc
from pathlib import Path
from appliance.client import Client, Connection
address, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]
conn = Connection(address, tls=True, ca=Path(ca), token=token, server_name=sys.argv[4])
try:
    with Client(conn) as client:
        print(client.classify("b8", ["I lost my card"], timeout=5).results[0].label)
except grpc.RpcError as exc:
    print(exc.code().name)
"""

METRIC = """
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
print(sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("appliance_texts_total{")))
"""


@dataclass
class ApplianceCluster:
    net: Network
    base: Path  # short: Ray's socket paths must stay under 108 bytes
    homes: dict[str, Path]
    env: dict[str, str]
    procs: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)

    @property
    def head_address(self) -> str:
        return f"{self.net.boxes['head'].address}:{RAY_PORT}"

    def endpoint(self, name: str) -> str:
        return f"{self.net.boxes[name].address}:{PORT}"

    def endpoints(self, names: list[str] | None = None) -> str:
        return ",".join(self.endpoint(name) for name in names or NODES)

    def cpu_seconds(self, name: str) -> float:
        """CPU time used so far by the processes alive in box ``name`` (user + system)."""
        ticks = 0
        for pid in self.net.pids(name):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # ended meanwhile
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks / os.sysconf("SC_CLK_TCK")

    @property
    def token(self) -> str:
        return (self.homes["head"] / "client" / "token").read_text().strip()

    def log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    def start_node(self, name: str) -> None:
        """``ray start`` on box ``name``, as appliance-ray-head/worker.service runs it."""
        box = self.net.boxes[name]
        argv = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address",
            box.address,
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(80 << 20),
            "--resources",
            json.dumps({"appliance_ingress": 1}),
            "--disable-usage-stats",
            "--temp-dir",
            str(self.base / f"r-{name}"),
        ]
        if name == "head":
            argv += ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"]
        else:
            argv += ["--address", self.head_address]
        self.procs.setdefault(name, []).append(self.net.spawn(name, argv, self.env, self.log(name)))

    def serve(self) -> None:
        """``appliance serve`` on the head, as appliance-server.service runs it."""
        argv = [
            str(BIN / "appliance"),
            "serve",
            "--address",
            self.head_address,
            "--host",
            "0.0.0.0",
        ]
        argv += ["--port", str(PORT), "--model", "b8"]
        self.procs["head"].append(self.net.spawn("head", argv, self.env, self.log("serve")))

    def kill(self, name: str) -> None:
        """Every process of box ``name`` at once, as when the box loses power."""
        self.net.kill(name)
        for proc in self.procs.pop(name, []):
            proc.wait(timeout=30)

    def probe(self, name: str, token: str | None = None) -> str:
        """A Classify on box ``name``'s endpoint from the client box: the label, or the gRPC code."""
        ca = self.homes["head"] / "pki" / "ca.crt"
        argv = [
            sys.executable,
            "-c",
            PROBE,
            self.endpoint(name),
            str(ca),
            token or self.token,
            SERVER_NAME,
        ]
        done = self.net.run("client", argv, self.env, timeout=60)
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"ERROR {done.stderr[-500:]}"

    def wait_answering(self, names: list[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            last = {name: self.probe(name) for name in names}
            if all(not answer.isupper() and not answer.startswith("ERROR") for answer in last.values()):
                return last
            time.sleep(2)
        raise AssertionError(f"not every node answered within {timeout:.0f} s: {last}\n{self.tail()}")

    def texts_served(self, name: str) -> float:
        done = self.net.run(name, [sys.executable, "-c", METRIC], self.env, timeout=30)
        return float(done.stdout.strip() or "nan")

    def tail(self) -> str:
        """The end of every box's logs and of the ingress replicas' own, for a failure message."""
        logs = sorted(self.base.glob("*.log")) + sorted(
            self.base.glob("r-*/session_latest/logs/serve/replica_*.log")
        )
        return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-2500:]}" for log in logs)

    def load(
        self,
        seconds: float,
        concurrency: int,
        out: Path,
        max_requests: int,
        names: list[str] | None = None,
        pause_s: float = 0.02,
    ) -> subprocess.Popen[bytes]:
        """Classify load from the client box over the endpoints of ``names`` (default: every node)."""
        ca = self.homes["head"] / "pki" / "ca.crt"
        token_file = self.homes["head"] / "client" / "token"
        script = Path(__file__).resolve().parents[1] / "cluster" / "load.py"
        argv = [
            sys.executable,
            str(script),
            self.endpoints(names),
            SERVER_NAME,
            str(ca),
            str(token_file),
        ]
        argv += [str(seconds), str(concurrency), str(out), str(max_requests), str(pause_s)]
        return self.net.spawn("client", argv, self.env, self.log("load"))


def prepare_homes(base: Path, head_home: Path, addresses: dict[str, str]) -> dict[str, Path]:
    """The PKI on the head (a server certificate per box, for its address and SERVER_NAME) and each
    worker's folder with only what the roles install on every box."""
    from appliance.security import pki

    homes = {"head": head_home}
    folder = head_home / "pki"
    pki.init_ca(folder)
    for name, address in addresses.items():
        if name == "head":
            continue
        home = base / "homes" / name
        (home / "pki").mkdir(parents=True)
        pki.issue_server(folder, [address, SERVER_NAME])
        cert, key = pki.server_paths(folder)
        for source in (cert, key, pki.ca_paths(folder).cert):
            shutil.copy2(source, home / "pki" / source.name)
        shutil.copytree(head_home / "keys" / "trusted", home / "keys" / "trusted")
        homes[name] = home
    pki.issue_server(folder, [addresses["head"], SERVER_NAME, "127.0.0.1", "localhost"])
    return homes


def cluster_env(home_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(home_path),
        "APPLIANCE_HOME": str(home_path),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        **OFFLINE_ENV,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextmanager
def built_cluster(start: tuple[str, ...] = tuple(NODES)) -> Iterator[ApplianceCluster]:
    """The boxes with their homes (the b8 specialist published on the head), the nodes in ``start``
    running and ``appliance serve`` on the head; everything stopped and removed after."""
    from tests.serving.specialists import train_subset

    base = Path(tempfile.mkdtemp(prefix="appl-c-", dir="/tmp"))
    home_path = base / "home"
    home_path.mkdir()
    head_home = base / "homes" / "head"
    previous = os.environ.get("APPLIANCE_HOME")
    os.environ["APPLIANCE_HOME"] = str(head_home)  # the factory signs with the head's key
    try:
        train_subset(ModelStore(head_home), "b8", base / "work")
        ensure_local_admin_token()  # the head's token store and the client's token, as the roles leave them
        homes = prepare_homes(base, head_home, {name: f"{SUBNET}.{host}" for name, host in NODES.items()})
        with Network(home_path) as network:
            for name, host in NODES.items():
                network.add(name, host, homes[name])
            network.add("client", 100)
            cluster = ApplianceCluster(network, base, homes, cluster_env(home_path))
            cluster.start_node("head")
            time.sleep(3)  # the GCS first
            for name in start:
                if name != "head":
                    cluster.start_node(name)
            cluster.serve()
            yield cluster
    finally:
        if previous is None:
            os.environ.pop("APPLIANCE_HOME", None)
        else:
            os.environ["APPLIANCE_HOME"] = previous
        if not os.environ.get("APPLIANCE_KEEP_CLUSTER"):  # set it to read the boxes' logs after a failure
            shutil.rmtree(base, ignore_errors=True)
