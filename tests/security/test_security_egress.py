"""No egress: a full appliance session attempts no connection off the box.

``appliance serve`` (local Ray, Ray Serve, the specialist, the vLLM generalist), a client session
(classify on both routes, streaming generate), the ``classify`` and ``status`` commands and
``appliance stop`` each run under ``strace -f -e trace=connect,sendto,sendmsg,sendmmsg``, which
records every connect() of every process and thread in the tree, whether it succeeds or not, and
every datagram sent to an address given with the send itself (UDP without connect()). Any
AF_INET/AF_INET6 destination other than loopback fails the test. The processes get an environment
without the offline variables: the appliance must switch telemetry and hub access off itself.

The detector is shown to catch real attempts: the same harness runs Hugging Face hub and vLLM
usage-stats code with telemetry switched back on, and a bare UDP sendto(), and must flag them.
Their endpoints are documentation addresses (TEST-NET-1/2, 2001:db8::/32), so the attempt happens
without a DNS lookup and fails harmlessly on any network.

Not covered: lookups a local stub resolver (a separate daemon) makes on a process's behalf, and
raw or packet sockets.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_security_server import MODEL, PROBE, published_home

from appliance.config import OFFLINE_ENV
from appliance.engines.tiny_llm import build_tiny_llm
from tests.helpers.system_tools import ensure_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# connect(3, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("1.2.3.4")}, 16) = ...
# connect(3, {sa_family=AF_INET6, sin6_port=htons(80), ..., inet_pton(AF_INET6, "::1", &sin6_addr), ...
# sendto(3, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(9), ...}, 16) = 1   (NULL when connected)
# sendmsg(3, {msg_name={sa_family=AF_INET, ...}, msg_namelen=16, msg_iov=...}, 0) = 1
_TRACED_CALLS = "connect,sendto,sendmsg,sendmmsg"
_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<call>connect|sendto|sendmsg|sendmmsg)\((?P<args>.*)$")
# A sockaddr as strace prints it; none of the IP families' fields holds a brace.
_SOCKADDR = re.compile(r"\{sa_family=(?P<family>AF_\w+)(?P<rest>[^{}]*)\}?")
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
_V4 = re.compile(r'sin_addr=inet_addr\("([^"]+)"\)')
_V6 = re.compile(r'inet_pton\(AF_INET6, "([^"]+)"')


@dataclass(frozen=True)
class Attempt:
    """One destination a process handed the kernel: a connect(), or a send with an address."""

    pid: int
    call: str
    family: str
    host: str  # the IP address, or the socket path / "" for other families
    port: int | None
    line: str

    @property
    def outbound(self) -> bool:
        """An IP destination off the box: anything but loopback (and the unspecified address,
        which Linux takes for the local host)."""
        if self.family not in ("AF_INET", "AF_INET6"):
            return False  # AF_UNIX, AF_NETLINK, AF_UNSPEC (a UDP "disconnect"): local by nature
        address = ipaddress.ip_address(self.host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return not (address.is_loopback or address.is_unspecified)


def parse_attempts(log: str) -> list[Attempt]:
    """Every destination in an ``strace -f`` log, completed or cut short (``<unfinished ...>``):
    each connect(), and each sendto/sendmsg/sendmmsg address (a send on a connected socket names
    none; its connect() is already recorded)."""
    found = []
    for line in log.splitlines():
        match = _CALL.match(line)
        if match is None:
            continue
        for address in _SOCKADDR.finditer(match["args"]):
            rest = address["rest"]
            host = next((m[1] for m in (_V4.search(rest), _V6.search(rest)) if m), "")
            if address["family"] in ("AF_INET", "AF_INET6") and not host:
                raise AssertionError(f"unparsed IP address in the strace log: {line}")
            port = _PORT.search(rest)
            found.append(
                Attempt(
                    int(match["pid"]),
                    match["call"],
                    address["family"],
                    host,
                    int(port[1]) if port else None,
                    line,
                )
            )
    return found


def outbound(logs: list[Path]) -> list[str]:
    return [c.line for log in logs for c in parse_attempts(log.read_text(errors="replace")) if c.outbound]


@pytest.fixture(scope="session")
def strace() -> str:
    """strace, installed with apt-get when missing and the tests run as root."""
    found = ensure_tool("strace")
    probe = subprocess.run([found, "-f", "-qq", "-e", f"trace={_TRACED_CALLS}", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace refused?): {probe.stderr.decode().strip()}")
    return found


def traced(strace: str, log: Path, argv: list[str]) -> list[str]:
    """``argv`` under strace: every connect() and addressed send of the process tree, threads
    included, into ``log``. seccomp-bpf stops the tracees only at those calls; ``-s 0`` keeps the
    sent data out of the log."""
    return [
        strace,
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-s",
        "0",
        "-e",
        f"trace={_TRACED_CALLS}",
        "-e",
        "signal=none",
        "-o",
        str(log),
        *argv,
    ]


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without the offline switches the test suite sets for itself."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    env["APPLIANCE_HOME"] = str(home)
    return env


# ------------------------------------------------------------------------------------ detector


TELEMETRY_ON = {
    # the hub lookup every from_pretrained() makes unless HF_HUB_OFFLINE is set
    "hf-hub": (
        "import huggingface_hub\n"
        "try:\n"
        "    huggingface_hub.model_info('sentence-transformers/all-MiniLM-L6-v2', timeout=3)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n",
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://198.51.100.7"},
        "198.51.100.7",
    ),
    # the report vLLM sends at engine start unless VLLM_NO_USAGE_STATS / DO_NOT_TRACK is set
    "vllm-usage-stats": (
        "import socket\n"
        "socket.setdefaulttimeout(3)\n"
        "from vllm.usage import usage_lib\n"
        "assert usage_lib.is_usage_stats_enabled()\n"
        "usage_lib.UsageMessage()._send_to_server({'probe': 1})\n",
        {"VLLM_USAGE_STATS_SERVER": "http://[2001:db8::7]/"},
        "2001:db8::7",
    ),
}


@pytest.mark.parametrize("case", sorted(TELEMETRY_ON))
def test_the_detector_flags_telemetry_that_is_switched_on(strace: str, tmp_path: Path, case: str) -> None:
    code, extra_env, address = TELEMETRY_ON[case]
    log = tmp_path / "connect.log"
    env = {**clean_env(tmp_path), **extra_env}
    done = subprocess.run(
        traced(strace, log, [sys.executable, "-c", code]), env=env, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    flagged = outbound([log])
    assert flagged, f"no outbound connect() recorded; log:\n{log.read_text()[-2000:]}"
    assert any(address in line for line in flagged), flagged


# A datagram sent without connect(): the address travels with the send itself. TEST-NET-1 and
# 2001:db8::/32 are documentation ranges; the kernel may refuse the send (no route), which is fine:
# strace records the attempt either way.
DATAGRAMS = {
    "sendto-v4": "sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "sock.sendto(b'probe', ('192.0.2.1', 9))\n",
    "sendmsg-v4": "sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "sock.sendmsg([b'probe'], [], 0, ('192.0.2.1', 9))\n",
    "sendto-v6": "sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "sock.sendto(b'probe', ('2001:db8::1', 9))\n",
}


@pytest.mark.parametrize("case", sorted(DATAGRAMS))
def test_the_detector_flags_a_datagram_sent_without_connect(strace: str, tmp_path: Path, case: str) -> None:
    code = "import socket\ntry:\n" + "".join(f"    {line}\n" for line in DATAGRAMS[case].splitlines())
    code += "except OSError as exc:\n    print('refused', exc)\n"
    log = tmp_path / "send.log"
    done = subprocess.run(
        traced(strace, log, [sys.executable, "-c", code]), env=clean_env(tmp_path), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    attempts = parse_attempts(log.read_text())
    assert not any(a.call == "connect" and a.outbound for a in attempts), attempts  # no connect() at all
    flagged = outbound([log])
    address = "2001:db8::1" if case.endswith("v6") else "192.0.2.1"
    assert any(address in line and case.split("-")[0] in line for line in flagged), log.read_text()[-2000:]


def test_parse_attempts_reads_every_family_and_addressed_sends() -> None:
    log = "\n".join(
        [
            '10 connect(3, {sa_family=AF_UNIX, sun_path="/tmp/ray/session/sockets/raylet"}, 110) = 0',
            "11 connect(4, {sa_family=AF_INET, sin_port=htons(50051), "
            'sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)',
            "12 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
            "13 connect(6, {sa_family=AF_INET, sin_port=htons(53), "
            'sin_addr=inet_addr("10.255.255.53")}, 16 <unfinished ...>',
            "14 connect(7, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "2606:4700::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
            "15 connect(8, {sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, 12) = 0",
            '16 connect(9, {sa_family=AF_UNSPEC, sa_data="\\0\\0"}, 16) = 0',
            "17 <... connect resumed>) = -1 ETIMEDOUT",
            '18 sendto(10, ""..., 5, MSG_NOSIGNAL, NULL, 0) = 5',
            '19 sendto(11, ""..., 5, 0, {sa_family=AF_INET, sin_port=htons(123), '
            'sin_addr=inet_addr("192.0.2.123")}, 16) = 5',
            "20 sendmsg(12, {msg_name={sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), "
            'inet_pton(AF_INET6, "2001:db8::53", &sin6_addr), sin6_scope_id=0}, msg_namelen=28, '
            'msg_iov=[{iov_base=""..., iov_len=5}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, 0) = 5',
            '21 sendmsg(13, {msg_name=NULL, msg_namelen=0, msg_iov=[{iov_base=""..., iov_len=5}], '
            "msg_iovlen=1, msg_controllen=0, msg_flags=0}, MSG_NOSIGNAL) = 5",
            '22 sendto(14, ""..., 20, 0, {sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, 12) = 20',
            '23 sendto(15, ""..., 5, 0, {sa_family=AF_INET, sin_port=htons(53), '
            'sin_addr=inet_addr("127.0.0.53")}, 16) = 5',
        ]
    )
    found = parse_attempts(log)
    assert [c.family for c in found] == [
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_UNSPEC",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_INET",
    ]
    assert [(c.call, c.host, c.port) for c in found if c.outbound] == [
        ("connect", "10.255.255.53", 53),
        ("connect", "2606:4700::1", 443),
        ("sendto", "192.0.2.123", 123),
        ("sendmsg", "2001:db8::53", 53),
    ]


# ------------------------------------------------------------------------------- full session

CLIENT_SESSION = f"""
import json
from appliance.client import Client

