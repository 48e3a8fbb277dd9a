"""The gRPC front end: both APIs on one port, behind TLS, tokens and the audit trail.

- ``appliance.v1`` (Inference, Generation, Model, Admin) and KServe v2 ``inference`` services.
- ``grpc.health.v1`` per service: inference services report NOT_SERVING until their models are
  warm, and every service turns NOT_SERVING the moment a shutdown starts.
- Server reflection, so that grpcurl and other generic tools can discover the API.
- TLS by default (mTLS with ``require_client_cert``); plaintext only on a loopback bind, and
  only when asked for (``insecure_loopback``).
- Message size limits, deadlines passed down to the batcher, graceful shutdown: new calls get
  UNAVAILABLE, calls in flight finish within the grace period.
- Several processes listen on one port (SO_REUSEPORT, ``reuse_port``), as a node's ingress
  processes do; port 0 always binds a port of this process's own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from appliance._proto.appliance.v1 import appliance_pb2 as pb
from appliance._proto.appliance.v1 import appliance_pb2_grpc as pb_grpc
from appliance._proto.inference import grpc_service_pb2 as kserve_pb
from appliance._proto.inference import grpc_service_pb2_grpc as kserve_grpc
from appliance.api.feedback import FeedbackServicer
from appliance.api.kserve import KServeServicer, reflection_pool
from appliance.api.servicers import AdminServicer, GenerationServicer, InferenceServicer, ModelServicer
from appliance.api.workflows import Workflows, WorkflowServicer, default_workflows
from appliance.backend import Backend
from appliance.engines.generalist_api import Generalist
from appliance.errors import FailedPrecondition
from appliance.network import is_loopback
from appliance.security.audit import AuditLog, AuditSettings
from appliance.security.interceptor import DEFAULT_MAX_CALLS_PER_TOKEN, AuthAuditInterceptor, open_prefixes
from appliance.security.revocation import RevocationList
from appliance.security.tls import ExpiryWatch, server_credentials
from appliance.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)

INFERENCE_SERVICES = (
    "appliance.v1.InferenceService",
    "inference.GRPCInferenceService",
    "appliance.v1.WorkflowService",
)
GENERATION_SERVICE = "appliance.v1.GenerationService"
CONTROL_SERVICES = ("appliance.v1.ModelService", "appliance.v1.AdminService")
FEEDBACK_SERVICE = "appliance.v1.FeedbackService"
MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    insecure_loopback: bool = False  # plaintext, allowed on loopback binds only
    require_client_cert: bool = False  # mTLS
    pki_dir: Path | None = None
    auth: bool = True  # bearer tokens with scopes
    open_health: bool | None = None  # None: open on loopback binds only
    open_reflection: bool = False
    audit_texts: bool = False
    max_message_bytes: int = 32 * MiB
    # Calls in progress at once (health checks included); one more is RESOURCE_EXHAUSTED at once,
    # which bounds the memory that queued requests of up to max_message_bytes can hold.
    max_concurrent_rpcs: int = 1024
    # Calls in progress at once per token: one client cannot take all of max_concurrent_rpcs.
    max_calls_per_token: int = DEFAULT_MAX_CALLS_PER_TOKEN
    grace_seconds: float = 5.0
    # Several ingress processes of one node share the port (SO_REUSEPORT): the kernel spreads new
    # connections among them. Only processes of the same user can join a port.
    reuse_port: bool = True
    audit: AuditSettings = field(default_factory=AuditSettings)  # rotation, retention, free space
    cert_warn_days: float = 30.0  # warn this long before the server certificate or the CA expires

    @property
    def shares_port(self) -> bool:
        """Whether the listening socket may be shared; port 0 always means a port of our own."""
        return self.reuse_port and self.port != 0

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ApplianceServer:
    """Owns the grpc.aio server, its health states, and the security pieces it was built with."""

    def __init__(
        self,
        backend: Backend,
        settings: ServerSettings,
        metrics: ServingMetrics | None = None,
        generalist: Generalist | None = None,
        workflows: Workflows | None = None,
        feedback: FeedbackServicer | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.generalist = generalist  # None: no GenerationService
        # published workflows over this backend; None: built at start with the generalist as "default"
        self.workflows = workflows
        self.feedback = feedback  # None: no FeedbackService
        # health follows the audit trail's for these
        self.control_services = (*CONTROL_SERVICES, *([FEEDBACK_SERVICE] if feedback is not None else []))
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._audit: AuditLog | None = None
        self.auth: AuthAuditInterceptor | None = None  # None: auth is off
        self._watch: asyncio.Task[None] | None = None
        self._expiry: ExpiryWatch | None = None  # TLS only

    # ------------------------------------------------------------------ building
    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if not self.settings.auth:
            if not is_loopback(self.settings.host):
                # without tokens anyone who can reach the port may classify, load and unload models
                raise FailedPrecondition(
                    f"refusing auth: false on {self.settings.host}: a server without tokens binds to "
                    "loopback only (set auth: true, or bind 127.0.0.1)"
                )
            return []
        from appliance.security.audit import stream_dir
        from appliance.security.tokens import TokenStore

        self._audit = AuditLog(stream_dir(), self.settings.audit)
        opened = open_prefixes(
            bind_address=self.settings.bind,
            health=self.settings.open_health,
            reflection=self.settings.open_reflection,
        )
        self.auth = AuthAuditInterceptor(
            TokenStore(),
            self._audit,
            open_methods=opened,
            audit_texts=self.settings.audit_texts,
            revocations=self._revocations(),
            max_calls_per_token=self.settings.max_calls_per_token,
        )
        return [self.auth]

    def _revocations(self) -> RevocationList | None:
        """Client certificates exist only over TLS; the CRL sits next to the CA."""
        return None if self.settings.insecure_loopback else RevocationList(self.settings.pki_dir)

    def _credentials(self) -> grpc.ServerCredentials | None:
        if self.settings.insecure_loopback:
            if not is_loopback(self.settings.host):
                raise FailedPrecondition(
                    f"refusing plaintext on {self.settings.host}: --insecure-loopback binds to loopback only"
                )
            return None
        registry = self.metrics.registry if self.metrics is not None else None
        self._expiry = ExpiryWatch(self.settings.pki_dir, self.settings.cert_warn_days, registry)
        self._expiry.check()
        return server_credentials(self.settings.pki_dir, self.settings.require_client_cert)

    async def start(self) -> int:
        credentials = self._credentials()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=self._interceptors(),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", int(self.settings.shares_port)),
            ],
        )
        if self.workflows is None:
            self.workflows = default_workflows(self.backend, self.generalist)
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.backend, self.metrics), server)
        pb_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(self.workflows, self.metrics), server)
        pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.backend, self.metrics), server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.backend, self.metrics), server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.backend, self.metrics, self.workflows), server
        )
        if self.generalist is not None:
            pb_grpc.add_GenerationServiceServicer_to_server(
                GenerationServicer(self.generalist, self.metrics), server
            )
        if self.feedback is not None:
            pb_grpc.add_FeedbackServiceServicer_to_server(self.feedback, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [
            *INFERENCE_SERVICES,
            *self.control_services,
            *([GENERATION_SERVICE] if self.generalist is not None else []),
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        pool = reflection_pool(
            pb.DESCRIPTOR, kserve_pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR
        )
        reflection.enable_server_reflection(services, server, pool=pool)
        bind = self.settings.bind
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
        if port == 0:
            raise FailedPrecondition(f"could not bind {bind}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.control_services:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server, self.port = server, port
        self._watch = asyncio.get_running_loop().create_task(self._track_readiness())
        log.info(
            "gRPC listening on %s (port %d, %s)", bind, port, "plaintext" if credentials is None else "TLS"
        )
        return port

    # ------------------------------------------------------------------ health
    async def _set_all(self, status: int) -> None:
        for name in (*INFERENCE_SERVICES, *self.control_services, GENERATION_SERVICE, ""):
            await self.health.set(name, status)

    async def _track_readiness(self) -> None:
        """Mirror backend and generalist readiness into the health service."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        while True:
            audit_ok = self.audit_problem() is None
            ready = self.backend.is_ready() and self.tls_problem() is None and audit_ok
            for name in self.control_services:
                await self.health.set(name, serving if audit_ok else not_serving)
            for name in INFERENCE_SERVICES:
                await self.health.set(name, serving if ready else not_serving)
            await self.health.set("", serving if ready else not_serving)
            if self.generalist is not None:
                gen_ready = self.generalist.ready and audit_ok
                await self.health.set(GENERATION_SERVICE, serving if gen_ready else not_serving)
            await asyncio.sleep(0.25)

    def audit_problem(self) -> str | None:
        """Why calls cannot be audited now (the reason is logged by the trail), or None; health
        then says NOT_SERVING for every service, and calls are refused UNAVAILABLE."""
        return self._audit.unavailable if self._audit is not None else None

    def tls_problem(self) -> str | None:
        """Why TLS cannot be served (an expired server certificate), or None; health then says
        NOT_SERVING for the inference services."""
        return self._expiry.check() if self._expiry is not None else None

    # ------------------------------------------------------------------ shutdown
    async def stop(self, grace: float | None = None) -> None:
        """Graceful: report NOT_SERVING, refuse new calls, let calls in flight finish."""
        if self._server is None:
            return
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        stopping = asyncio.ensure_future(self._server.stop(grace))
        await self.backend.close()
        await stopping
        self._server = None
        if self.workflows is not None and self.workflows.runs is not None:
            self.workflows.runs.close()
        if self._audit is not None:
            self._audit.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
