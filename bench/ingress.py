"""Served throughput with 1, 2 and 4 ingress processes on one port, pinned and unpinned.

Each ingress process is ``bench.ingress_server`` (the product's runtime and gRPC server with TLS,
a bearer token and the durable audit trail, its own encoder, no Ray), all on one port through
SO_REUSEPORT, each given its share of the server cores for encoder batches. The load generator
(``bench.load``) runs in its own process with several connections, so that the kernel spreads
them over the processes. Per setting:

* closed loop at concurrency 32: texts/s, p99, and the servers' CPU per request (user + system
  time of every ingress process over the run, divided by the requests answered);
* closed loop at concurrency 1: p50;
* the offline engine (one process, the same cores as the servers) on the same texts, for
  served / engine;
* each ingress process's resident memory once warm (one engine per process is the design).

Pinned: the load generator on the first core(s), the ingress processes on the rest, split between
them (``taskset``); unpinned: the scheduler places everything. On a 2-core box, 2 and 4
processes are a simulation (more event loops than cores), and the report says so.

    python -m bench.ingress --home /tmp/home --model banking77 --json
    python -m bench.ingress --home /tmp/home --model b8 --quick --json   # smoke: seconds, not figures

The last stdout line with ``--json`` is one JSON object: settings, medians, raw runs, ISA flags,
load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.ingress_server import REPO, started

CLK_TCK = os.sysconf("SC_CLK_TCK")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Plan:
    repeats: int
    closed_s: float
    single_s: float
    texts: int | None  # engine texts; None: all
    warmup: int = 32

    @classmethod
    def full(cls) -> Plan:
        return cls(repeats=3, closed_s=10.0, single_s=5.0, texts=None)

    @classmethod
    def quick(cls) -> Plan:
        return cls(repeats=1, closed_s=1.5, single_s=1.0, texts=200, warmup=8)


@dataclass(frozen=True)
class Pinning:
    """Where the load generator and the ingress processes run (None: anywhere)."""

    name: str
    load_cpus: str | None
    server_cpus: list[int]

    def process_cpus(self, index: int, count: int) -> str | None:
        """The CPUs of ingress process ``index`` of ``count``: its own slice of the server CPUs
        when there are enough, else all of them."""
        if self.load_cpus is None:
            return None
        cpus = self.server_cpus
        if len(cpus) >= count:
            share = len(cpus) // count
            cpus = cpus[index * share : (index + 1) * share]
        return ",".join(map(str, cpus))


def pinnings() -> list[Pinning]:
    cpus = sorted(os.sched_getaffinity(0))
    unpinned = Pinning("unpinned", None, cpus)
    if len(cpus) < 2:
        return [unpinned]
    load = max(1, len(cpus) // 4)  # a quarter of the cores drive the load, at least one
    return [unpinned, Pinning("pinned", ",".join(map(str, cpus[:load])), cpus[load:])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def isa_flags() -> list[str]:
    """The CPU's vector and matrix extensions that matter to the int8 encoder (lscpu's flags)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags:")), []
    )
    return [f for f in ISA_FLAGS if f in flags]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_load(
    home: Path,
    model: str,
    address: str,
    concurrency: int,
    seconds: float,
    channels: int,
    cpus: str | None,
    warmup: int,
) -> dict[str, object]:
    """``bench.load`` in its own process (pinned to ``cpus`` when given); its JSON result."""
    argv = [sys.executable, "-m", "bench.load", "--address", address, "--model", model, "--json"]
    argv += ["--ca", str(home / "pki" / "ca.crt"), "--token-file", str(home / "client" / "token")]
    argv += ["--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", str(warmup)]
    argv += ["--channels", str(channels)]
    pinned = ["taskset", "-c", cpus] if cpus else []
    done = subprocess.run([*pinned, *argv], cwd=REPO, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(
            f"bench.load failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-500:]}"
        )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(
            f"bench.load at concurrency {concurrency}: {result['errors']} {result['error_examples']}"
        )
    return result


def engine_per_s(home: Path, model: str, cpus: str | None, texts: int | None, cores: int) -> float:
    """The offline engine in its own process on ``cpus``: ``cores`` one-thread batches at once."""
    code = (
        "import json, sys; from bench import ceiling, load; "
        "from appliance.config import apply_offline_env; apply_offline_env(); "
        "from appliance.engines.encoder import EncoderConfig; "
        "from appliance.engines.specialist import load_specialist; from appliance.store import ModelStore; "
        "from pathlib import Path; "
        f"s = load_specialist({model!r}, ModelStore(Path({str(home)!r})), "
        f"EncoderConfig(intra_op_threads=1, parallel_batches={cores})); "
        f"t = load.load_texts()[:{texts}]; print(json.dumps(ceiling.engine_throughput(s, t, 1)))"
    )
    pinned = ["taskset", "-c", cpus] if cpus else []
    done = subprocess.run(
        [*pinned, sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the engine run failed: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])[0])


