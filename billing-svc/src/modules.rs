//! Module-aware charging (docs/api.md "Module-aware charging"): a `Deduct` or `Reserve` priced by
//! usage is refused when the operation's module is switched off for the
//! account.
//!
//! [`ModuleGate`] asks settings-svc `CheckModule` over gRPC — the generated
//! settings client and the auth crate's [`BearerInterceptor`], billing's own
//! service token, act-as the account — and caches each answer per
//! (account, module):
//!
//! - an answer is used without asking again for [`SettingsOptions::refresh_after`]
//!   (default 250 ms) after the question was sent;
//! - when settings cannot be asked, the last answer is still used until it is
//!   `refresh_after + serve_stale_for` old (default 500 ms in all); after
//!   that, or with no answer at all, the call fails closed with
//!   `SETTINGS_UNAVAILABLE`;
//! - so billing adds at most 500 ms to settings' own staleness (its
//!   `CheckModule` cache, ≤ 500 ms across replicas): a change made on any
//!   settings replica is honoured within 1 s, even across an outage;
//! - [`ModuleGate::invalidate`] drops an account's answers at once (for a
//!   change notification), and an answer asked before the invalidation is
//!   never served afterwards, even if its request was still in flight.
//!
//! The service token is read from `IGNY8_SETTINGS_TOKEN_FILE` (re-read when
//! the file changes, as a mounted Kubernetes secret does, and after settings
//! refused it) or, with no file and an HS256 secret, minted here:
//! `type` service, `sub` `billing-svc`, valid 5 minutes, renewed when less
//! than a minute is left.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use auth_interceptor::{BearerInterceptor, KeyConfig, VerifierConfig};
use igny8_proto::settings::v1::{
    CheckModuleRequest, Module, settings_service_client::SettingsServiceClient,
};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

use crate::{costs::CostTable, error::BillingError};

/// How long an answer is used before settings is asked again.
pub const DEFAULT_REFRESH_AFTER: Duration = Duration::from_millis(250);
/// How much longer an answer is used while settings cannot be asked.
pub const DEFAULT_SERVE_STALE_FOR: Duration = Duration::from_millis(250);
/// How long one `CheckModule` call may take (connecting included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Lifetime of a token billing mints for itself.
pub const MINTED_TOKEN_TTL: Duration = Duration::from_secs(300);
/// A minted token is renewed when less than this is left of it.
pub const MINTED_TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(60);
/// The `sub` of the service token billing mints.
pub const SERVICE_NAME: &str = "billing-svc";
/// Most cached answers (account × module) per replica.
const MAX_CACHED_ANSWERS: u64 = 100_000;

