"""Prometheus metrics of the serving path.

One registry per server, so that several servers in one process (tests) don't collide, exposed on
a loopback HTTP port by :func:`start_metrics_server`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "appliance_requests_total",
            "RPCs by method, model and final status",
            ["method", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "appliance_request_seconds",
            "RPC latency by method and model",
            ["method", "model"],
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


def start_metrics_server(metrics: ServingMetrics, port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics``; returns the bound port (``port=0`` picks a free one)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_port)
