#!/usr/bin/env python3
"""Python gRPC interop check against the running billing-svc and settings-svc.

Proves that a non-Rust client (grpcio, stubs generated at run time from the
repository's .proto files) can use the services as docs/api.md
describes them: health, v1alpha reflection, pricing, idempotent deduction, rich
error details, tenant echo, auth failures, act-as, and module settings.

Driven by tests/tests/python_interop.rs, which seeds the database and starts
the real binaries; it can also be run by hand against any pair of servers:

    python3 tests/python/interop.py --billing 127.0.0.1:50051 \
        --settings 127.0.0.1:50052 --token "$USER_JWT" \
        --service-token "$SERVICE_JWT" --account 1 --user 10 \
        --credits 100 --other-account 2

The user must be an owner or admin of --account, which must hold exactly
--credits credits and have no ledger history or module settings yet.

Needs: pip install grpcio grpcio-tools grpcio-health-checking \
grpcio-reflection grpcio-status

Exit status: 0 when every check passes, 1 when one fails (the failing
assertion is printed), 2 when the Python packages are missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

PIP_HINT = (
    "pip install 'grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2' "
    "'grpcio-health-checking>=1.60,<2' 'grpcio-reflection>=1.60,<2' "
    "'grpcio-status>=1.60,<2'"
)

try:
    import grpc
    from google.protobuf import field_mask_pb2
    from google.rpc import error_details_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from grpc_status import rpc_status
    from grpc_tools import protoc
except ImportError as e:  # pragma: no cover - environment problem
    print(
        f"interop.py: missing Python package ({e}).\nInstall them with:\n  {PIP_HINT}",
        file=sys.stderr,
    )
    sys.exit(2)

REPO_PROTO = Path(__file__).resolve().parents[2] / "proto"
TIMEOUT = 10.0
ACCOUNT_HEADER = "x-igny8-account-id"
ACT_AS_HEADER = "x-igny8-act-as-account"
DETAILS_TRAILER = "grpc-status-details-bin"


def well_known_include() -> str:
    """grpc_tools' bundled google/protobuf/*.proto directory."""
    try:
        from importlib.resources import files

        return str(files("grpc_tools") / "_proto")
    except (ImportError, TypeError):  # very old Pythons: fall back
        import pkg_resources

        return pkg_resources.resource_filename("grpc_tools", "_proto")