/// How billing reaches settings-svc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsOptions {
    /// `IGNY8_SETTINGS_URL`: `http://host:port` of settings-svc.
    pub url: String,
    /// `IGNY8_SETTINGS_TOKEN_FILE`: a file holding billing's service token;
    /// `None` = mint one with the HS256 secret.
    pub token_file: Option<PathBuf>,
    /// `IGNY8_SETTINGS_CACHE_MS`: an answer is used this long before asking again.
    pub refresh_after: Duration,
    /// `IGNY8_SETTINGS_STALE_MS`: an answer is used this much longer while
    /// settings cannot be asked.
    pub serve_stale_for: Duration,
    /// `IGNY8_SETTINGS_TIMEOUT_MS`: bound on one `CheckModule` call.
    pub timeout: Duration,
    /// For an `https://` URL: `IGNY8_SETTINGS_CA_FILE`, the CA settings'
    /// certificate chains to (PEM; required: the build trusts no public
    /// roots for internal calls).
    pub ca_file: Option<PathBuf>,
    /// For an `https://` URL to a settings-svc that requires client
    /// certificates: billing's certificate and key (PEM),
    /// `IGNY8_SETTINGS_CLIENT_CERT_FILE` / `IGNY8_SETTINGS_CLIENT_KEY_FILE`,
    /// defaulting to billing's own `IGNY8_TLS_CERT_FILE` / `IGNY8_TLS_KEY_FILE`.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl SettingsOptions {
    /// Settings at `url` with the default cache bounds and a minted token.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token_file: None,
            refresh_after: DEFAULT_REFRESH_AFTER,
            serve_stale_for: DEFAULT_SERVE_STALE_FOR,
            timeout: DEFAULT_TIMEOUT,
            ca_file: None,
            client_identity: None,
        }
    }

    /// Reads the `IGNY8_SETTINGS_*` variables through `lookup`; `Ok(None)`
    /// when `IGNY8_SETTINGS_URL` is unset or empty (module checks off).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let Some(url) = get("IGNY8_SETTINGS_URL") else {
            for name in [
                "IGNY8_SETTINGS_TOKEN_FILE",
                "IGNY8_SETTINGS_CACHE_MS",
                "IGNY8_SETTINGS_STALE_MS",
                "IGNY8_SETTINGS_TIMEOUT_MS",
                "IGNY8_SETTINGS_CA_FILE",
                "IGNY8_SETTINGS_CLIENT_CERT_FILE",
                "IGNY8_SETTINGS_CLIENT_KEY_FILE",
            ] {
                if get(name).is_some() {
                    return Err(format!(
                        "{name} is set but IGNY8_SETTINGS_URL is not; set IGNY8_SETTINGS_URL=http://settings-host:50052 to turn module checks on"
                    ));
                }
            }
            return Ok(None);
        };
        let millis =
            |name: &str, default: Duration, range: std::ops::RangeInclusive<u64>| match get(name) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(ms) if range.contains(&ms) => Ok(Duration::from_millis(ms)),
                    _ => Err(format!(
                        "{name}: expected milliseconds from {} to {}, got {v:?}",
                        range.start(),
                        range.end()
                    )),
                },
            };
        let options = Self {
            url: url.trim().to_owned(),
            token_file: get("IGNY8_SETTINGS_TOKEN_FILE").map(PathBuf::from),
            refresh_after: millis("IGNY8_SETTINGS_CACHE_MS", DEFAULT_REFRESH_AFTER, 1..=1000)?,
            serve_stale_for: millis(
                "IGNY8_SETTINGS_STALE_MS",
                DEFAULT_SERVE_STALE_FOR,
                0..=600_000,
            )?,
            timeout: millis("IGNY8_SETTINGS_TIMEOUT_MS", DEFAULT_TIMEOUT, 10..=60_000)?,
            ca_file: get("IGNY8_SETTINGS_CA_FILE").map(PathBuf::from),
            client_identity: match (
                get("IGNY8_SETTINGS_CLIENT_CERT_FILE").or_else(|| get("IGNY8_TLS_CERT_FILE")),
                get("IGNY8_SETTINGS_CLIENT_KEY_FILE").or_else(|| get("IGNY8_TLS_KEY_FILE")),
            ) {
                (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
                (None, None) => None,
                _ => {
                    return Err(
                        "IGNY8_SETTINGS_CLIENT_CERT_FILE and IGNY8_SETTINGS_CLIENT_KEY_FILE go together"
                            .to_owned(),
                    );
                }
            },
        };
        options.endpoint()?;
        Ok(Some(options))
    }

    fn endpoint(&self) -> Result<Endpoint, String> {
        let url = self.url.trim();
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(format!(
                "IGNY8_SETTINGS_URL must be an http:// or https:// URL, got {url:?}"
            ));
        }
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map(|e| {
                e.connect_timeout(self.timeout)
                    .timeout(self.timeout)
                    .tcp_nodelay(true)
            })
            .map_err(|e| format!("IGNY8_SETTINGS_URL {url:?} is not a valid URL: {e}"))?;
        if !https {
            return Ok(endpoint);
        }
        let read = |var: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("{var} {}: {e}", path.display()))
        };
        let ca = self.ca_file.as_ref().ok_or_else(|| {
            "IGNY8_SETTINGS_URL is https://: set IGNY8_SETTINGS_CA_FILE to the CA settings' certificate chains to".to_owned()
        })?;
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read("IGNY8_SETTINGS_CA_FILE", ca)?),
        );
        if let Some((cert, key)) = &self.client_identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("IGNY8_SETTINGS_CLIENT_CERT_FILE", cert)?,
                read("IGNY8_SETTINGS_CLIENT_KEY_FILE", key)?,
            ));
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| format!("IGNY8_SETTINGS_URL {url:?}: TLS settings refused: {e}"))
    }
}

