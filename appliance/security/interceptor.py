"""Authorization and audit for every RPC the gRPC server answers.

Each call is admitted in this order:

1. Open methods (health, reflection; only where configured) pass without a token. Otherwise
   reflection needs ``models:read``, like the calls that list and describe models.
2. A bearer token (``authorization: Bearer <token>``) must verify: else UNAUTHENTICATED.
3. The method must be in the scope table: else PERMISSION_DENIED (fail closed, even for admin).
4. The token must hold the method's scope; for model-scoped RPCs, the scope names the model from
   the request (``classify:<model>``): else PERMISSION_DENIED.

The model sits inside the request message, so the check runs in a wrapper around the method's
own behaviour, where the deserialized request is at hand (unary and server-streaming alike).

Every call, admitted or not, leaves one audit record: time, caller (token name and mTLS client
certificate subject), rpc, model, final status code, latency and request id. Request texts are
recorded only with ``audit_texts=True``. By default the response waits until its record is on
disk, so no answer leaves the server without a durable trace. That holds for errors too:
``context.abort`` sends the status at once, so every abort (the interceptor's own denials and the
servicers' errors, through a wrapped context) writes the record first.

A request that does not parse as its method's message is answered INVALID_ARGUMENT (after the
token check) and audited like any other call, instead of failing inside grpc unrecorded.

A token may have at most ``max_calls_per_token`` calls in progress at once (counted once a call
is admitted, released on every way out, streaming included): one more is RESOURCE_EXHAUSTED at
once and audited, so one busy or runaway client cannot take the whole server's call budget.

Caller-controlled strings are clipped where they leave the process: model names and request ids
in records, and status details (which often quote the bad input) in records and on the wire. A
megabyte-long model name must neither bloat the trail nor push the status past grpc's trailer
size limit, where the caller would see RESOURCE_EXHAUSTED instead of the real error.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from appliance.errors import ApplianceError, InvalidArgument, Status, context_code, status_of
from appliance.network import is_loopback
from appliance.security.audit import AuditError, AuditLog
from appliance.security.audit_chain import MAX_DETAILS_CHARS, MAX_FIELD_CHARS, clip
from appliance.security.revocation import RevocationList, RevocationUnavailable
from appliance.security.tokens import Principal, TokenExpired, TokenStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """The scope an RPC needs: ``scope``, or ``scope:<model>`` read from ``model_field``."""

    scope: str
    model_field: str | None = None
    # other kinds whose ``<kind>:<model>`` admits the call too (KServe ModelInfer answers for
    # classifiers and span extractors alike)
    or_kinds: tuple[str, ...] = ()
    # (kind, field): a further model the request may name, which then needs ``<kind>:<that model>``
    also: tuple[tuple[str, str], ...] = ()


_V1 = "/appliance.v1."
_KSERVE = "/inference.GRPCInferenceService/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

DEFAULT_RULES: Mapping[str, Rule] = {
    f"{_V1}InferenceService/Classify": Rule("classify", "model"),
    f"{_V1}InferenceService/Embed": Rule("embed", "model"),
    f"{_V1}InferenceService/Extract": Rule("extract", "model", also=(("classify", "classify_model"),)),
    f"{_V1}GenerationService/Generate": Rule("generate"),
    f"{_V1}ModelService/ListModels": Rule("models:read"),
    f"{_V1}ModelService/GetModel": Rule("models:read"),
    f"{_V1}AdminService/LoadModel": Rule("admin"),
    f"{_V1}AdminService/UnloadModel": Rule("admin"),
    f"{_V1}FeedbackService/Correct": Rule("feedback", "model"),
    f"{_V1}WorkflowService/Run": Rule("workflow", "workflow"),
    f"{_V1}WorkflowService/RunStream": Rule("workflow", "workflow"),
    # a workflow's name answers too: the servicer then checks workflow:<name> itself (WorkflowScope)
    f"{_KSERVE}ModelInfer": Rule("classify", "model_name", or_kinds=("extract", "workflow")),
    f"{_KSERVE}ServerLive": Rule("models:read"),
    f"{_KSERVE}ServerReady": Rule("models:read"),
    f"{_KSERVE}ServerMetadata": Rule("models:read"),
    f"{_KSERVE}ModelReady": Rule("models:read"),
    f"{_KSERVE}ModelMetadata": Rule("models:read"),
    f"{_KSERVE}ModelConfig": Rule("models:read"),  # Triton's extensions, which perf_analyzer calls
    f"{_KSERVE}ModelStatistics": Rule("models:read"),
    # reflection describes the API, not any model: whoever may list models may discover it
    **{f"{prefix}ServerReflectionInfo": Rule("models:read") for prefix in REFLECTION_PREFIXES},
}
# calls in progress at once per token; ServerSettings.max_calls_per_token sets it for the server
DEFAULT_MAX_CALLS_PER_TOKEN = 64
# where a request carries the model name used for "classify:<model>" etc. and its request id
_REQUEST_ID_FIELDS = ("request_id", "id")


def open_prefixes(
    *, bind_address: str, health: bool | None = None, reflection: bool = False
) -> tuple[str, ...]:
    """Method prefixes that need no token. Health defaults to open on loopback binds only."""
    if health is None:
        health = is_loopback(bind_address)
    return ((HEALTH_PREFIX,) if health else ()) + (REFLECTION_PREFIXES if reflection else ())


def model_scope_name(reference: str) -> str:
    """``NAME:VERSION`` or ``NAME`` → ``NAME``: scopes grant a model, not one of its versions."""
    return reference.partition(":")[0]


@dataclass
class _Call:
    """What the audit record of one call collects along the way."""

    method: str
    started: float = field(default_factory=time.perf_counter)
    time: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))
    token: str | None = None
    cert: str | None = None
    peer: str = ""
    model: str | None = None
    request_id: str = ""
    texts: list[str] | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    recorded: bool = False
    agent: str = ""
    unrecordable: bool = False  # refused because the trail cannot take records: none is written
    holds_slot: bool = False  # counted among its token's calls in progress until it ends
    principal: Principal | None = None  # who called, once authenticated
    steps: list[dict[str, Any]] | None = None  # a workflow run's steps, written in its one record


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes did not parse, so that the call is still audited."""

    error: str


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, bad UTF-8, recursion limit: the caller's fault
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return parse


