//! Signing secrets and token minting.
//!
//! The services verify HS256 tokens with `IGNY8_JWT_SECRET`. For development,
//! `igny8ctl dev` generates a random secret once and keeps it in a
//! `.igny8-dev-secret` file (mode 0600) next to the SQLite database, so
//! tokens stay valid across restarts and `igny8ctl token` can mint more.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde_json::{Value, json};

use crate::error::CtlError;

/// The development secret's file name.
pub const DEV_SECRET_FILE: &str = ".igny8-dev-secret";

/// Longest lifetime a minted token may have.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Where a signing secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `IGNY8_JWT_SECRET`.
    Env,
    /// The development secret file, and whether this call created it.
    DevFile {
        /// The file.
        path: PathBuf,
        /// True when the file was generated just now.
        created: bool,
    },
}

/// A signing secret; its `Debug` does not show the value.
#[derive(Clone)]
pub struct SigningSecret {
    value: String,
    /// Where it came from.
    pub source: SecretSource,
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecret")
            .field("value", &"***")
            .field("source", &self.source)
            .finish()
    }
}

impl SigningSecret {
    /// The secret as the services read it from `IGNY8_JWT_SECRET`.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// True for the generated development secret.
    pub fn is_development(&self) -> bool {
        matches!(self.source, SecretSource::DevFile { .. })
    }
}

/// The development secret file for a database: next to a SQLite file, in
/// the working directory otherwise.
pub fn dev_secret_path(database_url: &str) -> PathBuf {
    let dir = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or_default())
        .filter(|path| !path.is_empty() && !path.starts_with(":memory:"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(DEV_SECRET_FILE)
}

/// `IGNY8_JWT_SECRET` (non-empty), if set.
fn env_secret() -> Option<String> {
    std::env::var("IGNY8_JWT_SECRET")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// Refuses to mint when the services are configured for public keys: the
/// tokens they accept are signed by the issuer holding the private key.
fn reject_public_key_config() -> Result<(), CtlError> {
    for var in ["IGNY8_JWT_PUBLIC_KEY_FILE", "IGNY8_JWKS_FILE"] {
        if std::env::var(var).is_ok_and(|v| !v.trim().is_empty()) {
            return Err(CtlError::Secret(format!(
                "{var} is set: the services verify public-key (RS256/ES256/EdDSA) tokens, which only \
                 the issuer holding the private key can sign. igny8ctl signs HS256 tokens: unset \
                 {var} and set IGNY8_JWT_SECRET, or unset both to use the development secret"
            )));
        }
    }
    Ok(())
}

/// The secret to sign with when minting: `IGNY8_JWT_SECRET`, else an
/// existing development secret file. Never creates one.
pub fn signing_secret(database_url: &str) -> Result<SigningSecret, CtlError> {
    reject_public_key_config()?;
    if let Some(value) = env_secret() {
        return Ok(SigningSecret {
            value,
            source: SecretSource::Env,
        });
    }
    let path = dev_secret_path(database_url);
    match read_secret_file(&path)? {
        Some(value) => Ok(SigningSecret {
            value,
            source: SecretSource::DevFile {
                path,
                created: false,
            },
        }),
        None => Err(CtlError::Secret(format!(
            "no signing secret: set IGNY8_JWT_SECRET to the secret the services use, or run \
             `igny8ctl dev` once to generate the development secret ({} does not exist)",
            path.display()
        ))),
    }
}

/// The secret the dev launcher serves with: `IGNY8_JWT_SECRET`, else the
/// development secret file, generated on first use.
pub fn dev_secret(database_url: &str) -> Result<SigningSecret, CtlError> {
    reject_public_key_config()?;
    if let Some(value) = env_secret() {
        return Ok(SigningSecret {
            value,
            source: SecretSource::Env,
        });
    }
    let path = dev_secret_path(database_url);
    if let Some(value) = read_secret_file(&path)? {
        return Ok(SigningSecret {
            value,
            source: SecretSource::DevFile {
                path,
                created: false,
            },
        });
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let created = write_new_secret_file(&path, &value)?;
    if !created {
        // Another launcher created it between our read and our write.
        return dev_secret(database_url);
    }
    Ok(SigningSecret {
        value,
        source: SecretSource::DevFile {
            path,
            created: true,
        },
    })
}

fn read_secret_file(path: &Path) -> Result<Option<String>, CtlError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let value = text.trim().to_owned();
            if value.len() < 32 {
                return Err(CtlError::Secret(format!(
                    "the development secret file {} is empty or too short; delete it and run \
                     `igny8ctl dev` to generate a new one (tokens signed with the old one stop working)",
                    path.display()
                )));
            }
            Ok(Some(value))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CtlError::Secret(format!(
            "cannot read the development secret file {}: {e}",
            path.display()
        ))),
    }
}

