"""What a failed RPC raises on the client: one exception class per gRPC status code.

The server answers every failure through its one table (serving/errors.py) with a status code and a
message that names the bad value; the client maps the code back through the one table below and
keeps the server's message word for word. Each class also subclasses the matching server-side
``cnnctl.errors`` class, so ``except NotFoundError`` works the same on either side of the wire.
"""

from __future__ import annotations

import grpc

from cnnctl.errors import (
    ArtifactError,
    CnnctlError,
    DeadlineExceededError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
    UsageError,
)


class ClientError(CnnctlError):
    """An RPC that failed: ``code`` is the gRPC status, ``message`` the server's own words."""

    def __init__(self, code: grpc.StatusCode, message: str, *, attempts: int = 1) -> None:
        self.code = code
        self.message = message
        self.attempts = attempts
        super().__init__(message)


class InvalidArgument(ClientError, UsageError):
    """The request was malformed: bad shape, datatype, input name or image (INVALID_ARGUMENT)."""


class NotFound(ClientError, NotFoundError):
    """The server does not serve that model or version (NOT_FOUND)."""


class ResourceExhausted(ClientError, OverloadedError):
    """The server's queue is full or the message is over a size limit (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(ClientError, DeadlineExceededError):
    """The call's deadline passed before the answer came (DEADLINE_EXCEEDED)."""


class Unavailable(ClientError, UnavailableError):
    """The server cannot be reached or is shutting down, after every retry (UNAVAILABLE)."""


class FailedPrecondition(ClientError, ArtifactError):
    """The server cannot use the model's artifact (FAILED_PRECONDITION)."""


class Unauthenticated(ClientError):
    """TLS or credentials were refused (UNAUTHENTICATED / PERMISSION_DENIED)."""


class Cancelled(ClientError):
    """The call was cancelled before it finished (CANCELLED)."""


class ServerError(ClientError):
    """A bug or an unexpected failure on the server (INTERNAL, UNKNOWN and anything unlisted)."""


# The one table: status code -> exception class. Codes not listed raise ServerError.
STATUS_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_for(code: grpc.StatusCode, message: str, *, attempts: int = 1) -> ClientError:
    return STATUS_ERRORS.get(code, ServerError)(code, message, attempts=attempts)


def from_rpc_error(exc: grpc.RpcError, *, attempts: int = 1) -> ClientError:
    """The typed exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code, details or code.name, attempts=attempts)
