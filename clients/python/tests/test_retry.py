"""A retried charge is charged exactly once: the client keeps its key.

The answer to the first attempt is lost (a test interceptor drops it after
the real server committed the charge) and the server is SIGKILLed; the client
keeps retrying (real UNAVAILABLE: connection refused) until the server is
restarted on the same port, and its retry with the same key replays the
committed charge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from igny8_client import Igny8Credits, RetryPolicy, billing_pb2

from .conftest import Accounts, Psql, Server


class LostAnswer(grpc.RpcError):
    """What a client sees when the connection dies before the answer."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset before the answer (simulated)"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def result(self, timeout: float | None = None) -> Any:
        """As grpc's own failed outcomes: raise when asked for the answer."""
        raise self


class DropFirstAnswer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the first call of ``method`` reach the server, then drops its
    answer and runs ``after``; records every attempt's request."""

    def __init__(self, method: str, after: Callable[[], None]) -> None:
        self.method = method
        self.after = after
        self.requests: list[Any] = []
        self.committed: Any = None

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith(f"/{self.method}"):
            self.requests.append(request)
            if self.committed is None:
                self.committed = continuation(details, request).result()
                self.after()
                raise LostAnswer()
        return continuation(details, request)


@pytest.fixture()
def own_billing(database: Psql, billing_server: Server) -> Iterator[Server]:
    """A billing-svc of this test's own, on the session database."""
    server = Server(billing_server.binary, billing_server.service, database.url).start()
    yield server
    server.kill()


def test_a_lost_answer_is_retried_with_the_same_key_and_replayed(own_billing: Server, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    drop = DropFirstAnswer("Deduct", after=lambda: None)
    channel = grpc.intercept_channel(grpc.insecure_channel(own_billing.addr), drop)
    billing = Igny8Credits(channel, token=account.token("editor"))
    result = billing.deduct("clustering")
    channel.close()
    assert len(drop.requests) == 2
    assert drop.requests[0].idempotency_key == drop.requests[1].idempotency_key
    assert result.replayed, "the retry replayed the committed charge"
    assert result.transaction.id == drop.committed.transaction.id
    assert account.ledger() == (-10, 1) and account.balance() == 90


def test_a_retry_across_a_server_restart_is_charged_exactly_once(own_billing: Server, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    restarted = threading.Event()

    def restart_later() -> None:
        # Restart only once a retry has failed against the dead port (the
        # third attempt being recorded means the second one came back
        # UNAVAILABLE: the client is sequential).
        deadline = time.monotonic() + 30
        while len(drop_deduct.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        own_billing.start(wait=False)
        restarted.set()

    def kill_and_schedule_restart() -> None:
        own_billing.kill()
        threading.Thread(target=restart_later, daemon=True).start()

    drop_deduct = DropFirstAnswer("Deduct", after=kill_and_schedule_restart)
    channel = grpc.intercept_channel(grpc.insecure_channel(own_billing.addr), drop_deduct)
    billing = Igny8Credits(
        channel,
        token=account.token("editor"),
        retry=RetryPolicy(total_timeout=60, initial_backoff=0.1, max_backoff=0.5),
        timeout=5,
    )
    started = time.monotonic()
    result = billing.deduct("content_generation", 250, description="across a restart")
    took = time.monotonic() - started
    channel.close()

    assert restarted.is_set()
    keys = {r.idempotency_key for r in drop_deduct.requests}
    assert len(keys) == 1, f"every attempt carried the same key: {keys}"
    assert len(drop_deduct.requests) >= 3, "a retry failed with UNAVAILABLE while the server was down"
    assert result.replayed and result.transaction.id == drop_deduct.committed.transaction.id
    assert result.transaction.kind == billing_pb2.TRANSACTION_KIND_DEDUCT
    assert account.ledger() == (-2, 1), "charged exactly once"
    assert account.balance() == 98
    print(f"\nretry across restart: {len(drop_deduct.requests)} attempts, {took:.2f} s")
