//! Configuration from the environment (docs/api.md, "Configuration"). Every variable has a
//! default except the JWT key; anything malformed stops start-up with a
//! message naming the variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use auth_interceptor::{
    DEFAULT_CACHE_TTL, KeyConfig, MAX_CACHE_TTL, Secret, TokenVerifier, VerifierConfig,
};
use igny8_db::{DEFAULT_DATABASE_URL, PoolConfig};

use crate::limits::Limits;
use crate::tls::TlsFiles;
/// How often an open stream re-checks the caller's access by default.
pub const DEFAULT_STREAM_RECHECK: Duration = Duration::from_secs(30);

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// Per-service defaults.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `IGNY8_LISTEN_ADDR` when unset.
    pub listen_addr: &'static str,
    /// `IGNY8_METRICS_ADDR` when unset.
    pub metrics_addr: &'static str,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format `IGNY8_LOG_FORMAT` names (`text`, the default, or `json`).
    pub fn from_setting(value: Option<&str>) -> Result<Self, ConfigError> {
        match value {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(ConfigError(format!(
                "IGNY8_LOG_FORMAT must be `text` or `json`, got {other:?}"
            ))),
        }
    }
}

/// Everything a service needs to start.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// `DATABASE_URL` (default: a SQLite file in the working directory).
    pub database_url: String,
    /// `IGNY8_LISTEN_ADDR`.
    pub listen_addr: SocketAddr,
    /// `IGNY8_METRICS_ADDR`; `None` when set to `off`.
    pub metrics_addr: Option<SocketAddr>,
    /// True when `metrics_addr` is the per-service default rather than
    /// configured: if that port is taken (a second replica on one host), the
    /// server runs without metrics instead of refusing to start.
    pub metrics_addr_defaulted: bool,
    /// JWT verification (`IGNY8_JWT_*`).
    pub jwt: VerifierConfig,
    /// `IGNY8_RUN_MIGRATIONS` (default true).
    pub run_migrations: bool,
    /// `IGNY8_SHUTDOWN_TIMEOUT_SECS`: how long SIGTERM waits for in-flight calls.
    pub shutdown_timeout: Duration,
    /// `IGNY8_DB_MAX_CONNECTIONS` and friends.
    pub pool: PoolConfig,
    /// `IGNY8_DIRECTORY_CACHE_MS`: bounded staleness of directory reads.
    pub directory_cache_ttl: Duration,
    /// `IGNY8_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// `IGNY8_PAGE_TOKEN_KEY`: the MAC key of billing's page tokens (at
    /// least 32 bytes). Unset: derived from `IGNY8_JWT_SECRET` when that is
    /// the key, else random per process (see `docs/decisions.md`).
    pub page_token_key: Option<Secret<Vec<u8>>>,
    /// `IGNY8_TLS_CERT_FILE`, `IGNY8_TLS_KEY_FILE`, `IGNY8_TLS_CLIENT_CA_FILE`:
    /// gRPC over TLS (and mTLS) when set; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// `IGNY8_HEALTH_ADDR`: an extra plaintext listener serving only
    /// `grpc.health.v1.Health`, for probes that cannot speak TLS (the
    /// kubelet's gRPC probe); `None` (unset or `off`): health is served on
    /// the gRPC port only.
    pub health_addr: Option<SocketAddr>,
    /// Transport limits and fair sharing (`IGNY8_MAX_*`, time-outs, …).
    pub limits: Limits,
    /// `IGNY8_STREAM_RECHECK_SECS` (default 30, at most 60): how often an open
    /// stream re-checks the caller's access.
    pub stream_recheck: Duration,
}

impl ServiceConfig {
    /// Reads the process environment.
    pub fn from_env(defaults: Defaults) -> Result<Self, ConfigError> {
        Self::from_lookup(defaults, |k| std::env::var(k).ok())
    }

