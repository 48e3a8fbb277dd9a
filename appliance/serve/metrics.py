"""Prometheus metrics of the serving path.

One registry per server, so that several servers in one process (tests) don't collide, exposed on
a loopback HTTP port by :func:`start_metrics_server`.

Every label value must come from a bounded set, or a caller could grow the registry (and the
process) without limit by inventing names: a model gets its own ``model`` label only while it is
loaded (the runtime says so through :meth:`ServingMetrics.model_loaded`); any other name a request
carries counts as ``other``. Loaded names come from the store, which caps them at 63 characters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER = "other"  # the label of every model name that is not loaded
MAX_LABEL_CHARS = 64


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._loaded: dict[str, set[int]] = {}  # model name -> its loaded versions
        self.requests = Counter(
            "appliance_requests_total",
            "RPCs by service, method, model and final status",
            ["service", "method", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "appliance_request_seconds",
            "RPC latency by service, method and model",
            ["service", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter("appliance_texts_total", "texts classified or embedded", ["model"], registry=r)
        self.batch_rows = Histogram(
            "appliance_batch_rows", "texts per engine batch", ["encoder"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_padding = Counter(
            "appliance_batch_padding_tokens_total",
            "padding tokens computed and thrown away",
            ["encoder"],
            registry=r,
        )
        self.batch_tokens = Counter(
            "appliance_batch_tokens_total", "real tokens run through the encoder", ["encoder"], registry=r
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "texts waiting for the encoder", ["encoder"], registry=r
        )
        self.model_version = Gauge(
            "appliance_model_version_loaded",
            "1 for each loaded model version",
            ["model", "version"],
            registry=r,
        )

    def model_loaded(self, name: str, version: int) -> None:
        self.model_version.labels(name, str(version)).set(1)
        self._loaded.setdefault(name, set()).add(version)

    def model_unloaded(self, name: str, version: int) -> None:
        self.model_version.labels(name, str(version)).set(0)
        versions = self._loaded.get(name, set())
        versions.discard(version)
        if not versions:
            self._loaded.pop(name, None)

    def model_label(self, reference: str) -> str:
        """The ``model`` label for a caller's ``NAME`` or ``NAME:VERSION``: the name while a version
        of it is loaded, else :data:`OTHER` (an empty reference stays empty)."""
        if not reference:
            return ""
        name = reference.partition(":")[0]
        return name[:MAX_LABEL_CHARS] if name in self._loaded else OTHER

    def observe_request(self, service: str, method: str, model: str, code: str, seconds: float) -> None:
        """Count and time one RPC; ``model`` is a label from :meth:`model_label`."""
        self.requests.labels(service, method, model, code).inc()
        self.latency.labels(service, method, model).observe(seconds)


def start_metrics_server(metrics: ServingMetrics, port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics``; returns the bound port (``port=0`` picks a free one)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