with Client() as client:
    specialist = client.classify({MODEL!r}, [{PROBE[0]!r}], policy="specialist_only")
    generalist = client.classify({MODEL!r}, [{PROBE[0]!r}], policy="generalist_only")
    chunks = list(client.generate("where is my card", max_tokens=8))
print(json.dumps({{
    "specialist": [specialist.results[0].label, specialist.results[0].route],
    "generalist": [generalist.results[0].label, generalist.results[0].route],
    "chunks": len(chunks),
    "finished": [c.finished for c in chunks],
}}))
"""


@pytest.fixture(scope="module")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh APPLIANCE_HOME holding the published specialist (no PKI, tokens or audit yet)."""
    source = published_home(tmp_path_factory.getbasetemp())
    home = tmp_path_factory.mktemp("egress") / "home"
    shutil.copytree(
        source, home, ignore=shutil.ignore_patterns("audit", "tokens", "client", "run", "work", "pki")
    )
    return home


@pytest.fixture(scope="module")
def serving(
    strace: str, session_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """``appliance serve`` with the specialist and a tiny vLLM generalist, traced; yields its run file."""
    work = tmp_path_factory.mktemp("egress-run")
    llm = build_tiny_llm(work / "tiny-llm")
    config = work / "serve.yaml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "applications": [
                    {
                        "args": {
                            "metrics_port": 0,
                            "ingress_cpus": 0.5,
                            "generalist": {"path": str(llm), "max_model_len": 512, "max_concurrency": 2},
                        }
                    }
                ]
            }
        )
    )
    log = work / "serve.connect.log"
    argv = [
        sys.executable,
        "-m",
        "appliance.cli",
        "serve",
        "--port",
        "0",
        "--model",
        MODEL,
        "--config",
        str(config),
    ]
    argv += ["--generalist", str(llm)]
    out = (work / "serve.out").open("wb")
    server = subprocess.Popen(
        traced(strace, log, argv),
        env=clean_env(session_home),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a stuck tree can be ended as a whole
    )
    run_file = session_home / "run" / "server.json"
    deadline = time.monotonic() + 600
    while not run_file.is_file() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(1.0)
    try:
        if not run_file.is_file():
            tail = (work / "serve.out").read_text(errors="replace")[-4000:]
            pytest.fail(f"appliance serve did not come up (exit {server.poll()}):\n{tail}")
        yield {"info": json.loads(run_file.read_text()), "log": log, "work": work, "process": server}
    finally:
        if server.poll() is None:  # the test did not stop it: end the whole traced group
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        out.close()


