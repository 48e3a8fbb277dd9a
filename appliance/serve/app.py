"""The Ray Serve application: an ingress replica per node that holds the hot path.

Measured on 2 cores (ENVIRONMENT.md): a ``DeploymentHandle`` call costs 3.5-7 ms of CPU, more
than the int8 encoder spends on a short text (~2.8 ms). So the gRPC server, the batcher, the
encoders and the heads all live in the ingress replica: a classification crosses no process
boundary. Ray Serve still owns placement (one ingress per node), health checks, restarts and
rolling upgrades, and the generalist is a separate deployment reached through a handle, once
per escalated text (the rare path, where a millisecond of hop is noise beside an LLM call).

Ray's own gRPC proxy is not used: it has no TLS and no ``grpc.health.v1`` today, both of which
the appliance promises.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from appliance.batching import BatchSettings
from appliance.config import OFFLINE_ENV, appliance_home, apply_offline_env
from appliance.engines.generalist_args import GeneralistArgs
from appliance.router.cascade import DEFAULT_MAX_WAITING, Cascade
from appliance.router.cost import CostModel
from appliance.security.interceptor import DEFAULT_MAX_CALLS_PER_TOKEN
from appliance.serve.generalist import GeneralistClient, generalist_app, placement_of

if TYPE_CHECKING:
    from appliance.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)
APP_NAME = "appliance"


class LimitsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_texts_per_call: int = Field(256, ge=1, le=4096)
    max_text_bytes: int = Field(64 * 1024, ge=16, le=16 << 20)


class AppArgs(BaseModel):
    """The application's typed arguments: the ``args`` of the Serve config (deploy/serve/)."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    home: str | None = None  # APPLIANCE_HOME for the replicas; default: the caller's
    models: list[str] = Field(default_factory=lambda: ["banking77"])
    insecure_loopback: bool = False
    require_client_cert: bool = False
    auth: bool = True
    open_reflection: bool = False
    audit_texts: bool = False
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    max_concurrent_rpcs: int = Field(1024, ge=1)  # per replica's gRPC server
    # calls in progress at once per token, per replica's gRPC server
    max_calls_per_token: int = Field(DEFAULT_MAX_CALLS_PER_TOKEN, ge=1)
    cert_warn_days: float = Field(30.0, ge=0)  # warn this long before the server certificate or CA expires
    limits: LimitsArgs = LimitsArgs()
    batch: BatchSettings = BatchSettings()
    intra_op_threads: int = Field(0, ge=0)
    max_loaded_models: int = Field(64, ge=1)
    ingress_cpus: float = Field(1.0, gt=0)
    generalist: GeneralistArgs | None = None
    # texts waiting for the generalist at once, per replica; past it escalations are refused
    max_waiting_escalations: int = Field(DEFAULT_MAX_WAITING, ge=1)
    price_per_hour: float = Field(2.0, ge=0)
    currency: str = "USD"
    store_escalation_texts: bool = False


