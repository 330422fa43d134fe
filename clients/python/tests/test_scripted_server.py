"""The client's own behaviour against a scripted grpcio server in-process:
stream reconnects (reopen on UNAVAILABLE, stop on anything else, a fresh
token on every reopen), DEADLINE_EXCEEDED retried with the same key, codes
that are never retried.

The real servers are exercised by the other test files; this covers what is
hard to provoke there (a server that stalls, a scripted overload), and the
stream loop whatever the servers implement.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from igny8_client import (
    DeadlineExceeded,
    Igny8Credits,
    Igny8Settings,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    aio,
    billing_pb2,
    settings_pb2,
)
from igny8_client._gen.igny8.billing.v1 import billing_pb2_grpc
from igny8_client._gen.igny8.settings.v1 import settings_pb2_grpc

FAST = RetryPolicy(total_timeout=5, initial_backoff=0.01, max_backoff=0.05)


class ScriptedBilling(billing_pb2_grpc.BillingServiceServicer):
    """WatchBalance: each opening plays the next script; records tokens."""

    def __init__(self, scripts: list[tuple[list[int], grpc.StatusCode | None]]) -> None:
        self.scripts = iter(scripts)
        self.tokens: list[str] = []
        self.thresholds: list[int] = []

    def WatchBalance(self, request: Any, context: Any) -> Iterator[Any]:
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        self.thresholds.append(request.low_balance_threshold)
        balances, end = next(self.scripts)
        for b in balances:
            yield billing_pb2.WatchBalanceResponse(account_id=1, balance=b, available=b)
        if end is not None:
            context.abort(end, f"scripted {end.name}")


class ScriptedSettings(settings_pb2_grpc.SettingsServiceServicer):
    def __init__(self) -> None:
        self.opened = 0

    def WatchModuleSettings(self, request: Any, context: Any) -> Iterator[Any]:
        self.opened += 1
        yield settings_pb2.WatchModuleSettingsResponse(settings=settings_pb2.ModuleSettings(account_id=self.opened, writer_enabled=True))
        if self.opened == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")


def serve(servicer: Any, add: Any) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_watch_balance_reopens_on_unavailable_with_a_fresh_token() -> None:
    servicer = ScriptedBilling(
        [
            ([100, 90], grpc.StatusCode.UNAVAILABLE),  # a draining server
            ([], grpc.StatusCode.UNAVAILABLE),  # the next one is not up yet
            ([80], grpc.StatusCode.PERMISSION_DENIED),  # access removed
        ]
    )
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)
    counter = itertools.count(1)
    try:
        with Igny8Credits(addr, token_provider=lambda: f"t{next(counter)}", retry=FAST) as billing:
            seen: list[int] = []
            with pytest.raises(PermissionDenied, match="scripted PERMISSION_DENIED"):
                for message in billing.watch_balance(low_balance_threshold=25):
                    seen.append(message.balance)
        assert seen == [100, 90, 80]
        assert servicer.tokens == ["Bearer t1", "Bearer t2", "Bearer t3"]
        assert servicer.thresholds == [25, 25, 25]
    finally:
        server.stop(None)


def test_watch_balance_gives_up_after_the_total_deadline_without_messages() -> None:
    servicer = ScriptedBilling([([], grpc.StatusCode.UNAVAILABLE)] * 10_000)
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)
    try:
        policy = RetryPolicy(total_timeout=0.5, initial_backoff=0.01, max_backoff=0.02)
        with Igny8Credits(addr, token="t", retry=policy) as billing:
            with pytest.raises(Unavailable) as err:
                next(billing.watch_balance())
        assert err.value.attempts > 1
        with Igny8Credits(addr, token="t", retry=policy) as billing:
            with pytest.raises(Unavailable) as err:
                next(billing.watch_balance(reconnect=False))
        assert err.value.attempts == 1
    finally:
        server.stop(None)


def test_breaking_out_of_watch_cancels_the_call() -> None:
    servicer = ScriptedSettings()
    server, addr = serve(servicer, settings_pb2_grpc.add_SettingsServiceServicer_to_server)
    try:
        with Igny8Settings(addr, token="t", retry=FAST) as settings:
            stream = settings.watch()
            assert next(stream).account_id == 1
            assert next(stream).account_id == 2, "reopened after UNAVAILABLE"
            stream.close()
        assert servicer.opened == 2
    finally:
        server.stop(None)


def test_async_watch_reopens_on_unavailable() -> None:
    servicer = ScriptedBilling([([5], grpc.StatusCode.UNAVAILABLE), ([4, 3], grpc.StatusCode.NOT_FOUND)])
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)

    async def run() -> list[int]:
        seen: list[int] = []
        async with aio.Igny8Credits(addr, token="t", retry=FAST) as billing:
            try:
                async for message in billing.watch_balance():
                    seen.append(message.balance)
            except Exception as e:
                assert type(e).__name__ == "NotFound", e
        return seen

    try:
        assert asyncio.run(run()) == [5, 4, 3]
    finally:
        server.stop(None)


class StallingBilling(billing_pb2_grpc.BillingServiceServicer):
    """Deduct: stalls past the client's deadline on the first ``stalls``
    calls, then answers; records every request. Reserve: RESOURCE_EXHAUSTED."""

    def __init__(self, stalls: int) -> None:
        self.stalls = stalls
        self.requests: list[Any] = []
        self.lock = threading.Lock()

    def Deduct(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
            stall = len(self.requests) <= self.stalls
        if stall:
            time.sleep(2.0)  # the client gives up after its 0.5 s deadline
        return billing_pb2.DeductResponse(
            transaction=billing_pb2.Transaction(id=7, idempotency_key=request.idempotency_key), balance=3
        )

    def Reserve(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the ledger is busy")


def test_deadline_exceeded_is_retried_with_the_same_key() -> None:
    servicer = StallingBilling(stalls=2)
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)
    try:
        with Igny8Credits(addr, token="t", timeout=0.5, retry=FAST) as billing:
            result = billing.deduct("clustering", description="slow")
        assert len(servicer.requests) >= 3, "two stalled attempts, then an answer"
        assert len({r.idempotency_key for r in servicer.requests}) == 1
        assert servicer.requests[0] == servicer.requests[-1], "the very same request on every attempt"
        assert result.transaction.idempotency_key == servicer.requests[0].idempotency_key
    finally:
        server.stop(None)


def test_deadline_exceeded_after_the_total_deadline() -> None:
    servicer = StallingBilling(stalls=10_000)
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)
    try:
        policy = RetryPolicy(total_timeout=0.5, initial_backoff=0.01, max_backoff=0.02)
        with Igny8Credits(addr, token="t", timeout=0.2, retry=policy) as billing:  # stalls are 2 s
            with pytest.raises(DeadlineExceeded) as err:
                billing.deduct(credits=1)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts >= 2
    finally:
        server.stop(None)


def test_resource_exhausted_is_not_retried() -> None:
    servicer = StallingBilling(stalls=0)
    server, addr = serve(servicer, billing_pb2_grpc.add_BillingServiceServicer_to_server)
    try:
        with Igny8Credits(addr, token="t", retry=FAST) as billing:
            with pytest.raises(ResourceExhausted, match="the ledger is busy") as err:
                billing.reserve(credits=1)
        assert err.value.attempts == 1 and len(servicer.requests) == 1
        assert err.value.status is None, "no details were sent"
    finally:
        server.stop(None)