/// The settings `Module` a cost-table module name stands for.
pub fn module_of(name: &str) -> Option<Module> {
    Some(match name {
        "planner" => Module::Planner,
        "writer" => Module::Writer,
        "thinker" => Module::Thinker,
        "automation" => Module::Automation,
        "site_builder" => Module::SiteBuilder,
        "linker" => Module::Linker,
        "optimizer" => Module::Optimizer,
        "publisher" => Module::Publisher,
        _ => return None,
    })
}

/// One answer from settings, stamped with when the question was sent.
#[derive(Debug, Clone, Copy)]
struct Answer {
    enabled: bool,
    asked_at: Instant,
}

/// Settings could not be asked (why is logged where it happened, never
/// returned to callers).
#[derive(Debug, Clone, Copy)]
struct Unreachable;

type Key = (i64, i32);

/// Asks settings-svc whether an operation's module is enabled for an
/// account, with a bounded-staleness cache. Cheap to clone.
#[derive(Clone)]
pub struct ModuleGate {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    channel: Channel,
    tokens: TokenSource,
    table: Arc<CostTable>,
    modules: HashMap<String, Module>,
    refresh_after: Duration,
    max_age: Duration,
    timeout: Duration,
    /// Answers younger than `refresh_after`; concurrent misses share one call.
    fresh: moka::future::Cache<Key, Answer>,
    /// The last answer per key, for use while settings cannot be asked.
    known: moka::future::Cache<Key, Answer>,
    /// When each account was last invalidated.
    invalidated: moka::future::Cache<i64, Instant>,
}

impl std::fmt::Debug for ModuleGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleGate")
            .field("url", &self.inner.url)
            .field("tokens", &self.inner.tokens)
            .field("refresh_after", &self.inner.refresh_after)
            .field("max_age", &self.inner.max_age)
            .finish_non_exhaustive()
    }
}

