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
import errno
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from appliance.batching import BatchSettings
from appliance.config import OFFLINE_ENV, appliance_home, apply_offline_env
from appliance.engines.generalist_args import DEFAULT_NAME, NAME_PATTERN, GeneralistArgs
from appliance.router.cascade import DEFAULT_MAX_WAITING, Cascade
from appliance.router.cost import CostModel
from appliance.router.generalists import MAX_DEMONSTRATIONS, ModelEscalation
from appliance.security.interceptor import DEFAULT_MAX_CALLS_PER_TOKEN
from appliance.serve.generalist import GeneralistClient, generalist_app, placement_of
from appliance.serve.home_mirror import mirror_from_head
from appliance.serve.node import MAX_INGRESS_PER_NODE, cores_per_ingress, declared_units, ingress_per_node
from appliance.serve.placement import IngressPlacement, current_placement, deployment_version

if TYPE_CHECKING:
    from appliance.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)
APP_NAME = "appliance"


class LimitsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_texts_per_call: int = Field(256, ge=1, le=4096)
    max_text_bytes: int = Field(64 * 1024, ge=16, le=16 << 20)


class EscalationArgs(BaseModel):
    """A model's cascade settings (``escalation: {MODEL: {...}}`` in the Serve config)."""

    model_config = ConfigDict(extra="forbid")
    generalist: str | None = Field(None, pattern=NAME_PATTERN)  # None: "default", else the first
    demonstrations: int = Field(0, ge=0, le=MAX_DEMONSTRATIONS)  # k nearest training examples in the prompt


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
    # ingress processes per node, on one port; None: one per two cores, 1 to 8 (serve/node.py)
    ingress_per_node: int | None = Field(None, ge=1, le=MAX_INGRESS_PER_NODE)
    max_loaded_models: int = Field(64, ge=1)
    ingress_cpus: float = Field(1.0, gt=0)
    generalist: GeneralistArgs | None = None  # one, named "default" unless it says otherwise
    generalists: list[GeneralistArgs] = Field(default_factory=list)  # several, each named
    escalation: dict[str, EscalationArgs] = Field(default_factory=dict)  # per model name
    # texts waiting for the generalist at once, per replica; past it escalations are refused
    max_waiting_escalations: int = Field(DEFAULT_MAX_WAITING, ge=1)
    price_per_hour: float = Field(2.0, ge=0)
    currency: str = "USD"
    store_escalation_texts: bool = False

    @model_validator(mode="after")
    def _generalists_named_once(self) -> AppArgs:
        names = [g.name for g in self.all_generalists()]
        if len(set(names)) != len(names):
            raise ValueError(f"generalist names must be distinct, got {names}")
        for model, setting in self.escalation.items():
            if setting.generalist is not None and setting.generalist not in names:
                raise ValueError(
                    f"escalation.{model}.generalist names {setting.generalist!r}, which is not configured; "
                    f"known: {', '.join(names) or 'none'}"
                )
        return self

    def all_generalists(self) -> list[GeneralistArgs]:
        """The single ``generalist`` first, then the ``generalists`` list."""
        return [*([self.generalist] if self.generalist is not None else []), *self.generalists]

    @property
    def ingress_count(self) -> int:
        """Ingress processes on this node: ``ingress_per_node``, or the default for its cores."""
        return ingress_per_node(self.ingress_per_node)


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
        self, args: dict[str, Any], generalists: dict[str, DeploymentHandle[Any]] | None = None
    ) -> None:
        apply_offline_env()
        from appliance.api.feedback import FeedbackServicer
        from appliance.api.server import ApplianceServer, ServerSettings
        from appliance.api.workflows import default_workflows
        from appliance.serve.metrics import ServingMetrics
        from appliance.serve.runtime import RuntimeSettings, ServingRuntime
        from appliance.store import ModelStore
        from appliance.types import Limits

        self.args = a = AppArgs.model_validate(args)
        home = Path(a.home) if a.home else appliance_home()
        metrics = ServingMetrics()
        # ingress processes on this node, this one included
        self.siblings = siblings = declared_units() or a.ingress_count
        self.metrics_port = _start_metrics(metrics, a.metrics_port, siblings)
        cost, costs = generalist_costs(a)
        handles = generalists or {}
        self.generalists = {
            g.name: GeneralistClient(handles[g.name], costs.get(g.name, cost), placement_of(g))
            for g in a.all_generalists()
            if g.name in handles
        }
        # The GenerationService's: "default", else the first one.
        self.generalist = self.generalists.get(DEFAULT_NAME) or next(iter(self.generalists.values()), None)
        self._tasks: list[asyncio.Task[None]] = [
            asyncio.get_running_loop().create_task(client.watch()) for client in self.generalists.values()
        ]
        router = build_router(a, home, self.generalists, cost, metrics, costs)
        self.runtime = ServingRuntime(
            RuntimeSettings(
                models=tuple(a.models),
                limits=Limits(a.limits.max_texts_per_call, a.limits.max_text_bytes),
                batch=a.batch,
                intra_op_threads=a.intra_op_threads,
                cores=cores_per_ingress(siblings),
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
            workflows=default_workflows(self.runtime, self.generalists, cost),
            feedback=FeedbackServicer(router.escalations, ModelStore(home), router.flush, metrics),
        )
        # Serve before the models are warm: health says NOT_SERVING until they are.
        self.port = await self.server.start()
        # A node without the head's disk pulls (and verifies) the models and shared state first.
        mirror = await mirror_from_head(home)
        if mirror is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(mirror.run()))
        await self.runtime.start()

    async def address(self) -> dict[str, Any]:
        return {
            "host": self.args.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "ingress_on_node": self.siblings,
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


def _start_metrics(metrics: ServingMetrics, port: int | None, processes: int = 1) -> int | None:
    """The bound Prometheus port, or None when metrics are off. Each of a node's ``processes``
    ingress processes takes the first free port of ``port`` .. ``port + processes - 1`` (``port``
    0: any free one), so that each is scraped on its own."""
    from appliance.serve.metrics import start_metrics_server

    if port is None:
        return None
    ports = range(port, min(port + processes, 65536)) if port else range(0, 1)
    for candidate in ports:
        try:
            return start_metrics_server(metrics, candidate)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and candidate != ports[-1]:
                continue  # a sibling ingress process has it
            # the launcher shows this line to the operator: say which ports and what to do
            tried = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(port)
            raise OSError(
                exc.errno,
                f"cannot serve metrics on 127.0.0.1:{tried}: {exc.strerror} "
                "(choose another with --metrics-port, 0 for a free one)",
            ) from exc
    return None  # not reached: the last port returns or raises


def generalist_costs(args: AppArgs) -> tuple[CostModel, dict[str, CostModel]]:
    """The box's cost model, and one per generalist that has its own price or accelerators."""
    gpus = max((g.num_gpus for g in args.all_generalists()), default=0)
    box = CostModel(price_per_hour=args.price_per_hour, currency=args.currency, accelerators=gpus)
    own = {
        g.name: CostModel(
            price_per_hour=args.price_per_hour if g.price_per_hour is None else g.price_per_hour,
            currency=args.currency,
            accelerators=g.num_gpus,
        )
        for g in args.all_generalists()
        if g.price_per_hour is not None or g.num_gpus != gpus
    }
    return box, own


def build_router(
    args: AppArgs,
    home: Path,
    generalists: Mapping[str, GeneralistClient],
    cost: CostModel,
    metrics: ServingMetrics,
    costs: Mapping[str, CostModel] | None = None,
) -> Cascade:
    """The cascade router with its escalation store, cost models and per-model settings."""
    from appliance.router.escalations import EscalationStore
    from appliance.router.metrics import RouterMetrics
    from appliance.router.retrieval import SpecialistRetriever

    # strict=False: a damaged database refuses escalations, and never stops the server from starting
    store = EscalationStore(
        home / "escalations" / "escalations.db", store_texts=args.store_escalation_texts, strict=False
    )
    settings = {
        model: ModelEscalation(generalist=s.generalist, demonstrations=s.demonstrations)
        for model, s in args.escalation.items()
    }
    return Cascade(
        dict(generalists),
        store,
        cost,
        RouterMetrics(metrics.registry),
        max_waiting=args.max_waiting_escalations,
        generalist_costs=costs,
        settings=settings,
        retriever=SpecialistRetriever() if any(s.demonstrations for s in settings.values()) else None,
    )


def build_app(args: dict[str, Any], placement: IngressPlacement | None = None) -> Application:
    """The Serve application builder (``import_path: appliance.serve.app:build_app``).

    ``placement`` (default: the connected cluster's, serve/placement.py) sets one replica per
    ``appliance_ingress`` unit; the watcher in ``appliance serve`` passes the new one as nodes change."""
    a = AppArgs.model_validate(args)
    home = str(Path(a.home).resolve() if a.home else appliance_home())
    env = {**OFFLINE_ENV, "APPLIANCE_HOME": home}
    generalists = {g.name: generalist_app(g) for g in a.all_generalists()}
    bound = {**a.model_dump(), "home": home}
    placement = placement or current_placement()
    placed: dict[str, Any] = {}
    if placement.resources:  # a stable version: a change of num_replicas alone restarts no replica
        version = deployment_version(bound)
        placed = {"num_replicas": placement.num_replicas, "version": version, "_internal": True}
    ingress: Application = Ingress.options(  # type: ignore[attr-defined]  # @serve.deployment made it a Deployment
        ray_actor_options={
            "num_cpus": a.ingress_cpus,
            "resources": placement.resources,
            "runtime_env": {"env_vars": env},
        },
        **placed,
    ).bind(bound, generalists)
    return ingress
