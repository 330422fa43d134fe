//! An operator's cost table replaces the built-in one at start-up; a bad one
//! stops billing-svc with a message that says what is wrong.

use std::process::Command;

use igny8_proto::billing::v1::GetCreditCostRequest;
use igny8_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_table_replaces_the_builtin_one() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.account(1).create().await;
    db.user(1).account(1).role("viewer").create().await;
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("costs.json");
    std::fs::write(
        &table,
        r#"{"operation":[{"name":"clustering","aliases":["cluster"],"credits":12,"unit":"request","module":"planner"}]}"#,
    )
    .unwrap();
    let server = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[("IGNY8_COST_TABLE_FILE", table.to_str().unwrap())],
    )
    .await;
    let mut c = Running::at(server.addr)
        .billing(&access_token(1, None), None)
        .await;
    let r = c
        .get_credit_cost(GetCreditCostRequest {
            operation: "cluster".into(),
            quantity: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.operation.as_str(), r.credits), ("clustering", 24));
    // Operations of the built-in table are gone with it.
    let err = c
        .get_credit_cost(GetCreditCostRequest {
            operation: "linking".into(),
            quantity: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[test]
fn a_bad_table_stops_start_up_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("costs.toml");
    std::fs::write(&table, "[[operation]]\nname = \"clustering\"\ncredits = 0\nunit = \"request\"\nmodule = \"planner\"\n").unwrap();
    for (path, needle) in [
        (table.to_str().unwrap().to_owned(), "credits"),
        ("/no/such/table.toml".to_owned(), "cannot read"),
    ] {
        let out = Command::new(workspace_binary("billing-svc"))
            .env_clear()
            .env("IGNY8_JWT_SECRET", SECRET)
            .env("IGNY8_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("IGNY8_METRICS_ADDR", "off")
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("x.db").display()),
            )
            .env("IGNY8_COST_TABLE_FILE", &path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("IGNY8_COST_TABLE_FILE") && stderr.contains(needle),
            "{stderr}"
        );
    }
}
