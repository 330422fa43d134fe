"""Exceptions raised by igny8_client, carrying the google.rpc error details.

Every failed call raises a subclass of :class:`Igny8Error`. The most specific
class is chosen from the gRPC status code and the ``google.rpc.ErrorInfo``
reason the services attach (docs/api.md, "Errors"):

=====================================  ==========================================
exception                              when
=====================================  ==========================================
:class:`InsufficientCredits`           FAILED_PRECONDITION ``INSUFFICIENT_CREDITS``
:class:`ModuleDisabled`                FAILED_PRECONDITION ``MODULE_DISABLED``
:class:`HoldNotActive`                 FAILED_PRECONDITION ``HOLD_NOT_ACTIVE``
:class:`CaptureExceedsHold`            FAILED_PRECONDITION ``CAPTURE_EXCEEDS_HOLD``
:class:`RefundExceedsCharge`           FAILED_PRECONDITION ``REFUND_EXCEEDS_CHARGE``
:class:`FailedPrecondition`            any other FAILED_PRECONDITION
:class:`IdempotencyKeyReused`          ALREADY_EXISTS ``IDEMPOTENCY_KEY_REUSED``
:class:`UnknownOperation`              INVALID_ARGUMENT ``UNKNOWN_OPERATION``
:class:`InvalidArgument`               any other INVALID_ARGUMENT (and bad
                                       arguments refused before sending)
:class:`PermissionDenied`              PERMISSION_DENIED
:class:`Unauthenticated`               UNAUTHENTICATED
:class:`NotFound`                      NOT_FOUND
:class:`Unavailable`                   UNAVAILABLE (after the retries ran out)
:class:`DeadlineExceeded`              DEADLINE_EXCEEDED (after the retries)
:class:`ResourceExhausted`             RESOURCE_EXHAUSTED
:class:`Igny8Error`                    anything else
=====================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2

__all__ = [
    "Igny8Error",
    "InvalidArgument",
    "UnknownOperation",
    "FailedPrecondition",
    "InsufficientCredits",
    "ModuleDisabled",
    "HoldNotActive",
    "CaptureExceedsHold",
    "RefundExceedsCharge",
    "IdempotencyKeyReused",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "Unavailable",
    "DeadlineExceeded",
    "ResourceExhausted",
    "from_rpc_error",
]

DETAILS_TRAILER = "grpc-status-details-bin"


class Igny8Error(Exception):
    """A call to billing-svc or settings-svc failed.

    Attributes:
        code: the gRPC status code.
        message: the server's message (``str(err)`` is the same text).
        reason: ``ErrorInfo.reason`` (``"INSUFFICIENT_CREDITS"``, …) or ``""``.
        domain: ``ErrorInfo.domain`` (``"billing.igny8"``, ``"auth.igny8"``) or ``""``.
        metadata: ``ErrorInfo.metadata`` as a dict.
        field_violations: ``BadRequest`` field violations as ``(field, description)``.
        status: the whole ``google.rpc.Status`` when the server sent one.
        details: every detail message, decoded (``ErrorInfo``, ``BadRequest``, …).
        attempts: how many attempts the client made before giving up.
    """

    #: The code raised by default for this class (for errors made locally).
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        status: status_pb2.Status | None = None,
        details: Iterable[Any] = (),
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.status = status
        self.details: list[Any] = list(details)
        self.attempts = attempts

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps every field through pickle (Celery sends task exceptions to
        # its result backend this way); the default would call cls(message).
        return (_restore, (type(self), self.message), dict(self.__dict__))

    def _int(self, key: str) -> int | None:
        try:
            return int(self.metadata[key])
        except (KeyError, ValueError):
            return None


class InvalidArgument(Igny8Error, ValueError):
    """INVALID_ARGUMENT: a request field is wrong; nothing changed.
    ``field_violations`` names the fields. Also raised before sending for
    arguments the client can refuse itself (it never sends those)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownOperation(InvalidArgument):
    """The operation is not in the cost table (the old code charged 0)."""


class FailedPrecondition(Igny8Error):
    """FAILED_PRECONDITION: the account or hold is not in a state that allows
    the call; nothing changed."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InsufficientCredits(FailedPrecondition):
    """Not enough available credits; nothing changed.

    ``str(err)`` is the old code's text,
    ``"Insufficient credits. Required: X, Available: Y"``.

    Attributes:
        required: credits the call needed.
        available: credits available (balance minus active holds).
    """

    def __init__(self, message: str = "", *, required: int = 0, available: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("reason", "INSUFFICIENT_CREDITS")
        metadata = dict(kwargs.pop("metadata", None) or {})
        metadata.setdefault("required", str(required))
        metadata.setdefault("available", str(available))
        super().__init__(message, metadata=metadata, **kwargs)
        self.required: int = self._int("required") or 0
        self.available: int = self._int("available") or 0
        if not self.message:
            self.message = insufficient_message(self.required, self.available)
            self.args = (self.message,)


def _restore(cls: type[Igny8Error], message: str) -> Igny8Error:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def insufficient_message(required: int, available: int) -> str:
    """The old code's message for a refused charge."""
    return f"Insufficient credits. Required: {required}, Available: {available}"


