"""The generalist as a Ray Serve deployment (one replica owns one vLLM engine), and its client.

The ingress holds a :class:`GeneralistClient`, which implements
:class:`appliance.engines.generalist_api.Generalist` over the deployment's handle::

    result = await client.classify(text, labels, descriptions)   # ZeroShotResult
    answer = await client.extract(text, slots, descriptions)      # SpanAnswer
    async for chunk in client.generate(prompt="..."):             # GenerationChunk, the last priced
        ...

Errors raised by the engine (``InvalidArgument``, ``ResourceExhausted``, ``Unavailable``) reach
the caller as exceptions that are also instances of those classes; Ray's own failures (a replica
being replaced, back-pressure) are mapped to ``Unavailable`` and ``ResourceExhausted``. When the
engine core dies, ``check_health`` fails and Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from appliance.config import OFFLINE_ENV, apply_offline_env
from appliance.engines.generalist import GeneralistEngine
from appliance.engines.generalist_api import (
    Demonstration,
    Generalist,
    GenerationChunk,
    Placement,
    SpanAnswer,
    ZeroShotResult,
)
from appliance.engines.generalist_args import DEFAULT_NAME, GeneralistArgs
from appliance.errors import ApplianceError, InvalidArgument, ResourceExhausted, Unavailable
from appliance.router.cost import CostModel, price_generalist

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
    async def __init__(self, args: GeneralistArgs) -> None:  # type: ignore[misc]
        apply_offline_env()
        self._engine = GeneralistEngine(args)
        await self._engine.start()

    async def __del__(self) -> None:
        await self._engine.stop()

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def ready(self) -> bool:
        return self._engine.ready

    async def info(self) -> dict[str, Any]:
        """Limits and state, for status pages."""
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
        await self._engine.check_label_set(labels, descriptions)

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        return await self._engine.classify(text, labels, descriptions, request_id, demonstrations)

    async def extract(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> SpanAnswer:
        return await self._engine.extract(text, labels, descriptions, request_id)

    async def generate(self, request: Mapping[str, Any]) -> AsyncIterator[GenerationChunk]:
        """Stream a generation; ``request`` holds :meth:`GeneralistEngine.generate`'s arguments."""
        if not isinstance(request, Mapping):
            raise InvalidArgument("a generate request must be a dict")
        unknown = sorted(set(request) - GENERATE_FIELDS)
        if unknown:
            raise InvalidArgument(f"unknown generate fields {unknown}; known: {sorted(GENERATE_FIELDS)}")
        async for chunk in self._engine.generate(**request):
            yield chunk


def generalist_app(args: GeneralistArgs) -> Application:
    """The deployment sized for its box: CPU only, or ``tensor_parallel_size`` GPUs per replica."""
    actor_options: dict[str, Any] = {"num_cpus": 1, "runtime_env": {"env_vars": dict(OFFLINE_ENV)}}
    if args.num_gpus:
        actor_options["num_gpus"] = args.num_gpus
    # One deployment per named generalist; "default" keeps the class's own name.
    named = {} if args.name == DEFAULT_NAME else {"name": f"GeneralistDeployment-{args.name}"}
    # @serve.deployment made the class a Deployment, which the type checker cannot see.
    return GeneralistDeployment.options(  # type: ignore[attr-defined]
        **named,
        num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_concurrency + EXTRA_ONGOING,
        ray_actor_options=actor_options,
    ).bind(args)


def placement_of(args: GeneralistArgs) -> Placement:
    """Where the deployment's replicas run: on their GPUs, or on the box's cores."""
    return Placement(accelerator=True, units=args.num_gpus) if args.num_gpus else Placement()


def _mapped(exc: Exception) -> ApplianceError:
    """A Ray error from the generalist deployment as the status the caller should see."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, ApplianceError):
        return exc
    if isinstance(exc, BackPressureError):
        return ResourceExhausted("the generalist is overloaded; retry later")
    return Unavailable(f"the generalist is unavailable ({type(exc).__name__}); it is being restarted")


class GeneralistClient(Generalist):
    """The generalist deployment seen from the ingress; its generations come back priced."""

    def __init__(self, handle: DeploymentHandle[Any], cost: CostModel, placement: Placement) -> None:
        self._handle = handle
        self._cost = cost
        self._placement = placement
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def placement(self) -> Placement:
        return self._placement

    async def watch(self) -> None:
        """Keep :attr:`ready` current (a replica being replaced is not ready until it answers)."""
        while True:
            try:
                self._ready = bool(await self._handle.ready.remote())
            except Exception:
                self._ready = False
            await asyncio.sleep(1.0 if self._ready else 0.5)

    async def check_health(self) -> None:
        try:
            await self._handle.check_health.remote()
        except Exception as exc:
            raise _mapped(exc) from exc

    async def check_label_set(
        self, labels: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> None:
        try:
            await self._handle.check_label_set.remote(list(labels), dict(descriptions or {}))
        except Exception as exc:
            raise _mapped(exc) from exc

    async def classify(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
        demonstrations: Sequence[Demonstration] = (),
    ) -> ZeroShotResult:
        try:
            result: ZeroShotResult = await self._handle.classify.remote(
                text, list(labels), dict(descriptions or {}), request_id, list(demonstrations)
            )
        except Exception as exc:
            raise _mapped(exc) from exc
        return result

    async def extract(
        self,
        text: str,
        labels: Sequence[str],
        descriptions: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> SpanAnswer:
        try:
            answer: SpanAnswer = await self._handle.extract.remote(
                text, list(labels), dict(descriptions or {}), request_id
            )
        except Exception as exc:
            raise _mapped(exc) from exc
        return answer

    async def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        request = {
            "prompt": prompt,
            "messages": [dict(m) for m in messages] if messages is not None else None,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": list(stop) if stop else None,
            "request_id": request_id,
        }
        stream: Any = self._handle.options(stream=True).generate.remote(
            {k: v for k, v in request.items() if v is not None}
        )
        try:
            async for chunk in stream:
                if chunk.finished:  # the last chunk carries the usage; price it here
                    cost = price_generalist(self._cost, self._placement, chunk.engine_seconds)
                    chunk = dataclasses.replace(chunk, cost=cost)
                yield chunk
        except Exception as exc:
            raise _mapped(exc) from exc