def run_traced(strace: str, home: Path, log: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        traced(strace, log, argv), env=clean_env(home), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_a_full_session_makes_no_outbound_connection(strace: str, session_home: Path, serving) -> None:
    work: Path = serving["work"]  # type: ignore[assignment]
    info: dict[str, object] = serving["info"]  # type: ignore[assignment]
    assert info["host"] == "127.0.0.1" and int(info["port"]) > 0  # type: ignore[call-overload]
    logs = [serving["log"]]

    logs.append(work / "client.connect.log")
    session = run_traced(strace, session_home, logs[-1], [sys.executable, "-c", CLIENT_SESSION])
    summary = json.loads(session.stdout.strip().splitlines()[-1])
    assert summary["specialist"] == [PROBE[1], "specialist"]
    assert summary["generalist"][1] == "generalist"
    assert summary["chunks"] >= 2 and summary["finished"][-1] is True

    logs.append(work / "classify.connect.log")
    cli = run_traced(
        strace,
        session_home,
        logs[-1],
        [sys.executable, "-m", "appliance.cli", "classify", "--model", MODEL, PROBE[0]],
    )
    assert json.loads(cli.stdout.splitlines()[-1])["label"] == PROBE[1]

    logs.append(work / "status.connect.log")
    run_traced(strace, session_home, logs[-1], [sys.executable, "-m", "appliance.cli", "status", "--json"])

    logs.append(work / "stop.connect.log")
    stopped = run_traced(strace, session_home, logs[-1], [sys.executable, "-m", "appliance.cli", "stop"])
    assert "stopped" in stopped.stdout
    server: subprocess.Popen[bytes] = serving["process"]  # type: ignore[assignment]
    server.wait(timeout=300)  # strace exits once every process of the tree has ended

    connects = [c for log in logs for c in parse_attempts(log.read_text(errors="replace"))]
    port = int(info["port"])  # type: ignore[call-overload]
    # the harness saw the session's own traffic: clients reached the server on loopback
    assert any(c.family in ("AF_INET", "AF_INET6") and c.port == port and not c.outbound for c in connects)
    assert outbound(logs) == []
