"""What the sync and asyncio clients share: arguments, requests, retries."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Union

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from ._gen.igny8.billing.v1 import billing_pb2
from ._gen.igny8.settings.v1 import settings_pb2
from .errors import InvalidArgument

ACT_AS_HEADER = "x-igny8-act-as-account"
ACCOUNT_HEADER = "x-igny8-account-id"

#: The only codes a call is retried on: the request may not have reached the
#: service (or its answer was lost). Everything else is an answer.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Channel options every client channel gets unless the caller overrides them:
#: reconnect quickly after a restart (grpc's default waits 1 s, then up to
#: 120 s between connection attempts, longer than a retry loop lasts).
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

#: Module names accepted by the settings clients, mapped to the proto enum.
MODULES: dict[str, int] = {
    "planner": settings_pb2.MODULE_PLANNER,
    "writer": settings_pb2.MODULE_WRITER,
    "thinker": settings_pb2.MODULE_THINKER,
    "automation": settings_pb2.MODULE_AUTOMATION,
    "site_builder": settings_pb2.MODULE_SITE_BUILDER,
    "linker": settings_pb2.MODULE_LINKER,
    "optimizer": settings_pb2.MODULE_OPTIMIZER,
    "publisher": settings_pb2.MODULE_PUBLISHER,
}

ModuleName = Union[str, int]
Seconds = Union[float, int, timedelta]


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried on UNAVAILABLE and DEADLINE_EXCEEDED.

    Attempt *n* (from 0) is followed by a sleep drawn uniformly from
    ``[0, min(max_backoff, initial_backoff * multiplier**n)]`` ("full
    jitter", so many clients do not retry in step). No attempt starts after
    ``total_timeout`` seconds from the first one, and each attempt's own
    deadline is cut to what is left of it. ``max_attempts`` (``None``: as
    many as fit) bounds the count.
    """

    total_timeout: float = 30.0
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.total_timeout <= 0 or self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy: timeouts must be positive and backoffs not negative")
        if self.multiplier < 1:
            raise ValueError("RetryPolicy: multiplier must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("RetryPolicy: max_attempts must be at least 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (from 0)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** min(attempt, 64))
        return (rng or random).uniform(0.0, cap)

    def may_retry(self, attempts: int) -> bool:
        """Whether another attempt is allowed after ``attempts`` attempts."""
        return self.max_attempts is None or attempts < self.max_attempts


#: Never retry (one attempt).
NO_RETRY = RetryPolicy(max_attempts=1)


def seconds(value: Seconds, what: str) -> float:
    """A duration in seconds, from a number or a timedelta."""
    s = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0:
        raise InvalidArgument(f"{what} must be a positive number of seconds or a timedelta, got {value!r}")
    return float(s)


class Auth:
    """The metadata every call carries: the bearer token and act-as."""

    def __init__(
        self,
        token: str | None,
        token_provider: Callable[[], object] | None,
        act_as: int | None,
    ) -> None:
        if (token is None) == (token_provider is None):
            raise InvalidArgument("give exactly one of token= (a JWT) or token_provider= (a callable returning one)")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise InvalidArgument("token must be a non-empty string (the JWT, without 'Bearer ')")
        if token_provider is not None and not callable(token_provider):
            raise InvalidArgument("token_provider must be a callable returning the JWT")
        if act_as is not None and (isinstance(act_as, bool) or not isinstance(act_as, int) or act_as <= 0):
            raise InvalidArgument(f"act_as must be a positive account id, got {act_as!r}")
        self.token = token
        self.token_provider = token_provider
        self.act_as = act_as

    def with_act_as(self, act_as: int | None) -> Auth:
        return Auth(self.token, self.token_provider, act_as)

    def metadata_for(self, token: object) -> tuple[tuple[str, str], ...]:
        if not isinstance(token, str) or not token.strip():
            raise InvalidArgument("token_provider returned no token (expected a non-empty string)")
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        md: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
        if self.act_as is not None:
            md += ((ACT_AS_HEADER, str(self.act_as)),)
        return md


def new_idempotency_key() -> str:
    """A fresh key: 32 lowercase hex characters (a random UUID)."""
    return uuid.uuid4().hex


