"""The blocking clients: :class:`Igny8Credits` (billing-svc) and
:class:`Igny8Settings` (settings-svc)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _common as c
from ._common import ModuleName, RetryPolicy, Seconds
from ._gen.igny8.billing.v1 import billing_pb2, billing_pb2_grpc
from ._gen.igny8.settings.v1 import settings_pb2, settings_pb2_grpc
from .errors import InvalidArgument, from_rpc_error

__all__ = ["Igny8Credits", "Igny8Settings"]

Resp = TypeVar("Resp")
_C = TypeVar("_C", bound="_Client")


class _Client:
    """Channel, credentials, deadlines and the retry loop."""

    def __init__(
        self,
        target: str | grpc.Channel,
        *,
        token: str | None = None,
        token_provider: Callable[[], str] | None = None,
        act_as: int | None = None,
        timeout: Seconds = 10.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._auth = c.Auth(token, token_provider, act_as)
        self._timeout = c.seconds(timeout, "timeout")
        self._retry = retry if retry is not None else RetryPolicy()
        if isinstance(target, grpc.Channel):
            self._channel = target
            self._owns_channel = False
        elif isinstance(target, str) and target:
            target, credentials = c.parse_target(target, credentials)
            opts = c.channel_options(options)
            self._channel = (
                grpc.secure_channel(target, credentials, opts)
                if credentials is not None
                else grpc.insecure_channel(target, opts)
            )
            self._owns_channel = True
        else:
            raise InvalidArgument(f"target must be 'host:port' or a grpc.Channel, got {target!r}")
        self._init_stub()

    @property
    def act_as(self) -> int | None:
        """The account acted as (``x-igny8-act-as-account``), if any."""
        return self._auth.act_as

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        provider = self._auth.token_provider
        return self._auth.metadata_for(provider() if provider is not None else self._auth.token)

    def _call(self, method: Callable[..., Resp], request: Any) -> Resp:
        """Calls ``method``, retrying UNAVAILABLE and DEADLINE_EXCEEDED with
        jittered backoff within the total deadline. The request (and so its
        idempotency key) is the same object on every attempt."""
        deadline = time.monotonic() + self._retry.total_timeout
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            attempts += 1
            try:
                return method(
                    request,
                    timeout=max(min(self._timeout, remaining), 0.001),
                    metadata=self._metadata(),
                )
            except grpc.RpcError as err:
                if err.code() in c.RETRYABLE_CODES and self._retry.may_retry(attempts):
                    pause = self._retry.backoff(attempts - 1)
                    if time.monotonic() + pause < deadline:
                        time.sleep(pause)
                        continue
                raise from_rpc_error(err, attempts) from err

    def _stream(self, open_stream: Callable[..., Any], request: Any, reconnect: bool) -> Generator[Any, None, None]:
        """Messages of a server stream; on UNAVAILABLE (a draining server,
        a lost connection) it reopens the stream with backoff, for at most the
        retry policy's total deadline without any message."""
        failures = 0
        since = time.monotonic()
        while True:
            call = open_stream(request, metadata=self._metadata())
            try:
                for message in call:
                    failures, since = 0, time.monotonic()
                    yield message
                return  # the server ended the stream cleanly
            except grpc.RpcError as err:
                failures += 1
                code = err.code()
                if not (reconnect and code in c.RETRYABLE_CODES and self._retry.may_retry(failures)):
                    raise from_rpc_error(err, failures) from err
                pause = self._retry.backoff(failures - 1)
                if time.monotonic() + pause >= since + self._retry.total_timeout:
                    raise from_rpc_error(err, failures) from err
                time.sleep(pause)
            finally:
                call.cancel()

    def close(self) -> None:
        """Closes the channel (unless it was passed in)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _clone(self: _C, act_as: int | None) -> _C:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._auth = self._auth.with_act_as(act_as)
        clone._owns_channel = False
        clone._init_stub()
        return clone

    def _init_stub(self) -> None:
        raise NotImplementedError

    def for_account(self: _C, account_id: int | None) -> _C:
        """The same client (channel, token) acting as ``account_id``: for
        service tokens and developers, which name the account per call."""
        return self._clone(account_id)



class Igny8Credits(_Client):
    """A client of billing-svc (``igny8.billing.v1.BillingService``).

    Args:
        target: ``"host:port"``, or a ready ``grpc.Channel``.
        token: the bearer JWT (an access or service token).
        token_provider: instead of ``token``, a callable returning the current
            JWT; called before every attempt, so renewed tokens are picked up.
        act_as: account to act as (``x-igny8-act-as-account``): service tokens
            and developers only; others are refused with PERMISSION_DENIED.
        timeout: seconds each attempt may take (default 10).
        retry: the :class:`RetryPolicy` for UNAVAILABLE / DEADLINE_EXCEEDED
            (default: up to 30 s in total). ``NO_RETRY`` turns retries off.
        credentials: ``grpc.ssl_channel_credentials(...)`` for TLS/mTLS;
            plaintext without.
        options: extra grpc channel options.

    Every method raises an :class:`~igny8_client.errors.Igny8Error` subclass
    on failure. Calls that change the balance carry an idempotency key, made
    up when none is given and the same on every retry, so a retried call is
    charged at most once.
    """


    def _init_stub(self) -> None:
        self._stub = billing_pb2_grpc.BillingServiceStub(self._channel)

    def get_credit_cost(self, operation: str, quantity: int = 0) -> billing_pb2.GetCreditCostResponse:
        """Prices ``quantity`` of ``operation`` (canonical name or legacy alias;
        words for word-priced operations, a count otherwise; 0 = one unit).
        Unknown operations raise :class:`UnknownOperation`."""
        u = c.usage(operation, quantity)
        request = billing_pb2.GetCreditCostRequest(operation=u.operation, quantity=u.quantity)
        return self._call(self._stub.GetCreditCost, request)

    def list_credit_costs(self) -> list[billing_pb2.CreditCost]:
        """The whole cost table."""
        return list(self._call(self._stub.ListCreditCosts, billing_pb2.ListCreditCostsRequest()).costs)

    def check(
        self, operation: str | None = None, quantity: int = 0, credits: int | None = None
    ) -> billing_pb2.CheckResponse:
        """Whether the account could pay now (advisory): ``sufficient``,
        ``required_credits``, ``available_credits``. Give an operation (and
        quantity) or raw ``credits``."""
        return self._call(self._stub.Check, c.check_request(operation, quantity, credits))

    def deduct(
        self,
        operation: str | None = None,
        quantity: int = 0,
        *,
        credits: int | None = None,
        idempotency_key: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> billing_pb2.DeductResponse:
        """Charges the account atomically: ``transaction``, ``balance``,
        ``replayed``. Raises :class:`InsufficientCredits` (nothing changed),
        :class:`ModuleDisabled`, :class:`IdempotencyKeyReused`.

        Without ``idempotency_key`` a new one is made for this call and reused
        on each of its retries. Pass your own (e.g. the job id) to make a
        charge idempotent across calls and processes."""
        key = c.check_key(idempotency_key)
        request = c.deduct_request(operation, quantity, credits, key, description, metadata)
        return self._call(self._stub.Deduct, request)

    def reserve(
        self,
        operation: str | None = None,
        quantity: int = 0,
        *,
        credits: int | None = None,
        idempotency_key: str | None = None,
        ttl: Seconds | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> billing_pb2.ReserveResponse:
        """Places a hold (``hold``, ``available``, ``replayed``) for
        ``ttl`` (seconds or timedelta, 1 s to 24 h; default 15 min). Keys as
        for :meth:`deduct`."""
        key = c.check_key(idempotency_key)
        request = c.reserve_request(operation, quantity, credits, key, ttl, description, metadata)
        return self._call(self._stub.Reserve, request)

    def capture(
        self,
        hold_id: str,
        operation: str | None = None,
        quantity: int = 0,
        *,
        credits: int | None = None,
    ) -> billing_pb2.CaptureHoldResponse:
        """Charges a hold: the whole held amount, or the given usage or
        credits (at most the hold). Repeating the same capture replays it."""
        return self._call(self._stub.CaptureHold, c.capture_request(hold_id, operation, quantity, credits))

    def release(self, hold_id: str) -> billing_pb2.ReleaseHoldResponse:
        """Frees a hold without charging. Releasing twice replays."""
        return self._call(self._stub.ReleaseHold, billing_pb2.ReleaseHoldRequest(hold_id=c._text(hold_id, "hold_id")))

    def get_hold(self, hold_id: str) -> billing_pb2.Hold:
        """Reads a hold (state EXPIRED once its expire_time passed)."""
        return self._call(self._stub.GetHold, billing_pb2.GetHoldRequest(hold_id=c._text(hold_id, "hold_id"))).hold

    def balance(self) -> billing_pb2.GetBalanceResponse:
        """``account_id``, ``balance``, ``held`` and ``available``."""
        return self._call(self._stub.GetBalance, billing_pb2.GetBalanceRequest())

    def transactions(self, page_size: int = 0, page_token: str = "") -> Generator[billing_pb2.ListTransactionsResponse, None, None]:
        """Pages of the ledger, newest first. Each page has ``transactions``
        and ``next_page_token`` (pass it as ``page_token`` to resume later).
        ``page_size`` 0 means the server's default (50)."""
        size = c.page_size(page_size)
        token = c._text(page_token, "page_token")
        while True:
            page = self._call(
                self._stub.ListTransactions, billing_pb2.ListTransactionsRequest(page_size=size, page_token=token)
            )
            yield page
            if not page.next_page_token:
                return
            token = page.next_page_token

    def grant(
        self, credits: int, *, idempotency_key: str | None = None, reason: str = ""
    ) -> billing_pb2.GrantResponse:
        """Adds credits (developers acting as an account, and services)."""
        return self._call(self._stub.Grant, c.grant_request(credits, c.check_key(idempotency_key), reason))

    def refund(
        self,
        transaction_id: int,
        credits: int = 0,
        *,
        idempotency_key: str | None = None,
        reason: str = "",
    ) -> billing_pb2.RefundResponse:
        """Gives back ``credits`` (0: all that is left) of a DEDUCT or CAPTURE
        row (developers acting as an account, and services)."""
        key = c.check_key(idempotency_key)
        return self._call(self._stub.Refund, c.refund_request(transaction_id, credits, key, reason))

    def watch_balance(
        self, low_balance_threshold: int = 0, *, reconnect: bool = True
    ) -> Generator[billing_pb2.WatchBalanceResponse, None, None]:
        """The balance now, then after every change. Reconnects on
        UNAVAILABLE (the first message after a reconnect is the state then).
        Close the generator (or break out of the loop) to stop."""
        if isinstance(low_balance_threshold, bool) or not isinstance(low_balance_threshold, int):
            raise InvalidArgument("low_balance_threshold must be a whole number of credits")
        request = billing_pb2.WatchBalanceRequest(low_balance_threshold=low_balance_threshold)
        return self._stream(self._stub.WatchBalance, request, reconnect)