impl ModuleGate {
    /// A gate on settings at `options.url`, pricing modules with `table`.
    /// Fails when a module of the table is not a settings module, or when
    /// there is no way to get a token (no file, and `jwt` has no HS256
    /// secret). Connects lazily: settings need not be up yet.
    pub fn new(
        options: &SettingsOptions,
        jwt: &VerifierConfig,
        table: Arc<CostTable>,
    ) -> Result<Self, String> {
        let mut modules = HashMap::new();
        for row in table.rows() {
            let module = module_of(&row.module).ok_or_else(|| {
                format!(
                    "cost table: operation {} names module {:?}, which settings-svc does not know; \
                     with IGNY8_SETTINGS_URL set every module must be one of planner, writer, \
                     thinker, automation, site_builder, linker, optimizer, publisher",
                    row.operation, row.module
                )
            })?;
            modules.insert(row.module.clone(), module);
        }
        let tokens = match (&options.token_file, &jwt.keys) {
            (Some(path), _) => TokenSource::File(FileToken::open(path.clone())?),
            (None, KeyConfig::Hs256Secret(secret)) => TokenSource::Minted(MintedToken::new(
                secret.expose(),
                jwt.issuer.clone(),
                jwt.audience.clone(),
                MINTED_TOKEN_TTL,
                MINTED_TOKEN_RENEW_BEFORE,
            )),
            (None, _) => {
                return Err(
                    "IGNY8_SETTINGS_URL is set but billing has no token for settings-svc: \
                     set IGNY8_SETTINGS_TOKEN_FILE to a file holding a service token \
                     (billing verifies with a public key, so it cannot mint one)"
                        .to_owned(),
                );
            }
        };
        let channel = options.endpoint()?.connect_lazy();
        let max_age = options.refresh_after + options.serve_stale_for;
        let cache = |ttl| {
            moka::future::Cache::builder()
                .max_capacity(MAX_CACHED_ANSWERS)
                .time_to_live(ttl)
                .build()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                url: options.url.clone(),
                channel,
                tokens,
                table,
                modules,
                refresh_after: options.refresh_after,
                max_age,
                timeout: options.timeout,
                fresh: cache(options.refresh_after),
                known: cache(max_age),
                invalidated: moka::future::Cache::builder()
                    .max_capacity(MAX_CACHED_ANSWERS)
                    .time_to_live(max_age)
                    .build(),
            }),
        })
    }

    /// Refuses a usage charge of `operation` when its module is disabled for
    /// `account` ([`BillingError::ModuleDisabled`]), or when settings cannot
    /// tell and no recent answer is cached
    /// ([`BillingError::SettingsUnavailable`]). `operation` was priced with
    /// the same table, so it resolves.
    pub async fn check(&self, account: i64, operation: &str) -> Result<(), BillingError> {
        let Ok(row) = self.inner.table.resolve(operation) else {
            return Ok(());
        };
        let module = self.inner.modules[&row.module];
        if self.enabled(account, module, &row.module).await? {
            Ok(())
        } else {
            Err(BillingError::ModuleDisabled {
                module: row.module.clone(),
                operation: row.operation.clone(),
            })
        }
    }

    /// Drops every cached answer for `account` (all its modules): the next
    /// check asks settings. Answers to questions sent before this call are
    /// never served after it.
    pub async fn invalidate(&self, account: i64) {
        self.inner.invalidated.insert(account, Instant::now()).await;
        for module in ALL_MODULES {
            let key = (account, module as i32);
            self.inner.fresh.invalidate(&key).await;
            self.inner.known.invalidate(&key).await;
        }
    }

    /// Whether `module` is enabled for `account`.
    async fn enabled(
        &self,
        account: i64,
        module: Module,
        name: &str,
    ) -> Result<bool, BillingError> {
        let inner = &self.inner;
        let key = (account, module as i32);
        let invalidated = || inner.invalidated.get(&account);
        let usable = |a: &Answer, max_age: Duration, invalidated: Option<Instant>| {
            a.asked_at.elapsed() < max_age && invalidated.is_none_or(|at| a.asked_at > at)
        };
        if let Some(a) = inner.fresh.get(&key).await {
            if usable(&a, inner.refresh_after, invalidated().await) {
                return Ok(a.enabled);
            }
            inner.fresh.invalidate(&key).await;
        }
        let asked = inner
            .fresh
            .try_get_with(key, self.ask(account, module))
            .await;
        let asked = match asked {
            // Shared with a call that started before an invalidation: ask anew.
            Ok(a) if !usable(&a, inner.refresh_after, invalidated().await) => {
                self.ask(account, module).await
            }
            Ok(a) => Ok(a),
            Err(e) => Err(*e),
        };
        match asked {
            Ok(a) => {
                inner.known.insert(key, a).await;
                Ok(a.enabled)
            }
            Err(Unreachable) => match inner.known.get(&key).await {
                Some(a) if usable(&a, inner.max_age, invalidated().await) => {
                    tracing::debug!(
                        account,
                        module = name,
                        age_ms = a.asked_at.elapsed().as_millis() as u64,
                        "settings-svc unavailable: using the cached answer"
                    );
                    Ok(a.enabled)
                }
                _ => Err(BillingError::SettingsUnavailable {
                    module: name.to_owned(),
                }),
            },
        }
    }

    /// One `CheckModule` call, act-as `account`.
    async fn ask(&self, account: i64, module: Module) -> Result<Answer, Unreachable> {
        let inner = &self.inner;
        let fail = |why: String| {
            tracing::warn!(
                settings = %inner.url,
                account,
                module = module.as_str_name(),
                "cannot check the module with settings-svc: {why}"
            );
            Unreachable
        };
        let token = inner.tokens.current().map_err(fail)?;
        let interceptor = BearerInterceptor::new(token)
            .map_err(|_| fail("the service token is not valid ASCII".to_owned()))?
            .act_as(account);
        let mut client =
            SettingsServiceClient::with_interceptor(inner.channel.clone(), interceptor);
        let asked_at = Instant::now();
        let call = client.check_module(CheckModuleRequest {
            module: module as i32,
        });
        match tokio::time::timeout(inner.timeout, call).await {
            Err(_) => Err(fail(format!("no answer within {:?}", inner.timeout))),
            Ok(Ok(response)) => Ok(Answer {
                enabled: response.into_inner().enabled,
                asked_at,
            }),
            Ok(Err(status)) => {
                if status.code() == Code::Unauthenticated {
                    inner.tokens.refused();
                }
                Err(fail(format!(
                    "settings-svc answered {:?}: {}",
                    status.code(),
                    status.message()
                )))
            }
        }
    }
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

