"""The naive deployment many teams start with, as a yardstick for ``bench.compare``.

The same MiniLM weights and the same trained head as a published specialist, run the way a
sentence-transformers snippet runs them: Hugging Face tokenizer, ``AutoModel`` in plain PyTorch
eager mode, mean pooling, L2 normalisation, softmax over the head. Behind it a minimal synchronous
gRPC server speaking ``appliance.v1`` Classify, one request at a time (a single worker thread), no
batching across requests, no TLS, no tokens.

    python -m bench.baseline_server --home ~/.appliance --model banking77 --port 0

It prints ``listening on 127.0.0.1:PORT`` once it is ready, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc


class EagerClassifier:
    """MiniLM in torch eager mode plus the specialist's linear head."""

    def __init__(
        self, base: Path, weight: np.ndarray, bias: np.ndarray, labels: list[str], window: int
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        self.model = AutoModel.from_pretrained(base, local_files_only=True).eval()
        self.weight = torch.from_numpy(weight)
        self.bias = torch.from_numpy(bias)
        self.labels = labels
        self.window = window

    def classify(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        torch = self.torch
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.window, return_tensors="pt"
        )
        with torch.inference_mode():
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            x = torch.nn.functional.normalize(pooled, dim=1)
            probs = torch.softmax(x @ self.weight.T + self.bias, dim=1)
            confidence, index = probs.max(dim=1)
        return [(self.labels[int(i)], float(c)) for i, c in zip(index, confidence, strict=True)]


class Servicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, classifier: EagerClassifier, name: str) -> None:
        self.classifier = classifier
        self.name = name

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        if request.model != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here")
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no texts")
        answers = self.classifier.classify(list(request.texts))
        return pb.ClassifyResponse(
            model=self.name,
            results=[pb.Classification(label=label, confidence=c) for label, c in answers],
        )


def load_classifier(model: str, home: Path | None) -> tuple[EagerClassifier, str]:
    """The specialist's head and labels over the packaged base encoder it was trained on."""
    from appliance.artifact.head import Head
    from appliance.config import apply_offline_env
    from appliance.factory.pipeline import default_base
    from appliance.store import ModelStore

    apply_offline_env()
    manifest = ModelStore(home).load(model)
    head = Head.load(manifest.folder)
    spec = manifest.spec
    classifier = EagerClassifier(default_base(), head.weight, head.bias, spec.labels, spec.encoder.window)
    return classifier, manifest.name


def serve(model: str, home: Path | None, port: int, threads: int) -> None:
    classifier, name = load_classifier(model, home)
    if threads:
        classifier.torch.set_num_threads(threads)
    classifier.classify(["warm up"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # one request at a time
    pb_grpc.add_InferenceServiceServicer_to_server(Servicer(classifier, name), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0).wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--home", type=Path, help="APPLIANCE_HOME holding the model")
    parser.add_argument("--model", default="banking77", help="published specialist NAME[:VERSION]")
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: any free one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    serve(args.model, args.home, args.port, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