    /// Reads configuration through `lookup` (the environment, or a map in
    /// tests). Empty values count as unset.
    pub fn from_lookup(
        defaults: Defaults,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let database_url = get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        igny8_db::Backend::of_url(&database_url)
            .map_err(|e| ConfigError(format!("DATABASE_URL: {e}")))?;
        let listen_addr = parse_addr(
            "IGNY8_LISTEN_ADDR",
            get("IGNY8_LISTEN_ADDR"),
            defaults.listen_addr,
        )?;
        let metrics_addr_defaulted = get("IGNY8_METRICS_ADDR").is_none();
        let metrics_addr = match get("IGNY8_METRICS_ADDR").as_deref() {
            Some("off") => None,
            other => Some(parse_addr(
                "IGNY8_METRICS_ADDR",
                other.map(str::to_owned),
                defaults.metrics_addr,
            )?),
        };
        let key_variable = if get("IGNY8_JWT_PUBLIC_KEY_FILE").is_some() {
            "IGNY8_JWT_PUBLIC_KEY_FILE"
        } else if get("IGNY8_JWKS_FILE").is_some() {
            "IGNY8_JWKS_FILE"
        } else {
            "IGNY8_JWT_SECRET"
        };
        let keys = match (
            get("IGNY8_JWT_SECRET"),
            get("IGNY8_JWT_PUBLIC_KEY_FILE"),
            get("IGNY8_JWKS_FILE"),
        ) {
            (Some(secret), None, None) => KeyConfig::Hs256Secret(Secret::new(secret.into_bytes())),
            (None, Some(path), None) => {
                KeyConfig::pem_file(&PathBuf::from(path)).map_err(ConfigError)?
            }
            (None, None, Some(path)) => {
                KeyConfig::jwks_file(&PathBuf::from(path)).map_err(ConfigError)?
            }
            (None, None, None) => {
                return Err(ConfigError(
                    "no JWT key: set IGNY8_JWT_SECRET (HS256), IGNY8_JWT_PUBLIC_KEY_FILE (PEM) or IGNY8_JWKS_FILE".into(),
                ));
            }
            _ => {
                return Err(ConfigError(
                    "set only one of IGNY8_JWT_SECRET, IGNY8_JWT_PUBLIC_KEY_FILE, IGNY8_JWKS_FILE"
                        .into(),
                ));
            }
        };
        let jwt = VerifierConfig {
            keys,
            issuer: get("IGNY8_JWT_ISSUER"),
            audience: get("IGNY8_JWT_AUDIENCE"),
            leeway: Duration::from_secs(parse_num(
                "IGNY8_JWT_LEEWAY_SECS",
                get("IGNY8_JWT_LEEWAY_SECS"),
                30,
                0..=3600,
            )?),
        };
        // Key material is checked now (curve, private keys, JWKS key use),
        // so a key that could never verify a token stops start-up, named.
        TokenVerifier::new(&jwt).map_err(|e| ConfigError(format!("{key_variable}: {e}")))?;
        let log_format = LogFormat::from_setting(get("IGNY8_LOG_FORMAT").as_deref())?;
        Ok(Self {
            database_url,
            listen_addr,
            metrics_addr,
            metrics_addr_defaulted,
            jwt,
            run_migrations: parse_bool("IGNY8_RUN_MIGRATIONS", get("IGNY8_RUN_MIGRATIONS"), true)?,
            shutdown_timeout: Duration::from_secs(parse_num(
                "IGNY8_SHUTDOWN_TIMEOUT_SECS",
                get("IGNY8_SHUTDOWN_TIMEOUT_SECS"),
                20,
                0..=3600,
            )?),
            pool: PoolConfig {
                max_connections: parse_num(
                    "IGNY8_DB_MAX_CONNECTIONS",
                    get("IGNY8_DB_MAX_CONNECTIONS"),
                    16,
                    1..=1000,
                )? as u32,
                acquire_timeout: Duration::from_secs(parse_num(
                    "IGNY8_DB_ACQUIRE_TIMEOUT_SECS",
                    get("IGNY8_DB_ACQUIRE_TIMEOUT_SECS"),
                    5,
                    1..=600,
                )?),
                statement_timeout: Duration::from_millis(parse_num(
                    "IGNY8_DB_STATEMENT_TIMEOUT_MS",
                    get("IGNY8_DB_STATEMENT_TIMEOUT_MS"),
                    5000,
                    100..=3_600_000,
                )?),
                lock_timeout: Duration::from_millis(parse_num(
                    "IGNY8_DB_LOCK_TIMEOUT_MS",
                    get("IGNY8_DB_LOCK_TIMEOUT_MS"),
                    2000,
                    10..=3_600_000,
                )?),
            },
            directory_cache_ttl: match get("IGNY8_DIRECTORY_CACHE_MS") {
                None => DEFAULT_CACHE_TTL,
                v => Duration::from_millis(parse_num(
                    "IGNY8_DIRECTORY_CACHE_MS",
                    v,
                    0,
                    0..=MAX_CACHE_TTL.as_millis() as u64,
                )?),
            },
            log_format,
            otlp_endpoint: parse_otlp_endpoint(get("OTEL_EXPORTER_OTLP_ENDPOINT"))?,
            page_token_key: parse_page_token_key(lookup("IGNY8_PAGE_TOKEN_KEY"))?,
            tls: TlsFiles::from_vars(
                get(crate::tls::CERT_VAR),
                get(crate::tls::KEY_VAR),
                get(crate::tls::CLIENT_CA_VAR),
            )
            .map_err(ConfigError)?,
            health_addr: match get("IGNY8_HEALTH_ADDR").as_deref() {
                None | Some("off") => None,
                Some(value) => Some(parse_addr("IGNY8_HEALTH_ADDR", Some(value.to_owned()), "")?),
            },
            limits: parse_limits(&get)?,
            stream_recheck: Duration::from_secs(parse_num(
                "IGNY8_STREAM_RECHECK_SECS",
                get("IGNY8_STREAM_RECHECK_SECS"),
                DEFAULT_STREAM_RECHECK.as_secs(),
                1..=60,
            )?),
        })
    }
}

