//! SettingsService end to end on both backends.

use std::time::Duration;

use igny8_proto::settings::v1::{
    CheckModuleRequest, GetModuleSettingsRequest, Module, ModuleSettings,
    UpdateModuleSettingsRequest,
};
use igny8_tests::*;
use prost_types::FieldMask;
use tonic::Code;
use tonic_types::StatusExt;

const A1: i64 = 1;
const A2: i64 = 2;
const ADMIN: i64 = 10;
const OTHER_ADMIN: i64 = 20;

async fn setup(b: Backend) -> (TestDb, Running) {
    let db = TestDb::new(b).await;
    db.account(A1).create().await;
    db.account(A2).create().await;
    db.user(ADMIN).account(A1).role("admin").create().await;
    db.user(OTHER_ADMIN)
        .account(A2)
        .role("admin")
        .create()
        .await;
    let server = spawn_settings(&db).await;
    (db, server)
}

fn update(settings: ModuleSettings, paths: &[&str]) -> UpdateModuleSettingsRequest {
    UpdateModuleSettingsRequest {
        settings: Some(settings),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    }
}

type Client = igny8_proto::settings::v1::settings_service_client::SettingsServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        auth_interceptor::BearerInterceptor,
    >,
>;

/// The switches after an update that must succeed.
async fn updated(c: &mut Client, settings: ModuleSettings, paths: &[&str]) -> ModuleSettings {
    c.update_module_settings(update(settings, paths))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap()
}

/// The account's current switches.
async fn current(c: &mut Client) -> ModuleSettings {
    c.get_module_settings(GetModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap()
}

/// Whether `module` is enabled, by CheckModule.
async fn enabled(c: &mut Client, module: Module) -> bool {
    c.check_module(CheckModuleRequest {
        module: module as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .enabled
}

fn flags(s: &ModuleSettings) -> [bool; 8] {
    [
        s.planner_enabled,
        s.writer_enabled,
        s.thinker_enabled,
        s.automation_enabled,
        s.site_builder_enabled,
        s.linker_enabled,
        s.optimizer_enabled,
        s.publisher_enabled,
    ]
}

const ALL_MODULES: [Module; 8] = [
    Module::Planner,
    Module::Writer,
    Module::Thinker,
    Module::Automation,
    Module::SiteBuilder,
    Module::Linker,
    Module::Optimizer,
    Module::Publisher,
];

async fn first_read_creates_all_enabled(b: Backend) {
    let (db, server) = setup(b).await;
    assert_eq!(db.settings_rows(A1).await, 0);
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    let r = c
        .get_module_settings(GetModuleSettingsRequest {})
        .await
        .unwrap();
    assert_eq!(r.metadata().get("x-igny8-account-id").unwrap(), "1");
    let s = r.into_inner().settings.unwrap();
    assert_eq!(s.account_id, A1);
    assert_eq!(flags(&s), [true; 8]);
    assert!(s.create_time.is_some() && s.update_time.is_some());
    assert_eq!(db.settings_rows(A1).await, 1);
    let again = current(&mut c).await;
    assert_eq!(again.create_time, s.create_time);
    for m in ALL_MODULES {
        let r = c
            .check_module(CheckModuleRequest { module: m as i32 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.module, r.enabled), (m as i32, true), "{m:?}");
    }
}

async fn concurrent_first_reads_create_one_row(b: Backend) {
    let (db, server) = setup(b).await;
    let token = access_token(ADMIN, None);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = server.settings(&token, None).await;
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.get_module_settings(GetModuleSettingsRequest {})
                    .await
                    .map(|r| r.into_inner().settings.unwrap().writer_enabled)
            } else {
                c.check_module(CheckModuleRequest {
                    module: Module::Writer as i32,
                })
                .await
                .map(|r| r.into_inner().enabled)
            }
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().expect("no first read fails"));
    }
    assert_eq!(db.settings_rows(A1).await, 1);
}

async fn check_module_fails_closed(b: Backend) {
    let (_db, server) = setup(b).await;
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    for module in [Module::Unspecified as i32, 9, 42, -1] {
        let err = c
            .check_module(CheckModuleRequest { module })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "module {module}");
        assert_eq!(
            err.get_details_bad_request().unwrap().field_violations[0].field,
            "module"
        );
    }
}