class _RecordingContext:
    """The servicer's view of the context: ``abort`` writes the audit record before the status
    leaves (grpc sends it from inside ``abort``). Everything else is the real context.

    A workflow run also reports its steps here (``audit_steps``), so that the call's one record
    holds them, and asks whether the caller holds a scope (``allows``) where the method's rule
    admits more than one kind (KServe ModelInfer on a workflow's name)."""

    def __init__(
        self, context: grpc.aio.ServicerContext, before_abort: Callable[..., Awaitable[None]], call: _Call
    ) -> None:
        self._context = context
        self._before_abort = before_abort
        self._call = call

    def audit_steps(self, steps: list[dict[str, Any]]) -> None:
        self._call.steps = steps

    def allows(self, scope: str) -> bool:
        principal = self._call.principal
        return principal is None or principal.allows(scope)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        details = clip(details, MAX_DETAILS_CHARS)
        await self._before_abort(code, details)
        await self._context.abort(code, details, trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


Behavior = Callable[..., Any]


class AuthAuditInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    def __init__(
        self,
        tokens: TokenStore,
        audit: AuditLog,
        *,
        rules: Mapping[str, Rule] = DEFAULT_RULES,
        open_methods: Iterable[str] = (),
        audit_texts: bool = False,
        durable: bool = True,
        revocations: RevocationList | None = None,
        max_calls_per_token: int = DEFAULT_MAX_CALLS_PER_TOKEN,
    ) -> None:
        """``open_methods`` holds method names or prefixes (see :func:`open_prefixes`).
        ``durable=False`` sends answers without waiting for their audit record's fsync."""
        if max_calls_per_token < 1:
            raise InvalidArgument(f"max_calls_per_token must be at least 1, got {max_calls_per_token}")
        self.tokens = tokens
        self.audit = audit
        self.rules = dict(rules)
        self.open_methods = tuple(open_methods)
        self.audit_texts = audit_texts
        self.durable = durable
        self.revocations = revocations  # None: client certificates are not checked for revocation
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.max_calls_per_token = max_calls_per_token
        # calls in progress per token name; only the server's event loop touches it
        self._in_progress: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:  # wrappers hold no per-call state
            return cached[1]
        wrapped = self._wrap(method, handler)
        if handler is not None:  # only served methods: a finite set, unlike names callers invent
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(self._unimplemented(method))
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # one request message: parse it leniently, so that garbage is audited and answered precisely
        single = {**kwargs, "request_deserializer": _lenient(handler.request_deserializer)}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary, streamed=False), **single
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream, streamed=False), **single
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, streamed=True), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, streamed=True), **kwargs
        )

    # ------------------------------------------------------------------------------- wrappers

    def _wrap_unary(self, method: str, behavior: Behavior, streamed: bool) -> Behavior:
        """``streamed``: the behaviour takes a request iterator, so no single message to inspect."""

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method)
            try:
                self._admit(call, None if streamed else request, context)
                result = behavior(request, self._recording(call, context))
                return await result if inspect.isawaitable(result) else result
            except BaseException as exc:
                await self._fail(call, exc, context)
                raise
            finally:
                self._release(call)
                await self._record(call, context)

        return unary

    def _wrap_stream(self, method: str, behavior: Behavior, streamed: bool) -> Behavior:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method)
            try:
                self._admit(call, None if streamed else request, context)
                result = behavior(request, self._recording(call, context))
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):  # a handler that answers through context.write()
                    await result
                else:
                    for response in result:
                        yield response
            except BaseException as exc:
                await self._fail(call, exc, context)
                raise
            finally:
                self._release(call)
                await self._record(call, context)

        return stream

    def _recording(self, call: _Call, context: grpc.aio.ServicerContext) -> _RecordingContext:
        async def before_abort(code: grpc.StatusCode, details: str) -> None:
            call.code, call.details = code, details
            await self._record(call, context)

        return _RecordingContext(context, before_abort, call)

    def _unimplemented(self, method: str) -> Behavior:
        async def unimplemented(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = _Call(method)
            try:
                self._admit(call, None, context, served=False)
                # an open method (health, reflection) that is not registered
                raise _Denied(grpc.StatusCode.UNIMPLEMENTED, f"method {method} is not implemented")
            except BaseException as exc:
                await self._fail(call, exc, context)
                raise
            finally:
                await self._record(call, context)

        return unimplemented

    # ------------------------------------------------------------------------------ admission

    def _admit(
        self, call: _Call, request: Any, context: grpc.aio.ServicerContext, served: bool = True
    ) -> None:
        """Fill in who is calling and about what; raise :class:`_Denied` unless the call may proceed.
        For a method the server does not serve (``served=False``), an authenticated caller learns
        UNIMPLEMENTED; nobody else learns whether it exists."""
        call.peer = context.peer() or ""
        auth = context.auth_context() or {}  # built anew by each call to it: once per call
        call.cert = _peer_subject(auth)
        self._check_revocation(auth)
        metadata = _metadata(context)
        undecodable = request if isinstance(request, _Undecodable) else None
        self._describe(call, None if undecodable else request, metadata)
        problem = self.audit.unavailable
        if problem is not None:
            call.unrecordable = True
            if not call.method.startswith(HEALTH_PREFIX):  # health still answers: NOT_SERVING
                raise _Denied(grpc.StatusCode.UNAVAILABLE, f"audit cannot be written: {problem}")
        if self.open_methods and call.method.startswith(self.open_methods):
            _refuse_undecodable(call.method, undecodable)
            return
        principal = self._authenticate(metadata.get("authorization"))
        call.token, call.principal = principal.name, principal
        rule = self.rules.get(call.method)
        if rule is None:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED, f"method {call.method} is not open to any scope")
        if not served:
            raise _Denied(grpc.StatusCode.UNIMPLEMENTED, f"method {call.method} is not implemented")
        _refuse_undecodable(call.method, undecodable)
        required = rule.scope
        accepted = [required]
        if rule.model_field is not None:
            if request is None:
                raise _Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{call.method} needs a per-model scope, which streamed requests cannot carry",
                )
            # an empty model lets the server choose one, which only a wildcard scope may allow
            target = model_scope_name(call.model) if call.model else "*"
            required = f"{rule.scope}:{target}"
            accepted = [required, *(f"{kind}:{target}" for kind in rule.or_kinds)]
        if not any(principal.allows(scope) for scope in accepted):
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {principal.name!r} lacks scope {' or '.join(map(repr, accepted))} for {call.method}",
            )
        for kind, model_field in rule.also:
            other = str(getattr(request, model_field, "") or "")
            needed = f"{kind}:{model_scope_name(other)}"
            if other and not principal.allows(needed):
                raise _Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token {principal.name!r} lacks scope {needed!r} for {call.method} ({model_field})",
                )
        self._take_slot(call, principal.name)

    def _take_slot(self, call: _Call, token: str) -> None:
        """Count an admitted call against its token, or refuse it when the token is at its limit."""
        busy = self._in_progress.get(token, 0)
        if busy >= self.max_calls_per_token:
            raise _Denied(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"token {token!r} has {busy} calls in progress; the limit is {self.max_calls_per_token}",
            )
        self._in_progress[token] = busy + 1
        call.holds_slot = True

    def _release(self, call: _Call) -> None:
        if not call.holds_slot or call.token is None:
            return
        call.holds_slot = False
        left = self._in_progress.get(call.token, 0) - 1
        if left > 0:
            self._in_progress[call.token] = left
        else:  # no entry for idle tokens: the table holds only tokens with calls in progress
            self._in_progress.pop(call.token, None)

    def calls_in_progress(self, token: str) -> int:
        """How many admitted calls of ``token`` have not ended yet."""
        return self._in_progress.get(token, 0)

    def _check_revocation(self, auth: Mapping[str, Any]) -> None:
        """A revoked client certificate is refused on every method, open ones included."""
        pem = _peer_certificate(auth)
        if self.revocations is None or pem is None:
            return
        try:
            revoked = self.revocations.is_revoked(pem)
        except RevocationUnavailable as exc:
            raise _Denied(grpc.StatusCode.UNAVAILABLE, "client certificate revocation list unusable") from exc
        if revoked:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "the client certificate has been revoked")

    def _authenticate(self, header: str | None) -> Principal:
        if not header:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing token: send metadata 'authorization: Bearer <token>'",
            )
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
        try:
            principal = self.tokens.verify(secret.strip())
        except TokenExpired as exc:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, exc.message) from None
        except ApplianceError as exc:  # an unreadable token file: fail closed, say why
            log.error("token store unusable: %s", exc.message)
            raise _Denied(grpc.StatusCode.UNAVAILABLE, "token store unavailable") from exc
        if principal is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
        return principal

    def _describe(self, call: _Call, request: Any, metadata: Mapping[str, str]) -> None:
        rule = self.rules.get(call.method)
        if request is not None and rule is not None and rule.model_field:
            call.model = clip(str(getattr(request, rule.model_field, "") or ""), MAX_FIELD_CHARS) or None
        request_id = next(
            (
                str(v)
                for name in _REQUEST_ID_FIELDS
                if (v := getattr(request, name, "")) and isinstance(v, str)
            ),
            "",
        )
        if not request_id:
            request_id = metadata.get("x-request-id") or uuid.uuid4().hex
            # echo the same id the audit trail holds (the servicer makes one only when empty)
            if request is not None and hasattr(request, "request_id"):
                request.request_id = request_id
        call.request_id = clip(request_id, MAX_FIELD_CHARS)
        call.agent = clip(metadata.get("user-agent", ""))
        if self.audit_texts and request is not None:
            call.texts = _texts(request)

    # -------------------------------------------------------------------------------- outcome

    async def _fail(self, call: _Call, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Settle the call's final status. Denials and ApplianceErrors become precise aborts
        (``abort`` raises; the wrapper's ``finally`` writes the record)."""
        if isinstance(exc, grpc.aio.AbortError):
            if not call.recorded:
                call.code = context_code(context) or grpc.StatusCode.UNKNOWN
                call.details = _context_details(context)
            return
        # the servicers' Boundary maps their errors; this covers denials and methods without one
        status = Status(exc.code, exc.details) if isinstance(exc, _Denied) else status_of(exc)
        call.code, call.details = status.code, clip(status.details, MAX_DETAILS_CHARS)
        if status.code == grpc.StatusCode.CANCELLED:  # the client went away: nothing to send
            return
        if not status.expected:
            log.error("%s failed", call.method, exc_info=exc)
        await self._record(call, context)  # before abort, which sends the status at once
        await context.abort(call.code, call.details)

    async def _record(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Write the call's one record; later calls for the same call do nothing."""
        if call.recorded:
            return
        call.recorded = True
        if call.unrecordable:
            log.debug("not audited (the trail cannot take records): %s", clip(call.method))
            return
        if call.code == grpc.StatusCode.OK:
            code = context_code(context)
            if code is not None:  # the handler set a status without raising
                call.code, call.details = code, _context_details(context)
        record: dict[str, Any] = {
            "time": call.time,
            "rpc": clip(call.method),
            "caller": {
                "token": _clip_optional(call.token),
                "cert": _clip_optional(call.cert),
                "peer": clip(call.peer),
                "agent": call.agent,
            },
            "model": call.model,
            "code": call.code.name,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "request_id": call.request_id,
        }
        if call.details:
            record["details"] = call.details
        if call.texts is not None:
            record["texts"] = call.texts
        if call.steps is not None:
            record["steps"] = call.steps
        try:
            # a health probe never waits on the disk: it must be able to say NOT_SERVING
            if self.durable and not call.method.startswith(HEALTH_PREFIX):
                await self.audit.append_async(record)
            else:
                self.audit.append(record)
        except AuditError:
            log.exception("audit record lost for %s %s", call.method, call.request_id)
            raise


def _clip_optional(text: str | None) -> str | None:
    return None if text is None else clip(text)


def _refuse_undecodable(method: str, undecodable: _Undecodable | None) -> None:
    if undecodable is not None:
        raise _Denied(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid message for {method} ({undecodable.error})",
        )


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found.setdefault(key.lower(), value)
    return found


def _peer_subject(auth: Mapping[str, Any]) -> str | None:
    """The verified client certificate's subject (from the call's auth context), when mTLS."""
    subject = auth.get("x509_subject")
    if subject:
        return bytes(next(iter(subject))).decode(errors="replace")
    common_name = auth.get("x509_common_name")
    if common_name:
        return "CN=" + bytes(next(iter(common_name))).decode(errors="replace")
    return None


def _peer_certificate(auth: Mapping[str, Any]) -> bytes | None:
    """The verified client certificate (PEM, from the call's auth context), when mTLS."""
    pem = auth.get("x509_pem_cert")
    return bytes(next(iter(pem))) if pem else None


def _context_details(context: grpc.aio.ServicerContext) -> str:
    try:
        details = context.details()
    except (AttributeError, NotImplementedError):
        return ""
    text = details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
    return clip(text, MAX_DETAILS_CHARS)


def _texts(request: Any) -> list[str] | None:
    """The user texts of a request: ``texts``, ``prompt`` and chat ``messages``."""
    texts: list[str] = [str(t) for t in getattr(request, "texts", ()) or ()]
    prompt = getattr(request, "prompt", "")
    if isinstance(prompt, str) and prompt:
        texts.append(prompt)
    texts.extend(str(m.content) for m in getattr(request, "messages", ()) or () if hasattr(m, "content"))
    return texts or None