def measure_setting(
    home: Path, model: str, count: int, pinning: Pinning, plan: Plan, say: Callable[[str], None]
) -> dict[str, object]:
    """One process count under one pinning: repeats of c32 and c1, the engine, memory."""
    from appliance.serve.node import cores_per_ingress

    server_cores = len(pinning.server_cpus)
    share = cores_per_ingress(count, server_cores)
    port = free_port()
    runs: list[dict[str, object]] = []
    with started(
        home, [model], port, count=count, cores=share, cpus_of=lambda i: pinning.process_cpus(i, count)
    ) as procs:
        address = procs[0].address
        memory = [round(rss_mib(p.pid), 1) for p in procs]
        for _ in range(plan.repeats):
            before_load = loadavg()
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            c32 = run_load(
                home, model, address, 32, plan.closed_s, max(8, 4 * count), pinning.load_cpus, plan.warmup
            )
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
            answered = int(c32["ok"]) + plan.warmup  # the warm-up calls ran on the servers too
            c1 = run_load(home, model, address, 1, plan.single_s, 1, pinning.load_cpus, plan.warmup)
            run = {
                "texts_per_s_c32": c32["texts_per_s"],
                "p99_ms_c32": c32["latency_ms"]["p99"],  # type: ignore[index]
                "p50_ms_c1": c1["latency_ms"]["p50"],  # type: ignore[index]
                "server_cpu_ms_per_request": 1000.0 * cpu / answered,
                "loadavg_before": before_load,
            }
            runs.append(run)
            say(
                f"  {count} process(es), {pinning.name}: {run['texts_per_s_c32']:.1f} texts/s at c32, "
                f"p99 {run['p99_ms_c32']:.1f} ms, p50 at c1 {run['p50_ms_c1']:.2f} ms, "
                f"{run['server_cpu_ms_per_request']:.2f} ms server CPU per request, load {before_load}"
            )
        memory_after = [round(rss_mib(p.pid), 1) for p in procs]
    engine_cpus = ",".join(map(str, pinning.server_cpus)) if pinning.load_cpus else None
    engine = engine_per_s(home, model, engine_cpus, plan.texts, server_cores)

    def median(key: str) -> float:
        return float(statistics.median(float(r[key]) for r in runs))  # type: ignore[arg-type]

    served = median("texts_per_s_c32")
    return {
        "processes": count,
        "pinning": pinning.name,
        "load_cpus": pinning.load_cpus,
        "server_cpus": pinning.server_cpus,
        "batches_per_process": share,
        "simulated": count > server_cores,  # more event loops than cores: a simulation
        "texts_per_s_c32": served,
        "p99_ms_c32": median("p99_ms_c32"),
        "p50_ms_c1": median("p50_ms_c1"),
        "server_cpu_ms_per_request": median("server_cpu_ms_per_request"),
        "engine_per_s": engine,
        "served_over_engine": served / engine,
        "rss_mib_per_process_warm": memory,
        "rss_mib_per_process_after": memory_after,
        "raw": runs,
    }


def run(
    home: Path, model: str, counts: Sequence[int], plan: Plan, say: Callable[[str], None]
) -> dict[str, object]:
    started_at, load_at_start = time.time(), loadavg()
    settings = []
    for pinning in pinnings():
        for count in counts:
            settings.append(measure_setting(home, model, count, pinning, plan, say))
    return {
        "model": model,
        "transport": "TLS + bearer token + durable audit",
        "cpus": len(os.sched_getaffinity(0)),
        "isa": isa_flags(),
        "loadavg_start_end": [load_at_start, loadavg()],
        "plan": plan.__dict__,
        "settings": settings,
        "wall_s": round(time.time() - started_at, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", type=Path, required=True, help="APPLIANCE_HOME with the model, PKI and token"
    )
    parser.add_argument("--model", default="banking77", help="published specialist NAME[:VERSION]")
    parser.add_argument("--processes", default="1,2,4", help="ingress process counts (default 1,2,4)")
    parser.add_argument("--quick", action="store_true", help="one short repeat (CI smoke, not figures)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    args = parser.parse_args(argv)
    os.environ["APPLIANCE_HOME"] = str(args.home)
    from appliance.security.pki import ensure_local_pki
    from appliance.security.tokens import ensure_local_admin_token

    ensure_local_pki(args.home / "pki")
    ensure_local_admin_token()
    counts = [int(n) for n in args.processes.split(",")]
    result = run(args.home, args.model, counts, Plan.quick() if args.quick else Plan.full(), print)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
