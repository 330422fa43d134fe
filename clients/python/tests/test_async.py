"""The asyncio clients (igny8_client.aio) against the real pair."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from igny8_client import (
    HoldNotActive,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    UnknownOperation,
    billing_pb2,
)
from igny8_client.aio import Igny8Credits, Igny8Settings

from .conftest import Accounts, free_port, service_token


def test_async_credits_every_method(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    token = account.token("editor")

    async def provide() -> str:  # an async token provider
        await asyncio.sleep(0)
        return token

    async def run() -> None:
        async with Igny8Credits(billing_addr, token_provider=provide) as billing:
            assert (await billing.get_credit_cost("content", 250)).credits == 2
            assert len(await billing.list_credit_costs()) == 9
            assert (await billing.check("clustering")).sufficient
            first = await billing.deduct("clustering", description="async")
            assert re.fullmatch(r"[0-9a-f]{32}", first.transaction.idempotency_key)
            assert first.balance == 90
            again = await billing.deduct(credits=5, idempotency_key="a-1")
            assert (await billing.deduct(credits=5, idempotency_key="a-1")).replayed
            with pytest.raises(IdempotencyKeyReused):
                await billing.deduct(credits=4, idempotency_key="a-1")
            with pytest.raises(InsufficientCredits) as err:
                await billing.deduct(credits=1000)
            assert str(err.value) == "Insufficient credits. Required: 1000, Available: 85"
            assert (err.value.required, err.value.available) == (1000, 85)
            with pytest.raises(UnknownOperation):
                await billing.get_credit_cost("nope")

            hold = (await billing.reserve(credits=30, ttl=60)).hold
            assert (await billing.get_hold(hold.id)).state == billing_pb2.HOLD_STATE_ACTIVE
            bal = await billing.balance()
            assert (bal.balance, bal.held, bal.available) == (85, 30, 55)
            captured = await billing.capture(hold.id, credits=10)
            assert captured.balance == 75
            with pytest.raises(HoldNotActive):
                await billing.release(hold.id)
            other = (await billing.reserve("clustering")).hold
            assert (await billing.release(other.id)).hold.state == billing_pb2.HOLD_STATE_RELEASED
            with pytest.raises(NotFound):
                await billing.get_hold("missing")

            pages = [p async for p in billing.transactions(page_size=2)]
            assert [len(p.transactions) for p in pages] == [2, 1]
            assert pages[0].transactions[0].kind == billing_pb2.TRANSACTION_KIND_CAPTURE
            assert pages[-1].transactions[-1].id == first.transaction.id
            assert again.transaction.id in {t.id for p in pages for t in p.transactions}

        async with Igny8Credits(billing_addr, token=service_token()) as service:
            acting = service.for_account(account.id)
            granted = await acting.grant(10, reason="async grant")
            assert granted.balance == 85
            refund = await acting.refund(first.transaction.id)
            assert (refund.transaction.credits, refund.balance) == (10, 95)

        async with Igny8Credits(billing_addr, token="bad") as bad:
            with pytest.raises(Unauthenticated):
                await bad.balance()

    asyncio.run(run())
    assert account.ledger() == (-5, 5)


def test_async_settings(settings_addr: str, accounts: Accounts) -> None:
    account = accounts.new()

    async def run() -> None:
        async with Igny8Settings(settings_addr, token=account.token("admin")) as settings:
            assert (await settings.get()).writer_enabled
            assert not (await settings.update(writer=False)).writer_enabled
            assert await settings.is_module_enabled("writer") is False
            assert await settings.is_module_enabled("planner") is True
            with pytest.raises(InvalidArgument):
                await settings.is_module_enabled("nope")
        async with Igny8Settings(settings_addr, token=account.token("viewer")) as viewer:
            with pytest.raises(PermissionDenied):
                await viewer.update(writer=True)

    asyncio.run(run())


def test_async_retries_then_gives_up_unavailable() -> None:
    async def run() -> None:
        policy = RetryPolicy(total_timeout=1.0, initial_backoff=0.05, max_backoff=0.2)
        async with Igny8Credits(f"127.0.0.1:{free_port()}", token="t", retry=policy, timeout=0.5) as billing:
            with pytest.raises(Unavailable) as err:
                await billing.deduct(credits=1)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts > 1

    asyncio.run(run())


def test_async_concurrent_deducts_never_overdraw(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=50)

    async def run() -> list[object]:
        async with Igny8Credits(billing_addr, token=account.token("editor")) as billing:
            return await asyncio.gather(*(billing.deduct(credits=7) for _ in range(10)), return_exceptions=True)

    results = asyncio.run(run())
    charged = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(charged) == 7 and len(refused) == 3, results
    assert account.balance() == 1 and account.ledger() == (-49, 7)