/// Writes a new file readable by its owner only. False when it already
/// exists.
fn write_new_secret_file(path: &Path, value: &str) -> Result<bool, CtlError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => {
            return Err(CtlError::Secret(format!(
                "cannot create the development secret file {}: {e}",
                path.display()
            )));
        }
    };
    file.write_all(format!("{value}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            CtlError::Secret(format!(
                "cannot write the development secret file {}: {e}",
                path.display()
            ))
        })?;
    Ok(true)
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// An `access` token for a directory user.
    User {
        /// `user_id`.
        id: i64,
        /// `account_id`: a hint only; the services use the user's current account.
        account_hint: Option<i64>,
    },
    /// A `service` token.
    Service {
        /// `sub`: the service name.
        name: String,
    },
}

/// `iss` and `aud` to include: the services require them when
/// `IGNY8_JWT_ISSUER` / `IGNY8_JWT_AUDIENCE` are set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audience {
    /// `iss`.
    pub issuer: Option<String>,
    /// `aud`.
    pub audience: Option<String>,
}

impl Audience {
    /// From `IGNY8_JWT_ISSUER` and `IGNY8_JWT_AUDIENCE` (empty counts as unset).
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            issuer: get("IGNY8_JWT_ISSUER"),
            audience: get("IGNY8_JWT_AUDIENCE"),
        }
    }
}

/// Signs an HS256 token for `subject`, valid for `ttl` from now.
pub fn mint(
    secret: &SigningSecret,
    subject: &Subject,
    ttl: Duration,
    audience: &Audience,
) -> Result<String, CtlError> {
    let now = chrono::Utc::now().timestamp();
    let ttl = i64::try_from(ttl.min(MAX_TTL).as_secs()).unwrap_or(i64::MAX);
    let mut claims = match subject {
        Subject::User { id, account_hint } => {
            let mut c = json!({"type": "access", "user_id": id});
            if let Some(a) = account_hint {
                c["account_id"] = json!(a);
            }
            c
        }
        Subject::Service { name } => json!({"type": "service", "sub": name}),
    };
    claims["iat"] = json!(now);
    claims["exp"] = json!(now + ttl);
    if let Some(iss) = &audience.issuer {
        claims["iss"] = Value::String(iss.clone());
    }
    if let Some(aud) = &audience.audience {
        claims["aud"] = Value::String(aud.clone());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| CtlError::Secret(format!("cannot sign the token: {e}")))
}

/// Parses a lifetime such as `90s`, `15m`, `1h`, `30d` (a bare number is
/// seconds), from 1 second to 366 days.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let help = || format!("expected a duration such as 90s, 15m, 1h or 30d, got {text:?}");
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| help())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(help()),
    };
    let secs = n.checked_mul(scale).ok_or_else(help)?;
    let ttl = Duration::from_secs(secs);
    if secs == 0 || ttl > MAX_TTL {
        return Err(format!(
            "must be from 1s to 366d, got {text:?} (tokens are bearer credentials: keep them short-lived)"
        ));
    }
    Ok(ttl)
}

/// A human form of a lifetime: `30d`, `1h`, `90s`.
pub fn format_ttl(ttl: Duration) -> String {
    let s = ttl.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_sits_next_to_the_sqlite_file() {
        for (url, want) in [
            ("sqlite://igny8.db", "./.igny8-dev-secret"),
            ("sqlite:igny8.db", "./.igny8-dev-secret"),
            ("sqlite://data/igny8.db?mode=rwc", "data/.igny8-dev-secret"),
            (
                "sqlite:///var/lib/igny8/x.db",
                "/var/lib/igny8/.igny8-dev-secret",
            ),
            ("sqlite::memory:", "./.igny8-dev-secret"),
            ("postgres://u@h/db", "./.igny8-dev-secret"),
        ] {
            assert_eq!(dev_secret_path(url), PathBuf::from(want), "{url}");
        }
    }

    #[test]
    fn lifetimes_parse_with_units_and_bounds() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("30d").unwrap(), Duration::from_secs(30 * 86_400));
        for bad in [
            "",
            "0",
            "0h",
            "1y",
            "h",
            "-1h",
            "367d",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(format_ttl(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(format_ttl(Duration::from_secs(5400)), "90m");
    }

    #[test]
    fn minted_tokens_carry_the_contract_claims() {
        let secret = SigningSecret {
            value: "x".repeat(64),
            source: SecretSource::Env,
        };
        let audience = Audience {
            issuer: Some("igny8".into()),
            audience: None,
        };
        let token = mint(
            &secret,
            &Subject::User {
                id: 7,
                account_hint: Some(3),
            },
            Duration::from_secs(60),
            &audience,
        )
        .unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_issuer(&["igny8"]);
        let claims = jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.expose().as_bytes()),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["type"], "access");
        assert_eq!(claims["user_id"], 7);
        assert_eq!(claims["account_id"], 3);
        assert_eq!(claims["iss"], "igny8");
        let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(ttl, 60);
    }
}
