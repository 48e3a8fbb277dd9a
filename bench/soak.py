"""Soak benchmark: a steady open-loop load on a running appliance for a long time, sampled.

Finds a quick maximum first (a short closed loop), then offers half of it (or ``--rate``) as
Poisson arrivals for ``--minutes`` (default 30), in windows of ``--interval`` seconds (default 30).
After each window it samples the server: resident memory and open file descriptors summed over
the process tree of ``--pid`` (default: the running appliance's launcher, from its run file; a
local Ray runs the ingress replica below it), the window's p50/p99 latency and errors, and the
load average. Memory or descriptors that keep growing under a steady load are leaks.

Prints the CPU's vector ISA (avx2/avx512/vnni/amx from the CPU flags, as lscpu shows them) and
writes ``OUT.json`` and ``OUT.png`` (the curves). The load itself is :mod:`bench.load`.

    H=~/.local/share/appliance
    python -m bench.soak --address 127.0.0.1:50051 --model banking77 --ca $H/pki/ca.crt \\
        --token-file $H/client/token --minutes 30 --out soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.config import appliance_home
from bench import load

ISA_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
}


@dataclass(frozen=True)
class Sample:
    """One window of the soak."""

    t_s: float  # seconds since the soak began, at the window's end
    rss_bytes: int  # summed over the server's process tree
    open_fds: int
    processes: int
    requests: int
    ok: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    throughput_rps: float
    load_avg: tuple[float, float, float]


@dataclass
class SoakReport:
    address: str
    model: str
    pid: int
    rate: float  # offered, requests/s
    measured_max_rps: float | None  # None when --rate was given
    minutes: float
    interval_s: float
    cpu: dict[str, object]
    samples: list[Sample] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def growth(self) -> dict[str, int]:
        """Last sample minus first: what the soak added to memory and descriptors."""
        if len(self.samples) < 2:
            return {"rss_bytes": 0, "open_fds": 0}
        first, last = self.samples[0], self.samples[-1]
        return {"rss_bytes": last.rss_bytes - first.rss_bytes, "open_fds": last.open_fds - first.open_fds}


# ---------------------------------------------------------------- the machine and the server


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Model name, logical CPUs and which vector extensions the CPU flags show."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = {name: any(f in flags for f in names) for name, names in ISA_FLAGS.items()}
    return {"model": model, "cpus": os.cpu_count(), "isa": isa}


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_usage(root: int) -> tuple[int, int, int]:
    """(resident bytes, open descriptors, processes) summed over ``root``'s process tree."""
    rss = fds = alive = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in process_tree(root):
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, IndexError):
            continue
        alive += 1
    if not alive:
        raise ProcessLookupError(f"no process {root}: is the appliance running?")
    return rss, fds, alive