def generate_stubs(out_dir: str, proto_root: Path):
    """Compiles the repository's protos into out_dir and imports them."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.glob("igny8/**/*.proto"))
    assert protos, f"no .proto files under {proto_root}"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known_include()}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    code = protoc.main(args)
    assert code == 0, f"grpc_tools.protoc failed with {code}: {' '.join(args)}"
    sys.path.insert(0, out_dir)
    return {
        name: importlib.import_module(name)
        for name in (
            "igny8.billing.v1.billing_pb2",
            "igny8.billing.v1.billing_pb2_grpc",
            "igny8.settings.v1.settings_pb2",
            "igny8.settings.v1.settings_pb2_grpc",
        )
    }


def bearer(token: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), *extra]


def metadata_value(md, key: str):
    values = [v for k, v in (md or ()) if k == key]
    assert len(values) <= 1, f"{key} appears {len(values)} times: {values}"
    return values[0] if values else None


def expect_error(code: grpc.StatusCode, what: str, fn, *args, **kwargs) -> grpc.RpcError:
    """Calls fn and returns its RpcError, asserting its status code."""
    try:
        response = fn(*args, timeout=TIMEOUT, **kwargs)
    except grpc.RpcError as err:
        assert err.code() == code, f"{what}: expected {code.name}, got {err.code().name}: {err.details()}"
        return err
    raise AssertionError(f"{what}: expected {code.name}, got a response: {response}")


class Checks:
    """Runs checks in order, recording their names for the summary."""

    def __init__(self) -> None:
        self.passed: list[str] = []

    def check(self, name: str, fn) -> None:
        try:
            fn()
        except AssertionError as e:
            raise AssertionError(f"[{name}] {e}") from e
        except grpc.RpcError as e:
            raise AssertionError(f"[{name}] unexpected RPC error {e.code().name}: {e.details()}") from e
        self.passed.append(name)


def check_health(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", service):
        # No token: health is public (docs/api.md, "Authentication").
        r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert r.status == serving, (
            f"health of {name!r}: expected SERVING, got "
            f"{health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"
        )


def check_reflection(channel: grpc.Channel, service: str, absent: str) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    assert len(responses) == 1, f"one reflection response per request, got {len(responses)}"
    r = responses[0]
    assert r.HasField("list_services_response"), f"v1alpha list_services answered with: {r}"
    names = {s.name for s in r.list_services_response.service}
    assert service in names, f"v1alpha reflection does not list {service}: {sorted(names)}"
    assert "grpc.health.v1.Health" in names, f"reflection does not list health: {sorted(names)}"
    assert absent not in names, f"{absent} listed by the wrong server: {sorted(names)}"
    # And the service's file descriptor is served, so tools can describe it.
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
    (r,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    assert r.HasField("file_descriptor_response"), f"file_containing_symbol {service}: {r}"
    assert r.file_descriptor_response.file_descriptor_proto, f"no descriptors for {service}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--billing", required=True, help="billing-svc address, host:port")
    p.add_argument("--settings", required=True, help="settings-svc address, host:port")
    p.add_argument("--token", required=True, help="access token of an owner/admin of --account")
    p.add_argument("--service-token", required=True, help="a service token")
    p.add_argument("--account", type=int, required=True, help="the user's account id")
    p.add_argument("--user", type=int, required=True, help="the user id inside --token")
    p.add_argument("--credits", type=int, default=100, help="the account's starting balance")
    p.add_argument(
        "--other-account",
        type=int,
        required=True,
        help="another existing account, used as a spoofed x-igny8-account-id",
    )
    p.add_argument("--proto-root", type=Path, default=REPO_PROTO, help="the repository's proto/ dir")
    args = p.parse_args(argv)
    assert args.credits >= 10, "--credits must be at least 10 (one clustering deduction)"

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="igny8-pystubs-") as out:
        m = generate_stubs(out, args.proto_root)
        billing_pb2 = m["igny8.billing.v1.billing_pb2"]
        billing_grpc = m["igny8.billing.v1.billing_pb2_grpc"]
        settings_pb2 = m["igny8.settings.v1.settings_pb2"]
        settings_grpc = m["igny8.settings.v1.settings_pb2_grpc"]
        billing_name = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
        settings_name = settings_pb2.DESCRIPTOR.services_by_name["SettingsService"].full_name

        with grpc.insecure_channel(args.billing) as bch, grpc.insecure_channel(args.settings) as sch:
            billing = billing_grpc.BillingServiceStub(bch)
            settings = settings_grpc.SettingsServiceStub(sch)
            user_md = bearer(args.token)
            account = str(args.account)
            checks = Checks()

            # --- public surface: health and reflection, no token -----------
            checks.check("billing health", lambda: check_health(bch, billing_name))
            checks.check("settings health", lambda: check_health(sch, settings_name))
            checks.check("billing reflection v1alpha", lambda: check_reflection(bch, billing_name, settings_name))
            checks.check("settings reflection v1alpha", lambda: check_reflection(sch, settings_name, billing_name))

            # --- pricing ---------------------------------------------------
            def credit_cost():
                r = billing.GetCreditCost(
                    billing_pb2.GetCreditCostRequest(operation="content", quantity=250),
                    metadata=user_md,
                    timeout=TIMEOUT,
                )
                assert r.operation == "content_generation", f"alias not canonicalised: {r.operation!r}"
                assert r.credits == 2, f"content x250 words: expected 2 credits, got {r.credits}"
                assert r.quantity == 250, f"quantity echoed as {r.quantity}"

            checks.check("GetCreditCost content x250", credit_cost)

            # --- idempotent deduction and tenant echo ----------------------
            deduct_req = billing_pb2.DeductRequest(
                usage=billing_pb2.Usage(operation="clustering", quantity=1),
                idempotency_key="python-interop-1",
                description="python interop",
                metadata={"client": "python"},
            )
            first = {}
            balance = args.credits - 10

            def deduct():
                before = time.time()
                r, call = billing.Deduct.with_call(deduct_req, metadata=user_md, timeout=TIMEOUT)
                echoed = metadata_value(call.initial_metadata(), ACCOUNT_HEADER)
                assert echoed == account, f"response {ACCOUNT_HEADER}: expected {account!r}, got {echoed!r}"
                assert not r.replayed, "the first Deduct claims to be a replay"
                assert r.balance == balance, f"balance: expected {balance}, got {r.balance}"
                t = r.transaction
                assert t.id > 0, f"transaction id {t.id}"
                assert t.account_id == args.account, f"transaction account {t.account_id}"
                assert t.kind == billing_pb2.TRANSACTION_KIND_DEDUCT, (
                    f"kind {billing_pb2.TransactionKind.Name(t.kind)}"
                )
                assert t.credits == -10, f"transaction credits: expected -10, got {t.credits}"
                assert t.balance_after == balance, f"balance_after {t.balance_after}"
                assert t.operation == "clustering", f"operation {t.operation!r}"
                assert t.quantity == 1, f"quantity {t.quantity}"
                assert t.idempotency_key == "python-interop-1", f"idempotency_key {t.idempotency_key!r}"
                assert t.description == "python interop", f"description {t.description!r}"
                assert dict(t.metadata) == {"client": "python"}, f"metadata {dict(t.metadata)}"
                assert t.actor == f"user:{args.user}", f"actor {t.actor!r}"
                assert t.HasField("create_time"), "no create_time"
                created = t.create_time.seconds + t.create_time.nanos / 1e9
                assert abs(created - before) < 120, f"create_time {t.create_time.ToJsonString()} is not now"
                first["id"] = t.id

            checks.check("Deduct", deduct)

            def replay():
                r = billing.Deduct(deduct_req, metadata=user_md, timeout=TIMEOUT)
                assert r.replayed, "the retried Deduct was not a replay"
                assert r.transaction.id == first["id"], f"replay id {r.transaction.id} != {first['id']}"
                assert r.balance == balance, f"replay changed the balance: {r.balance}"
                b = billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user_md, timeout=TIMEOUT)
                assert b.balance == balance, f"a replay deducted again: balance {b.balance}"

            checks.check("Deduct replay", replay)

            # --- insufficient credits: status, message, ErrorInfo ----------
            def insufficient():
                required = balance + 1000
                err = expect_error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "Deduct beyond the balance",
                    billing.Deduct,
                    billing_pb2.DeductRequest(credits=required, idempotency_key="python-too-much"),
                    metadata=user_md,
                )
                want = f"Insufficient credits. Required: {required}, Available: {balance}"
                assert err.details() == want, f"message: expected {want!r}, got {err.details()!r}"
                raw = metadata_value(err.trailing_metadata(), DETAILS_TRAILER)
                assert raw, f"no {DETAILS_TRAILER} trailer: {err.trailing_metadata()}"
                status = rpc_status.from_call(err)
                assert status is not None, "rpc_status.from_call found no status"
                infos = []
                for detail in status.details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        infos.append(info)
                assert len(infos) == 1, f"expected one ErrorInfo, got {[d.type_url for d in status.details]}"
                info = infos[0]
                assert info.reason == "INSUFFICIENT_CREDITS", f"reason {info.reason!r}"
                assert info.domain == "billing.igny8", f"domain {info.domain!r}"
                md = dict(info.metadata)
                assert md.get("required") == str(required), f"ErrorInfo metadata {md}"
                assert md.get("available") == str(balance), f"ErrorInfo metadata {md}"
                b = billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user_md, timeout=TIMEOUT)
                assert b.balance == balance, f"a refused Deduct changed the balance: {b.balance}"

            checks.check("Deduct insufficient -> FAILED_PRECONDITION + ErrorInfo", insufficient)

            # --- authentication and the authoritative account -------------
            def no_token():
                expect_error(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "GetCreditCost without a token",
                    billing.GetCreditCost,
                    billing_pb2.GetCreditCostRequest(operation="linking"),
                )
                expect_error(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "GetModuleSettings without a token",
                    settings.GetModuleSettings,
                    settings_pb2.GetModuleSettingsRequest(),
                )

            checks.check("missing token -> UNAUTHENTICATED", no_token)

            def spoofed_account():
                md = bearer(args.token, (ACCOUNT_HEADER, str(args.other_account)))
                r, call = billing.GetBalance.with_call(billing_pb2.GetBalanceRequest(), metadata=md, timeout=TIMEOUT)
                assert r.account_id == args.account, (
                    f"spoofed {ACCOUNT_HEADER}: {args.other_account} was honoured (account {r.account_id})"
                )
                assert r.balance == balance, f"spoofed header: balance {r.balance}, own is {balance}"
                echoed = metadata_value(call.initial_metadata(), ACCOUNT_HEADER)
                assert echoed == account, f"response {ACCOUNT_HEADER} {echoed!r} after a spoofed request header"

            checks.check("spoofed x-igny8-account-id ignored", spoofed_account)

            def service_act_as():
                svc_md = bearer(args.service_token)
                expect_error(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "service token GetBalance without act-as",
                    billing.GetBalance,
                    billing_pb2.GetBalanceRequest(),
                    metadata=svc_md,
                )
                md = bearer(args.service_token, (ACT_AS_HEADER, account))
                r, call = billing.GetBalance.with_call(billing_pb2.GetBalanceRequest(), metadata=md, timeout=TIMEOUT)
                assert r.account_id == args.account, f"act-as {account}: got account {r.account_id}"
                assert r.balance == balance, f"act-as balance {r.balance}"
                echoed = metadata_value(call.initial_metadata(), ACCOUNT_HEADER)
                assert echoed == account, f"act-as response {ACCOUNT_HEADER}: {echoed!r}"

            checks.check("service token act-as", service_act_as)

            # --- holds: reserve -> capture -> refund ------------------------
            def hold_flow():
                r = billing.Reserve(
                    billing_pb2.ReserveRequest(credits=20, idempotency_key="python-hold-1"),
                    metadata=user_md,
                    timeout=TIMEOUT,
                )
                h = r.hold
                assert h.state == billing_pb2.HOLD_STATE_ACTIVE, f"state {h.state}"
                assert r.available == balance - 20, f"available after Reserve {r.available}"
                b = billing.GetBalance(billing_pb2.GetBalanceRequest(), metadata=user_md, timeout=TIMEOUT)
                assert (b.balance, b.held, b.available) == (balance, 20, balance - 20), f"GetBalance {b}"
                c = billing.CaptureHold(
                    billing_pb2.CaptureHoldRequest(hold_id=h.id, credits=15),
                    metadata=user_md,
                    timeout=TIMEOUT,
                )
                assert c.hold.state == billing_pb2.HOLD_STATE_CAPTURED, f"state {c.hold.state}"
                assert c.transaction.kind == billing_pb2.TRANSACTION_KIND_CAPTURE
                assert c.transaction.hold_id == h.id and c.transaction.credits == -15
                assert c.balance == balance - 15, f"balance after capture {c.balance}"
                err = expect_error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "a second, different capture",
                    billing.CaptureHold,
                    billing_pb2.CaptureHoldRequest(hold_id=h.id, credits=5),
                    metadata=user_md,
                )
                assert "HOLD_NOT_ACTIVE" in str(rpc_status.from_call(err)), "no HOLD_NOT_ACTIVE detail"
                staff = bearer(args.service_token, (ACT_AS_HEADER, account))
                f = billing.Refund(
                    billing_pb2.RefundRequest(
                        transaction_id=c.transaction.id, idempotency_key="python-refund-1", reason="interop"
                    ),
                    metadata=staff,
                    timeout=TIMEOUT,
                )
                assert f.transaction.kind == billing_pb2.TRANSACTION_KIND_REFUND
                assert f.transaction.refund_of == c.transaction.id and f.transaction.credits == 15
                assert f.balance == balance, f"balance after refund {f.balance}"
                expect_error(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "a member refunding",
                    billing.Refund,
                    billing_pb2.RefundRequest(transaction_id=c.transaction.id, idempotency_key="python-refund-2"),
                    metadata=user_md,
                )

            checks.check("Reserve -> CaptureHold -> Refund", hold_flow)

            # --- live changes: server streaming -------------------------------
            def watch_balance():
                stream = billing.WatchBalance(
                    billing_pb2.WatchBalanceRequest(), metadata=user_md, timeout=TIMEOUT
                )
                try:
                    now = next(stream)
                    assert now.account_id == args.account, f"stream for account {now.account_id}"
                    assert now.available == now.balance - now.held, f"available {now.available}"
                    assert now.available >= 1, "seed the account with credits left after the checks above"
                    # A hold moves no balance and writes no ledger row, but it
                    # changes held/available: the stream reports it.
                    hold = billing.Reserve(
                        billing_pb2.ReserveRequest(credits=1, idempotency_key="python-watch-1"),
                        metadata=user_md,
                        timeout=TIMEOUT,
                    ).hold
                    changed = next(stream)
                    assert (changed.balance, changed.held) == (now.balance, now.held + 1), (
                        f"after reserving 1 credit the stream says balance {changed.balance} "
                        f"held {changed.held}; was {now.balance}/{now.held}"
                    )
                    billing.ReleaseHold(
                        billing_pb2.ReleaseHoldRequest(hold_id=hold.id), metadata=user_md, timeout=TIMEOUT
                    )
                    released = next(stream)
                    assert released.held == now.held, f"held {released.held} after the release"
                finally:
                    stream.cancel()

            checks.check("WatchBalance: current state, then the change", watch_balance)

            # --- settings ----------------------------------------------------
            flags = [f.name for f in settings_pb2.ModuleSettings.DESCRIPTOR.fields if f.name.endswith("_enabled")]
            assert len(flags) == 8, f"expected 8 module switches, found {flags}"

            def defaults():
                r = settings.GetModuleSettings(
                    settings_pb2.GetModuleSettingsRequest(), metadata=user_md, timeout=TIMEOUT
                )
                s = r.settings
                assert s.account_id == args.account, f"settings for account {s.account_id}"
                off = [f for f in flags if not getattr(s, f)]
                assert not off, f"defaults must all be enabled; disabled: {off}"

            checks.check("GetModuleSettings defaults", defaults)

            def update():
                req = settings_pb2.UpdateModuleSettingsRequest(
                    settings=settings_pb2.ModuleSettings(writer_enabled=False),
                    update_mask=field_mask_pb2.FieldMask(paths=["writer_enabled"]),
                )
                r, call = settings.UpdateModuleSettings.with_call(req, metadata=user_md, timeout=TIMEOUT)
                s = r.settings
                assert not s.writer_enabled, "writer_enabled still true after the update"
                others_off = [f for f in flags if f != "writer_enabled" and not getattr(s, f)]
                assert not others_off, f"the mask named only writer_enabled, but these turned off: {others_off}"
                echoed = metadata_value(call.initial_metadata(), ACCOUNT_HEADER)
                assert echoed == account, f"settings response {ACCOUNT_HEADER}: {echoed!r}"
                c = settings.CheckModule(
                    settings_pb2.CheckModuleRequest(module=settings_pb2.MODULE_WRITER),
                    metadata=user_md,
                    timeout=TIMEOUT,
                )
                assert c.module == settings_pb2.MODULE_WRITER, f"CheckModule echoed {c.module}"
                assert c.enabled is False, "CheckModule(MODULE_WRITER) is still enabled"
                c = settings.CheckModule(
                    settings_pb2.CheckModuleRequest(module=settings_pb2.MODULE_PLANNER),
                    metadata=user_md,
                    timeout=TIMEOUT,
                )
                assert c.enabled is True, "CheckModule(MODULE_PLANNER) was switched off"

            checks.check("UpdateModuleSettings with FieldMask", update)

            def watch_settings():
                stream = settings.WatchModuleSettings(
                    settings_pb2.WatchModuleSettingsRequest(), metadata=user_md, timeout=TIMEOUT
                )
                try:
                    now = next(stream).settings
                    assert not now.writer_enabled, "the stream's first message is not the current state"
                    settings.UpdateModuleSettings(
                        settings_pb2.UpdateModuleSettingsRequest(
                            settings=settings_pb2.ModuleSettings(writer_enabled=True),
                            update_mask=field_mask_pb2.FieldMask(paths=["writer_enabled"]),
                        ),
                        metadata=user_md,
                        timeout=TIMEOUT,
                    )
                    changed = next(stream).settings
                    assert changed.writer_enabled, "the stream did not carry the update"
                finally:
                    stream.cancel()

            checks.check("WatchModuleSettings: current settings, then the update", watch_settings)

            def unspecified():
                for module in (settings_pb2.MODULE_UNSPECIFIED, 99):
                    expect_error(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"CheckModule({module})",
                        settings.CheckModule,
                        settings_pb2.CheckModuleRequest(module=module),
                        metadata=user_md,
                    )

            checks.check("CheckModule unspecified/unknown -> INVALID_ARGUMENT", unspecified)

    elapsed = time.monotonic() - started
    print(
        f"python interop: {len(checks.passed)} checks passed in {elapsed:.1f}s "
        f"(grpcio {grpc.__version__}, Python {sys.version.split()[0]})"
    )
    for name in checks.passed:
        print(f"  ok  {name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"python interop FAILED: {e}", file=sys.stderr)
        sys.exit(1)