/// Shortest accepted `IGNY8_PAGE_TOKEN_KEY`, in bytes.
pub const MIN_PAGE_TOKEN_KEY_BYTES: usize = 32;

/// `IGNY8_PAGE_TOKEN_KEY`, taken as given (no trimming: it is key material).
/// Set but empty or short is refused: a weak key would go unnoticed.
fn parse_page_token_key(value: Option<String>) -> Result<Option<Secret<Vec<u8>>>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.len() < MIN_PAGE_TOKEN_KEY_BYTES {
        return Err(ConfigError(format!(
            "IGNY8_PAGE_TOKEN_KEY must be at least {MIN_PAGE_TOKEN_KEY_BYTES} bytes (it is {}); generate one with `openssl rand -base64 32`, or unset it",
            value.len()
        )));
    }
    Ok(Some(Secret::new(value.into_bytes())))
}

/// The transport limits (see [`Limits`] for the defaults).
fn parse_limits(get: &impl Fn(&str) -> Option<String>) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let num = |name: &str, default: u64, range| parse_num(name, get(name), default, range);
    let secs = |name: &str, default: Duration, range| {
        num(name, default.as_secs(), range).map(Duration::from_secs)
    };
    let principal_share_percent = match get("IGNY8_PRINCIPAL_SHARE_PERCENT").as_deref() {
        Some("off") => None,
        other => Some(parse_num(
            "IGNY8_PRINCIPAL_SHARE_PERCENT (or `off`)",
            other.map(str::to_owned),
            d.principal_share_percent.map_or(100, u64::from),
            1..=100,
        )? as u8),
    };
    Ok(Limits {
        max_concurrent_streams: num(
            "IGNY8_MAX_CONCURRENT_STREAMS",
            d.max_concurrent_streams.into(),
            1..=10_000,
        )? as u32,
        max_connections: num(
            "IGNY8_MAX_CONNECTIONS",
            d.max_connections as u64,
            1..=1_000_000,
        )? as usize,
        header_read_timeout: secs(
            "IGNY8_HEADER_READ_TIMEOUT_SECS",
            d.header_read_timeout,
            1..=600,
        )?,
        idle_timeout: secs("IGNY8_IDLE_TIMEOUT_SECS", d.idle_timeout, 1..=86_400)?,
        body_read_timeout: secs("IGNY8_BODY_READ_TIMEOUT_SECS", d.body_read_timeout, 1..=600)?,
        max_request_bytes: num(
            "IGNY8_MAX_REQUEST_BYTES",
            d.max_request_bytes as u64,
            1024..=4 * 1024 * 1024,
        )? as usize,
        keepalive_interval: secs("IGNY8_HTTP2_KEEPALIVE_SECS", d.keepalive_interval, 1..=3600)?,
        keepalive_timeout: secs(
            "IGNY8_HTTP2_KEEPALIVE_TIMEOUT_SECS",
            d.keepalive_timeout,
            1..=600,
        )?,
        max_in_flight: num("IGNY8_MAX_IN_FLIGHT", d.max_in_flight as u64, 1..=100_000)? as usize,
        principal_share_percent,
        aux_pool_size: num("IGNY8_DB_AUX_CONNECTIONS", d.aux_pool_size.into(), 1..=64)? as u32,
    })
}

