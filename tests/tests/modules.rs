//! Module-aware charging (docs/api.md "Module-aware charging") end to end: real billing and settings
//! servers, billing asking settings over gRPC with its own service token.

use std::{path::Path, time::Duration};

use billing_svc::{BillingOptions, modules::SettingsOptions};
use igny8_proto::{
    billing::v1::{
        CaptureHoldRequest, GetBalanceRequest, ReserveRequest, capture_hold_request,
        reserve_request,
    },
    settings::v1::{ModuleSettings, UpdateModuleSettingsRequest},
};
use igny8_tests::*;
use prost_types::FieldMask;
use tokio::time::Instant;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const A1: i64 = 1;
const A2: i64 = 2;
const A3: i64 = 3;
const EDITOR: i64 = 10;
const ADMIN: i64 = 11;

type Billing = igny8_proto::billing::v1::billing_service_client::BillingServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        auth_interceptor::BearerInterceptor,
    >,
>;

/// Accounts 1–3 with `credits` each, an editor and an admin in account 1.
async fn seed(db: &TestDb, credits: i64) {
    for a in [A1, A2, A3] {
        db.account(a).credits(credits).create().await;
    }
    db.user(EDITOR).account(A1).role("editor").create().await;
    db.user(ADMIN).account(A1).role("admin").create().await;
}

/// Billing on `db`, checking modules with settings at `settings`.
async fn billing_with_settings(db: &TestDb, settings: SettingsOptions) -> Running {
    spawn_billing_with_options(
        test_config(&db.url),
        BillingOptions {
            settings: Some(settings),
            ..Default::default()
        },
    )
    .await
}

/// Switches one module of `account` through `settings` (as a service acting
/// as the account).
async fn set_module(settings: &Running, account: i64, field: &str, on: bool) {
    let mut body = ModuleSettings::default();
    match field {
        "writer_enabled" => body.writer_enabled = on,
        "planner_enabled" => body.planner_enabled = on,
        other => panic!("unsupported field {other}"),
    }
    settings
        .settings(&service_token("ops"), Some(account))
        .await
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(body),
            update_mask: Some(FieldMask {
                paths: vec![field.to_owned()],
            }),
        })
        .await
        .expect("module switched");
}

