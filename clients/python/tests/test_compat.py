"""igny8_client.compat: the old call shapes and messages, on the real pair."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from igny8_client import Igny8Credits, Igny8Settings, InvalidArgument, UnknownOperation, compat
from igny8_client.compat import AccountModuleSettings, CreditService, InsufficientCreditsError

from .conftest import Accounts, service_token


@dataclass
class Account:
    """Stands in for the Django model instance the old code was handed."""

    id: int
    credits: int = 0


@pytest.fixture()
def configured(billing_addr: str, settings_addr: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(compat, "_credits", None)
    monkeypatch.setattr(compat, "_settings", None)
    credits = Igny8Credits(billing_addr, token=service_token("django"))
    settings = Igny8Settings(settings_addr, token=service_token("django"))
    compat.configure(credits=credits, settings=settings)
    yield
    credits.close()
    settings.close()


def test_get_credit_cost_answers_as_before_and_refuses_unknown_operations(configured: None) -> None:
    assert CreditService.get_credit_cost("content_generation", 250) == 2
    assert CreditService.get_credit_cost("content", None) == 1
    assert compat.get_credit_cost("ideas", 2) == 30
    assert compat.get_credit_cost("optimization", 1000) == 5
    with pytest.raises(UnknownOperation) as err:
        CreditService.get_credit_cost("keyword_research", 1)
    assert isinstance(err.value, ValueError)


def test_check_credits_raises_the_old_error_with_the_old_message(configured: None, accounts: Accounts) -> None:
    row = accounts.new(credits=12)
    account = Account(row.id)
    assert CreditService.check_credits(account, required_credits=12) is True
    assert CreditService.check_credits(account, operation_type="clustering") is True
    with pytest.raises(InsufficientCreditsError) as err:
        CreditService.check_credits(account, operation_type="idea_generation", amount=1)
    assert str(err.value) == "Insufficient credits. Required: 15, Available: 12"
    assert (err.value.required, err.value.available) == (15, 12)
    with pytest.raises(InsufficientCreditsError) as err:
        compat.check_credits(row.id, required_credits=13)
    assert str(err.value) == "Insufficient credits. Required: 13, Available: 12"
    with pytest.raises(UnknownOperation):
        compat.check_credits(account, operation_type="nonsense")
    with pytest.raises(InvalidArgument, match="give required_credits"):
        compat.check_credits(account)
    assert row.ledger() == (0, 0)


def test_deduct_credits_returns_the_balance_and_keeps_the_old_fields(configured: None, accounts: Accounts) -> None:
    row = accounts.new(credits=20)
    account = Account(row.id)
    balance = CreditService.deduct_credits(
        account, 8, "content_generation", "Blog post", {"site": 3}, model_used="gpt-4o", tokens_input=1200
    )
    assert balance == 12
    balance = compat.deduct_credits(account, 2, "linking", idempotency_key="task-9")
    assert compat.deduct_credits(account, 2, "linking", idempotency_key="task-9") == balance == 10
    with pytest.raises(InsufficientCreditsError) as err:
        compat.deduct_credits(account, 11, "images", "too much")
    assert str(err.value) == "Insufficient credits. Required: 11, Available: 10"
    with pytest.raises(InvalidArgument):
        compat.deduct_credits(account, 0, "images")
    assert CreditService.deduct_credits_for_operation(account, "content", 250) == 8
    assert row.ledger() == (-12, 3)
    meta = accounts.db.run(
        f"SELECT description, metadata FROM credit_ledger WHERE account_id = {row.id} ORDER BY id LIMIT 1"
    )
    for part in ("Blog post", '"operation_type"', "content_generation", '"model_used"', "gpt-4o", '"tokens_input"', "1200", '"site"'):
        assert part in meta, f"{part} missing from the first ledger row: {meta}"


def test_is_module_enabled_fails_closed_on_unknown_names(configured: None, accounts: Accounts) -> None:
    row = accounts.new()
    assert compat.is_module_enabled("writer", row.id) is True
    with Igny8Settings(compat._settings_client()._channel, token=service_token(), act_as=row.id) as settings:
        settings.update(writer=False)
    assert compat.is_module_enabled("writer", Account(row.id)) is False
    assert AccountModuleSettings.for_account(Account(row.id)).is_module_enabled("planner") is True
    assert AccountModuleSettings(row.id).is_module_enabled("writer") is False
    with pytest.raises(InvalidArgument, match="unknown module 'blog'"):
        compat.is_module_enabled("blog", row.id)


def test_configuration_from_the_environment(
    billing_addr: str, settings_addr: str, accounts: Accounts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(compat, "_credits", None)
    monkeypatch.setattr(compat, "_settings", None)
    for name in ("IGNY8_BILLING_URL", "IGNY8_SETTINGS_URL", "IGNY8_SERVICE_TOKEN", "IGNY8_SERVICE_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidArgument, match="not configured"):
        compat.get_credit_cost("clustering")
    token = tmp_path / "token"
    token.write_text(service_token("django-env"))
    monkeypatch.setenv("IGNY8_BILLING_URL", billing_addr)
    monkeypatch.setenv("IGNY8_SETTINGS_URL", f"http://{settings_addr}")  # billing's own form
    monkeypatch.setenv("IGNY8_SERVICE_TOKEN_FILE", str(token))
    row = accounts.new(credits=4)
    assert compat.check_credits(row.id, required_credits=4)
    assert compat.is_module_enabled("linker", row.id)
    compat._billing().close()
    compat._settings_client().close()