def default_pid() -> int:
    run = appliance_home() / "run" / "server.json"
    try:
        return int(json.loads(run.read_text())["pid"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"no running appliance found in {run}: give --pid") from exc


# ---------------------------------------------------------------- the soak


async def measure_max(target: load.Target, texts: list[str], seconds: float, concurrency: int) -> float:
    """Successful requests/s of a short closed loop: a quick, rough maximum."""
    result = await load.run_closed_loop(
        target, texts, concurrency=concurrency, duration=seconds, warmup=2 * concurrency
    )
    if not result.ok:
        raise ValueError(f"the quick maximum got no answers: {result.errors} {result.error_examples}")
    return result.throughput_rps


async def soak(
    target: load.Target,
    texts: list[str],
    report: SoakReport,
    *,
    batch: int = 1,
    timeout: float = 10.0,
    progress: bool = True,
) -> SoakReport:
    began = time.perf_counter()
    windows = max(1, round(report.minutes * 60 / report.interval_s))
    for window in range(windows):
        result = await load.run_open_loop(
            target,
            texts,
            rate=report.rate,
            duration=report.interval_s,
            warmup=0,
            batch=batch,
            timeout=timeout,
            seed=window,
        )
        rss, fds, processes = tree_usage(report.pid)
        sample = Sample(
            t_s=round(time.perf_counter() - began, 3),
            rss_bytes=rss,
            open_fds=fds,
            processes=processes,
            requests=result.requests,
            ok=result.ok,
            errors=result.errors,
            p50_ms=result.latency_ms.get("p50"),
            p99_ms=result.latency_ms.get("p99"),
            throughput_rps=result.throughput_rps,
            load_avg=os.getloadavg(),
        )
        report.samples.append(sample)
        if progress:
            print(_line(sample), flush=True)
    return report


def _line(s: Sample) -> str:
    lat = f"p50 {s.p50_ms:.1f} ms p99 {s.p99_ms:.1f} ms" if s.p50_ms is not None else "no answers"
    errors = f" errors {s.errors}" if s.errors else ""
    return (
        f"t={s.t_s:7.1f}s rss {s.rss_bytes / 2**20:8.1f} MiB fds {s.open_fds:5d} procs {s.processes:3d} "
        f"{s.ok}/{s.requests} ok {lat}{errors} load {s.load_avg[0]:.2f}"
    )


def plot(report: SoakReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in report.samples]
    fig, (mem, lat) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    mem.plot(t, [s.rss_bytes / 2**20 for s in report.samples], marker="o", color="tab:blue")
    mem.set_ylabel("server RSS (MiB)", color="tab:blue")
    fds = mem.twinx()
    fds.plot(t, [s.open_fds for s in report.samples], marker="s", color="tab:orange")
    fds.set_ylabel("open descriptors", color="tab:orange")
    for name, color in (("p50_ms", "tab:green"), ("p99_ms", "tab:red")):
        lat.plot(t, [getattr(s, name) for s in report.samples], marker="o", color=color, label=name[:3])
    lat.set_ylabel("latency (ms)")
    lat.set_xlabel("minutes")
    lat.legend()
    for ax in (mem, lat):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"soak: {report.model} at {report.rate:.1f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--model", required=True)
    parser.add_argument("--ca", type=Path, help="PEM root certificate: connect with TLS")
    parser.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key for mutual TLS")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per sample (default 30)")
    parser.add_argument("--rate", type=float, help="requests/s to offer (default: half the quick maximum)")
    parser.add_argument("--probe-seconds", type=float, default=10.0, help="length of the quick maximum")
    parser.add_argument("--probe-concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="texts per request")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline in seconds")
    parser.add_argument("--pid", type=int, help="the server process whose tree is measured")
    parser.add_argument("--out", type=Path, default=Path("soak"), help="writes OUT.json and OUT.png")
    return parser


async def _main(args: argparse.Namespace) -> SoakReport:
    token = args.token_file.read_text(encoding="utf-8").strip() if args.token_file else None
    target = load.Target(
        address=args.address, model=args.model, ca=args.ca, cert=args.cert, key=args.key, token=token
    )
    texts = load.load_texts()
    pid = args.pid if args.pid is not None else default_pid()
    tree_usage(pid)  # fail before any load if the server is not there
    measured = None
    rate = args.rate
    if rate is None:
        measured = await measure_max(target, texts, args.probe_seconds, args.probe_concurrency)
        rate = measured / 2
    if rate <= 0:
        raise ValueError("the rate must be positive")
    cpu = cpu_info()
    print(f"cpu: {cpu['model']}, {cpu['cpus']} logical CPUs, isa {cpu['isa']}")
    print(f"load average: {os.getloadavg()}")
    print(
        f"soaking {args.model} at {rate:.1f} req/s"
        + (f" (half of the quick maximum {measured:.1f})" if measured is not None else "")
        + f" for {args.minutes} min, a sample every {args.interval} s; server pid {pid}",
        flush=True,
    )
    report = SoakReport(args.address, args.model, pid, rate, measured, args.minutes, args.interval, cpu)
    return await soak(target, texts, report, batch=args.batch, timeout=args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        print("error: --minutes and --interval must be positive", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = {**report.to_dict(), "growth": report.growth()}
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    plot(report, png_path)
    print(f"growth over the soak: {report.growth()}")
    print(f"wrote {json_path} and {png_path}")
    return 0 if all(s.ok for s in report.samples) else 1


if __name__ == "__main__":
    raise SystemExit(main())
