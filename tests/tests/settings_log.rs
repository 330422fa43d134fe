//! The settings update log line names the switches that changed and their
//! new values (`changed=writer_enabled=false, linker_enabled=true`), read
//! from the real binary's log output.

use igny8_proto::settings::v1::{ModuleSettings, UpdateModuleSettingsRequest};
use igny8_tests::*;
use prost_types::FieldMask;

const A1: i64 = 1;
const ADMIN: i64 = 10;

async fn the_update_log_names_changed_fields_and_values(b: Backend) {
    let db = TestDb::new(b).await;
    db.account(A1).create().await;
    db.user(ADMIN).account(A1).role("admin").create().await;
    let log = tempfile::NamedTempFile::new().expect("log file");
    let server = Process::start_logging(
        "settings-svc",
        igny8_proto::SETTINGS_SERVICE_NAME,
        &db.url,
        &[("RUST_LOG", "info"), ("IGNY8_LOG_FORMAT", "json")],
        log.reopen().expect("reopen").into(),
    )
    .await;
    let mut client = Running::at(server.addr)
        .settings(&access_token(ADMIN, Some(A1)), None)
        .await;
    client
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(ModuleSettings {
                writer_enabled: false,
                linker_enabled: true,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["writer_enabled".into(), "linker_enabled".into()],
            }),
        })
        .await
        .expect("update");
    drop(server);
    let logs = std::fs::read_to_string(log.path()).expect("read log");
    let line = logs
        .lines()
        .find(|l| l.contains("module settings updated"))
        .unwrap_or_else(|| panic!("no update line in:\n{logs}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    let changed = json
        .get("changed")
        .or_else(|| json.pointer("/fields/changed"))
        .unwrap_or_else(|| panic!("no `changed` field in {line}"));
    assert_eq!(
        changed, "writer_enabled=false, linker_enabled=true",
        "{line}"
    );
    assert!(!line.contains("Some("), "{line}");
}

on_both_backends!(the_update_log_names_changed_fields_and_values);
