"""The appliance against NVIDIA Triton Inference Server (through PyTriton), same model, same client.

* **appliance**: the shipped Ray Serve application (``bench.compare.ours``: TLS and a bearer
  token), answering KServe ``ModelInfer`` on ``TEXT`` BYTES ``[1]``;
* **triton**: ``tritonserver`` from the ``nvidia-pytriton`` wheel, with Triton's dynamic batcher
  in front of a PyTriton callable that runs the same published specialist (its ONNX Runtime
  encoder session and head, loaded and verified by the appliance's own loader), ``TEXT`` BYTES
  ``[batch, 1]``, plaintext on loopback;
* **client**: Triton's perf_analyzer for both (``bench.perf_analyzer``), one text per request, the
  same texts (the Banking77 test set), closed loop at concurrency 1 and 32, each measurement
  ``--seconds`` long and repeated ``--repeats`` times with the servers alternating; medians are
  reported next to the raw runs, with the CPU's ISA flags and the load average.

    python -m bench.triton --home ~/.local/share/appliance --model banking77 --json   # the real run
    python -m bench.triton --home /tmp/home --model b8 --smoke                        # a few seconds

With ``--json`` the last line of stdout is one JSON object. Needs ``pip install -e '.[bench]'`` (PyTriton)
and ``python -m bench.perf_analyzer install``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import load
from bench.perf_analyzer import command as perf_analyzer

REPO = Path(__file__).resolve().parents[1]
CONCURRENCIES = (1, 32)
TRITON_MAX_BATCH = 64
TRITON_TOKEN_ENV = "BENCH_TRITON_ACCESS_TOKEN"  # the parent hands the child its access token
TRITON_ACCESS_HEADER = "triton-grpc-protocol-triton-access-token"
PYTHON_LIB = Path(sys.base_prefix) / "lib"  # the stub must load this interpreter's libpython


@dataclass(frozen=True)
class Endpoint:
    name: str  # "appliance" | "triton"
    address: str
    model: str
    batched: bool  # Triton's [batch, 1] form instead of the appliance's [texts]
    ca: Path | None = None
    token: str | None = None
    headers: tuple[str, ...] = ()  # further "name:value" metadata sent with every call


@dataclass(frozen=True)
class Measurement:
    server: str
    concurrency: int
    texts_per_s: float
    p50_ms: float
    p99_ms: float


# ---------------------------------------------------------------- the Triton side


def serve_triton(home: Path, model: str, port: int) -> None:
    """Run in the child process: PyTriton over the appliance's loaded specialist, until killed."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    from appliance.engines.encoder import EncoderConfig
    from appliance.engines.extractor import load_served
    from appliance.engines.specialist import Specialist
    from appliance.store import ModelStore

    specialist = load_served(model, ModelStore(home), EncoderConfig())
    if not isinstance(specialist, Specialist):
        raise SystemExit(f"{model} is not a classifier")
    labels = np.array([label.encode() for label in specialist.labels], dtype=object)

    @batch
    def classify(TEXT: np.ndarray) -> dict[str, np.ndarray]:
        texts = [t.decode("utf-8") for t in TEXT.reshape(-1)]
        probs, _ = specialist.probs(texts)
        best = probs.argmax(axis=1)
        return {
            "LABEL": labels[best].reshape(-1, 1),
            "SCORE": probs.max(axis=1).astype(np.float32).reshape(-1, 1),
        }

    config = TritonConfig(grpc_port=port, http_port=free_port(), metrics_port=free_port())
    # PyTriton restricts the statistics and model-config endpoints (which perf_analyzer reads) to
    # callers holding its access token: the parent chose it and sends it with every call.
    security = TritonSecurityConfig(access_token=os.environ[TRITON_TOKEN_ENV])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=model.split(":")[0],
            infer_func=classify,
            inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="LABEL", dtype=bytes, shape=(1,)),
                Tensor(name="SCORE", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(max_batch_size=TRITON_MAX_BATCH, batcher=DynamicBatcher()),
        )
        print(f"listening on 127.0.0.1:{port}", flush=True)
        triton.serve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def triton(home: Path, model: str, python: str = sys.executable) -> Iterator[Endpoint]:
    """PyTriton in a child process run by ``python``: PyTriton 0.7 needs numpy < 2 (its Python
    backend stub dies on the first BYTES request under numpy 2), so the child may need a
    virtualenv of its own with the appliance's serving dependencies and numpy 1."""
    port = free_port()
    token = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{PYTHON_LIB}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        TRITON_TOKEN_ENV: token,
    }
    argv = [python, "-m", "bench.triton", "--serve-triton", "--home", str(home), "--model", model]
    child = subprocess.Popen(
        [*argv, "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("listening on "):
                lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=300.0)
        except queue.Empty:
            raise RuntimeError("tritonserver did not start within 300 s") from None
        if not line:
            raise RuntimeError(f"tritonserver did not start (exit {child.poll()}); see its stderr")
        yield Endpoint(
            "triton", f"127.0.0.1:{port}", model.split(":")[0], batched=True,
            headers=(f"{TRITON_ACCESS_HEADER}:{token}",),
        )  # fmt: skip
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contextmanager
def appliance(home: Path, model: str) -> Iterator[Endpoint]:
    from bench.compare import ours

    with ours(home, model, insecure=False) as target:
        yield Endpoint("appliance", target.address, model, False, target.ca, target.token)


# ---------------------------------------------------------------- the client


def input_data(texts: Sequence[str], batched: bool, folder: Path) -> Path:
    """perf_analyzer's input file: one step per text, in the tensor form each server takes."""
    steps = [{"TEXT": [t] if batched else {"content": [t], "shape": [1]}} for t in texts]
    path = folder / ("batched.json" if batched else "texts.json")
    path.write_text(json.dumps({"data": steps}))
    return path


def measure(endpoint: Endpoint, data: Path, concurrency: int, seconds: float, folder: Path) -> Measurement:
    report = folder / f"{endpoint.name}-{concurrency}.csv"
    argv = [
        *perf_analyzer(),
        "-m", endpoint.model, "-u", endpoint.address, "-i", "grpc",
        "--input-data", str(data), "--concurrency-range", str(concurrency),
        # three windows make the measurement (perf_analyzer's least for a result), whatever they vary
        "--measurement-interval", str(int(seconds * 1000 / 3)), "--stability-percentage", "1000",
        "--max-trials", "3", "-f", str(report),
    ]  # fmt: skip
    if endpoint.ca is not None:
        argv += ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(endpoint.ca)]
    if endpoint.token:
        argv += ["-H", f"authorization:Bearer {endpoint.token}"]
    for header in endpoint.headers:
        argv += ["-H", header]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"perf_analyzer against {endpoint.name} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    (row,) = list(csv.DictReader(report.read_text().splitlines()))
    return Measurement(
        endpoint.name,
        concurrency,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000.0,
        float(row["p99 latency"]) / 1000.0,
    )


