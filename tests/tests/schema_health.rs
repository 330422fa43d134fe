//! Health tells the truth about the schema: with `IGNY8_RUN_MIGRATIONS=false`
//! (as the Kubernetes Deployments run) readiness stays NOT_SERVING until the
//! database has every migration the binary embeds, and says which are
//! missing — in the log and in `igny8_db_migrations_missing`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use igny8_db::on_pool;
use igny8_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;

const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

/// The migration files this build embeds for `backend`.
fn embedded_migrations(backend: Backend) -> usize {
    let dir = match backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    };
    std::fs::read_dir(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../db/migrations").to_owned() + "/" + dir,
    )
    .expect("migrations directory")
    .filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sql"))
    })
    .count()
}

async fn missing_metric(addr: std::net::SocketAddr) -> Option<f64> {
    let (status, body) = scrape(addr).await;
    assert_eq!(status, 200);
    metric_value(&body, "igny8_db_migrations_missing")
}

async fn readiness_waits_for_every_embedded_migration(backend: Backend) {
    let db = TestDb::empty(backend).await;
    let mut config = test_config(&db.url);
    assert!(!config.run_migrations);
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let (server, metrics) = start_billing_unready(config).await;
    let metrics = metrics.expect("metrics on");

    // An empty database: every migration is missing, and it says so.
    let all = embedded_migrations(backend) as f64;
    assert!(all >= 3.0);
    eventually(
        Duration::from_secs(10),
        "every migration counted missing",
        || async { missing_metric(metrics).await == Some(all) },
    )
    .await;
    for service in ["", BILLING] {
        assert_eq!(server.health(service).await, ServingStatus::NotServing);
    }
    // It does not apply them itself.
    let tables: i64 = match &db.db {
        igny8_db::Db::Postgres(pool) => sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'credit_ledger'",
        )
        .fetch_one(pool)
        .await
        .expect("catalog"),
        igny8_db::Db::Sqlite(pool) => sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'credit_ledger'",
        )
        .fetch_one(pool)
        .await
        .expect("catalog"),
    };
    assert_eq!(tables, 0, "IGNY8_RUN_MIGRATIONS=false must not migrate");

    // The migrate Job runs: the server becomes ready by itself.
    db.db.migrate().await.expect("migrate");
    eventually(Duration::from_secs(10), "SERVING once migrated", || async {
        server.health(BILLING).await == ServingStatus::Serving
    })
    .await;
    assert_eq!(missing_metric(metrics).await, Some(0.0));

    // A migration applied from a different file than this binary embeds
    // is not the schema it expects.
    on_pool!(&db.db, pool => sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 1")
        .bind(vec![0u8; 4])
        .execute(pool)
        .await
        .map(|_| ()))
    .expect("tamper with the checksum");
    eventually(
        Duration::from_secs(10),
        "NOT_SERVING with a changed migration",
        || async {
            server.health(BILLING).await == ServingStatus::NotServing
                && missing_metric(metrics).await == Some(1.0)
        },
    )
    .await;
    server.stop().await.expect("clean stop");

    // The binary names what is missing in its log.
    let empty = TestDb::empty(backend).await;
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log_path = log_dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(workspace_binary("billing-svc"))
        .env_clear()
        .env("DATABASE_URL", &empty.url)
        .env("IGNY8_JWT_SECRET", SECRET)
        .env("IGNY8_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("IGNY8_METRICS_ADDR", "off")
        .env("IGNY8_RUN_MIGRATIONS", "false")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start billing-svc");
    let mut text = String::new();
    for _ in 0..200 {
        text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("0001_directory (not applied)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("0001_directory (not applied)")
            && text.contains("0002_credit_ledger (not applied)")
            && text.contains("IGNY8_RUN_MIGRATIONS=false"),
        "the log must name the missing migrations:\n{text}"
    );
}

on_both_backends!(readiness_waits_for_every_embedded_migration);