@serve.deployment(
    name="ingress",
    max_ongoing_requests=16,  # control calls only; inference traffic arrives over gRPC
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
class Ingress:
    """Starts the runtime and the gRPC server inside the replica's event loop."""

    # Ray Serve awaits an async constructor; type checkers only know synchronous ones.
    async def __init__(  # type: ignore[misc]
        self, args: dict[str, Any], generalist: DeploymentHandle[Any] | None = None
    ) -> None:
        apply_offline_env()
        from appliance.api.server import ApplianceServer, ServerSettings
        from appliance.serve.metrics import ServingMetrics
        from appliance.serve.runtime import RuntimeSettings, ServingRuntime
        from appliance.store import ModelStore
        from appliance.types import Limits

        self.args = a = AppArgs.model_validate(args)
        home = Path(a.home) if a.home else appliance_home()
        metrics = ServingMetrics()
        self.metrics_port = _start_metrics(metrics, a.metrics_port)
        cost = CostModel(
            price_per_hour=a.price_per_hour,
            currency=a.currency,
            accelerators=a.generalist.num_gpus if a.generalist else 0,
        )
        self.generalist = (
            GeneralistClient(generalist, cost, placement_of(a.generalist))
            if generalist is not None and a.generalist is not None
            else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        if self.generalist is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.generalist.watch()))
        router = build_router(a, home, self.generalist, cost, metrics)
        self.runtime = ServingRuntime(
            RuntimeSettings(
                models=tuple(a.models),
                limits=Limits(a.limits.max_texts_per_call, a.limits.max_text_bytes),
                batch=a.batch,
                intra_op_threads=a.intra_op_threads,
                max_loaded_models=a.max_loaded_models,
            ),
            store=ModelStore(home),
            metrics=metrics,
            router=router,
        )
        self.server = ApplianceServer(
            self.runtime,
            ServerSettings(
                host=a.host,
                port=a.port,
                insecure_loopback=a.insecure_loopback,
                require_client_cert=a.require_client_cert,
                pki_dir=home / "pki",
                auth=a.auth,
                open_reflection=a.open_reflection,
                audit_texts=a.audit_texts,
                max_concurrent_rpcs=a.max_concurrent_rpcs,
                max_calls_per_token=a.max_calls_per_token,
                cert_warn_days=a.cert_warn_days,
            ),
            metrics=metrics,
            generalist=self.generalist,
        )
        # Serve before the models are warm: health says NOT_SERVING until they are.
        self.port = await self.server.start()
        await self.runtime.start()

    async def address(self) -> dict[str, Any]:
        return {
            "host": self.args.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "tls": not self.args.insecure_loopback,
            "pid": os.getpid(),
        }

    async def ready(self) -> bool:
        return self.runtime.is_ready()

    async def waiting(self) -> dict[str, str]:
        """Configured models not serving yet, each with what it waits for."""
        return self.runtime.waiting()

    async def check_health(self) -> None:
        if self.server.port == 0:
            raise RuntimeError("the gRPC server is not running")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.server.stop()


def _start_metrics(metrics: ServingMetrics, port: int | None) -> int | None:
    """The bound Prometheus port (``port`` 0: a free one), or None when metrics are off."""
    from appliance.serve.metrics import start_metrics_server

    if port is None:
        return None
    try:
        return start_metrics_server(metrics, port)
    except OSError as exc:  # the launcher shows this line to the operator: say which port and what to do
        raise OSError(
            exc.errno,
            f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror} "
            "(choose another with --metrics-port, 0 for a free one)",
        ) from exc


def build_router(
    args: AppArgs, home: Path, generalist: GeneralistClient | None, cost: CostModel, metrics: ServingMetrics
) -> Cascade:
    """The cascade router with its escalation store and cost model."""
    from appliance.router.escalations import EscalationStore
    from appliance.router.metrics import RouterMetrics

    # strict=False: a damaged database refuses escalations, and never stops the server from starting
    store = EscalationStore(
        home / "escalations" / "escalations.db", store_texts=args.store_escalation_texts, strict=False
    )
    return Cascade(
        generalist, store, cost, RouterMetrics(metrics.registry), max_waiting=args.max_waiting_escalations
    )


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder (``import_path: appliance.serve.app:build_app``)."""
    a = AppArgs.model_validate(args)
    home = str(Path(a.home).resolve() if a.home else appliance_home())
    env = {**OFFLINE_ENV, "APPLIANCE_HOME": home}
    generalist = generalist_app(a.generalist) if a.generalist is not None else None
    ingress: Application = Ingress.options(  # type: ignore[attr-defined]  # @serve.deployment made it a Deployment
        ray_actor_options={"num_cpus": a.ingress_cpus, "runtime_env": {"env_vars": env}},
    ).bind({**a.model_dump(), "home": home}, generalist)
    return ingress
