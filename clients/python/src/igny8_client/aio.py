"""The asyncio clients (``grpc.aio``), for asyncio workers: the same methods
as :mod:`igny8_client.client`, as coroutines and async iterators. Create
them inside the event loop that uses them (a ``grpc.aio`` channel belongs to
one loop), and ``await client.close()`` or use ``async with``.

    async with Igny8Credits("billing:50051", token=jwt) as billing:
        result = await billing.deduct("content_generation", 250)
        async for page in billing.transactions():
            ...
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar, Union

import grpc
import grpc.aio

from . import _common as c
from ._common import ModuleName, RetryPolicy, Seconds
from ._gen.igny8.billing.v1 import billing_pb2, billing_pb2_grpc
from ._gen.igny8.settings.v1 import settings_pb2, settings_pb2_grpc
from .errors import InvalidArgument, from_rpc_error

__all__ = ["Igny8Credits", "Igny8Settings"]

Resp = TypeVar("Resp")
_C = TypeVar("_C", bound="_AsyncClient")

#: A token provider for the async clients: a plain or an async callable.
AsyncTokenProvider = Callable[[], Union[str, Awaitable[str]]]


class _AsyncClient:
    """Channel, credentials, deadlines and the retry loop (asyncio)."""

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        token: str | None = None,
        token_provider: AsyncTokenProvider | None = None,
        act_as: int | None = None,
        timeout: Seconds = 10.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._auth = c.Auth(token, token_provider, act_as)
        self._timeout = c.seconds(timeout, "timeout")
        self._retry = retry if retry is not None else RetryPolicy()
        if isinstance(target, grpc.aio.Channel):
            self._channel = target
            self._owns_channel = False
        elif isinstance(target, str) and target:
            target, credentials = c.parse_target(target, credentials)
            opts = c.channel_options(options)
            self._channel = (
                grpc.aio.secure_channel(target, credentials, opts)
                if credentials is not None
                else grpc.aio.insecure_channel(target, opts)
            )
            self._owns_channel = True
        else:
            raise InvalidArgument(f"target must be 'host:port' or a grpc.aio.Channel, got {target!r}")
        self._init_stub()

    @property
    def act_as(self) -> int | None:
        """The account acted as (``x-igny8-act-as-account``), if any."""
        return self._auth.act_as

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        provider = self._auth.token_provider
        if provider is None:
            return self._auth.metadata_for(self._auth.token)
        token = provider()
        if inspect.isawaitable(token):
            token = await token
        return self._auth.metadata_for(token)

    async def _call(self, method: Callable[..., Awaitable[Resp]], request: Any) -> Resp:
        """As the blocking client's: the same request (and key) on every
        retry of UNAVAILABLE / DEADLINE_EXCEEDED, within the total deadline."""
        deadline = time.monotonic() + self._retry.total_timeout
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            attempts += 1
            try:
                return await method(
                    request,
                    timeout=max(min(self._timeout, remaining), 0.001),
                    metadata=await self._metadata(),
                )
            except grpc.aio.AioRpcError as err:
                if err.code() in c.RETRYABLE_CODES and self._retry.may_retry(attempts):
                    pause = self._retry.backoff(attempts - 1)
                    if time.monotonic() + pause < deadline:
                        await asyncio.sleep(pause)
                        continue
                raise from_rpc_error(err, attempts) from err

    async def _stream(self, open_stream: Callable[..., Any], request: Any, reconnect: bool) -> AsyncGenerator[Any, None]:
        failures = 0
        since = time.monotonic()
        while True:
            call = open_stream(request, metadata=await self._metadata())
            try:
                async for message in call:
                    failures, since = 0, time.monotonic()
                    yield message
                return
            except grpc.aio.AioRpcError as err:
                failures += 1
                if not (reconnect and err.code() in c.RETRYABLE_CODES and self._retry.may_retry(failures)):
                    raise from_rpc_error(err, failures) from err
                pause = self._retry.backoff(failures - 1)
                if time.monotonic() + pause >= since + self._retry.total_timeout:
                    raise from_rpc_error(err, failures) from err
                await asyncio.sleep(pause)
            finally:
                call.cancel()

    async def close(self) -> None:
        """Closes the channel (unless it was passed in)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _init_stub(self) -> None:
        raise NotImplementedError

    def for_account(self: _C, account_id: int | None) -> _C:
        """The same client (channel, token) acting as ``account_id``."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._auth = self._auth.with_act_as(account_id)
        clone._owns_channel = False
        clone._init_stub()
        return clone


class Igny8Credits(_AsyncClient):
    """The asyncio client of billing-svc; see
    :class:`igny8_client.client.Igny8Credits` for arguments and semantics.
    ``token_provider`` may also be an async callable."""


    def _init_stub(self) -> None:
        self._stub = billing_pb2_grpc.BillingServiceStub(self._channel)

    async def get_credit_cost(self, operation: str, quantity: int = 0) -> billing_pb2.GetCreditCostResponse:
        """Prices ``quantity`` of ``operation``."""
        u = c.usage(operation, quantity)
        request = billing_pb2.GetCreditCostRequest(operation=u.operation, quantity=u.quantity)
        return await self._call(self._stub.GetCreditCost, request)

    async def list_credit_costs(self) -> list[billing_pb2.CreditCost]:
        """The whole cost table."""
        response = await self._call(self._stub.ListCreditCosts, billing_pb2.ListCreditCostsRequest())
        return list(response.costs)

    async def check(
        self, operation: str | None = None, quantity: int = 0, credits: int | None = None
    ) -> billing_pb2.CheckResponse:
        """Whether the account could pay now (advisory)."""
        return await self._call(self._stub.Check, c.check_request(operation, quantity, credits))

    async def deduct(
        self,
        operation: str | None = None,
        quantity: int = 0,
        *,
        credits: int | None = None,
        idempotency_key: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> billing_pb2.DeductResponse:
        """Charges the account; one key per call, reused on its retries."""
        key = c.check_key(idempotency_key)
        request = c.deduct_request(operation, quantity, credits, key, description, metadata)
        return await self._call(self._stub.Deduct, request)

    async def reserve(
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
        """Places a hold; one key per call, reused on its retries."""
        key = c.check_key(idempotency_key)
        request = c.reserve_request(operation, quantity, credits, key, ttl, description, metadata)
        return await self._call(self._stub.Reserve, request)

    async def capture(
        self,
        hold_id: str,
        operation: str | None = None,
        quantity: int = 0,
        *,
        credits: int | None = None,
    ) -> billing_pb2.CaptureHoldResponse:
        """Charges a hold (all of it, or the given usage or credits)."""
        request = c.capture_request(hold_id, operation, quantity, credits)
        return await self._call(self._stub.CaptureHold, request)

    async def release(self, hold_id: str) -> billing_pb2.ReleaseHoldResponse:
        """Frees a hold without charging."""
        request = billing_pb2.ReleaseHoldRequest(hold_id=c._text(hold_id, "hold_id"))
        return await self._call(self._stub.ReleaseHold, request)

    async def get_hold(self, hold_id: str) -> billing_pb2.Hold:
        """Reads a hold."""
        request = billing_pb2.GetHoldRequest(hold_id=c._text(hold_id, "hold_id"))
        return (await self._call(self._stub.GetHold, request)).hold

    async def balance(self) -> billing_pb2.GetBalanceResponse:
        """``account_id``, ``balance``, ``held`` and ``available``."""
        return await self._call(self._stub.GetBalance, billing_pb2.GetBalanceRequest())

    async def transactions(
        self, page_size: int = 0, page_token: str = ""
    ) -> AsyncGenerator[billing_pb2.ListTransactionsResponse, None]:
        """Pages of the ledger, newest first (an async iterator)."""
        size = c.page_size(page_size)
        token = c._text(page_token, "page_token")
        while True:
            request = billing_pb2.ListTransactionsRequest(page_size=size, page_token=token)
            page = await self._call(self._stub.ListTransactions, request)
            yield page
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def grant(
        self, credits: int, *, idempotency_key: str | None = None, reason: str = ""
    ) -> billing_pb2.GrantResponse:
        """Adds credits (developers acting as an account, and services)."""
        return await self._call(self._stub.Grant, c.grant_request(credits, c.check_key(idempotency_key), reason))

    async def refund(
        self,
        transaction_id: int,
        credits: int = 0,
        *,
        idempotency_key: str | None = None,
        reason: str = "",
    ) -> billing_pb2.RefundResponse:
        """Gives back credits of a DEDUCT or CAPTURE row."""
        key = c.check_key(idempotency_key)
        return await self._call(self._stub.Refund, c.refund_request(transaction_id, credits, key, reason))

    def watch_balance(
        self, low_balance_threshold: int = 0, *, reconnect: bool = True
    ) -> AsyncGenerator[billing_pb2.WatchBalanceResponse, None]:
        """The balance now, then after every change (an async iterator)."""
        if isinstance(low_balance_threshold, bool) or not isinstance(low_balance_threshold, int):
            raise InvalidArgument("low_balance_threshold must be a whole number of credits")
        request = billing_pb2.WatchBalanceRequest(low_balance_threshold=low_balance_threshold)
        return self._stream(self._stub.WatchBalance, request, reconnect)


class Igny8Settings(_AsyncClient):
    """The asyncio client of settings-svc; see
    :class:`igny8_client.client.Igny8Settings`."""


    def _init_stub(self) -> None:
        self._stub = settings_pb2_grpc.SettingsServiceStub(self._channel)

    async def get(self) -> settings_pb2.ModuleSettings:
        """The account's switches."""
        response = await self._call(self._stub.GetModuleSettings, settings_pb2.GetModuleSettingsRequest())
        return response.settings

    async def is_module_enabled(self, module: ModuleName) -> bool:
        """Whether the account may use ``module`` (unknown names refused)."""
        request = settings_pb2.CheckModuleRequest(module=c.module_enum(module))  # type: ignore[arg-type]
        return (await self._call(self._stub.CheckModule, request)).enabled

    async def update(self, **flags: bool) -> settings_pb2.ModuleSettings:
        """Switches modules on or off, e.g. ``await update(writer=False)``."""
        return (await self._call(self._stub.UpdateModuleSettings, c.update_request(flags))).settings

    async def watch(self, *, reconnect: bool = True) -> AsyncGenerator[settings_pb2.ModuleSettings, None]:
        """The switches now, then after every change (an async iterator)."""
        async for message in self._stream(
            self._stub.WatchModuleSettings, settings_pb2.WatchModuleSettingsRequest(), reconnect
        ):
            yield message.settings
