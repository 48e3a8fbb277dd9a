"""Errors that cross the API boundary, each bound to its precise gRPC status.

Code below the API raises these; the gRPC layer turns them into ``context.abort(code, message)``
so that every client sees the same status for the same mistake, whichever API it speaks.
"""

from __future__ import annotations

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
