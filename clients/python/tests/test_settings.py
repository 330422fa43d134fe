"""Igny8Settings against the real settings-svc."""

from __future__ import annotations

import pytest

from igny8_client import Igny8Settings, InvalidArgument, PermissionDenied, settings_pb2

from .conftest import Accounts, service_token

MODULES = ("planner", "writer", "thinker", "automation", "site_builder", "linker", "optimizer", "publisher")


def test_get_creates_every_module_enabled(settings_addr: str, accounts: Accounts) -> None:
    account = accounts.new()
    with Igny8Settings(settings_addr, token=account.token("viewer")) as settings:
        got = settings.get()
    assert got.account_id == account.id
    assert all(getattr(got, f"{m}_enabled") for m in MODULES)
    assert got.create_time.seconds > 0


def test_update_sends_only_the_named_switches(settings_addr: str, accounts: Accounts) -> None:
    account = accounts.new()
    with Igny8Settings(settings_addr, token=account.token("admin")) as settings:
        updated = settings.update(writer=False, linker_enabled=False)
        assert not updated.writer_enabled and not updated.linker_enabled
        assert all(getattr(updated, f"{m}_enabled") for m in MODULES if m not in ("writer", "linker"))
        # The mask names only planner: writer and linker stay off (a whole
        # message without a mask would have switched them back on).
        again = settings.update(planner=True)
        assert not again.writer_enabled and not again.linker_enabled and again.planner_enabled
        assert settings.is_module_enabled("writer") is False
        assert settings.is_module_enabled("MODULE_PLANNER") is True
        assert settings.is_module_enabled(settings_pb2.MODULE_SITE_BUILDER) is True
        assert settings.update(writer=True).writer_enabled
        assert settings.is_module_enabled("writer") is True


def test_unknown_modules_are_refused_before_sending_or_by_the_server(settings_addr: str, accounts: Accounts) -> None:
    account = accounts.new()
    with Igny8Settings(settings_addr, token=account.token("admin")) as settings:
        with pytest.raises(InvalidArgument, match="unknown module 'wrtier'") as err:
            settings.is_module_enabled("wrtier")
        assert err.value.field_violations == [("module", "unknown module 'wrtier'")]
        with pytest.raises(InvalidArgument, match="unknown module switch 'sales'"):
            settings.update(sales=True)
        with pytest.raises(InvalidArgument, match="True or False"):
            settings.update(writer=0)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="at least one"):
            settings.update()
        # What only the server can judge: the enum value 0, an unknown value.
        for value in (settings_pb2.MODULE_UNSPECIFIED, 99):
            with pytest.raises(InvalidArgument) as server_err:
                settings.is_module_enabled(value)
            assert server_err.value.status is not None, "answered by the server, with details"
    assert accounts.db.scalar(f"SELECT COUNT(*) FROM module_settings WHERE account_id = {account.id}") <= 1


def test_update_needs_admin_and_act_as_needs_a_service(settings_addr: str, accounts: Accounts) -> None:
    account = accounts.new()
    with Igny8Settings(settings_addr, token=account.token("editor")) as editor:
        with pytest.raises(PermissionDenied) as err:
            editor.update(writer=False)
        assert (err.value.reason, err.value.domain) == ("ROLE_NOT_ALLOWED", "auth.igny8")
        assert editor.get().writer_enabled, "nothing changed"
    with Igny8Settings(settings_addr, token=service_token(), act_as=account.id) as service:
        assert service.update(optimizer=False).optimizer_enabled is False
        assert service.get().account_id == account.id
