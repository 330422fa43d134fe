"""The Django monolith's call shapes on top of the gRPC clients.

Existing call sites change only their import::

    # before
    from igny8_core.business.billing.services import CreditService
    from igny8_core.business.billing.exceptions import InsufficientCreditsError
    # after
    from igny8_client.compat import CreditService, InsufficientCreditsError

    CreditService.check_credits(account, operation_type="content", amount=250)
    CreditService.deduct_credits(account, 2, "content", "Blog post")

and ``settings.is_module_enabled("writer")`` becomes
``AccountModuleSettings.for_account(account).is_module_enabled("writer")`` or
``is_module_enabled("writer", account)``.

**Configuration.** Call :func:`configure` once (e.g. in ``AppConfig.ready``)
with clients, or let the first call read the environment:
``IGNY8_BILLING_URL`` and ``IGNY8_SETTINGS_URL`` (``host:port`` or
``http(s)://host:port``) and the service token in
``IGNY8_SERVICE_TOKEN_FILE`` (re-read when it changes) or
``IGNY8_SERVICE_TOKEN``. The
monolith is an internal service: give it a ``service`` token; each call then
acts as the ``account`` it is given (``x-igny8-act-as-account``), exactly as
the old code acted on the account object it was handed. ``account`` may be a
model instance (its ``id``/``pk`` is used) or an account id.

**What is refused now that the old code accepted** (every refusal raises a
subclass of :class:`~igny8_client.errors.InvalidArgument`, which is also a
``ValueError``, and changes nothing):

* unknown operation types: the old cost lookup answered 0 credits, so an
  unknown or misspelled operation was free. Now :class:`UnknownOperation`.
* unknown module names: the old ``is_module_enabled`` answered ``True`` for any
  name it did not know, so a typo enabled a feature. Now refused (fail closed).
* amounts of zero or less, and quantities above 10^9: the old code charged
  nothing or overflowed. Now refused.

Other errors keep their exception types from :mod:`igny8_client.errors`
(:class:`PermissionDenied`, :class:`Unavailable`, …).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, TypeVar

from . import _common as c
from .client import Igny8Credits, Igny8Settings
from .errors import InsufficientCredits, InvalidArgument
from .tokens import token_from_file

__all__ = [
    "configure",
    "get_credit_cost",
    "check_credits",
    "deduct_credits",
    "deduct_credits_for_operation",
    "is_module_enabled",
    "CreditService",
    "AccountModuleSettings",
    "InsufficientCreditsError",
]

#: The old exception's name. ``except InsufficientCreditsError`` keeps
#: working; ``str(err)`` is ``"Insufficient credits. Required: X, Available: Y"``
#: and ``err.required`` / ``err.available`` carry the numbers.
InsufficientCreditsError = InsufficientCredits

_lock = threading.Lock()
_credits: Igny8Credits | None = None
_settings: Igny8Settings | None = None


def configure(credits: Igny8Credits | None = None, settings: Igny8Settings | None = None) -> None:
    """Sets the clients the compat functions use (``None`` leaves one as is).
    Each call acts as the account it is given via ``client.for_account``."""
    global _credits, _settings
    with _lock:
        if credits is not None:
            _credits = credits
        if settings is not None:
            _settings = settings


def _token_kwargs() -> dict[str, Any]:
    path = os.environ.get("IGNY8_SERVICE_TOKEN_FILE")
    if path:
        return {"token_provider": token_from_file(path)}
    token = os.environ.get("IGNY8_SERVICE_TOKEN")
    if token:
        return {"token": token}
    raise InvalidArgument(
        "igny8_client.compat is not configured: call compat.configure(...) or set "
        "IGNY8_SERVICE_TOKEN_FILE (or IGNY8_SERVICE_TOKEN) and IGNY8_BILLING_URL / IGNY8_SETTINGS_URL"
    )


def _env_target(name: str) -> str:
    target = os.environ.get(name)
    if not target:
        raise InvalidArgument(f"igny8_client.compat is not configured: call compat.configure(...) or set {name}")
    return target


def _billing() -> Igny8Credits:
    global _credits
    with _lock:
        if _credits is None:
            _credits = Igny8Credits(_env_target("IGNY8_BILLING_URL"), **_token_kwargs())
        return _credits


def _settings_client() -> Igny8Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = Igny8Settings(_env_target("IGNY8_SETTINGS_URL"), **_token_kwargs())
        return _settings


def _account_id(account: object) -> int | None:
    if account is None:
        return None
    if isinstance(account, bool):
        raise InvalidArgument(f"account must be an Account or an account id, got {account!r}")
    if isinstance(account, int):
        return account
    for attr in ("id", "pk"):
        value = getattr(account, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise InvalidArgument(f"account must be an Account (with an integer id) or an account id, got {account!r}")


_Client = TypeVar("_Client", Igny8Credits, Igny8Settings)


def _for(client: _Client, account: object) -> _Client:
    account_id = _account_id(account)
    return client if account_id is None else client.for_account(account_id)


def _amount(amount: int | None) -> int:
    return 0 if amount is None else amount


def get_credit_cost(operation_type: str, amount: int | None = None) -> int:
    """Credits ``operation_type`` costs for ``amount`` (words for
    content_generation/optimization, a count otherwise; ``None``/0 = one
    unit).

    Refused now: an unknown ``operation_type`` raises
    :class:`~igny8_client.errors.UnknownOperation` (the old code answered 0,
    so a misspelled operation was free); ``amount`` above 10^9 raises
    :class:`~igny8_client.errors.InvalidArgument`.
    """
    return _billing().get_credit_cost(operation_type, _amount(amount)).credits


def check_credits(
    account: object,
    required_credits: int | None = None,
    operation_type: str | None = None,
    amount: int | None = None,
) -> bool:
    """Returns ``True`` when ``account`` can pay, else raises
    ``InsufficientCreditsError("Insufficient credits. Required: X, Available: Y")``.

    Give ``required_credits``, or ``operation_type`` (and ``amount``) to price.
    "Available" is the balance minus active holds. Advisory only: a later
    :func:`deduct_credits` decides atomically.

    Refused now: an unknown ``operation_type`` (the old code priced it at 0
    and always passed); giving neither ``required_credits`` nor
    ``operation_type``, or both; ``required_credits`` of 0 or less.
    """
    if required_credits is not None and operation_type is not None:
        raise InvalidArgument("give required_credits or operation_type (with amount), not both")
    client = _for(_billing(), account)
    if required_credits is not None:
        result = client.check(credits=required_credits)
    elif operation_type is not None:
        result = client.check(operation_type, _amount(amount))
    else:
        raise InvalidArgument("give required_credits, or operation_type (with amount) to price")
    if not result.sufficient:
        raise InsufficientCreditsError(required=result.required_credits, available=result.available_credits)
    return True


def _ledger_metadata(
    operation_type: str | None, metadata: Mapping[str, Any] | None, extra: Mapping[str, Any]
) -> dict[str, str]:
    out: dict[str, str] = {}
    if operation_type:
        out["operation_type"] = operation_type
    for key, value in {**dict(metadata or {}), **extra}.items():
        if value is not None:
            out[str(key)] = value if isinstance(value, str) else str(value)
    return out


def deduct_credits(
    account: object,
    amount: int,
    operation_type: str,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    **ledger_fields: Any,
) -> int:
    """Deducts ``amount`` credits (already priced) from ``account`` and
    returns the new balance. Raises ``InsufficientCreditsError`` (nothing
    changed) when the account cannot pay; the old check-then-deduct race is
    gone (the database decides).

    ``operation_type``, ``metadata`` and any further keyword arguments of the
    old signature (``cost_usd``, ``model_used``, ``tokens_input``,
    ``tokens_output``, ``related_object_type``, ``related_object_id``) are
    kept as string metadata on the ledger row (at most 16 entries in all).

    Pass ``idempotency_key`` (e.g. the task id) so that a repeated call
    charges once; without it each call is a new charge (each call's own
    retries still reuse one key).

    Refused now: ``amount`` of 0 or less (the old code wrote a no-op or
    negative charge).
    """
    client = _for(_billing(), account)
    result = client.deduct(
        credits=amount,
        idempotency_key=idempotency_key,
        description=description or "",
        metadata=_ledger_metadata(operation_type, metadata, ledger_fields),
    )
    return result.balance


def deduct_credits_for_operation(
    account: object,
    operation_type: str,
    amount: int | None = None,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    **ledger_fields: Any,
) -> int:
    """Prices ``operation_type`` for ``amount`` and deducts it in one atomic
    call; returns the new balance. Unlike :func:`deduct_credits` this is
    refused with :class:`~igny8_client.errors.ModuleDisabled` when the
    operation's module is off for the account. Unknown operations raise
    :class:`~igny8_client.errors.UnknownOperation`."""
    client = _for(_billing(), account)
    result = client.deduct(
        operation_type,
        _amount(amount),
        idempotency_key=idempotency_key,
        description=description or "",
        metadata=_ledger_metadata(None, metadata, ledger_fields),
    )
    return result.balance


def is_module_enabled(name: str, account: object = None) -> bool:
    """Whether ``account``'s ``name`` module is on (``account`` may be left
    out with a user token: the token's account is used).

    Refused now: an unknown module name raises
    :class:`~igny8_client.errors.InvalidArgument` (the old code answered
    ``True`` for any name it did not know: fail open). Names are ``planner``,
    ``writer``, ``thinker``, ``automation``, ``site_builder``, ``linker``,
    ``optimizer``, ``publisher``.
    """
    c.module_enum(name)  # refuse unknown names before any network call
    return _for(_settings_client(), account).is_module_enabled(name)


class CreditService:
    """The old ``CreditService`` static methods: :func:`get_credit_cost`,
    :func:`check_credits`, :func:`deduct_credits`,
    :func:`deduct_credits_for_operation`."""

    get_credit_cost = staticmethod(get_credit_cost)
    check_credits = staticmethod(check_credits)
    deduct_credits = staticmethod(deduct_credits)
    deduct_credits_for_operation = staticmethod(deduct_credits_for_operation)


class AccountModuleSettings:
    """Stands in for the old model's ``is_module_enabled``:
    ``AccountModuleSettings.for_account(account).is_module_enabled("writer")``."""

    def __init__(self, account: object = None) -> None:
        self.account_id = _account_id(account)

    @classmethod
    def for_account(cls, account: object) -> AccountModuleSettings:
        """The switches of ``account`` (a model instance or an id)."""
        return cls(account)

    def is_module_enabled(self, name: str) -> bool:
        """As :func:`is_module_enabled`."""
        return is_module_enabled(name, self.account_id)