/// Where billing's service token for settings comes from.
#[derive(Debug)]
enum TokenSource {
    File(FileToken),
    Minted(MintedToken),
}

impl TokenSource {
    fn current(&self) -> Result<String, String> {
        match self {
            TokenSource::File(f) => f.current(),
            TokenSource::Minted(m) => m.current(),
        }
    }

    /// Settings refused the token: read the file again on the next call.
    fn refused(&self) {
        if let TokenSource::File(f) = self {
            f.state.lock().expect("token lock").stamp = None;
        }
    }
}

/// A token file, re-read whenever its modification time or size changes
/// (a Kubernetes secret mount swaps a symlink; the stat follows it).
struct FileToken {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    stamp: Option<(SystemTime, u64)>,
    token: String,
}

impl std::fmt::Debug for FileToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileToken {
    /// Reads the file once; an unreadable or empty file stops start-up.
    fn open(path: PathBuf) -> Result<Self, String> {
        let (stamp, token) = read_token(&path)?;
        Ok(Self {
            path,
            state: Mutex::new(FileState {
                stamp: Some(stamp),
                token,
            }),
        })
    }

    fn current(&self) -> Result<String, String> {
        let stamp = stamp_of(&self.path);
        let mut state = self.state.lock().expect("token lock");
        if stamp.is_err() || state.stamp != stamp.ok() {
            match read_token(&self.path) {
                Ok((stamp, token)) => {
                    if token != state.token {
                        tracing::info!(path = %self.path.display(), "settings token file changed: using the new token");
                    }
                    *state = FileState {
                        stamp: Some(stamp),
                        token,
                    };
                }
                // Mid-rotation or removed: keep the last good token.
                Err(e) => tracing::warn!("{e}; using the last token read"),
            }
        }
        Ok(state.token.clone())
    }
}

fn stamp_of(path: &std::path::Path) -> Result<(SystemTime, u64), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("IGNY8_SETTINGS_TOKEN_FILE {}: {e}", path.display()))?;
    Ok((meta.modified().unwrap_or(UNIX_EPOCH), meta.len()))
}

fn read_token(path: &std::path::Path) -> Result<((SystemTime, u64), String), String> {
    let stamp = stamp_of(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("IGNY8_SETTINGS_TOKEN_FILE {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "IGNY8_SETTINGS_TOKEN_FILE {} is empty; it must hold billing's service token (a JWT)",
            path.display()
        ));
    }
    Ok((stamp, token.to_owned()))
}

