"""Errors that cross the API boundary, each bound to its precise gRPC status.

Code below the API raises these; :func:`status_of` turns them (and timeouts, cancellations and
bugs) into the status that :mod:`appliance.api.boundary` aborts with, so that every client sees
the same status for the same mistake, whichever API it speaks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc


class ApplianceError(Exception):
    """Base class: a message meant for the caller, and the gRPC status that goes with it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ApplianceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApplianceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ApplianceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ApplianceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ApplianceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ApplianceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ApplianceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ApplianceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class IntegrityError(ApplianceError):
    """A stored artifact does not match its manifest or signature."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Status:
    """What the caller is told: a gRPC status code and its details."""

    code: grpc.StatusCode
    details: str

    @property
    def expected(self) -> bool:
        """False for a fault of the server (INTERNAL), which deserves a log line with its traceback."""
        return self.code != grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> Status:
    """The one mapping from an exception to the status the caller sees.

    ApplianceError subclasses carry their own code; a timeout is DEADLINE_EXCEEDED, a cancelled
    call CANCELLED; anything else is a bug of the server: INTERNAL, never grpc's UNKNOWN, and
    without the exception's text, which may hold internals.
    """
    if isinstance(exc, ApplianceError):
        return Status(exc.code, exc.message)
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since Python 3.11
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while the request was served")
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return Status(grpc.StatusCode.CANCELLED, "the call was cancelled")
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")


def context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    """The status already set on ``context`` (by an abort or ``set_code``), or None while it is OK."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if code is None or code == grpc.StatusCode.OK:
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
