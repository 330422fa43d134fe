//! `igny8.settings.v1.SettingsService`.
//!
//! The account always comes from the [`AuthContext`]; `settings.account_id`
//! in a request is output-only and ignored.

use auth_interceptor::{AuthContext, Recheck};
use igny8_proto::settings::v1::{self as pb, Module, settings_service_server::SettingsService};
use service_kit::{
    StreamEnv,
    streams::{self, Read, WatchStream, Watched},
};
use tonic::{Request, Response, Status};

use crate::{
    error::SettingsError,
    modules::{self, FIELDS},
    store::{SettingsStore, Switches},
};

/// The settings service.
#[derive(Debug, Clone)]
pub struct Settings {
    store: SettingsStore,
    streams: StreamEnv,
}

impl Settings {
    /// A service over this store. Its streams never see a drain until
    /// [`Settings::with_streams`] gives them the server's.
    pub fn new(store: SettingsStore) -> Self {
        Self {
            store,
            streams: StreamEnv::detached(),
        }
    }

    /// Streams end when this server drains and re-check access this often.
    pub fn with_streams(mut self, streams: StreamEnv) -> Self {
        self.streams = streams;
        self
    }
}

/// One account's switches, as a `WatchModuleSettings` stream sees them.
struct WatchedSettings {
    store: SettingsStore,
    account: i64,
    last: Option<pb::ModuleSettings>,
}

impl Watched for WatchedSettings {
    type Message = pb::WatchModuleSettingsResponse;

    async fn read(&mut self) -> Result<Read<Self::Message>, Status> {
        let settings = to_proto(&*self.store.get_or_create(self.account).await?);
        // A wake-up without a visible change (a notification heard twice:
        // in-process and over LISTEN) sends nothing.
        if self.last.as_ref() == Some(&settings) {
            return Ok(Read {
                message: None,
                wake_at: None,
            });
        }
        self.last = Some(settings);
        Ok(Read {
            message: Some(pb::WatchModuleSettingsResponse {
                settings: Some(settings),
            }),
            wake_at: None,
        })
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

/// The API form of an account's switches.
pub fn to_proto(s: &Switches) -> pb::ModuleSettings {
    let [
        planner,
        writer,
        thinker,
        automation,
        site_builder,
        linker,
        optimizer,
        publisher,
    ] = s.enabled;
    pb::ModuleSettings {
        account_id: s.account_id,
        planner_enabled: planner,
        writer_enabled: writer,
        thinker_enabled: thinker,
        automation_enabled: automation,
        site_builder_enabled: site_builder,
        linker_enabled: linker,
        optimizer_enabled: optimizer,
        publisher_enabled: publisher,
        create_time: Some(timestamp(s.created_at)),
        update_time: Some(timestamp(s.updated_at)),
    }
}

fn requested(s: &pb::ModuleSettings) -> [bool; 8] {
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

/// Turns a field mask into per-switch changes (AIP-134):
/// named paths set those switches; `*` sets all eight; an empty mask sets
/// the switches that are `true` in `settings` (the populated fields).
pub fn changes(
    settings: Option<&pb::ModuleSettings>,
    mask: Option<&prost_types::FieldMask>,
) -> Result<[Option<bool>; 8], SettingsError> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    let mut out = [None; 8];
    if paths.is_empty() {
        if let Some(s) = settings {
            for (i, on) in requested(s).into_iter().enumerate() {
                out[i] = on.then_some(true);
            }
        }
        return Ok(out);
    }
    let updatable = || format!("updatable fields: {}", FIELDS.join(", "));
    let mut wildcard = false;
    let mut named = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "*" => wildcard = true,
            p => named.push(modules::field_index(p).ok_or_else(|| {
                SettingsError::field(
                    format!("update_mask.paths[{i}]"),
                    format!("unknown or read-only field {p:?}; {}", updatable()),
                )
            })?),
        }
    }
    if wildcard && !named.is_empty() {
        return Err(SettingsError::field(
            "update_mask.paths",
            "`*` cannot be combined with other paths",
        ));
    }
    let values = requested(settings.ok_or_else(|| {
        SettingsError::field("settings", "required when update_mask names fields")
    })?);
    if wildcard {
        named = (0..FIELDS.len()).collect();
    }
    for i in named {
        out[i] = Some(values[i]);
    }
    Ok(out)
}