def check_key(key: str | None) -> str:
    """The caller's key, or a new one when none is given."""
    if key is None:
        return new_idempotency_key()
    if not isinstance(key, str):
        raise InvalidArgument(f"idempotency_key must be a string, got {type(key).__name__}")
    return key  # the server checks length and characters, and says which rule failed


def _quantity(quantity: int) -> int:
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        raise InvalidArgument(f"quantity must be a whole number >= 0, got {quantity!r}")
    if quantity >= 2**64:
        raise InvalidArgument(f"quantity {quantity} is too large (at most 1000000000)")
    return quantity


def usage(operation: str, quantity: int) -> billing_pb2.Usage:
    """A Usage message, checked for what the wire cannot carry."""
    if not isinstance(operation, str):
        raise InvalidArgument(f"operation must be a string, got {type(operation).__name__}")
    return billing_pb2.Usage(operation=operation, quantity=_quantity(quantity))


def cost(
    operation: str | None, quantity: int, credits: int | None, *, required: bool = True
) -> tuple[billing_pb2.Usage | None, int | None]:
    """The oneof ``cost``: a usage (operation, quantity) or raw credits."""
    if operation is not None and credits is not None:
        raise InvalidArgument("give either operation= (with quantity=) or credits=, not both")
    if credits is not None:
        if isinstance(credits, bool) or not isinstance(credits, int):
            raise InvalidArgument(f"credits must be a whole number > 0, got {credits!r}")
        if not -(2**63) <= credits < 2**63:
            raise InvalidArgument(f"credits {credits} does not fit in 64 bits")
        if quantity:
            raise InvalidArgument("quantity= prices an operation; it cannot go with credits=")
        return None, credits
    if operation is None:
        if required:
            raise InvalidArgument("give operation= (with quantity=) or credits= to say what to charge")
        if quantity:
            raise InvalidArgument("quantity= needs operation=")
        return None, None
    return usage(operation, quantity), None


def check_request(operation: str | None, quantity: int, credits: int | None) -> billing_pb2.CheckRequest:
    u, c = cost(operation, quantity, credits)
    return billing_pb2.CheckRequest(usage=u) if u is not None else billing_pb2.CheckRequest(credits=c or 0)