async fn field_mask_updates(b: Backend) {
    let (db, server) = setup(b).await;
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    let before = current(&mut c).await;

    // Only the masked field changes, whatever else the message says.
    let s = ModuleSettings {
        writer_enabled: false,
        planner_enabled: false,
        account_id: A2,
        ..Default::default()
    };
    let r = updated(&mut c, s, &["writer_enabled"]).await;
    assert_eq!(flags(&r), [true, false, true, true, true, true, true, true]);
    assert_eq!(r.account_id, A1, "the account never comes from the body");
    assert_eq!(r.create_time, before.create_time);
    // The next CheckModule on this replica sees it immediately.
    let w = c
        .check_module(CheckModuleRequest {
            module: Module::Writer as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!w.enabled);

    // Several paths at once.
    let s = ModuleSettings {
        linker_enabled: false,
        publisher_enabled: false,
        ..Default::default()
    };
    let r = updated(&mut c, s, &["linker_enabled", "publisher_enabled"]).await;
    assert_eq!(
        flags(&r),
        [true, false, true, true, true, false, true, false]
    );

    // An empty mask updates the populated (true) fields only: AIP-134.
    let s = ModuleSettings {
        writer_enabled: true,
        optimizer_enabled: false,
        ..Default::default()
    };
    let r = updated(&mut c, s, &[]).await;
    assert_eq!(
        flags(&r),
        [true, true, true, true, true, false, true, false]
    );
    let r = c
        .update_module_settings(UpdateModuleSettingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(
        flags(&r),
        [true, true, true, true, true, false, true, false],
        "nothing to change"
    );

    // `*` replaces every switch.
    let s = ModuleSettings {
        thinker_enabled: true,
        ..Default::default()
    };
    let r = updated(&mut c, s, &["*"]).await;
    assert_eq!(
        flags(&r),
        [false, false, true, false, false, false, false, false]
    );

    // Bad paths change nothing.
    for paths in [
        &["nope"][..],
        &["writer_enabled", "bogus"],
        &["account_id"],
        &["create_time"],
        &["*", "writer_enabled"],
    ] {
        let s = ModuleSettings {
            writer_enabled: true,
            ..Default::default()
        };
        let err = c
            .update_module_settings(update(s, paths))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{paths:?}");
        assert!(err.get_details_bad_request().is_some(), "{paths:?}");
    }
    let err = c
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: None,
            update_mask: Some(FieldMask {
                paths: vec!["writer_enabled".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let now = current(&mut c).await;
    assert_eq!(
        flags(&now),
        [false, false, true, false, false, false, false, false]
    );
    assert_eq!(db.settings_rows(A1).await, 1);
}

async fn update_creates_the_row_when_missing(b: Backend) {
    let (db, server) = setup(b).await;
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    let r = updated(
        &mut c,
        ModuleSettings {
            automation_enabled: false,
            ..Default::default()
        },
        &["automation_enabled"],
    )
    .await;
    assert_eq!(flags(&r), [true, true, true, false, true, true, true, true]);
    assert_eq!(db.settings_rows(A1).await, 1);
}

async fn tenants_are_isolated(b: Backend) {
    let (_db, server) = setup(b).await;
    let mut one = server.settings(&access_token(ADMIN, None), None).await;
    let mut two = server
        .settings(&access_token(OTHER_ADMIN, None), None)
        .await;
    one.update_module_settings(update(ModuleSettings::default(), &["planner_enabled"]))
        .await
        .unwrap();
    let theirs = current(&mut two).await;
    assert_eq!(theirs.account_id, A2);
    assert!(theirs.planner_enabled);
    assert!(enabled(&mut two, Module::Planner).await);
    assert!(!enabled(&mut one, Module::Planner).await);
}

async fn other_replicas_see_updates_within_a_second(b: Backend) {
    let (db, replica1) = setup(b).await;
    let replica2 = spawn_settings(&db).await;
    let token = access_token(ADMIN, None);
    let mut c1 = replica1.settings(&token, None).await;
    let mut c2 = replica2.settings(&token, None).await;
    let check = CheckModuleRequest {
        module: Module::Optimizer as i32,
    };
    assert!(c2.check_module(check).await.unwrap().into_inner().enabled);
    c1.update_module_settings(update(ModuleSettings::default(), &["optimizer_enabled"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!c2.check_module(check).await.unwrap().into_inner().enabled);
}

async fn roles_for_updates(b: Backend) {
    let (db, server) = setup(b).await;
    db.user(11).account(A1).role("viewer").create().await;
    db.user(12).account(A1).role("editor").create().await;
    db.user(13).account(A1).role("owner").create().await;
    db.user(14).account(A2).role("developer").create().await;
    let req = || update(ModuleSettings::default(), &["thinker_enabled"]);
    for (token, act_as, allowed) in [
        (access_token(11, None), None, false),
        (access_token(12, None), None, false),
        (access_token(13, None), None, true),
        (access_token(ADMIN, None), None, true),
        (access_token(14, None), Some(A1), true),
        (service_token("automation"), Some(A1), true),
    ] {
        let mut c = server.settings(&token, act_as).await;
        let r = c.update_module_settings(req()).await;
        assert_eq!(r.is_ok(), allowed, "{r:?}");
        if let Err(e) = r {
            assert_eq!(e.code(), Code::PermissionDenied);
        }
        // Everyone may read.
        c.get_module_settings(GetModuleSettingsRequest {})
            .await
            .unwrap();
        c.check_module(CheckModuleRequest {
            module: Module::Thinker as i32,
        })
        .await
        .unwrap();
    }
    let mut svc = server.settings(&service_token("automation"), None).await;
    assert_eq!(
        svc.check_module(CheckModuleRequest {
            module: Module::Writer as i32
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
}

async fn suspended_accounts_read_but_do_not_update(b: Backend) {
    let (db, server) = setup(b).await;
    db.set_account_status(A1, "suspended").await;
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    c.get_module_settings(GetModuleSettingsRequest {})
        .await
        .unwrap();
    c.check_module(CheckModuleRequest {
        module: Module::Writer as i32,
    })
    .await
    .unwrap();
    let err = c
        .update_module_settings(update(ModuleSettings::default(), &["writer_enabled"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "ACCOUNT_SUSPENDED"
    );
}

on_both_backends!(
    first_read_creates_all_enabled,
    concurrent_first_reads_create_one_row,
    check_module_fails_closed,
    field_mask_updates,
    update_creates_the_row_when_missing,
    tenants_are_isolated,
    other_replicas_see_updates_within_a_second,
    roles_for_updates,
    suspended_accounts_read_but_do_not_update,
);