class ModuleDisabled(FailedPrecondition):
    """The operation's module is switched off for the account.

    Attributes:
        module: the module (``"writer"``).
        operation: the canonical operation (``"content_generation"``).
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.module: str = self.metadata.get("module", "")
        self.operation: str = self.metadata.get("operation", "")


class HoldNotActive(FailedPrecondition):
    """The hold was captured, released or expired.

    Attributes:
        state: ``"HOLD_STATE_CAPTURED"``, ``"HOLD_STATE_RELEASED"`` or
            ``"HOLD_STATE_EXPIRED"``.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.state: str = self.metadata.get("state", "")


class CaptureExceedsHold(FailedPrecondition):
    """A capture asked for more than the hold holds.

    Attributes:
        requested: credits asked for.
        held: credits the hold holds.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.requested: int | None = self._int("requested")
        self.held: int | None = self._int("held")


class RefundExceedsCharge(FailedPrecondition):
    """A refund asked for more than is left to refund.

    Attributes:
        requested: credits asked for (0 = everything left).
        refundable: credits still refundable on the transaction.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.requested: int | None = self._int("requested")
        self.refundable: int | None = self._int("refundable")


class AlreadyExists(Igny8Error):
    """ALREADY_EXISTS."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class IdempotencyKeyReused(AlreadyExists):
    """The idempotency key was used before for a different request.

    Attributes:
        idempotency_key: the key.
    """

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.idempotency_key: str = self.metadata.get("idempotency_key", "")


class PermissionDenied(Igny8Error):
    """PERMISSION_DENIED: authenticated, but not allowed (role, suspended
    account, act-as not allowed, …); ``reason`` says which."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(Igny8Error):
    """UNAUTHENTICATED: no token, or an invalid, expired or refused one."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(Igny8Error):
    """NOT_FOUND: no such hold or transaction on this account."""

    default_code = grpc.StatusCode.NOT_FOUND


class Unavailable(Igny8Error):
    """UNAVAILABLE: the service (or its database, directory or settings) could
    not be reached, even after retrying within the total deadline."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(Igny8Error):
    """DEADLINE_EXCEEDED: no answer within the timeout, even after retrying."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(Igny8Error):
    """RESOURCE_EXHAUSTED: the server refused the call under load; nothing
    changed. Retry later with the same idempotency key."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_REASON: dict[tuple[grpc.StatusCode, str], type[Igny8Error]] = {
    (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"): InsufficientCredits,
    (grpc.StatusCode.FAILED_PRECONDITION, "MODULE_DISABLED"): ModuleDisabled,
    (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_NOT_ACTIVE"): HoldNotActive,
    (grpc.StatusCode.FAILED_PRECONDITION, "CAPTURE_EXCEEDS_HOLD"): CaptureExceedsHold,
    (grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_CHARGE"): RefundExceedsCharge,
    (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"): IdempotencyKeyReused,
    (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_OPERATION"): UnknownOperation,
}

_BY_CODE: dict[grpc.StatusCode, type[Igny8Error]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def _unpack(detail: any_pb2.Any) -> Any:
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
        error_details_pb2.DebugInfo,
        error_details_pb2.RequestInfo,
    ):
        if detail.type_url.rsplit("/", 1)[-1] == cls.DESCRIPTOR.full_name:
            message = cls()
            detail.Unpack(message)
            return message
    return detail


def build_error(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
    attempts: int = 1,
) -> Igny8Error:
    """The exception for a status and its trailers (``grpc-status-details-bin``)."""
    status: status_pb2.Status | None = None
    for key, value in trailing_metadata or ():
        if key == DETAILS_TRAILER and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except Exception:  # a malformed trailer: keep the plain status
                status = None
    details = [_unpack(d) for d in status.details] if status is not None else []
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    for d in details:
        if isinstance(d, error_details_pb2.ErrorInfo) and not reason:
            reason, domain, metadata = d.reason, d.domain, dict(d.metadata)
        elif isinstance(d, error_details_pb2.BadRequest):
            violations.extend((v.field, v.description) for v in d.field_violations)
    cls = _BY_REASON.get((code, reason)) or _BY_CODE.get(code, Igny8Error)
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        status=status,
        details=details,
        attempts=attempts,
    )


def from_rpc_error(err: grpc.RpcError, attempts: int = 1) -> Igny8Error:
    """The exception for a failed grpcio call (sync or ``grpc.aio``)."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    trailers_fn = getattr(err, "trailing_metadata", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or str(err)
    trailers = trailers_fn() if callable(trailers_fn) else None
    return build_error(code or grpc.StatusCode.UNKNOWN, message, trailers, attempts)