def _metadata_map(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument("metadata must be a mapping of str to str")
    return dict(metadata)


def _text(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


def deduct_request(
    operation: str | None,
    quantity: int,
    credits: int | None,
    key: str,
    description: str,
    metadata: Mapping[str, str] | None,
) -> billing_pb2.DeductRequest:
    u, c = cost(operation, quantity, credits)
    req = billing_pb2.DeductRequest(
        idempotency_key=key,
        description=_text(description, "description"),
        metadata=_metadata_map(metadata),
    )
    if u is not None:
        req.usage.CopyFrom(u)
    else:
        req.credits = c or 0
    return req


def reserve_request(
    operation: str | None,
    quantity: int,
    credits: int | None,
    key: str,
    ttl: Seconds | None,
    description: str,
    metadata: Mapping[str, str] | None,
) -> billing_pb2.ReserveRequest:
    u, c = cost(operation, quantity, credits)
    req = billing_pb2.ReserveRequest(
        idempotency_key=key,
        description=_text(description, "description"),
        metadata=_metadata_map(metadata),
    )
    if u is not None:
        req.usage.CopyFrom(u)
    else:
        req.credits = c or 0
    if ttl is not None:
        s = seconds(ttl, "ttl")
        whole = int(s)
        req.ttl.CopyFrom(duration_pb2.Duration(seconds=whole, nanos=int(round((s - whole) * 1e9))))
    return req


def capture_request(
    hold_id: str, operation: str | None, quantity: int, credits: int | None
) -> billing_pb2.CaptureHoldRequest:
    u, c = cost(operation, quantity, credits, required=False)
    req = billing_pb2.CaptureHoldRequest(hold_id=_text(hold_id, "hold_id"))
    if u is not None:
        req.usage.CopyFrom(u)
    elif c is not None:
        req.credits = c
    return req


def refund_request(transaction_id: int, credits: int, key: str, reason: str) -> billing_pb2.RefundRequest:
    if isinstance(transaction_id, bool) or not isinstance(transaction_id, int):
        raise InvalidArgument(f"transaction_id must be a ledger row id (int), got {transaction_id!r}")
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidArgument(f"credits must be a whole number (0 = all that is left), got {credits!r}")
    return billing_pb2.RefundRequest(
        transaction_id=transaction_id, credits=credits, idempotency_key=key, reason=_text(reason, "reason")
    )


def grant_request(credits: int, key: str, reason: str) -> billing_pb2.GrantRequest:
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidArgument(f"credits must be a whole number > 0, got {credits!r}")
    return billing_pb2.GrantRequest(credits=credits, idempotency_key=key, reason=_text(reason, "reason"))


def page_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1000:
        raise InvalidArgument(f"page_size must be 0 (server default, 50) to 1000, got {size!r}")
    return size


def module_enum(module: ModuleName) -> int:
    """The Module enum value of a name (``"writer"``, ``"MODULE_WRITER"``,
    ``"site-builder"``) or of an enum value. Unknown names are refused here:
    the old code said "enabled" for any unknown name; this fails closed."""
    if isinstance(module, bool):
        raise InvalidArgument(f"module must be a module name or settings_pb2.Module value, got {module!r}")
    if isinstance(module, int):
        return module  # the server refuses MODULE_UNSPECIFIED and unknown values
    if not isinstance(module, str):
        raise InvalidArgument(f"module must be a module name, got {type(module).__name__}")
    name = module.strip().lower().replace("-", "_")
    name = name.removeprefix("module_").removesuffix("_enabled")
    if name not in MODULES:
        raise InvalidArgument(
            f"unknown module {module!r}: expected one of {', '.join(MODULES)}",
            field_violations=[("module", f"unknown module {module!r}")],
        )
    return MODULES[name]


def update_request(flags: Mapping[str, bool]) -> settings_pb2.UpdateModuleSettingsRequest:
    """UpdateModuleSettings with exactly the named switches in its mask.

    Keys are module names (``writer``) or field names (``writer_enabled``)."""
    if not flags:
        raise InvalidArgument("update() needs at least one switch, e.g. update(writer=False)")
    settings = settings_pb2.ModuleSettings()
    paths: list[str] = []
    for key, value in flags.items():
        name = key.removesuffix("_enabled")
        if name not in MODULES:
            raise InvalidArgument(
                f"unknown module switch {key!r}: expected one of {', '.join(MODULES)}",
                field_violations=[("update_mask", f"unknown module {key!r}")],
            )
        if not isinstance(value, bool):
            raise InvalidArgument(f"{key} must be True or False, got {value!r}")
        field = f"{name}_enabled"
        if field in paths:
            raise InvalidArgument(f"{name} is given twice")
        setattr(settings, field, value)
        paths.append(field)
    return settings_pb2.UpdateModuleSettingsRequest(
        settings=settings, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def parse_target(
    target: str, credentials: grpc.ChannelCredentials | None
) -> tuple[str, grpc.ChannelCredentials | None]:
    """``host:port``; ``http://host:port`` (plaintext, as billing's
    IGNY8_SETTINGS_URL is written); ``https://host:port`` (TLS, system roots
    unless ``credentials`` are given)."""
    lowered = target.lower()
    if not lowered.startswith(("http://", "https://")):
        return target, credentials  # host:port, dns:///…, unix:…: grpc's own forms
    if lowered.startswith("https://"):
        credentials = credentials or grpc.ssl_channel_credentials()
    address = target.split("://", 1)[1].rstrip("/")
    if not address or "/" in address:
        raise InvalidArgument(f"target must be host:port or http(s)://host:port, got {target!r}")
    return address, credentials


def channel_options(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The default options, overridden by the caller's."""
    given: list[tuple[str, Any]] = list(options or ())
    names = {name for name, _ in given}
    defaults: list[tuple[str, Any]] = [(n, v) for n, v in DEFAULT_CHANNEL_OPTIONS if n not in names]
    return defaults + given
