"""One ingress process without Ray: the product's runtime and gRPC server, as a replica runs them.

TLS, bearer tokens and the durable audit trail are on, as shipped (``--insecure-loopback``:
plaintext on 127.0.0.1, no tokens). Several of these on one ``--port`` share it through
SO_REUSEPORT, the way a node's ingress replicas do; ``bench.ingress`` starts 1, 2 or 4 of them,
and the tests use them as real server processes.

    python -m bench.ingress_server --home /tmp/home --model b8 --port 50071 --cores 1

It prints ``listening on 127.0.0.1:PORT pid PID`` once its models are warm, then serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY = "listening on "


@dataclass(frozen=True)
class Ingress:
    """One started ingress process."""

    child: subprocess.Popen[str]
    address: str
    pid: int


@contextlib.contextmanager
def started(
    home: Path,
    models: Sequence[str],
    port: int,
    *,
    count: int = 1,
    cores: int = 0,
    cpus_of: Callable[[int], str | None] | None = None,
    insecure: bool = False,
    timeout: float = 300.0,
) -> Iterator[list[Ingress]]:
    """``count`` ingress processes on ``port`` (0 only for one), process ``i`` pinned to
    ``cpus_of(i)`` (a ``taskset -c`` list; None: anywhere); yields them once all are warm, stops
    them after."""
    if count > 1 and port == 0:
        raise ValueError("several ingress processes share one port: give a port, not 0")
    argv = [sys.executable, "-m", "bench.ingress_server", "--home", str(home), "--port", str(port)]
    argv += [f"--model={m}" for m in models] + ["--cores", str(cores)]
    argv += ["--insecure-loopback"] if insecure else []
    children = []
    for index in range(count):
        cpus = cpus_of(index) if cpus_of is not None else None
        pinned = ["taskset", "-c", cpus] if cpus else []
        children.append(subprocess.Popen([*pinned, *argv], cwd=REPO, stdout=subprocess.PIPE, text=True))
    try:
        yield [_ready(child, timeout) for child in children]
    finally:
        for child in children:
            stop(child)


def _ready(child: subprocess.Popen[str], timeout: float) -> Ingress:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put("")  # end of output: the process is gone

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"an ingress process did not start within {timeout:.0f} s") from None
    if not line.startswith(READY):
        reason = line.strip() or f"exit {child.wait()}; see its stderr"
        raise RuntimeError(f"an ingress process did not start: {reason}")
    _, _, address, _, pid = line.split()
    return Ingress(child, address, int(pid))


def stop(child: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 15 s; a process already gone is left as it is."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
    child.wait()


async def serve(home: Path, models: list[str], port: int, cores: int, insecure: bool) -> None:
    from appliance.api.server import ApplianceServer, ServerSettings
    from appliance.serve.runtime import RuntimeSettings, ServingRuntime
    from appliance.store import ModelStore

    runtime = ServingRuntime(RuntimeSettings(models=tuple(models), cores=cores), store=ModelStore(home))
    settings = ServerSettings(
        host="127.0.0.1", port=port, pki_dir=home / "pki", insecure_loopback=insecure, auth=not insecure
    )
    server = ApplianceServer(runtime, settings)
    bound = await server.start()
    await runtime.start()
    if not runtime.is_ready():
        await server.stop(grace=0)
        raise SystemExit(f"models did not load: {runtime.start_errors}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY}127.0.0.1:{bound} pid {os.getpid()}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingress_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--home", type=Path, required=True, help="APPLIANCE_HOME with the model, PKI and tokens"
    )
    parser.add_argument("--model", action="append", required=True, help="published specialist (repeatable)")
    parser.add_argument("--port", type=int, default=0, help="loopback port, shared with siblings (0: own)")
    parser.add_argument("--cores", type=int, default=0, help="encoder batches in flight (0: this CPU set)")
    parser.add_argument("--insecure-loopback", action="store_true", help="plaintext, no tokens, no audit")
    args = parser.parse_args(argv)
    os.environ["APPLIANCE_HOME"] = str(args.home)  # tokens and the audit chain live under it
    from appliance.config import apply_offline_env

    apply_offline_env()
    asyncio.run(serve(args.home, args.model, args.port, args.cores, args.insecure_loopback))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
