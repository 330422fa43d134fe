"""Auth failures, retries that give up, and arguments refused before sending."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from igny8_client import (
    NO_RETRY,
    Igny8Credits,
    InvalidArgument,
    PermissionDenied,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    token_from_file,
)

from .conftest import Accounts, access_token, free_port, service_token, sign


def test_targets_in_url_form(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new(credits=3)
    for target in (f"http://{billing_addr}", f"http://{billing_addr}/", f"dns:///{billing_addr}"):
        with Igny8Credits(target, token=account.token("viewer")) as billing:
            assert billing.balance().balance == 3


def test_unauthenticated_for_missing_bad_and_expired_tokens(billing_addr: str, accounts: Accounts) -> None:
    account = accounts.new()
    user = account.user("owner")
    expired = access_token(user, account.id, ttl=-3600)
    for token, reason in (
        ("not-a-jwt", "INVALID_TOKEN"),
        (expired, "INVALID_TOKEN"),
        (sign({"type": "refresh", "user_id": user, "exp": int(time.time()) + 60}), "INVALID_TOKEN"),
        (access_token(999_999_990), "USER_INACTIVE"),
    ):
        with Igny8Credits(billing_addr, token=token) as billing:
            with pytest.raises(Unauthenticated) as err:
                billing.balance()
        e = err.value
        assert (e.code, e.reason, e.domain) == (grpc.StatusCode.UNAUTHENTICATED, reason, "auth.igny8")
        assert e.attempts == 1


def test_permission_denied_carries_the_reason(billing_addr: str, accounts: Accounts) -> None:
    account, other = accounts.new(credits=10), accounts.new(credits=10)
    with Igny8Credits(billing_addr, token=account.token("viewer")) as viewer:
        with pytest.raises(PermissionDenied) as err:
            viewer.deduct(credits=1)
        assert err.value.reason == "ROLE_NOT_ALLOWED"
    with Igny8Credits(billing_addr, token=account.token("editor"), act_as=other.id) as editor:
        with pytest.raises(PermissionDenied) as err:
            editor.balance()
        assert err.value.reason == "ACT_AS_FORBIDDEN"
    with Igny8Credits(billing_addr, token=account.token("owner")) as owner:
        with pytest.raises(PermissionDenied) as err:
            owner.grant(100)
        assert err.value.reason == "ROLE_NOT_ALLOWED"
    with Igny8Credits(billing_addr, token=service_token()) as service:
        with pytest.raises(InvalidArgument) as bad:
            service.balance()
        assert bad.value.reason == "ACT_AS_REQUIRED"
    account.suspend()
    time.sleep(1.1)  # the directory cache's bound (docs/api.md, directory changes within 1 s)
    with Igny8Credits(billing_addr, token=account.token("owner")) as owner:
        assert owner.balance().balance == 10, "a suspended account may still read"
        with pytest.raises(PermissionDenied) as err:
            owner.deduct(credits=1)
        assert err.value.reason == "ACCOUNT_SUSPENDED"
    assert account.ledger() == (0, 0) and other.ledger() == (0, 0)


def test_unavailable_after_the_retries_run_out() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(total_timeout=1.5, initial_backoff=0.05, max_backoff=0.2)
    with Igny8Credits(nobody, token=service_token(), act_as=1, retry=policy, timeout=0.5) as billing:
        with pytest.raises(Unavailable) as err:
            billing.deduct(credits=1)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.attempts > 1, "UNAVAILABLE is retried, until the total deadline ends the loop"
    with Igny8Credits(nobody, token=service_token(), act_as=1, retry=NO_RETRY) as billing:
        with pytest.raises(Unavailable) as err:
            billing.balance()
        assert err.value.attempts == 1


def test_arguments_the_client_refuses_before_sending() -> None:
    with pytest.raises(InvalidArgument, match="exactly one of token"):
        Igny8Credits("127.0.0.1:1")
    with pytest.raises(InvalidArgument, match="exactly one of token"):
        Igny8Credits("127.0.0.1:1", token="t", token_provider=lambda: "t")
    with pytest.raises(InvalidArgument, match="act_as"):
        Igny8Credits("127.0.0.1:1", token="t", act_as=0)
    with pytest.raises(InvalidArgument, match="timeout"):
        Igny8Credits("127.0.0.1:1", token="t", timeout=0)
    with pytest.raises(InvalidArgument, match="http"):
        Igny8Credits("http://host:1/path", token="t")
    # Nothing listens on port 1: every refusal below happens before a call.
    with Igny8Credits("127.0.0.1:1", token="t", retry=NO_RETRY) as billing:
        for call, match in (
            (lambda: billing.deduct(), "give operation"),
            (lambda: billing.deduct("clustering", credits=5), "not both"),
            (lambda: billing.deduct("clustering", -1), "quantity"),
            (lambda: billing.deduct(credits=True), "credits"),  # type: ignore[arg-type]
            (lambda: billing.deduct(credits=3, quantity=2), "quantity"),
            (lambda: billing.deduct(credits=1, metadata={"a": 1}), "metadata"),  # type: ignore[dict-item]
            (lambda: billing.reserve(credits=1, ttl=-5), "ttl"),
            (lambda: billing.deduct(credits=1, idempotency_key=7), "idempotency_key"),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidArgument, match=match):
                call()


def test_the_token_provider_is_asked_on_every_call(billing_addr: str, accounts: Accounts, tmp_path: Path) -> None:
    account = accounts.new(credits=3)
    viewer, owner = account.token("viewer"), account.token("owner")
    path = tmp_path / "token"
    path.write_text(viewer + "\n")
    with Igny8Credits(billing_addr, token_provider=token_from_file(path)) as billing:
        assert billing.balance().balance == 3
        with pytest.raises(PermissionDenied):
            billing.deduct(credits=1)
        # A rotated secret file is picked up without a new client.
        path.write_text(f"Bearer {owner}")
        assert billing.deduct(credits=1).balance == 2
    with Igny8Credits(billing_addr, token_provider=lambda: "") as billing:
        with pytest.raises(InvalidArgument, match="no token"):
            billing.balance()