/// A service token billing signs itself with the HS256 secret.
struct MintedToken {
    key: jsonwebtoken::EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
    ttl: Duration,
    renew_before: Duration,
    state: Mutex<Option<(String, SystemTime)>>,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl MintedToken {
    fn new(
        secret: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        ttl: Duration,
        renew_before: Duration,
    ) -> Self {
        Self {
            key: jsonwebtoken::EncodingKey::from_secret(secret),
            issuer,
            audience,
            ttl,
            renew_before,
            state: Mutex::new(None),
        }
    }

    fn current(&self) -> Result<String, String> {
        let now = SystemTime::now();
        let mut state = self.state.lock().expect("token lock");
        if let Some((token, expires)) = &*state
            && expires
                .duration_since(now)
                .is_ok_and(|left| left > self.renew_before)
        {
            return Ok(token.clone());
        }
        let expires = now + self.ttl;
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut claims = serde_json::json!({
            "type": "service",
            "sub": SERVICE_NAME,
            "iat": secs(now),
            "exp": secs(expires),
        });
        if let Some(iss) = &self.issuer {
            claims["iss"] = iss.clone().into();
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = aud.clone().into();
        }
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &self.key,
        )
        .map_err(|e| format!("cannot sign the service token: {e}"))?;
        *state = Some((token.clone(), expires));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use auth_interceptor::{Principal, TokenVerifier};

    use super::*;

    const SECRET: &[u8] = b"modules-test-secret-0123456789abcdef";

    #[test]
    fn every_builtin_module_is_a_settings_module() {
        for row in CostTable::builtin().rows() {
            assert!(module_of(&row.module).is_some(), "{}", row.module);
        }
        assert_eq!(module_of("site_builder"), Some(Module::SiteBuilder));
        assert_eq!(module_of("Writer"), None);
    }

    #[test]
    fn minted_tokens_verify_as_billing_and_are_renewed_before_expiry() {
        let mut config = VerifierConfig::hs256(SECRET.to_vec());
        config.issuer = Some("igny8".into());
        config.audience = Some("igny8-internal".into());
        let verifier = TokenVerifier::new(&config).unwrap();
        let minted = MintedToken::new(
            SECRET,
            config.issuer.clone(),
            config.audience.clone(),
            Duration::from_secs(300),
            Duration::from_secs(60),
        );
        let first = minted.current().unwrap();
        assert_eq!(minted.current().unwrap(), first, "reused while fresh");
        let verified = verifier.verify(&first).unwrap();
        assert!(
            matches!(&verified.principal, Principal::Service { name } if name == SERVICE_NAME),
            "{:?}",
            verified.principal
        );
        // A token with less than `renew_before` left is replaced.
        let short = MintedToken::new(
            SECRET,
            None,
            None,
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let a = short.current().unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let b = short.current().unwrap();
        assert_ne!(a, b, "renewed");
    }

    #[test]
    fn options_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(SettingsOptions::from_lookup(env(&[])).unwrap(), None);
        let o = SettingsOptions::from_lookup(env(&[
            ("IGNY8_SETTINGS_URL", "http://settings:50052"),
            ("IGNY8_SETTINGS_CACHE_MS", "250"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(o.refresh_after, Duration::from_millis(250));
        assert_eq!(o.serve_stale_for, DEFAULT_SERVE_STALE_FOR);
        for bad in [
            &[("IGNY8_SETTINGS_TOKEN_FILE", "/x")][..],
            &[("IGNY8_SETTINGS_URL", "settings:50052")],
            &[("IGNY8_SETTINGS_URL", "https://settings:50052")],
            &[
                ("IGNY8_SETTINGS_URL", "http://settings:50052"),
                ("IGNY8_SETTINGS_CACHE_MS", "5000"),
            ],
        ] {
            assert!(SettingsOptions::from_lookup(env(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_token_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = FileToken::open(path.clone()).unwrap();
        assert_eq!(file.current().unwrap(), "first");
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert_eq!(file.current().unwrap(), "second-token");
        // Removed mid-rotation: the last good token stays.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.current().unwrap(), "second-token");
        std::fs::write(&path, "").unwrap();
        assert!(FileToken::open(path).is_err(), "an empty file is refused");
    }
}
