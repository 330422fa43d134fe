//! The operator subcommands against a real database (a temporary SQLite
//! file and a fresh PostgreSQL database), run as the built binary.

mod common;

use std::{path::Path, time::Duration};

use common::{Ran, igny8ctl, run};
use igny8_db::on_pool;
use igny8_proto::billing::v1::GetBalanceRequest;
use igny8_tests::{Backend, TestDb, on_both_backends, spawn_billing};
use igny8ctl::ops::Operator;
use serde_json::Value;
use tonic::Code;

/// `igny8ctl --database-url <db> <args>` in a scratch directory.
fn ctl(db: &TestDb, args: &[&str]) -> Ran {
    ctl_env(db, args, &[])
}

fn ctl_env(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = igny8ctl(dir.path());
    cmd.args(["--database-url", &db.url]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

async fn user(db: &TestDb, id: i64) -> igny8ctl::ops::User {
    Operator::new(db.db.clone())
        .user(id)
        .await
        .expect("read user")
        .unwrap_or_else(|| panic!("user {id} exists"))
}

async fn account_status(db: &TestDb, id: i64) -> String {
    Operator::new(db.db.clone())
        .account(id)
        .await
        .expect("read account")
        .unwrap_or_else(|| panic!("account {id} exists"))
        .status
}

async fn account_create_grants_initial_credits_through_the_ledger(b: Backend) {
    let db = TestDb::new(b).await;
    let out = ctl(
        &db,
        &["account", "create", "--name", "Acme", "--credits", "500"],
    );
    assert!(
        out.ok()
            .contains("created account 1 \"Acme\" (active) with 500 credits"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("through the ledger"), "{out:#?}");
    assert_eq!(db.balance(1).await, 500);
    assert_eq!(db.ledger_sum(1).await, (500, 1), "one grant row");

    ctl(&db, &["account", "create", "--id", "10", "--name", "Ten"]).ok();
    assert_eq!(db.ledger_sum(10).await, (0, 0), "no row for zero credits");
    let next = ctl(&db, &["account", "create", "--name", "Next"]);
    assert!(next.ok().contains("created account 11 "), "{next:#?}");
}

async fn account_create_rejects_bad_input(b: Backend) {
    let db = TestDb::new(b).await;
    ctl(&db, &["account", "create", "--id", "3", "--name", "Three"]).ok();
    let dup = ctl(&db, &["account", "create", "--id", "3", "--name", "Again"]);
    assert!(
        dup.fails(1).contains("account 3 already exists"),
        "{dup:#?}"
    );
    let blank = ctl(&db, &["account", "create", "--name", "   "]);
    assert!(blank.fails(1).contains("--name must be"), "{blank:#?}");
    ctl(
        &db,
        &["account", "create", "--name", "X", "--credits", "-5"],
    )
    .fails(2);
    ctl(&db, &["account", "create", "--id", "0", "--name", "X"]).fails(2);
    ctl(&db, &["account", "create"]).fails(2);
    assert_eq!(db.ledger_sum(3).await, (0, 0));
}

async fn accounts_are_suspended_and_reactivated(b: Backend) {
    let db = TestDb::new(b).await;
    ctl(&db, &["account", "create", "--id", "1", "--name", "Acme"]).ok();
    let out = ctl(&db, &["account", "suspend", "--id", "1"]);
    assert!(
        out.ok().contains("account 1 \"Acme\": active -> suspended"),
        "{out:#?}"
    );
    assert_eq!(account_status(&db, 1).await, "suspended");
    let again = ctl(&db, &["account", "suspend", "--id", "1"]);
    assert!(again.ok().contains("already suspended"), "{again:#?}");
    let out = ctl(&db, &["account", "activate", "--id", "1"]);
    assert!(out.ok().contains("suspended -> active"), "{out:#?}");
    assert_eq!(account_status(&db, 1).await, "active");
    let missing = ctl(&db, &["account", "suspend", "--id", "99"]);
    assert!(
        missing.fails(1).contains("account 99 does not exist"),
        "{missing:#?}"
    );

    let out = ctl(
        &db,
        &[
            "account",
            "create",
            "--name",
            "Frozen",
            "--credits",
            "5",
            "--suspended",
        ],
    );
    assert!(out.ok().contains("(suspended) with 5 credits"), "{out:#?}");
    assert_eq!(account_status(&db, 2).await, "suspended");
}

async fn users_are_created_moved_deactivated_and_reroled(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(1).create().await;
    db.account(2).create().await;
    let out = ctl(
        &db,
        &[
            "user",
            "create",
            "--id",
            "5",
            "--email",
            "ed@example.com",
            "--role",
            "editor",
            "--account",
            "1",
        ],
    );
    assert!(
        out.ok()
            .contains("created user 5 <ed@example.com>: editor of account 1, active"),
        "{out:#?}"
    );
    let u = user(&db, 5).await;
    assert_eq!(
        (u.account_id, u.role.as_str(), u.is_active),
        (Some(1), "editor", true)
    );

    let out = ctl(
        &db,
        &[
            "user",
            "create",
            "--email",
            "v@example.com",
            "--role",
            "viewer",
            "--inactive",
        ],
    );
    assert!(
        out.ok()
            .contains("created user 6 <v@example.com>: viewer of no account, inactive"),
        "{out:#?}"
    );

    let out = ctl(&db, &["user", "move", "--id", "5", "--account", "2"]);
    assert!(
        out.ok()
            .contains("moved user 5 from account 1 to account 2"),
        "{out:#?}"
    );
    assert_eq!(user(&db, 5).await.account_id, Some(2));
    let out = ctl(&db, &["user", "move", "--id", "5", "--account", "2"]);
    assert!(out.ok().contains("already in account 2"), "{out:#?}");
    let out = ctl(&db, &["user", "move", "--id", "5", "--no-account"]);
    assert!(
        out.ok().contains("from account 2 to no account"),
        "{out:#?}"
    );
    assert_eq!(user(&db, 5).await.account_id, None);

    let out = ctl(&db, &["user", "deactivate", "--id", "5"]);
    assert!(out.ok().contains("deactivated user 5"), "{out:#?}");
    assert!(!user(&db, 5).await.is_active);
    let out = ctl(&db, &["user", "activate", "--id", "5"]);
    assert!(out.ok().contains("activated user 5"), "{out:#?}");
    assert!(user(&db, 5).await.is_active);

    let out = ctl(&db, &["user", "role", "--id", "5", "--role", "admin"]);
    assert!(out.ok().contains("role editor -> admin"), "{out:#?}");
    assert_eq!(user(&db, 5).await.role, "admin");
}

async fn user_commands_reject_bad_input(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(1).create().await;
    ctl(
        &db,
        &[
            "user", "create", "--id", "5", "--email", "a@b.c", "--role", "owner",
        ],
    )
    .ok();
    let dup = ctl(
        &db,
        &[
            "user", "create", "--id", "5", "--email", "a@b.c", "--role", "owner",
        ],
    );
    assert!(dup.fails(1).contains("user 5 already exists"), "{dup:#?}");
    let role = ctl(
        &db,
        &["user", "create", "--email", "a@b.c", "--role", "boss"],
    );
    assert!(
        role.fails(2).contains("owner"),
        "lists the roles: {role:#?}"
    );
    let email = ctl(
        &db,
        &[
            "user",
            "create",
            "--email",
            "not-an-email",
            "--role",
            "viewer",
        ],
    );
    assert!(email.fails(1).contains("--email"), "{email:#?}");
    let account = ctl(
        &db,
        &[
            "user",
            "create",
            "--email",
            "a@b.c",
            "--role",
            "viewer",
            "--account",
            "99",
        ],
    );
    assert!(
        account.fails(1).contains("account 99 does not exist"),
        "{account:#?}"
    );
    let missing = ctl(&db, &["user", "move", "--id", "99", "--account", "1"]);
    assert!(
        missing.fails(1).contains("user 99 does not exist"),
        "{missing:#?}"
    );
    let to_nowhere = ctl(&db, &["user", "move", "--id", "5", "--account", "99"]);
    assert!(
        to_nowhere.fails(1).contains("account 99 does not exist"),
        "{to_nowhere:#?}"
    );
    ctl(&db, &["user", "move", "--id", "5"]).fails(2);
    ctl(
        &db,
        &[
            "user",
            "move",
            "--id",
            "5",
            "--account",
            "1",
            "--no-account",
        ],
    )
    .fails(2);
    ctl(&db, &["user", "deactivate", "--id", "99"]).fails(1);
    ctl(&db, &["user", "role", "--id", "5", "--role", "service"]).fails(2);
    assert_eq!(user(&db, 5).await.account_id, None, "nothing changed");
}

async fn grants_go_through_the_ledger_once_per_key(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(1).create().await;
    let grant = |extra: &[&str]| {
        let mut args = vec!["grant", "--account", "1"];
        args.extend_from_slice(extra);
        ctl_env(&db, &args, &[("USER", "alice")])
    };
    let out = grant(&[
        "--credits",
        "100",
        "--reason",
        "support ticket 42",
        "--idempotency-key",
        "t-42",
    ]);
    assert!(
        out.ok()
            .contains("granted 100 credits to account 1: balance 100"),
        "{out:#?}"
    );
    let replay = grant(&[
        "--credits",
        "100",
        "--reason",
        "support ticket 42",
        "--idempotency-key",
        "t-42",
    ]);
    assert!(replay.ok().contains("already granted"), "{replay:#?}");
    let reuse = grant(&[
        "--credits",
        "200",
        "--reason",
        "support ticket 42",
        "--idempotency-key",
        "t-42",
    ]);
    assert!(reuse.fails(1).contains("already used"), "{reuse:#?}");
    let fresh = grant(&["--credits", "50", "--reason", "goodwill"]);
    assert!(
        fresh.ok().contains("--idempotency-key"),
        "prints the generated key: {fresh:#?}"
    );
    assert_eq!(db.balance(1).await, 150);
    assert_eq!(db.ledger_sum(1).await, (150, 2));
    let actors: Vec<String> = on_pool!(&db.db, pool => sqlx::query_scalar(
        "SELECT actor FROM credit_ledger WHERE account_id = 1 ORDER BY id").fetch_all(pool).await)
    .expect("actors");
    assert_eq!(actors, ["operator:alice", "operator:alice"]);

    grant(&["--credits", "0", "--reason", "x"]).fails(2);
    grant(&["--credits", "1000000000001", "--reason", "x"]).fails(2);
    let reason = grant(&["--credits", "1", "--reason", " "]);
    assert!(reason.fails(1).contains("--reason"), "{reason:#?}");
    let key = grant(&[
        "--credits",
        "1",
        "--reason",
        "x",
        "--idempotency-key",
        "naïve",
    ]);
    assert!(key.fails(1).contains("--idempotency-key"), "{key:#?}");
    let missing = ctl(
        &db,
        &[
            "grant",
            "--account",
            "99",
            "--credits",
            "1",
            "--reason",
            "x",
        ],
    );
    assert!(
        missing.fails(1).contains("account 99 does not exist"),
        "{missing:#?}"
    );
    assert_eq!(db.ledger_sum(1).await, (150, 2), "refusals change nothing");

    // Without $USER (cron, containers) the actor is `operator:cli`.
    let dir = tempfile::tempdir().expect("temp dir");
    let anonymous = run(igny8ctl(dir.path()).env_remove("USER").args([
        "--database-url",
        &db.url,
        "grant",
        "--account",
        "1",
        "--credits",
        "5",
        "--reason",
        "no $USER",
        "--idempotency-key",
        "no-user",
    ]));
    anonymous.ok();
    let actor: String = on_pool!(&db.db, pool => sqlx::query_scalar(
        "SELECT actor FROM credit_ledger WHERE account_id = 1 AND idempotency_key = 'no-user'")
        .fetch_one(pool).await)
    .expect("actor");
    assert_eq!(actor, "operator:cli");
}

async fn balance_shows_the_ledger_beside_the_balance(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(1).credits(40).create().await;
    ctl(
        &db,
        &[
            "grant",
            "--account",
            "1",
            "--credits",
            "10",
            "--reason",
            "x",
        ],
    )
    .ok();
    let out = ctl(&db, &["balance", "--account", "1"]);
    let text = out.ok();
    assert!(
        text.contains("account 1 \"account 1\" (active): 50 credits"),
        "{text}"
    );
    assert!(
        text.contains("ledger: 1 row summing to 10 (40 credits were set outside the ledger)"),
        "{text}"
    );
    let missing = ctl(&db, &["balance", "--account", "2"]);
    assert!(
        missing.fails(1).contains("account 2 does not exist"),
        "{missing:#?}"
    );
}

/// Polls `check` (bounded) until it returns true.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 10 s");
}

async fn cli_tokens_and_changes_reach_a_running_service(b: Backend) {
    let db = TestDb::new(b).await;
    ctl(
        &db,
        &[
            "account",
            "create",
            "--id",
            "1",
            "--name",
            "A",
            "--credits",
            "10",
        ],
    )
    .ok();
    ctl(
        &db,
        &[
            "account",
            "create",
            "--id",
            "2",
            "--name",
            "B",
            "--credits",
            "20",
        ],
    )
    .ok();
    ctl(
        &db,
        &[
            "user",
            "create",
            "--id",
            "7",
            "--email",
            "u@x.io",
            "--role",
            "editor",
            "--account",
            "1",
        ],
    )
    .ok();
    let billing = spawn_billing(&db).await;
    let secret = [("IGNY8_JWT_SECRET", igny8_tests::SECRET)];
    let token = ctl_env(
        &db,
        &["token", "user", "--id", "7", "--account-hint", "1"],
        &secret,
    );
    let token = token.ok().trim().to_owned();
    let mut client = billing.billing(&token, None).await;
    let r = client
        .get_balance(GetBalanceRequest {})
        .await
        .expect("balance")
        .into_inner();
    assert_eq!((r.account_id, r.balance), (1, 10));

    ctl(&db, &["user", "move", "--id", "7", "--account", "2"]).ok();
    eventually("the move", async || {
        client
            .get_balance(GetBalanceRequest {})
            .await
            .is_ok_and(|r| r.get_ref().account_id == 2)
    })
    .await;

    ctl(&db, &["user", "deactivate", "--id", "7"]).ok();
    eventually("the deactivation", async || {
        client
            .get_balance(GetBalanceRequest {})
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;

    let service = ctl_env(
        &db,
        &["token", "service", "--name", "writer-worker"],
        &secret,
    );
    let mut svc = billing.billing(service.ok().trim(), Some(2)).await;
    let r = svc
        .get_balance(GetBalanceRequest {})
        .await
        .expect("act-as")
        .into_inner();
    assert_eq!((r.account_id, r.balance), (2, 20));
}

on_both_backends!(
    account_create_grants_initial_credits_through_the_ledger,
    account_create_rejects_bad_input,
    accounts_are_suspended_and_reactivated,
    users_are_created_moved_deactivated_and_reroled,
    user_commands_reject_bad_input,
    grants_go_through_the_ledger_once_per_key,
    balance_shows_the_ledger_beside_the_balance,
    cli_tokens_and_changes_reach_a_running_service,
);

// Tokens need no database.

fn token(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = igny8ctl(dir);
    cmd.arg("token").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

fn claims(token: &str, secret: &str) -> Value {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .expect("a valid HS256 token")
    .claims
}

const SECRET: &str = "cli-test-secret-0123456789abcdef0123456789";

#[test]
fn token_user_prints_only_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = token(
        dir.path(),
        &["user", "--id", "7", "--ttl", "15m", "--account-hint", "3"],
        &[("IGNY8_JWT_SECRET", SECRET)],
    );
    let stdout = out.ok();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let c = claims(stdout.trim(), SECRET);
    assert_eq!(c["type"], "access");
    assert_eq!(c["user_id"], 7);
    assert_eq!(c["account_id"], 3);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900);
    assert!(out.stderr.contains("IGNY8_JWT_SECRET"), "{}", out.stderr);
}

#[test]
fn token_service_names_the_service_and_honours_iss_and_aud() {
    let dir = tempfile::tempdir().unwrap();
    let out = token(
        dir.path(),
        &["service", "--name", "writer-worker"],
        &[
            ("IGNY8_JWT_SECRET", SECRET),
            ("IGNY8_JWT_ISSUER", "igny8-auth"),
            ("IGNY8_JWT_AUDIENCE", "igny8"),
        ],
    );
    let c = claims(out.ok().trim(), SECRET);
    assert_eq!(c["type"], "service");
    assert_eq!(c["sub"], "writer-worker");
    assert_eq!(c["iss"], "igny8-auth");
    assert_eq!(c["aud"], "igny8");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
}

#[test]
fn token_uses_the_development_secret_next_to_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let none = token(dir.path(), &["user", "--id", "1"], &[]);
    let err = none.fails(1);
    assert!(
        err.contains("IGNY8_JWT_SECRET") && err.contains("igny8ctl dev"),
        "says how to get a secret: {err}"
    );
    let dev = "d".repeat(64);
    std::fs::write(dir.path().join(".igny8-dev-secret"), format!("{dev}\n")).unwrap();
    let out = token(dir.path(), &["user", "--id", "1"], &[]);
    assert_eq!(claims(out.ok().trim(), &dev)["user_id"], 1);
    assert!(out.stderr.contains("DEVELOPMENT"), "{}", out.stderr);

    // With --database-url, the file next to that database.
    let other = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("igny8.db").display());
    let out = token(
        other.path(),
        &["user", "--id", "1", "--database-url", &url],
        &[],
    );
    assert_eq!(claims(out.ok().trim(), &dev)["user_id"], 1);
}

#[test]
fn token_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("IGNY8_JWT_SECRET", SECRET)];
    for args in [
        &["user", "--id", "0"][..],
        &["user", "--id", "1", "--ttl", "0s"],
        &["user", "--id", "1", "--ttl", "2y"],
        &["user", "--id", "1", "--ttl", "400d"],
        &["service", "--name", "has space"],
        &["service", "--name", ""],
        &["user"],
    ] {
        let out = token(dir.path(), args, &env);
        assert!(out.stdout.is_empty(), "{args:?}: {out:#?}");
        out.fails(2);
    }
    let pem = token(
        dir.path(),
        &["user", "--id", "1"],
        &[("IGNY8_JWT_PUBLIC_KEY_FILE", "/keys/public.pem")],
    );
    assert!(
        pem.fails(1).contains("IGNY8_JWT_PUBLIC_KEY_FILE"),
        "{pem:#?}"
    );
}

#[test]
fn a_malformed_database_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(igny8ctl(dir.path()).args([
        "--database-url",
        "mysql://localhost/x",
        "balance",
        "--account",
        "1",
    ]));
    assert!(out.fails(1).contains("postgres://"), "{out:#?}");
}

#[test]
fn help_lists_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(igny8ctl(dir.path()).arg("--help"));
    let text = out.ok();
    for sub in ["dev", "account", "user", "grant", "token", "balance"] {
        assert!(text.contains(sub), "{sub} in:\n{text}");
    }
}