/// The collector address for OTLP over gRPC: `http://` (plaintext) or
/// `https://` (TLS, the collector's certificate verified against the public
/// Mozilla roots). Anything else would fail on every export instead of at
/// start-up.
fn parse_otlp_endpoint(value: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.trim().to_owned();
    let uri: http::Uri = value.parse().map_err(|_| {
        ConfigError(format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT must be a URL such as http://otel-collector:4317, got {value:?}"
        ))
    })?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(Some(value)),
        _ => Err(ConfigError(format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http://host:port or https://host:port URL (OTLP/gRPC, usually port 4317), got {value:?}"
        ))),
    }
}

/// Parses a listen address: `IP:port`, `host:port` (resolved once, at
/// start-up, e.g. `localhost:50051`), or `:port` for every interface.
fn parse_addr(name: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_owned());
    let value = value.trim();
    let resolved = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}").parse().ok(),
        None => value.parse().ok().or_else(|| {
            std::net::ToSocketAddrs::to_socket_addrs(value)
                .ok()
                .and_then(|mut addrs| addrs.next())
        }),
    };
    resolved.ok_or_else(|| {
        ConfigError(format!(
            "{name} must be IP:port, host:port or :port (such as 0.0.0.0:50051), got {value:?}"
        ))
    })
}

fn parse_num(
    name: &str,
    value: Option<String>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            ConfigError(format!(
                "{name} must be a whole number from {} to {}, got {value:?}",
                range.start(),
                range.end()
            ))
        })
}

