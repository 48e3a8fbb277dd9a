"""Load generator for the appliance's gRPC APIs (``appliance.v1`` Classify or KServe v2 ModelInfer).

Two modes, each bounded by a request count and a duration:

* closed loop: ``--concurrency N`` workers, each sending its next request when the last returns;
* open loop: Poisson arrivals at ``--rate R`` requests/s, sent whether or not earlier ones have
  returned. Latency counts from the scheduled arrival, so a lagging client or server shows up as
  latency instead of silently lowering the offered rate (no coordinated omission).

A warm-up phase runs first and is not counted. ``--sweep R1,R2,..`` runs the open loop at each
rate and plots latency percentiles against achieved throughput. Targets must be loopback
addresses unless ``--allow-remote`` is given.

    python -m bench.load --address 127.0.0.1:50051 --model intents --concurrency 8 --duration 10
    python -m bench.load --api kserve --address 127.0.0.1:50051 --model intents --sweep 20,40,80 --plot p.png

``run_closed_loop`` and ``run_open_loop`` are the function API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import grpc
import numpy as np

from appliance._proto.appliance.v1 import appliance_pb2, appliance_pb2_grpc
from appliance._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from appliance.api.kserve import encode_raw_bytes
from appliance.network import is_loopback

APIS = ("appliance", "kserve")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    address: str  # host:port, [v6]:port or unix:PATH
    model: str
    api: str = "appliance"  # "appliance" | "kserve"
    ca: Path | None = None  # PEM root certificate; enables TLS
    cert: Path | None = None  # client certificate (mutual TLS), with `key`
    key: Path | None = None
    server_name: str | None = None  # TLS name to verify when it differs from the address
    token: str | None = None  # sent as `authorization: Bearer <token>`
    channels: int = 1
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        if (self.cert or self.server_name) and self.ca is None:
            raise ValueError("cert, key and server_name need TLS: give ca as well")
        if self.channels < 1:
            raise ValueError("channels must be at least 1")
        if not self.allow_remote and not is_loopback(self.address):
            raise ValueError(f"{self.address} is not a loopback address; pass allow_remote to load it anyway")


def load_texts(path: Path | None = None) -> list[str]:
    """Texts from a CSV with a ``text`` column, or one per line; default the Banking77 test set."""
    if path is None:
        source = resources.files("appliance") / "data" / "banking77" / "test.csv"
        content, is_csv = source.read_text(encoding="utf-8"), True
    else:
        content, is_csv = path.read_text(encoding="utf-8"), path.suffix.lower() == ".csv"
    if is_csv:
        reader = csv.DictReader(content.splitlines())
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise ValueError(f"{path or 'the default texts'}: a CSV needs a 'text' column")
        texts = [row["text"] for row in reader if row["text"]]
    else:
        texts = [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


# ---------------------------------------------------------------- results


@dataclass
class LoadResult:
    mode: str  # "closed" | "open"
    api: str
    model: str
    concurrency: int | None  # closed loop
    offered_rate: float | None  # open loop, requests/s
    batch: int
    requests: int  # counted requests that finished (ok or not)
    ok: int
    errors: dict[str, int]  # gRPC status name -> count
    duration_s: float  # first send to last completion
    throughput_rps: float  # successful requests per second
    texts_per_s: float
    latency_ms: dict[str, float]  # p50/p90/p99/p99.9/mean/max over successful requests
    warmup_requests: int
    error_examples: dict[str, str] = field(default_factory=dict)  # one message per status

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        shape = f"concurrency {self.concurrency}" if self.mode == "closed" else f"rate {self.offered_rate}/s"
        lat = "  ".join(f"{k} {v:.2f}" for k, v in self.latency_ms.items())
        lines = [
            f"{self.api} {self.model} {self.mode} loop, {shape}, batch {self.batch}",
            f"  {self.ok}/{self.requests} ok in {self.duration_s:.2f} s: "
            f"{self.throughput_rps:.1f} req/s, {self.texts_per_s:.1f} texts/s",
            f"  latency ms: {lat}" if lat else "  latency ms: (no successful requests)",
        ]
        for code, count in sorted(self.errors.items()):
            lines.append(f"  {code}: {count} ({self.error_examples.get(code, '')})")
        return "\n".join(lines)


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.first_start = math.inf
        self.last_end = -math.inf

    def record(self, started: float, ended: float, error: grpc.aio.AioRpcError | None) -> None:
        self.first_start = min(self.first_start, started)
        self.last_end = max(self.last_end, ended)
        if error is None:
            self.latencies.append(ended - started)
        else:
            name = error.code().name
            self.errors[name] += 1
            self.examples.setdefault(name, (error.details() or "")[:200])

    def result(self, **shape: object) -> LoadResult:
        ok, failed = len(self.latencies), sum(self.errors.values())
        duration = max(self.last_end - self.first_start, 0.0) if ok + failed else 0.0
        latency: dict[str, float] = {}
        if ok:
            ms = np.asarray(self.latencies) * 1000.0
            latency = {name: float(np.percentile(ms, q)) for name, q in PERCENTILES.items()}
            latency |= {"mean": float(ms.mean()), "max": float(ms.max())}
        rps = ok / duration if duration > 0 else 0.0
        batch = int(shape["batch"])  # type: ignore[call-overload]
        return LoadResult(
            requests=ok + failed,
            ok=ok,
            errors=dict(self.errors),
            duration_s=duration,
            throughput_rps=rps,
            texts_per_s=rps * batch,
            latency_ms=latency,
            error_examples=dict(self.examples),
            **shape,  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------- the client

Call = Callable[[list[str]], Awaitable[object]]


def _channel(target: Target) -> grpc.aio.Channel:
    # A local subchannel pool gives each channel its own connection, so --channels means sockets.
    options = [("grpc.use_local_subchannel_pool", 1)]
    if target.ca is None:
        return grpc.aio.insecure_channel(target.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=target.ca.read_bytes(),
        private_key=target.key.read_bytes() if target.key else None,
        certificate_chain=target.cert.read_bytes() if target.cert else None,
    )
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    return grpc.aio.secure_channel(target.address, credentials, options=options)


def _caller(channel: grpc.aio.Channel, target: Target, timeout: float) -> Call:
    metadata = (("authorization", f"Bearer {target.token}"),) if target.token else None
    if target.api == "appliance":
        classify = appliance_pb2_grpc.InferenceServiceStub(channel).Classify

        def call_appliance(texts: list[str]) -> Awaitable[object]:
            request = appliance_pb2.ClassifyRequest(model=target.model, texts=texts)
            return classify(request, timeout=timeout, metadata=metadata)

        return call_appliance

    infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    # Raw contents, as the standard clients send them; the label and its score come back.
    outputs = [
        grpc_service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("LABEL", "SCORE")
    ]

    def call_kserve(texts: list[str]) -> Awaitable[object]:
        request = grpc_service_pb2.ModelInferRequest(
            model_name=target.model,
            outputs=outputs,
            raw_input_contents=[encode_raw_bytes([t.encode() for t in texts])],
        )
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
        return infer(request, timeout=timeout, metadata=metadata)

    return call_kserve


@contextlib.asynccontextmanager
async def _callers(target: Target, timeout: float) -> AsyncIterator[itertools.cycle[Call]]:
    channels = [_channel(target) for _ in range(target.channels)]
    try:
        yield itertools.cycle([_caller(c, target, timeout) for c in channels])
    finally:
        for channel in channels:
            await channel.close()


async def _timed(call: Call, texts: list[str], started: float, recorder: _Recorder | None) -> None:
    error: grpc.aio.AioRpcError | None = None
    try:
        await call(texts)
    except grpc.aio.AioRpcError as exc:
        error = exc
    if recorder is not None:
        recorder.record(started, time.perf_counter(), error)


def _batches(texts: Sequence[str], batch: int) -> itertools.cycle[list[str]]:
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if not texts:
        raise ValueError("no texts to send")
    stream = itertools.cycle(texts)
    count = max(len(texts), batch)
    return itertools.cycle([[next(stream) for _ in range(batch)] for _ in range(math.ceil(count / batch))])


def _check_bounds(requests: int | None, duration: float | None) -> None:
    if requests is None and duration is None:
        raise ValueError("give requests or duration (or both), so that the run stops by itself")
    if (requests is not None and requests < 1) or (duration is not None and duration <= 0):
        raise ValueError("requests and duration must be positive")


async def _closed(
    callers: itertools.cycle[Call],
    batches: itertools.cycle[list[str]],
    concurrency: int,
    requests: int | None,
    duration: float | None,
    recorder: _Recorder | None,
) -> None:
    deadline = time.perf_counter() + duration if duration is not None else math.inf
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (requests is None or issued < requests) and time.perf_counter() < deadline:
            issued += 1  # no await between the check and this increment: no overshoot
            await _timed(next(callers), next(batches), time.perf_counter(), recorder)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_closed_loop(
    target: Target,
    texts: Sequence[str],
    *,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    batch: int = 1,
    timeout: float = 30.0,
) -> LoadResult:
    """``concurrency`` workers back to back until ``requests`` are sent or ``duration`` s pass."""
    _check_bounds(requests, duration)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    batches = _batches(texts, batch)
    async with _callers(target, timeout) as callers:
        if warmup:
            await _closed(callers, batches, concurrency, warmup, None, None)
        recorder = _Recorder()
        await _closed(callers, batches, concurrency, requests, duration, recorder)
    return recorder.result(
        mode="closed",
        api=target.api,
        model=target.model,
        concurrency=concurrency,
        offered_rate=None,
        batch=batch,
        warmup_requests=warmup,
    )


async def run_open_loop(
    target: Target,
    texts: Sequence[str],
    *,
    rate: float,
    requests: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    batch: int = 1,
    timeout: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """Poisson arrivals at ``rate``/s until ``requests`` are sent or ``duration`` s pass.

    Every request is awaited (each has ``timeout``), so the run ends at most ``timeout`` s after
    the last arrival.
    """
    _check_bounds(requests, duration)
    if rate <= 0:
        raise ValueError("rate must be positive")
    batches = _batches(texts, batch)
    gaps = random.Random(seed)
    async with _callers(target, timeout) as callers:
        if warmup:
            await _closed(callers, batches, 1, warmup, None, None)
        recorder = _Recorder()
        in_flight: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        arrival = start
        issued = 0
        while requests is None or issued < requests:
            arrival += gaps.expovariate(rate)
            if duration is not None and arrival - start >= duration:
                break
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_timed(next(callers), next(batches), arrival, recorder))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            issued += 1
        if in_flight:
            await asyncio.gather(*in_flight)
    return recorder.result(
        mode="open",
        api=target.api,
        model=target.model,
        concurrency=None,
        offered_rate=rate,
        batch=batch,
        warmup_requests=warmup,
    )


# ---------------------------------------------------------------- sweep plot


def plot_sweep(results: Sequence[LoadResult], path: Path) -> None:
    """Latency percentiles against achieved throughput, one point per offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    points = sorted((r for r in results if r.latency_ms), key=lambda r: r.throughput_rps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in PERCENTILES:
        ax.plot(
            [r.throughput_rps for r in points], [r.latency_ms[name] for r in points], marker="o", label=name
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("achieved throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    if results:
        ax.set_title(f"{results[0].api} {results[0].model}, open loop, batch {results[0].batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def _rates(value: str) -> list[float]:
    try:
        rates = [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated rates, got {value!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("--sweep rates must be positive")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--api", choices=APIS, default="appliance")
    parser.add_argument("--address", required=True, help="host:port (loopback unless --allow-remote)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    tls = parser.add_argument_group("security")
    tls.add_argument("--ca", type=Path, help="PEM root certificate: connect with TLS")
    tls.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    tls.add_argument("--key", type=Path, help="client private key for mutual TLS")
    tls.add_argument("--server-name", help="TLS name to verify, when it differs from the address")
    token = tls.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token")
    token.add_argument("--token-file", type=Path, help="file holding the bearer token")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--concurrency", type=int, help="closed loop with N workers")
    shape.add_argument("--rate", type=float, help="open loop, Poisson arrivals per second")
    shape.add_argument("--sweep", type=_rates, help="open loop at each of R1,R2,...")
    parser.add_argument("--requests", type=int, help="stop after this many counted requests (per rate)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds (per rate; default 10)")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests first (default 20)")
    parser.add_argument("--batch", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels, used round robin")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds")
    parser.add_argument("--texts", type=Path, help="one text per line, or a CSV with a 'text' column")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    parser.add_argument("--json-out", type=Path, help="write the result as JSON here")
    parser.add_argument("--plot", type=Path, help="with --sweep: PNG of latency against throughput")
    return parser


async def _run(args: argparse.Namespace, target: Target, texts: list[str]) -> list[LoadResult]:
    common = {
        "requests": args.requests,
        "duration": args.duration,
        "warmup": args.warmup,
        "batch": args.batch,
        "timeout": args.timeout,
    }
    if args.concurrency is not None:
        return [await run_closed_loop(target, texts, concurrency=args.concurrency, **common)]
    rates = args.sweep or [args.rate]
    return [await run_open_loop(target, texts, rate=rate, seed=args.seed, **common) for rate in rates]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.duration = 10.0
    if args.plot and not args.sweep:
        parser.error("--plot goes with --sweep")
    token = args.token
    if args.token_file:
        token = args.token_file.read_text(encoding="utf-8").strip()
    try:
        target = Target(
            address=args.address,
            model=args.model,
            api=args.api,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            server_name=args.server_name,
            token=token,
            channels=args.channels,
            allow_remote=args.allow_remote,
        )
        texts = load_texts(args.texts)
        results = asyncio.run(_run(args, target, texts))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for result in results:
        print(result.summary())
    document: dict[str, object] = (
        {"sweep": [r.to_dict() for r in results]} if args.sweep else results[0].to_dict()
    )
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"plot: {args.plot}")
    if args.json_out:
        args.json_out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(document))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