# ---------------------------------------------------------------- the run


def isa_flags() -> list[str]:
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    )
    wanted = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "fma")
    return [f for f in flags.split(":")[-1].split() if f in wanted]


def summarize(results: Sequence[Measurement]) -> dict[str, object]:
    medians: dict[str, dict[str, float]] = {}
    for server in ("appliance", "triton"):
        for c in CONCURRENCIES:
            runs = [r for r in results if r.server == server and r.concurrency == c]
            if runs:
                medians[f"{server}_c{c}"] = {
                    "texts_per_s": statistics.median(r.texts_per_s for r in runs),
                    "p50_ms": statistics.median(r.p50_ms for r in runs),
                    "p99_ms": statistics.median(r.p99_ms for r in runs),
                }
    ratio = {
        f"c{c}": medians[f"appliance_c{c}"]["texts_per_s"] / medians[f"triton_c{c}"]["texts_per_s"]
        for c in CONCURRENCIES
        if f"appliance_c{c}" in medians and f"triton_c{c}" in medians
    }
    return {
        "medians": medians,
        "appliance_over_triton": ratio,
        "raw": [asdict(r) for r in results],
        "isa": isa_flags(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def _line(r: Measurement) -> str:
    speed = f"{r.texts_per_s:8.1f} texts/s"
    return f"{r.server:9s} c{r.concurrency:<3d} {speed}  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms"


def run(
    home: Path, model: str, repeats: int, seconds: float, texts: Sequence[str], python: str = sys.executable
) -> dict[str, object]:
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        folder = Path(tmp)
        with appliance(home, model) as ours, triton(home, model, python) as theirs:
            data = {False: input_data(texts, False, folder), True: input_data(texts, True, folder)}
            for _ in range(repeats):
                for c in CONCURRENCIES:
                    for endpoint in (ours, theirs):  # alternating, so both see the same drift
                        result = measure(endpoint, data[endpoint.batched], c, seconds, folder)
                        print(_line(result), flush=True)
                        results.append(result)
    return summarize(results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--model", default="banking77")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="each measurement window")
    parser.add_argument("--texts", type=Path, help="CSV with a text column or one text per line")
    parser.add_argument("--smoke", action="store_true", help="one repeat of 2 s windows on 50 texts")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--triton-python", default=sys.executable, help="interpreter for the PyTriton side")
    parser.add_argument("--serve-triton", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["APPLIANCE_HOME"] = str(args.home)
    if args.serve_triton:
        serve_triton(args.home, args.model, args.port)
        return 0
    texts = load.load_texts(args.texts)
    repeats, seconds = (1, 2.0) if args.smoke else (args.repeats, args.seconds)
    summary = run(
        args.home, args.model, repeats, seconds, texts[:50] if args.smoke else texts, args.triton_python
    )
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