class Igny8Settings(_Client):
    """A client of settings-svc (``igny8.settings.v1.SettingsService``).

    Takes the same arguments as :class:`Igny8Credits`. Module names are
    ``planner``, ``writer``, ``thinker``, ``automation``, ``site_builder``,
    ``linker``, ``optimizer``, ``publisher`` (``MODULE_WRITER`` and the
    ``settings_pb2.Module`` values work too)."""


    def _init_stub(self) -> None:
        self._stub = settings_pb2_grpc.SettingsServiceStub(self._channel)

    def get(self) -> settings_pb2.ModuleSettings:
        """The account's switches (every module on for a new account)."""
        return self._call(self._stub.GetModuleSettings, settings_pb2.GetModuleSettingsRequest()).settings

    def is_module_enabled(self, module: ModuleName) -> bool:
        """Whether the account may use ``module``. Unknown names raise
        :class:`InvalidArgument` (fail closed)."""
        request = settings_pb2.CheckModuleRequest(module=c.module_enum(module))  # type: ignore[arg-type]
        return self._call(self._stub.CheckModule, request).enabled

    def update(self, **flags: bool) -> settings_pb2.ModuleSettings:
        """Switches modules on or off, e.g. ``update(writer=False)``; only the
        named switches change (the update mask is built from the names)."""
        return self._call(self._stub.UpdateModuleSettings, c.update_request(flags)).settings

    def watch(self, *, reconnect: bool = True) -> Generator[settings_pb2.ModuleSettings, None, None]:
        """The switches now, then after every change. Reconnects on
        UNAVAILABLE. Close the generator (or break) to stop."""
        for message in self._stream(
            self._stub.WatchModuleSettings, settings_pb2.WatchModuleSettingsRequest(), reconnect
        ):
            yield message.settings
