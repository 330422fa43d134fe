//! `igny8ctl dev`: both services in one process on the embedded SQLite
//! default, a seeded demo account, a token and grpcurl calls to paste.
//!
//! Order matters: migrations run once here, before either service starts
//! (each runs with `run_migrations = false`, so they do not race), then the
//! demo rows are seeded idempotently, then both servers bind and serve
//! until one shared shutdown signal (Ctrl-C or SIGTERM) stops them.

use std::{net::SocketAddr, time::Duration};

use billing_svc::ledger::Applied;
use service_kit::{ServiceConfig, StartError, telemetry};
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    error::CtlError,
    ops::{GrantRequest, Operator, User},
    tokens::{self, Audience, SecretSource, SigningSecret, Subject},
};

/// The demo account's id.
pub const DEMO_ACCOUNT: i64 = 1;
/// The demo account's name.
pub const DEMO_ACCOUNT_NAME: &str = "Demo";
/// Credits granted to the demo account, once.
pub const DEMO_CREDITS: i64 = 1000;
/// The demo owner's user id.
pub const DEMO_USER: i64 = 1;
/// The demo owner's email.
pub const DEMO_EMAIL: &str = "demo@igny8.local";
/// Idempotency key of the demo grant: a restart replays it instead of
/// granting again.
pub const DEMO_GRANT_KEY: &str = "igny8ctl-dev:demo-credits";
/// Idempotency key of the printed Deduct call.
pub const DEMO_DEDUCT_KEY: &str = "readme-demo-1";
/// The Reserve key of the printed hold example.
pub const DEMO_HOLD_KEY: &str = "readme-hold-1";
/// How long `dev` waits for both services to report SERVING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What `dev` needs to know.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// Billing's listen address.
    pub billing_addr: SocketAddr,
    /// Settings' listen address.
    pub settings_addr: SocketAddr,
    /// Lifetime of the printed demo token.
    pub token_ttl: Duration,
}

/// What seeding found or did.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// True when the demo account row was inserted now.
    pub account_created: bool,
    /// The demo grant (a replay on every start after the first), or `None`
    /// when account 1 is not the demo account.
    pub grant: Option<Applied>,
    /// The demo account's name (another name means it was not ours).
    pub account_name: String,
    /// The demo account's balance now.
    pub balance: i64,
    /// True when the demo user row was inserted now.
    pub user_created: bool,
    /// The demo user as it is now.
    pub user: User,
}

/// Creates the demo account, its credits and its owner when missing.
/// Rows an operator has changed since are left as they are.
pub async fn seed_demo(op: &Operator) -> Result<Seeded, CtlError> {
    let account_created = match op
        .create_account(Some(DEMO_ACCOUNT), DEMO_ACCOUNT_NAME, 0, false, "")
        .await
    {
        Ok(_) => true,
        Err(CtlError::Conflict(_)) => false,
        Err(e) => return Err(e),
    };
    let account = op
        .account(DEMO_ACCOUNT)
        .await?
        .ok_or_else(|| CtlError::NotFound("the demo account vanished while seeding".into()))?;
    // Only credit an account we created: account 1 of a copied production
    // database is somebody else's.
    let grant = if account.name == DEMO_ACCOUNT_NAME {
        Some(
            op.grant(
                DEMO_ACCOUNT,
                &GrantRequest {
                    credits: DEMO_CREDITS,
                    reason: "demo credits (igny8ctl dev)".into(),
                    idempotency_key: DEMO_GRANT_KEY.into(),
                    actor: "operator:igny8ctl-dev".into(),
                },
            )
            .await?,
        )
    } else {
        None
    };
    let user_created = match op
        .create_user(
            Some(DEMO_USER),
            DEMO_EMAIL,
            "owner",
            Some(DEMO_ACCOUNT),
            true,
        )
        .await
    {
        Ok(_) => true,
        Err(CtlError::Conflict(_)) => false,
        Err(e) => return Err(e),
    };
    let user = op
        .user(DEMO_USER)
        .await?
        .ok_or_else(|| CtlError::NotFound("the demo user vanished while seeding".into()))?;
    let balance = op
        .account(DEMO_ACCOUNT)
        .await?
        .map_or(account.credits, |a| a.credits);
    Ok(Seeded {
        account_created,
        grant,
        account_name: account.name,
        balance,
        user_created,
        user,
    })
}

