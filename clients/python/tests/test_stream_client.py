"""The client side of the streams: reopen on UNAVAILABLE, stop on anything
else, a fresh token on every reopen.

The real servers' streams are exercised in test_streams.py; this scripts a
grpcio server in-process so that the client's reconnect loop is tested
whatever the servers implement, including failures hard to provoke there.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from igny8_client import Igny8Credits, Igny8Settings, PermissionDenied, RetryPolicy, Unavailable, aio, billing_pb2, settings_pb2
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
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
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
