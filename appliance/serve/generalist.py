"""The generalist as a Ray Serve deployment: one replica owns one vLLM engine.

Callers hold a ``DeploymentHandle``::

    result = await handle.classify.remote(text, labels, descriptions)        # ZeroShotResult
    async for chunk in handle.options(stream=True).generate.remote(request):  # GenerationChunk
        ...

Errors raised by the engine (``InvalidArgument``, ``ResourceExhausted``, ``Unavailable``) reach
the caller as exceptions that are also instances of those classes. When the engine core dies,
``check_health`` fails and Serve replaces the replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from appliance.config import OFFLINE_ENV, apply_offline_env
from appliance.engines.generalist import GeneralistEngine, GenerationChunk, ZeroShotResult
from appliance.errors import InvalidArgument

GENERATE_FIELDS = frozenset({"prompt", "messages", "max_tokens", "temperature", "stop", "request_id"})
# Calls beyond the engine's own limit that Serve should still let through: readiness and
# health probes, and requests the engine will refuse with ResourceExhausted instead of letting
# them wait in Serve's queue.
EXTRA_ONGOING = 8


@serve.deployment(
    # The engine core and its worker are child processes of the replica, outside Ray's
    # accounting; one CPU here reserves the replica's share of the box.
    ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": dict(OFFLINE_ENV)}},
    max_ongoing_requests=8 + EXTRA_ONGOING,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class GeneralistDeployment:
    # Ray Serve awaits an async constructor; type checkers only know synchronous ones.
    async def __init__(  # type: ignore[misc]
        self,
        model_path: str,
        max_model_len: int = 2048,
        kv_cache_gib: float = 1.0,
        max_concurrency: int = 8,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        dtype: str | None = None,
    ) -> None:
        apply_offline_env()
        self._engine = GeneralistEngine(
            Path(model_path),
            max_model_len=max_model_len,
            kv_cache_gib=kv_cache_gib,
            max_concurrency=max_concurrency,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            dtype=dtype,
        )
        await self._engine.start()

    async def __del__(self) -> None:
        await self._engine.stop()

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def ready(self) -> bool:
        return self._engine.ready

    async def info(self) -> dict[str, Any]:
        """Limits and state, for the router and for status pages."""
        engine = self._engine
        return {
            "model_path": str(engine.model_path),
            "max_model_len": engine.max_model_len,
            "max_concurrency": engine.max_concurrency,
            "in_flight": engine.in_flight,
            "ready": engine.ready,
            "start_seconds": engine.start_seconds,
        }

    async def check_label_set(
        self, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> None:
        self._engine.check_label_set(labels, descriptions)

    async def classify(
        self, text: str, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> ZeroShotResult:
        return await self._engine.classify(text, labels, descriptions)

    async def generate(self, request: Mapping[str, Any]) -> AsyncIterator[GenerationChunk]:
        """Stream a generation; ``request`` holds :meth:`GeneralistEngine.generate`'s arguments."""
        if not isinstance(request, Mapping):
            raise InvalidArgument("a generate request must be a dict")
        unknown = sorted(set(request) - GENERATE_FIELDS)
        if unknown:
            raise InvalidArgument(f"unknown generate fields {unknown}; known: {sorted(GENERATE_FIELDS)}")
        async for chunk in self._engine.generate(**request):
            yield chunk


def generalist_app(
    model_path: Path | str,
    *,
    max_model_len: int = 2048,
    kv_cache_gib: float = 1.0,
    max_concurrency: int = 8,
    num_gpus: int = 0,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = False,
    dtype: str | None = None,
    num_replicas: int = 1,
) -> Application:
    """The deployment sized for its box: CPU only, or ``tensor_parallel_size`` GPUs per replica."""
    if num_gpus and num_gpus != tensor_parallel_size:
        raise InvalidArgument(
            f"a generalist replica uses one GPU per tensor-parallel rank: num_gpus={num_gpus} "
            f"but tensor_parallel_size={tensor_parallel_size}"
        )
    actor_options: dict[str, Any] = {"num_cpus": 1, "runtime_env": {"env_vars": dict(OFFLINE_ENV)}}
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    # @serve.deployment made the class a Deployment, which the type checker cannot see.
    return GeneralistDeployment.options(  # type: ignore[attr-defined]
        num_replicas=num_replicas,
        max_ongoing_requests=max_concurrency + EXTRA_ONGOING,
        ray_actor_options=actor_options,
    ).bind(
        str(model_path),
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        max_concurrency=max_concurrency,
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager,
        dtype=dtype,
    )