/// The configuration of one service under `dev`: the process environment
/// for everything else (log format, leeway, issuer, …), with the database,
/// address and secret chosen here, metrics off and migrations already done.
pub fn service_config(
    defaults: service_kit::Defaults,
    database_url: &str,
    listen_addr: SocketAddr,
    secret: &SigningSecret,
) -> Result<ServiceConfig, CtlError> {
    let addr = listen_addr.to_string();
    ServiceConfig::from_lookup(defaults, |key| match key {
        "DATABASE_URL" => Some(database_url.to_owned()),
        "IGNY8_LISTEN_ADDR" => Some(addr.clone()),
        "IGNY8_METRICS_ADDR" => Some("off".to_owned()),
        "IGNY8_RUN_MIGRATIONS" => Some("false".to_owned()),
        "IGNY8_JWT_SECRET" => Some(secret.expose().to_owned()),
        "IGNY8_JWT_PUBLIC_KEY_FILE" | "IGNY8_JWKS_FILE" => None,
        other => std::env::var(other).ok(),
    })
    .map_err(|e| CtlError::Invalid(e.to_string()))
}

/// Where a client should connect to reach `addr` (a wildcard bind is
/// reached on loopback).
pub fn connect_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        other => other.ip(),
    };
    SocketAddr::new(ip, addr.port())
}

fn bind_error(service: &str, flag: &str, e: StartError) -> CtlError {
    match e {
        StartError::Bind { addr, source } => CtlError::Serve(format!(
            "{service} cannot listen on {addr}: {source}. Is another `igny8ctl dev` (or the \
             service) already running? Stop it, or pick another address with {flag} 127.0.0.1:PORT"
        )),
        other => CtlError::Serve(format!("{service} failed to start: {other}")),
    }
}

fn print_secret_notice(secret: &SigningSecret) {
    match &secret.source {
        SecretSource::Env => {
            eprintln!("igny8ctl dev: signing and verifying tokens with IGNY8_JWT_SECRET");
        }
        SecretSource::DevFile { path, created } => {
            let bar = "!".repeat(78);
            eprintln!("{bar}");
            eprintln!("!! DEVELOPMENT SECRET — NOT FOR PRODUCTION");
            eprintln!(
                "!! Tokens are signed with a development secret {} {}",
                if *created {
                    "generated now and saved in"
                } else {
                    "read from"
                },
                path.display()
            );
            eprintln!("!! (mode 0600). Anyone with that file can mint tokens for any user.");
            eprintln!(
                "!! Real deployments set IGNY8_JWT_SECRET or a public key (IGNY8_JWT_PUBLIC_KEY_FILE)."
            );
            eprintln!("{bar}");
        }
    }
}

