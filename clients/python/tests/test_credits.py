"""Igny8Credits against the real billing-svc: every method, every field."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from igny8_client import (
    CaptureExceedsHold,
    HoldNotActive,
    IdempotencyKeyReused,
    Igny8Credits,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    RefundExceedsCharge,
    UnknownOperation,
    billing_pb2,
)

from .conftest import Accounts, service_token


def test_get_credit_cost_prices_resolves_aliases_and_refuses_unknown_operations(
    billing_addr: str, accounts: Accounts
) -> None:
    account = accounts.new()
    with Igny8Credits(billing_addr, token=account.token("viewer")) as billing:
        cost = billing.get_credit_cost("content", 250)
        assert (cost.operation, cost.credits, cost.unit, cost.base_credits, cost.quantity) == (
            "content_generation",
            2,
            "word",
            1,
            250,
        )
        assert billing.get_credit_cost("clustering").credits == 10
        assert billing.get_credit_cost("images", 3).credits == 15

        with pytest.raises(UnknownOperation) as err:
            billing.get_credit_cost("teleportation", 1)
        e = err.value
        assert isinstance(e, InvalidArgument) and isinstance(e, ValueError)
        assert e.code.name == "INVALID_ARGUMENT"
        assert (e.reason, e.domain) == ("UNKNOWN_OPERATION", "billing.igny8")
        assert "clustering" in e.message, "the message lists the known operations"
        assert e.field_violations and e.field_violations[0][0] == "operation"
        assert e.status is not None and e.status.code == 3

        with pytest.raises(InvalidArgument) as err:
            billing.get_credit_cost("content", 10**9 + 1)
        assert err.value.reason == "QUANTITY_TOO_LARGE"


def test_list_credit_costs_is_the_whole_table(billing_addr: str, accounts: Accounts) -> None:
    with Igny8Credits(billing_addr, token=accounts.new().token("viewer")) as billing:
        costs = {c.operation: c for c in billing.list_credit_costs()}
    assert len(costs) == 9
    assert costs["content_generation"].unit_size == 100
    assert list(costs["idea_generation"].aliases) == ["ideas"]
    assert costs["linking"].module == "linker"


def test_check_answers_insufficient_without_raising(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=12)
    with Igny8Credits(billing_addr, token=account.token("viewer")) as billing:
        ok = billing.check("clustering")
        assert (ok.sufficient, ok.required_credits, ok.available_credits) == (True, 10, 12)
        short = billing.check("ideas", 1)
        assert (short.sufficient, short.required_credits, short.available_credits) == (False, 15, 12)
        assert billing.check(credits=12).sufficient
        assert not billing.check(credits=13).sufficient
        with pytest.raises(InvalidArgument, match="not both"):
            billing.check("clustering", credits=1)
        with pytest.raises(InvalidArgument) as err:
            billing.check(credits=0)
        assert err.value.field_violations, "the server names the field"


def test_deduct_makes_a_key_replays_and_refuses_key_reuse(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    with Igny8Credits(billing_addr, token=account.token("editor")) as billing:
        first = billing.deduct("content", 250, description="blog post", metadata={"job": "7"})
        tx = first.transaction
        assert (first.balance, first.replayed) == (98, False)
        assert re.fullmatch(r"[0-9a-f]{32}", tx.idempotency_key), "a key was made for the call"
        assert tx.kind == billing_pb2.TRANSACTION_KIND_DEDUCT
        assert (tx.credits, tx.balance_after, tx.operation, tx.quantity) == (-2, 98, "content_generation", 250)
        assert (tx.description, dict(tx.metadata), tx.account_id) == ("blog post", {"job": "7"}, account.id)

        second = billing.deduct("content", 250, description="blog post", metadata={"job": "7"})
        assert second.transaction.idempotency_key != tx.idempotency_key, "each call has its own key"
        assert second.balance == 96

        mine = billing.deduct(credits=5, idempotency_key="job-42")
        again = billing.deduct(credits=5, idempotency_key="job-42")
        assert again.replayed and again.transaction.id == mine.transaction.id and again.balance == 91

        with pytest.raises(IdempotencyKeyReused) as err:
            billing.deduct(credits=6, idempotency_key="job-42")
        e = err.value
        assert (e.code.name, e.reason, e.idempotency_key) == ("ALREADY_EXISTS", "IDEMPOTENCY_KEY_REUSED", "job-42")
    assert account.balance() == 91
    assert account.ledger() == (-9, 3)


def test_insufficient_credits_carries_the_numbers_and_the_old_message(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=7)
    with Igny8Credits(billing_addr, token=account.token("editor")) as billing:
        with pytest.raises(InsufficientCredits) as err:
            billing.deduct("clustering")
        e = err.value
        assert str(e) == "Insufficient credits. Required: 10, Available: 7"
        assert (e.required, e.available) == (10, 7)
        assert (e.code.name, e.reason, e.domain) == ("FAILED_PRECONDITION", "INSUFFICIENT_CREDITS", "billing.igny8")
        assert e.metadata == {"required": "10", "available": "7"}
        assert e.attempts == 1, "an answer is never retried"
    assert account.balance() == 7 and account.ledger() == (0, 0), "nothing changed"


def test_holds_reserve_capture_release_and_their_errors(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    with Igny8Credits(billing_addr, token=account.token("editor")) as billing:
        placed = billing.reserve("site_page_generation", 2, ttl=timedelta(minutes=5), description="site 1")
        hold = placed.hold
        assert (placed.available, placed.replayed) == (60, False)
        assert (hold.state, hold.credits, hold.operation, hold.quantity) == (
            billing_pb2.HOLD_STATE_ACTIVE,
            40,
            "site_page_generation",
            2,
        )
        assert re.fullmatch(r"[0-9a-f]{32}", hold.idempotency_key)
        assert hold.expire_time.ToSeconds() - hold.create_time.ToSeconds() == 300
        bal = billing.balance()
        assert (bal.account_id, bal.balance, bal.held, bal.available) == (account.id, 100, 40, 60)

        with pytest.raises(InsufficientCredits) as err:
            billing.reserve(credits=61)
        assert (err.value.required, err.value.available) == (61, 60)

        with pytest.raises(CaptureExceedsHold) as cap_err:
            billing.capture(hold.id, credits=41)
        assert (cap_err.value.requested, cap_err.value.held) == (41, 40)

        captured = billing.capture(hold.id, credits=25)
        assert captured.hold.state == billing_pb2.HOLD_STATE_CAPTURED
        assert (captured.hold.captured_credits, captured.balance, captured.replayed) == (25, 75, False)
        assert captured.transaction.kind == billing_pb2.TRANSACTION_KIND_CAPTURE
        assert captured.transaction.hold_id == hold.id
        assert billing.capture(hold.id, credits=25).replayed, "the same capture replays"
        assert billing.get_hold(hold.id).transaction_id == captured.transaction.id

        with pytest.raises(HoldNotActive) as state_err:
            billing.release(hold.id)
        assert state_err.value.state == "HOLD_STATE_CAPTURED"

        other = billing.reserve(credits=10, ttl=60).hold
        released = billing.release(other.id)
        assert released.hold.state == billing_pb2.HOLD_STATE_RELEASED and not released.replayed
        assert billing.release(other.id).replayed
        with pytest.raises(HoldNotActive) as state_err:
            billing.capture(other.id)
        assert state_err.value.state == "HOLD_STATE_RELEASED"

        with pytest.raises(NotFound) as nf:
            billing.get_hold("no-such-hold")
        assert nf.value.reason == "HOLD_NOT_FOUND"
        with pytest.raises(InvalidArgument):
            billing.reserve(credits=1, ttl=0)
    assert account.ledger() == (-25, 1)
    assert account.balance() == 75


def test_transactions_iterates_pages_newest_first(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=100)
    with Igny8Credits(billing_addr, token=account.token("editor")) as billing:
        ids = [billing.deduct(credits=i).transaction.id for i in range(1, 6)]
        pages = list(billing.transactions(page_size=2))
        assert [len(p.transactions) for p in pages] == [2, 2, 1]
        assert [t.id for p in pages for t in p.transactions] == ids[::-1]
        assert pages[-1].next_page_token == ""
        resumed = next(billing.transactions(page_size=2, page_token=pages[0].next_page_token))
        assert [t.id for t in resumed.transactions] == ids[2:0:-1]
        assert [t.id for p in billing.transactions() for t in p.transactions] == ids[::-1]
        with pytest.raises(InvalidArgument):
            next(billing.transactions(page_size=2, page_token="garbage"))
        with pytest.raises(InvalidArgument):
            next(billing.transactions(page_size=1001))


def test_grant_and_refund_through_a_service_acting_as_the_account(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=0)
    with Igny8Credits(billing_addr, token=service_token(), act_as=account.id) as service:
        granted = service.grant(50, reason="welcome")
        assert (granted.balance, granted.transaction.kind, granted.transaction.actor) == (
            50,
            billing_pb2.TRANSACTION_KIND_GRANT,
            "service:python-client-tests",
        )
        charge = service.deduct(credits=20)
        refund = service.refund(charge.transaction.id, 5, reason="partial")
        assert (refund.balance, refund.transaction.refund_of) == (35, charge.transaction.id)
        with pytest.raises(RefundExceedsCharge) as err:
            service.refund(charge.transaction.id, 16)
        assert (err.value.requested, err.value.refundable) == (16, 15)
        rest = service.refund(charge.transaction.id)
        assert (rest.transaction.credits, rest.balance) == (15, 50)
        with pytest.raises(NotFound):
            service.refund(10**12)
    assert account.ledger() == (50, 4)


def test_for_account_shares_the_channel_and_switches_the_act_as(billing_addr: str, accounts: Accounts) -> None:
    a, b = accounts.new(credits=5), accounts.new(credits=9)
    with Igny8Credits(billing_addr, token=service_token()) as service:
        assert service.for_account(a.id).balance().balance == 5
        assert service.for_account(b.id).balance().balance == 9
        assert service.act_as is None
