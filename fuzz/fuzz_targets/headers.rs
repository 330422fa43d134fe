//! The authorization and act-as metadata, parsed alone and through the whole
//! authenticator (verify, resolve against a small directory, authorize).
//! Never panics; refusals carry the contract's codes and bounded messages.
#![no_main]

use std::sync::{Arc, LazyLock};

use auth_interceptor::{
    AccountRecord, AccountStatus, AuthMetrics, Authenticator, Directory, DirectoryError,
    TokenVerifier, UserRecord, VerifierConfig, headers,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tonic::Code;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123456789";

/// Users 1..=5 with every role, accounts 1..=3 (3 suspended).
struct Fixed;

#[tonic::async_trait]
impl Directory for Fixed {
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
        let roles = ["owner", "admin", "editor", "viewer", "developer"];
        Ok((1..=5).contains(&id).then(|| UserRecord {
            id,
            account_id: Some(id % 3 + 1),
            role: roles[(id - 1) as usize].to_owned(),
            is_active: id != 4,
        }))
    }
    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
        Ok((1..=3).contains(&id).then_some(AccountRecord {
            id,
            status: if id == 3 {
                AccountStatus::Suspended
            } else {
                AccountStatus::Active
            },
        }))
    }
}

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    Authenticator::new(
        TokenVerifier::new(&VerifierConfig::hs256(SECRET)).expect("verifier"),
        Arc::new(Fixed),
        AuthMetrics::default(),
    )
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

const NAMES: [&str; 4] = ["authorization", headers::ACT_AS, "x-igny8-account-id", "te"];
const PATHS: [&str; 4] = [
    "/igny8.billing.v1.BillingService/Deduct",
    "/igny8.billing.v1.BillingService/Grant",
    "/igny8.settings.v1.SettingsService/GetModuleSettings",
    "/igny8.billing.v1.BillingService/Nope",
];

fuzz_target!(|data: &[u8]| {
    // Entries separated by 0xFF: first byte picks the name, the rest is the value.
    let mut map = HeaderMap::new();
    let mut path = PATHS[0];
    for (i, entry) in data.split(|b| *b == 0xff).enumerate() {
        let Some((pick, value)) = entry.split_first() else {
            continue;
        };
        if i == 0 {
            path = PATHS[usize::from(*pick) % PATHS.len()];
        }
        let name = HeaderName::from_static(NAMES[usize::from(*pick) % NAMES.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.append(name, value);
        }
    }
    if let Ok(token) = headers::bearer(&map) {
        assert!(!token.is_empty());
        assert_eq!(token.expose(), token.expose().trim());
        assert_eq!(map.get_all("authorization").iter().count(), 1);
    }
    if let Ok(Some(account)) = headers::act_as(&map) {
        assert!(account > 0);
    }
    match RUNTIME.block_on(AUTH.authenticate(path, &map)) {
        Ok(ctx) => assert!(ctx.account_id.is_none_or(|a| a > 0)),
        Err(e) => {
            let status = tonic::Status::from(e);
            assert!(
                matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::InvalidArgument
                        | Code::Unimplemented
                ),
                "{status:?}"
            );
            assert!(status.message().len() < 512, "{}", status.message());
        }
    }
});