/// Shell-quotes `s` with single quotes.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The grpcurl calls `dev` prints, each complete on one line. Calls whose
/// answer can hold `false` or `0` pass `-emit-defaults`: grpcurl otherwise
/// leaves such fields out, and `{"module": "MODULE_WRITER"}` without
/// `enabled` reads like a broken response.
pub fn grpcurl_calls(token: &str, billing: SocketAddr, settings: SocketAddr) -> Vec<String> {
    let header = sq(&format!("authorization: Bearer {token}"));
    let billing_svc = igny8_proto::BILLING_SERVICE_NAME;
    let settings_svc = igny8_proto::SETTINGS_SERVICE_NAME;
    let deduct = format!(
        r#"{{"usage":{{"operation":"content","quantity":250}},"idempotency_key":"{DEMO_DEDUCT_KEY}","description":"first deduction from the README"}}"#
    );
    vec![
        format!("grpcurl -plaintext {billing} list"),
        format!("grpcurl -plaintext -emit-defaults -H {header} {billing} {billing_svc}/GetBalance"),
        format!(
            "grpcurl -plaintext -emit-defaults -H {header} -d {} {billing} {billing_svc}/GetCreditCost",
            sq(r#"{"operation":"content","quantity":250}"#)
        ),
        format!(
            "grpcurl -plaintext -emit-defaults -H {header} -d {} {billing} {billing_svc}/Deduct",
            sq(&deduct)
        ),
        format!(
            "grpcurl -plaintext -emit-defaults -H {header} -d {} {settings} {settings_svc}/CheckModule",
            sq(r#"{"module":"MODULE_WRITER"}"#)
        ),
    ]
}

/// The printed hold example: a Reserve whose hold id the shell keeps, then a
/// CaptureHold of what the work really used. Both lines run as printed, one
/// after the other, and again after a restart (the Reserve key replays the
/// same hold, and the same capture replays).
pub fn hold_example(token: &str, billing: SocketAddr) -> [String; 2] {
    let header = sq(&format!("authorization: Bearer {token}"));
    let billing_svc = igny8_proto::BILLING_SERVICE_NAME;
    let reserve = format!(
        r#"{{"usage":{{"operation":"content","quantity":4000}},"idempotency_key":"{DEMO_HOLD_KEY}","ttl":"600s"}}"#
    );
    [
        format!(
            "HOLD_ID=$(grpcurl -plaintext -H {header} -d {} {billing} {billing_svc}/Reserve | python3 -c {})",
            sq(&reserve),
            sq(r#"import json, sys; print(json.load(sys.stdin)["hold"]["id"])"#)
        ),
        format!(
            r#"grpcurl -plaintext -emit-defaults -H {header} -d "{{\"hold_id\":\"$HOLD_ID\",\"usage\":{{\"operation\":\"content\",\"quantity\":2500}}}}" {billing} {billing_svc}/CaptureHold"#
        ),
    ]
}

fn print_banner(
    options: &DevOptions,
    seeded: &Seeded,
    token: &str,
    billing: SocketAddr,
    settings: SocketAddr,
) {
    let ttl = tokens::format_ttl(options.token_ttl);
    println!();
    println!(
        "igny8ctl dev: billing and settings are serving on {}",
        igny8_db::redact_url(&options.database_url)
    );
    println!();
    println!(
        "  billing   listening on {billing}  ({})",
        igny8_proto::BILLING_SERVICE_NAME
    );
    println!(
        "  settings  listening on {settings}  ({})",
        igny8_proto::SETTINGS_SERVICE_NAME
    );
    println!();
    println!(
        "  demo account  {DEMO_ACCOUNT} {:?}, balance {} credits{}",
        seeded.account_name,
        seeded.balance,
        if seeded.account_created {
            " (created now)"
        } else {
            ""
        }
    );
    let u = &seeded.user;
    println!(
        "  demo user     {} <{}>, {} of account {}{}{}",
        u.id,
        u.email,
        u.role,
        u.account_id
            .map_or_else(|| "none".to_owned(), |a| a.to_string()),
        if u.is_active { "" } else { ", DEACTIVATED" },
        if seeded.user_created {
            " (created now)"
        } else {
            ""
        }
    );
    println!();
    println!("Bearer token for the demo user (valid {ttl}):");
    println!();
    println!("  export IGNY8_TOKEN={token}");
    println!();
    println!("(the README's examples read it from $IGNY8_TOKEN: paste the line above first)");
    println!();
    println!("Try it — each line works as printed:");
    println!();
    for call in grpcurl_calls(token, billing, settings) {
        println!("  {call}");
    }
    println!();
    println!(
        "Deduct uses idempotency key {DEMO_DEDUCT_KEY:?}: run it twice and the second answer is a replay."
    );
    println!();
    println!(
        "Hold credits before the work (40 for 4000 words), then capture what it used (25 for 2500):"
    );
    println!();
    for line in hold_example(token, billing) {
        println!("  {line}");
    }
    println!(
        "More tokens: cargo run -q -p igny8ctl -- token user --id {DEMO_USER}    (see cargo run -q -p igny8ctl -- --help)"
    );
    println!("Ctrl-C stops both services.");
    println!("ready: billing={billing} settings={settings}");
}

fn warn_if_demo_user_changed(seeded: &Seeded) {
    let u = &seeded.user;
    if seeded.grant.is_none() {
        eprintln!(
            "igny8ctl dev: warning: account {DEMO_ACCOUNT} exists as {:?}, not the demo account; it was not credited",
            seeded.account_name
        );
    }
    if u.account_id != Some(DEMO_ACCOUNT) || !u.is_active || u.role == "viewer" {
        eprintln!(
            "igny8ctl dev: warning: user {DEMO_USER} was changed since it was seeded (account {:?}, role {}, active {}); \
             the printed calls act as it is now and some may be refused",
            u.account_id, u.role, u.is_active
        );
    }
}

async fn wait_serving(addr: SocketAddr, service: &'static str) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1));
    let mut last = String::from("not reachable yet");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        match endpoint.connect().await {
            Ok(channel) => {
                match HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: service.to_owned(),
                    })
                    .await
                {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(r) => last = format!("health status {}", r.get_ref().status),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "{service} on {addr} did not report SERVING within {}s (last: {last}); see the log above",
        READY_TIMEOUT.as_secs()
    ))
}

/// Runs `dev` until Ctrl-C or SIGTERM.
pub async fn run(options: DevOptions) -> Result<(), CtlError> {
    let secret = tokens::dev_secret(&options.database_url)?;
    let billing_config = service_config(
        billing_svc::DEFAULTS,
        &options.database_url,
        options.billing_addr,
        &secret,
    )?;
    let settings_config = service_config(
        settings_svc::DEFAULTS,
        &options.database_url,
        options.settings_addr,
        &secret,
    )?;
    telemetry::init(billing_config.log_format);
    print_secret_notice(&secret);
    let audience = Audience {
        issuer: billing_config.jwt.issuer.clone(),
        audience: billing_config.jwt.audience.clone(),
    };
    let table = billing_svc::cost_table_from_env()
        .map_err(|e| CtlError::Invalid(format!("IGNY8_COST_TABLE_FILE: {e}")))?;

    // Migrate once, seed, and let go of the pool: the services open their own.
    let op = Operator::open(&options.database_url, true).await?;
    let seeded = seed_demo(&op).await?;
    op.close().await;
    warn_if_demo_user_changed(&seeded);
    let token = tokens::mint(
        &secret,
        &Subject::User {
            id: DEMO_USER,
            account_hint: Some(DEMO_ACCOUNT),
        },
        options.token_ttl,
        &audience,
    )?;

    // Settings first: billing checks modules with it (docs/api.md "Module-aware charging"), with a
    // service token it mints from the same development secret.
    let settings = settings_svc::build(settings_config)
        .await
        .map_err(|e| bind_error("settings", "--settings-addr", e))?;
    let settings_addr = connect_addr(settings.local_addr());
    let billing_options = billing_svc::BillingOptions {
        settings: Some(billing_svc::modules::SettingsOptions::new(format!(
            "http://{settings_addr}"
        ))),
        ..Default::default()
    };
    let billing = billing_svc::build_with(billing_config, table, billing_options)
        .await
        .map_err(|e| bind_error("billing", "--billing-addr", e))?;
    let billing_addr = connect_addr(billing.local_addr());

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let billing_task: JoinHandle<Result<(), StartError>> =
        tokio::spawn(billing.run_until_stopped(stopped(stop_rx.clone())));
    let settings_task: JoinHandle<Result<(), StartError>> =
        tokio::spawn(settings.run_until_stopped(stopped(stop_rx.clone())));
    let signals = tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            service_kit::shutdown_signal().await;
            eprintln!("igny8ctl dev: stopping both services (press Ctrl-C again to exit at once)");
            let _ = stop_tx.send(true);
            service_kit::shutdown_signal().await;
            eprintln!("igny8ctl dev: second interrupt: exiting without draining");
            std::process::exit(130);
        }
    });

    let ready = async {
        tokio::try_join!(
            wait_serving(billing_addr, igny8_proto::BILLING_SERVICE_NAME),
            wait_serving(settings_addr, igny8_proto::SETTINGS_SERVICE_NAME),
        )
    };
    let mut stopping = stop_rx.clone();
    let startup_error = tokio::select! {
        r = ready => r.err(),
        _ = stopping.wait_for(|stop| *stop) => None,
    };
    match &startup_error {
        None if !*stop_rx.borrow() => {
            print_banner(&options, &seeded, &token, billing_addr, settings_addr);
        }
        None => {}
        Some(e) => {
            eprintln!("igny8ctl dev: {e}");
            let _ = stop_tx.send(true);
        }
    }

    // Whichever finishes first (normally both, after the signal) stops the other.
    let (billing_result, settings_result) = {
        let billing_task = async {
            let r = billing_task.await;
            let _ = stop_tx.send(true);
            r
        };
        let settings_task = async {
            let r = settings_task.await;
            let _ = stop_tx.send(true);
            r
        };
        tokio::join!(billing_task, settings_task)
    };
    signals.abort();
    let mut errors = Vec::new();
    for (name, result) in [("billing", billing_result), ("settings", settings_result)] {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{name}: {e}")),
            Err(e) => errors.push(format!("{name} crashed: {e}")),
        }
    }
    if let Some(e) = startup_error {
        errors.insert(0, e);
    }
    if errors.is_empty() {
        eprintln!("igny8ctl dev: both services stopped cleanly");
        Ok(())
    } else {
        Err(CtlError::Serve(errors.join("; ")))
    }
}