/// The switches an update sets, for the log: `writer_enabled=false,
/// linker_enabled=true`, or `none` for an update that names nothing.
pub fn describe_changes(changes: &[Option<bool>; 8]) -> String {
    let named: Vec<String> = FIELDS
        .iter()
        .zip(changes)
        .filter_map(|(field, change)| change.map(|on| format!("{field}={on}")))
        .collect();
    if named.is_empty() {
        "none".to_owned()
    } else {
        named.join(", ")
    }
}

#[tonic::async_trait]
impl SettingsService for Settings {
    async fn get_module_settings(
        &self,
        request: Request<pb::GetModuleSettingsRequest>,
    ) -> Result<Response<pb::GetModuleSettingsResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let switches = self.store.get_or_create(account).await?;
        Ok(Response::new(pb::GetModuleSettingsResponse {
            settings: Some(to_proto(&switches)),
        }))
    }

    async fn check_module(
        &self,
        request: Request<pb::CheckModuleRequest>,
    ) -> Result<Response<pb::CheckModuleResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let raw = request.get_ref().module;
        let index = Module::try_from(raw)
            .ok()
            .and_then(modules::index)
            .ok_or_else(|| {
                SettingsError::field(
                    "module",
                    format!(
                        "must name a module (MODULE_PLANNER … MODULE_PUBLISHER), got {}",
                        Module::try_from(raw)
                            .map(|m| m.as_str_name().to_owned())
                            .unwrap_or_else(|_| raw.to_string())
                    ),
                )
            })?;
        let switches = self.store.cached(account).await?;
        Ok(Response::new(pb::CheckModuleResponse {
            module: raw,
            enabled: switches.enabled[index],
        }))
    }

    async fn update_module_settings(
        &self,
        request: Request<pb::UpdateModuleSettingsRequest>,
    ) -> Result<Response<pb::UpdateModuleSettingsResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let r = request.into_inner();
        let changes = changes(r.settings.as_ref(), r.update_mask.as_ref())?;
        let switches = if changes.iter().all(Option::is_none) {
            self.store.get_or_create(account).await?
        } else {
            self.store.update(account, changes).await?
        };
        tracing::info!(
            account,
            changed = %describe_changes(&changes),
            "module settings updated"
        );
        Ok(Response::new(pb::UpdateModuleSettingsResponse {
            settings: Some(to_proto(&switches)),
        }))
    }

    type WatchModuleSettingsStream = WatchStream<pb::WatchModuleSettingsResponse>;

    async fn watch_module_settings(
        &self,
        request: Request<pb::WatchModuleSettingsRequest>,
    ) -> Result<Response<Self::WatchModuleSettingsStream>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let recheck = Recheck::of(&request)?;
        // Subscribe before the first read: no change can fall in between.
        let subscription = self.store.changes().subscribe(account);
        let watched = WatchedSettings {
            store: self.store.clone(),
            account,
            last: None,
        };
        Ok(Response::new(streams::watch(
            self.streams.clone(),
            subscription,
            recheck,
            watched,
        )))
    }
}

#[cfg(test)]
mod tests {
    use prost_types::FieldMask;

    use super::*;

    fn mask(paths: &[&str]) -> Option<FieldMask> {
        Some(FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        })
    }

    #[test]
    fn the_log_names_the_changed_fields_and_their_values() {
        let mut c = [None; 8];
        assert_eq!(describe_changes(&c), "none");
        c[1] = Some(false);
        c[5] = Some(true);
        assert_eq!(
            describe_changes(&c),
            "writer_enabled=false, linker_enabled=true"
        );
    }

    #[test]
    fn masks() {
        let s = pb::ModuleSettings {
            writer_enabled: false,
            planner_enabled: true,
            ..Default::default()
        };
        let c = changes(Some(&s), mask(&["writer_enabled"]).as_ref()).unwrap();
        assert_eq!(c[1], Some(false));
        assert_eq!(c.iter().filter(|c| c.is_some()).count(), 1);

        let all = changes(Some(&s), mask(&["*"]).as_ref()).unwrap();
        assert!(all.iter().all(Option::is_some));

        let implied = changes(Some(&s), mask(&[]).as_ref()).unwrap();
        assert_eq!(implied[0], Some(true));
        assert_eq!(implied.iter().filter(|c| c.is_some()).count(), 1);

        for bad in [
            &["nope"][..],
            &["account_id"],
            &["*", "writer_enabled"],
            &["create_time"],
        ] {
            assert!(changes(Some(&s), mask(bad).as_ref()).is_err(), "{bad:?}");
        }
        assert!(changes(None, mask(&["writer_enabled"]).as_ref()).is_err());
    }
}
