//! The `main` both service binaries share: `<bin>` serves, `<bin> migrate`
//! applies migrations and exits, `<bin> --help` explains configuration.

use std::{future::Future, process::ExitCode, time::Duration};

use crate::{
    config::{Defaults, ServiceConfig},
    telemetry,
};

const CONFIG_HELP: &str = "\
Configuration (environment):
  DATABASE_URL                  postgres://… or sqlite://… (default sqlite://igny8.db)
                                (PostgreSQL TLS: ?sslmode=verify-full&sslrootcert=/path/ca.pem)
  IGNY8_LISTEN_ADDR             gRPC address (default {listen})
  IGNY8_METRICS_ADDR            Prometheus /metrics address, or `off` (default {metrics})
  IGNY8_JWT_SECRET              HS256 shared secret            } exactly one
  IGNY8_JWT_PUBLIC_KEY_FILE     RS256/ES256/EdDSA PEM key file } of these
  IGNY8_JWKS_FILE               JWKS file (keys chosen by kid) } three
  IGNY8_JWT_ISSUER              required `iss` (unset: not checked)
  IGNY8_JWT_AUDIENCE            required `aud` (unset: not checked)
  IGNY8_JWT_LEEWAY_SECS         clock-skew leeway (default 30)
  IGNY8_RUN_MIGRATIONS          apply migrations at start-up (default true)
  IGNY8_SHUTDOWN_TIMEOUT_SECS   SIGTERM drain bound (default 20)
  IGNY8_DB_MAX_CONNECTIONS      pool size (default 16)
  IGNY8_DB_ACQUIRE_TIMEOUT_SECS wait for a pooled connection (default 5)
  IGNY8_DIRECTORY_CACHE_MS      directory cache staleness bound, ≤ 1000 (default 500)
  IGNY8_STREAM_RECHECK_SECS     Watch streams re-check access this often, 1–60 (default 30)
  IGNY8_LOG_FORMAT              text or json (default text)
  IGNY8_TLS_CERT_FILE           serve gRPC over TLS: certificate chain (PEM), re-read on change
  IGNY8_TLS_KEY_FILE            its private key (PEM); set both or neither (default plaintext)
  IGNY8_TLS_CLIENT_CA_FILE      require client certificates from these CAs (mTLS)
  IGNY8_HEALTH_ADDR             extra plaintext port serving only gRPC health, for probes
                                that cannot speak TLS (default off)
  OTEL_EXPORTER_OTLP_ENDPOINT   OTLP/gRPC collector, http(s)://host:4317 (unset: no trace export)
  RUST_LOG                      log filter (default info)";

/// How long exiting waits for tasks still on the runtime.
const RUNTIME_SHUTDOWN_BOUND: Duration = Duration::from_secs(1);

async fn migrate(config: &ServiceConfig) -> Result<(), String> {
    let db = igny8_db::Db::connect(&config.database_url, &config.pool)
        .await
        .map_err(|e| e.to_string())?;
    db.migrate().await.map_err(|e| e.to_string())?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Runs a service binary. `serve` receives the validated configuration and
/// serves until SIGTERM/SIGINT.
pub fn run<F, Fut>(name: &'static str, extra_help: &str, defaults: Defaults, serve: F) -> ExitCode
where
    F: FnOnce(ServiceConfig) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let migrate_only = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => false,
        ["migrate"] => true,
        ["-h" | "--help" | "help"] => {
            println!(
                "{name}: igny8 gRPC service\n\nUsage:\n  {name}            serve\n  {name} migrate    apply database migrations and exit\n\n{}\n{extra_help}",
                CONFIG_HELP
                    .replace("{listen}", defaults.listen_addr)
                    .replace("{metrics}", defaults.metrics_addr)
            );
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("{name}: unknown arguments {other:?}; try `{name} --help`");
            return ExitCode::from(2);
        }
    };
    let config = match ServiceConfig::from_env(defaults) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Inside the runtime: the OTLP exporter's channel lives on it.
        let telemetry = telemetry::install(&config, name).map_err(|e| e.to_string())?;
        let result = if migrate_only {
            migrate(&config).await
        } else {
            serve(config).await
        };
        // Last spans out before the runtime goes (bounded).
        telemetry.shutdown().await;
        result
    });
    // Calls abandoned by a timed-out drain may still be parked on the
    // runtime; do not wait for them.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_BOUND);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name}: {e}");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