fn parse_bool(name: &str, value: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(_) => Err(ConfigError(format!(
            "{name} must be true or false, got {:?}",
            value.unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const D: Defaults = Defaults {
        listen_addr: "0.0.0.0:50051",
        metrics_addr: "0.0.0.0:9101",
    };

    fn load(pairs: &[(&str, &str)]) -> Result<ServiceConfig, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ServiceConfig::from_lookup(D, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_apply() {
        let c = load(&[("IGNY8_JWT_SECRET", "s")]).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.listen_addr.to_string(), "0.0.0.0:50051");
        assert_eq!(c.jwt.leeway, Duration::from_secs(30));
        assert!(c.run_migrations);
        assert_eq!(c.metrics_addr.unwrap().to_string(), "0.0.0.0:9101");
        assert_eq!(c.otlp_endpoint, None);
        assert!(c.page_token_key.is_none());
        assert_eq!(c.stream_recheck, DEFAULT_STREAM_RECHECK);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.pool.lock_timeout, Duration::from_secs(2));
        assert_eq!(c.pool.statement_timeout, Duration::from_secs(5));
    }

    #[test]
    fn limits_are_configurable() {
        let c = load(&[
            ("IGNY8_JWT_SECRET", "s"),
            ("IGNY8_MAX_CONCURRENT_STREAMS", "50"),
            ("IGNY8_PRINCIPAL_SHARE_PERCENT", "off"),
            ("IGNY8_IDLE_TIMEOUT_SECS", "7"),
            ("IGNY8_DB_LOCK_TIMEOUT_MS", "250"),
        ])
        .unwrap();
        assert_eq!(c.limits.max_concurrent_streams, 50);
        assert_eq!(c.limits.principal_share_percent, None);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.pool.lock_timeout, Duration::from_millis(250));
        let c = load(&[
            ("IGNY8_JWT_SECRET", "s"),
            ("IGNY8_PRINCIPAL_SHARE_PERCENT", "10"),
        ])
        .unwrap();
        assert_eq!(c.limits.principal_share_percent, Some(10));
    }

    #[test]
    fn unusable_key_material_stops_start_up_naming_the_variable() {
        let fixture = |name: &str| {
            format!(
                "{}/../tests/fixtures/keys/{name}",
                env!("CARGO_MANIFEST_DIR")
            )
        };
        for (name, needle) in [
            ("ec_p384_public.pem", "P-384"),
            ("rsa_private.pem", "private key"),
        ] {
            let err = load(&[("IGNY8_JWT_PUBLIC_KEY_FILE", &fixture(name))])
                .unwrap_err()
                .to_string();
            assert!(err.contains("IGNY8_JWT_PUBLIC_KEY_FILE"), "{err}");
            assert!(err.contains(needle), "{err}");
        }
        let ok = load(&[("IGNY8_JWT_PUBLIC_KEY_FILE", &fixture("ec_public.pem"))]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn page_token_key_is_long_enough_or_refused() {
        let key = "k".repeat(32);
        let c = load(&[("IGNY8_JWT_SECRET", "s"), ("IGNY8_PAGE_TOKEN_KEY", &key)]).unwrap();
        assert_eq!(c.page_token_key.unwrap().expose(), key.as_bytes());
        for short in ["", " ", "short"] {
            let err = load(&[("IGNY8_JWT_SECRET", "s"), ("IGNY8_PAGE_TOKEN_KEY", short)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("IGNY8_PAGE_TOKEN_KEY"), "{err}");
            assert!(!err.contains("short"), "the key never appears: {err}");
        }
    }

    #[test]
    fn observability_settings() {
        let c = load(&[
            ("IGNY8_JWT_SECRET", "s"),
            ("IGNY8_METRICS_ADDR", "off"),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://otel-collector.monitoring:4317",
            ),
            ("IGNY8_LOG_FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(c.metrics_addr, None);
        assert_eq!(
            c.otlp_endpoint.as_deref(),
            Some("http://otel-collector.monitoring:4317")
        );
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn listen_addresses_take_hosts_and_bare_ports() {
        for (value, want) in [
            ("127.0.0.1:7000", "127.0.0.1:7000"),
            (":7001", "0.0.0.0:7001"),
            ("localhost:7002", "127.0.0.1:7002"),
        ] {
            let c = load(&[("IGNY8_JWT_SECRET", "s"), ("IGNY8_LISTEN_ADDR", value)]).unwrap();
            assert!(
                c.listen_addr.port() == want.parse::<SocketAddr>().unwrap().port(),
                "{value}"
            );
            if value != "localhost:7002" {
                assert_eq!(c.listen_addr.to_string(), want);
            }
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (pairs, needle) in [
            (vec![], "IGNY8_JWT_SECRET"),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_JWKS_FILE", "/x")],
                "only one",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_LISTEN_ADDR", "nope")],
                "IGNY8_LISTEN_ADDR",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("DATABASE_URL", "mysql://x")],
                "DATABASE_URL",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_JWT_LEEWAY_SECS", "-1")],
                "IGNY8_JWT_LEEWAY_SECS",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("IGNY8_DIRECTORY_CACHE_MS", "1000"),
                ],
                "IGNY8_DIRECTORY_CACHE_MS",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("IGNY8_STREAM_RECHECK_SECS", "61"),
                ],
                "IGNY8_STREAM_RECHECK_SECS",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_RUN_MIGRATIONS", "maybe")],
                "IGNY8_RUN_MIGRATIONS",
            ),
            (
                vec![("IGNY8_JWT_PUBLIC_KEY_FILE", "/definitely/missing.pem")],
                "missing.pem",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317"),
                ],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_TLS_CERT_FILE", "/c.pem")],
                "IGNY8_TLS_KEY_FILE",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("IGNY8_TLS_CLIENT_CA_FILE", "/ca.pem"),
                ],
                "IGNY8_TLS_CLIENT_CA_FILE",
            ),
            (
                vec![
                    ("IGNY8_JWT_SECRET", "s"),
                    ("IGNY8_PRINCIPAL_SHARE_PERCENT", "0"),
                ],
                "IGNY8_PRINCIPAL_SHARE_PERCENT",
            ),
            (
                vec![("IGNY8_JWT_SECRET", "s"), ("IGNY8_MAX_IN_FLIGHT", "lots")],
                "IGNY8_MAX_IN_FLIGHT",
            ),
        ] {
            let err = load(&pairs).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