fn reserve_usage(operation: &str, quantity: u64, key: &str) -> ReserveRequest {
    ReserveRequest {
        cost: Some(reserve_request::Cost::Usage(
            igny8_proto::billing::v1::Usage {
                operation: operation.into(),
                quantity,
            },
        )),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn reserve_credits(credits: i64, key: &str) -> ReserveRequest {
    ReserveRequest {
        cost: Some(reserve_request::Cost::Credits(credits)),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Asserts `status` is MODULE_DISABLED for `module`/`operation`.
fn assert_module_disabled(status: &Status, module: &str, operation: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "MODULE_DISABLED", "{status:?}");
    assert_eq!(info.domain, "billing.igny8");
    assert_eq!(info.metadata["module"], module);
    assert_eq!(info.metadata["operation"], operation);
    assert!(
        status.message().contains(module) && status.message().contains("UpdateModuleSettings"),
        "actionable message: {}",
        status.message()
    );
}

/// Asserts `status` is UNAVAILABLE / SETTINGS_UNAVAILABLE for `module`.
fn assert_settings_unavailable(status: &Status, module: &str) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SETTINGS_UNAVAILABLE", "{status:?}");
    assert_eq!(info.domain, "billing.igny8");
    assert_eq!(info.metadata["module"], module);
}

/// Usage deducts under fresh keys until one is refused; returns the error
/// and how long after `since` it came. Panics after `within`.
async fn deduct_until_refused(
    c: &mut Billing,
    operation: &str,
    prefix: &str,
    since: Instant,
    within: Duration,
) -> (Status, Duration) {
    for i in 0.. {
        match c
            .deduct(deduct_usage(operation, 0, &format!("{prefix}-{i}")))
            .await
        {
            Err(e) => return (e, since.elapsed()),
            Ok(_) => {
                assert!(
                    since.elapsed() < within,
                    "{operation} still charged {within:?} after its module was switched off"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    unreachable!()
}

/// Usage deducts under fresh keys until one succeeds; returns how long
/// after `since`. Each refusal must be `refused_as`. Panics after `within`.
async fn deduct_until_ok(
    c: &mut Billing,
    operation: &str,
    prefix: &str,
    since: Instant,
    within: Duration,
    refused_as: impl Fn(&Status),
) -> Duration {
    for i in 0.. {
        match c
            .deduct(deduct_usage(operation, 0, &format!("{prefix}-{i}")))
            .await
        {
            Ok(_) => return since.elapsed(),
            Err(e) => {
                refused_as(&e);
                assert!(
                    since.elapsed() < within,
                    "{operation} still refused {within:?} later: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    unreachable!()
}

async fn balance_and_held(c: &mut Billing) -> (i64, i64) {
    let b = c
        .get_balance(GetBalanceRequest {})
        .await
        .unwrap()
        .into_inner();
    (b.balance, b.held)
}

async fn usage_charges_of_a_disabled_module_are_refused(b: Backend) {
    let db = TestDb::new(b).await;
    seed(&db, 10_000).await;
    let settings = spawn_settings(&db).await;
    let billing = billing_with_settings(&db, SettingsOptions::new(settings.endpoint())).await;
    let mut c = billing.billing(&access_token(EDITOR, None), None).await;

    // While the writer module is on: a deduct and a hold of writer work.
    let before = c
        .deduct(deduct_usage("content", 250, "before-off"))
        .await
        .expect("writer on: charged")
        .into_inner();
    let hold = c
        .reserve(reserve_usage("content_generation", 500, "hold-before-off"))
        .await
        .expect("writer on: reserved")
        .into_inner()
        .hold
        .unwrap();

    set_module(&settings, A1, "writer_enabled", false).await;
    let (refused, _) = deduct_until_refused(
        &mut c,
        "content",
        "probe",
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    // The alias is reported by its canonical name, with its module.
    assert_module_disabled(&refused, "writer", "content_generation");

    // Refusals change nothing.
    let (balance, held) = balance_and_held(&mut c).await;
    let ledger = db.ledger_sum(A1).await;
    let e = c
        .deduct(deduct_usage("image_generation", 2, "off-deduct"))
        .await
        .unwrap_err();
    assert_module_disabled(&e, "writer", "image_generation");
    let e = c
        .reserve(reserve_usage("images", 3, "off-reserve"))
        .await
        .unwrap_err();
    assert_module_disabled(&e, "writer", "image_generation");
    assert_eq!(balance_and_held(&mut c).await, (balance, held));
    assert_eq!(db.ledger_sum(A1).await, ledger);
    assert_eq!(db.balance(A1).await, balance);

    // Retries of requests recorded while the module was on replay; they are
    // not turned into refusals.
    let replay = c
        .deduct(deduct_usage("content", 250, "before-off"))
        .await
        .expect("a retry replays")
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.transaction, before.transaction);
    let again = c
        .reserve(reserve_usage("content_generation", 500, "hold-before-off"))
        .await
        .expect("a reserve retry replays")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.hold.unwrap().id, hold.id);

    // Other modules, raw credits and the capture of an existing hold are not
    // module-checked.
    c.deduct(deduct_usage("clustering", 1, "planner-on"))
        .await
        .expect("planner is on");
    c.deduct(deduct_credits(7, "raw-credits"))
        .await
        .expect("raw credits are not module-checked");
    c.reserve(reserve_credits(9, "raw-hold"))
        .await
        .expect("raw holds are not module-checked");
    let captured = c
        .capture_hold(CaptureHoldRequest {
            hold_id: hold.id.clone(),
            amount: Some(capture_hold_request::Amount::Usage(
                igny8_proto::billing::v1::Usage {
                    operation: "content_generation".into(),
                    quantity: 300,
                },
            )),
        })
        .await
        .expect("a capture is never module-checked")
        .into_inner();
    assert_eq!(captured.transaction.unwrap().credits, -3);

    // Settings are per account: account 2's writer is still on.
    let mut service = billing
        .billing(&service_token("writer-worker"), Some(A2))
        .await;
    service
        .deduct(deduct_usage("content", 100, "other-account"))
        .await
        .expect("account 2's writer is on");

    // Switched on again: charged again.
    set_module(&settings, A1, "writer_enabled", true).await;
    deduct_until_ok(
        &mut c,
        "content",
        "back-on",
        Instant::now(),
        Duration::from_secs(5),
        |e| assert_module_disabled(e, "writer", "content_generation"),
    )
    .await;
    let (sum, _) = db.ledger_sum(A1).await;
    assert_eq!(db.balance(A1).await, 10_000 + sum, "ledger matches balance");
}

async fn every_role_row_still_holds(b: Backend) {
    let db = TestDb::new(b).await;
    seed(&db, 10_000).await;
    db.user(12).account(A1).role("viewer").create().await;
    db.user(13).account(A1).role("owner").create().await;
    db.user(14).account(A2).role("developer").create().await;
    let settings = spawn_settings(&db).await;
    let billing = billing_with_settings(&db, SettingsOptions::new(settings.endpoint())).await;
    let callers = [
        ("viewer", access_token(12, None), None, false),
        ("editor", access_token(EDITOR, None), None, true),
        ("admin", access_token(ADMIN, None), None, true),
        ("owner", access_token(13, None), None, true),
        ("developer", access_token(14, None), Some(A1), true),
        ("service", service_token("writer-worker"), Some(A1), true),
    ];
    for (who, token, act_as, allowed) in &callers {
        let mut c = billing.billing(token, *act_as).await;
        let r = c
            .deduct(deduct_usage("linking", 1, &format!("on-{who}")))
            .await;
        assert_eq!(r.is_ok(), *allowed, "{who}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e.code(), Code::PermissionDenied, "{who}");
        }
    }
    set_module(&settings, A1, "planner_enabled", false).await;
    let mut probe = billing.billing(&access_token(EDITOR, None), None).await;
    deduct_until_refused(
        &mut probe,
        "clustering",
        "probe",
        Instant::now(),
        Duration::from_secs(5),
    )
    .await;
    for (who, token, act_as, allowed) in &callers {
        let mut c = billing.billing(token, *act_as).await;
        let e = c
            .deduct(deduct_usage("ideas", 1, &format!("off-{who}")))
            .await
            .unwrap_err();
        if *allowed {
            // Billing asks with its own token: the caller's role is irrelevant.
            assert_module_disabled(&e, "planner", "idea_generation");
        } else {
            assert_eq!(e.code(), Code::PermissionDenied, "{who}: auth comes first");
        }
        let e = c
            .reserve(reserve_usage("clustering", 1, &format!("off-{who}")))
            .await
            .unwrap_err();
        if *allowed {
            assert_module_disabled(&e, "planner", "clustering");
        }
    }
}

/// Two settings and two billing replicas on one PostgreSQL database; billing
/// replica 2 asks settings replica 2, the switch goes through replica 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_honour_a_switch_within_a_second() {
    let db = TestDb::new(Backend::Postgres).await;
    seed(&db, 1_000_000).await;
    let settings1 = spawn_settings(&db).await;
    let settings2 = spawn_settings(&db).await;
    let _billing1 = billing_with_settings(&db, SettingsOptions::new(settings1.endpoint())).await;
    let billing2 = billing_with_settings(&db, SettingsOptions::new(settings2.endpoint())).await;
    let mut c = billing2.billing(&access_token(EDITOR, None), None).await;
    c.deduct(deduct_usage("content", 0, "warm"))
        .await
        .expect("writer on");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..5 {
        set_module(&settings1, A1, "writer_enabled", false).await;
        let (e, delay) = deduct_until_refused(
            &mut c,
            "content",
            &format!("off{round}"),
            Instant::now(),
            Duration::from_secs(5),
        )
        .await;
        assert_module_disabled(&e, "writer", "content_generation");
        off.push(delay);
        set_module(&settings1, A1, "writer_enabled", true).await;
        on.push(
            deduct_until_ok(
                &mut c,
                "content",
                &format!("on{round}"),
                Instant::now(),
                Duration::from_secs(5),
                |e| assert_module_disabled(e, "writer", "content_generation"),
            )
            .await,
        );
    }
    off.sort();
    on.sort();
    // Reported, not asserted: timing on a shared machine is not a test.
    eprintln!(
        "MEASURE module switch via settings replica 1 -> billing replica 2: off median {:?} (all {:?}), on median {:?} (all {:?})",
        off[off.len() / 2],
        off,
        on[on.len() / 2],
        on
    );
    let (sum, _) = db.ledger_sum(A1).await;
    assert_eq!(db.balance(A1).await, 1_000_000 + sum);
}

async fn settings_outage_fails_closed_and_recovers(b: Backend) {
    let db = TestDb::new(b).await;
    seed(&db, 10_000).await;
    let settings = spawn_settings(&db).await;
    let addr = settings.addr;
    // A long grace so that "answers from its cache" does not race the clock.
    let options = SettingsOptions {
        serve_stale_for: Duration::from_secs(5),
        timeout: Duration::from_millis(500),
        ..SettingsOptions::new(settings.endpoint())
    };
    let billing = billing_with_settings(&db, options).await;
    let mut c1 = billing
        .billing(&service_token("writer-worker"), Some(A1))
        .await;
    let mut c2 = billing
        .billing(&service_token("writer-worker"), Some(A2))
        .await;
    c1.deduct(deduct_usage("content", 0, "warm"))
        .await
        .expect("writer on");

    let stopped_at = Instant::now();
    settings.stop().await.expect("settings stops cleanly");
    // Account 1 has a recent answer: still served.
    c1.deduct(deduct_usage("content", 0, "from-cache"))
        .await
        .expect("answered from the cache while fresh");
    // Account 2 was never asked: fail closed, nothing changes.
    let balance2 = db.balance(A2).await;
    let e = c2
        .deduct(deduct_usage("optimization", 1000, "no-answer"))
        .await
        .unwrap_err();
    assert_settings_unavailable(&e, "optimizer");
    let e = c2
        .reserve(reserve_usage("linking", 1, "no-answer"))
        .await
        .unwrap_err();
    assert_settings_unavailable(&e, "linker");
    assert_eq!(db.balance(A2).await, balance2);
    assert_eq!(db.ledger_sum(A2).await, (0, 0));
    // Raw credits do not need settings.
    c2.deduct(deduct_credits(5, "raw"))
        .await
        .expect("raw credits need no module check");
    // Once the cached answer is too old: fail closed for account 1 too.
    let mut last = None;
    for i in 0.. {
        match c1
            .deduct(deduct_usage("content", 0, &format!("aging-{i}")))
            .await
        {
            Ok(_) => {
                assert!(
                    stopped_at.elapsed() < Duration::from_secs(20),
                    "cache served for too long"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    assert_settings_unavailable(&last.unwrap(), "writer");

    // Settings back on the same address: billing recovers by itself.
    let mut config = test_config(&db.url);
    config.listen_addr = addr;
    let _settings = spawn_settings_with(config).await;
    deduct_until_ok(
        &mut c1,
        "content",
        "recovered",
        Instant::now(),
        Duration::from_secs(10),
        |e| assert_settings_unavailable(e, "writer"),
    )
    .await;
    c2.deduct(deduct_usage("optimization", 1000, "no-answer"))
        .await
        .expect("the same request succeeds once settings is back");
}

fn write_atomically(path: &Path, token: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn a_rotated_token_file_is_picked_up(b: Backend) {
    let db = TestDb::new(b).await;
    seed(&db, 10_000).await;
    let settings = spawn_settings(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings-token");
    std::fs::write(&file, format!("{}\n", service_token("billing-svc"))).unwrap();
    let options = SettingsOptions {
        token_file: Some(file.clone()),
        ..SettingsOptions::new(settings.endpoint())
    };
    let billing = billing_with_settings(&db, options).await;
    let deduct = |account: i64, key: &'static str| {
        let billing = &billing;
        async move {
            billing
                .billing(&service_token("writer-worker"), Some(account))
                .await
                .deduct(deduct_usage("content", 0, key))
                .await
        }
    };
    deduct(A1, "first").await.expect("the file's token works");

    // Rotated to a token settings refuses (another secret): billing uses the
    // new file at once and fails closed.
    let foreign = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"type": "service", "sub": "billing-svc", "exp": unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-settings-trusts-0123456789"),
    )
    .unwrap();
    write_atomically(&file, &foreign);
    let e = deduct(A2, "refused-token").await.unwrap_err();
    assert_settings_unavailable(&e, "writer");

    // Rotated again to a good token: works without a restart.
    write_atomically(&file, &service_token("billing-svc-rotated"));
    deduct(A3, "rotated")
        .await
        .expect("the rotated token works");
    deduct(A2, "refused-token")
        .await
        .expect("the refused request now succeeds");
}

on_both_backends!(
    usage_charges_of_a_disabled_module_are_refused,
    every_role_row_still_holds,
    settings_outage_fails_closed_and_recovers,
    a_rotated_token_file_is_picked_up,
);

#[tokio::test]
async fn start_up_refuses_unusable_settings_configuration() {
    let db = TestDb::new(Backend::Sqlite).await;
    // A public key cannot mint tokens: a token file is required.
    let mut config = test_config(&db.url);
    config.jwt = auth_interceptor::VerifierConfig {
        keys: auth_interceptor::KeyConfig::pem_file(&fixture("keys/rsa_public.pem")).unwrap(),
        ..config.jwt
    };
    let options = BillingOptions {
        settings: Some(SettingsOptions::new("http://127.0.0.1:1")),
        ..Default::default()
    };
    let err = billing_svc::build_with(config, billing_svc::CostTable::builtin(), options)
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    assert!(
        err.to_string().contains("IGNY8_SETTINGS_TOKEN_FILE"),
        "{err}"
    );
    // A missing token file.
    let options = BillingOptions {
        settings: Some(SettingsOptions {
            token_file: Some("/nonexistent/settings-token".into()),
            ..SettingsOptions::new("http://127.0.0.1:1")
        }),
        ..Default::default()
    };
    let err = billing_svc::build_with(
        test_config(&db.url),
        billing_svc::CostTable::builtin(),
        options,
    )
    .await
    .err()
    .unwrap_or_else(|| panic!("refused"));
    assert!(
        err.to_string().contains("/nonexistent/settings-token"),
        "{err}"
    );
    // A cost-table module settings does not know.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("costs.toml");
    std::fs::write(
        &path,
        "[[operation]]\nname = \"x\"\ncredits = 1\nunit = \"request\"\nmodule = \"translator\"\n",
    )
    .unwrap();
    let table = billing_svc::CostTable::from_file(&path).unwrap();
    let options = BillingOptions {
        settings: Some(SettingsOptions::new("http://127.0.0.1:1")),
        ..Default::default()
    };
    let err = billing_svc::build_with(test_config(&db.url), table, options)
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    assert!(err.to_string().contains("translator"), "{err}");
}

/// The binary: without IGNY8_SETTINGS_URL it serves and warns that module
/// checks are off; a bad URL stops start-up with the reason.
#[tokio::test]
async fn the_binary_warns_without_settings_and_refuses_a_bad_url() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut process = Process::start_logging(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
        std::process::Stdio::piped(),
    )
    .await;
    let _ = process.child.kill();
    let output = std::mem::replace(
        &mut process.child,
        std::process::Command::new("true").spawn().unwrap(),
    )
    .wait_with_output()
    .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("IGNY8_SETTINGS_URL is not set: module checks are off"),
        "{log}"
    );

    let output = std::process::Command::new(workspace_binary("billing-svc"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("IGNY8_JWT_SECRET", SECRET)
        .env("IGNY8_LISTEN_ADDR", "127.0.0.1:0")
        .env("IGNY8_METRICS_ADDR", "off")
        .env("IGNY8_SETTINGS_URL", "settings:50052")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("IGNY8_SETTINGS_URL must be an http:// or https:// URL"),
        "{err}"
    );

    // https:// needs the CA settings' certificate chains to.
    let output = std::process::Command::new(workspace_binary("billing-svc"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("IGNY8_JWT_SECRET", SECRET)
        .env("IGNY8_LISTEN_ADDR", "127.0.0.1:0")
        .env("IGNY8_METRICS_ADDR", "off")
        .env("IGNY8_SETTINGS_URL", "https://settings:50052")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("IGNY8_SETTINGS_CA_FILE"), "{err}");
}

/// `ModuleGate::invalidate` (the hook for settings change notifications)
/// makes the next check ask settings at once, instead of serving the cached
/// answer for up to 250 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_drops_an_accounts_cached_answers_at_once() {
    let db = TestDb::new(Backend::Sqlite).await;
    seed(&db, 100).await;
    let settings = spawn_settings(&db).await;
    let options = SettingsOptions {
        // Long enough that only invalidation can explain a fresh answer.
        refresh_after: Duration::from_secs(1),
        ..SettingsOptions::new(settings.endpoint())
    };
    let gate = billing_svc::modules::ModuleGate::new(
        &options,
        &test_config(&db.url).jwt,
        std::sync::Arc::new(billing_svc::CostTable::builtin()),
    )
    .unwrap();
    gate.check(A1, "content_generation")
        .await
        .expect("writer on");
    gate.check(A2, "content_generation")
        .await
        .expect("writer on");
    // Settings writes its own cache through, so the replica that took the
    // update answers the new value at once.
    set_module(&settings, A1, "writer_enabled", false).await;
    set_module(&settings, A2, "writer_enabled", false).await;
    let started = Instant::now();
    gate.invalidate(A1).await;
    let e = Status::from(gate.check(A1, "content_generation").await.unwrap_err());
    assert_module_disabled(&e, "writer", "content_generation");
    // Account 2 was not invalidated: its cached answer stands while fresh.
    if started.elapsed() < Duration::from_millis(900) {
        gate.check(A2, "content_generation")
            .await
            .expect("still the cached answer");
    }
    // An operation the table does not know was refused by pricing already.
    gate.check(A1, "no_such_operation")
        .await
        .expect("unknown operations are the pricer's business");
}
