//! Opaque, tamper-proof page tokens for `ListTransactions`.
//!
//! A token is `base64url(account ‖ last_id ‖ HMAC-SHA256(key, account ‖ last_id)[..16])`.
//! The MAC key is derived from `IGNY8_PAGE_TOKEN_KEY` (or, unset, the HS256
//! secret; never a public key: see `billing_svc::build`), so every replica
//! with the same configuration accepts the same tokens; a token is bound to
//! the account it was issued for.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const MAC_LEN: usize = 16;
const TOKEN_LEN: usize = 8 + 8 + MAC_LEN;

/// Issues and checks page tokens.
#[derive(Clone)]
pub struct PageTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(***)")
    }
}

impl PageTokens {
    /// Derives the MAC key from secret material.
    pub fn new(material: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"igny8 billing page tokens v1\0");
        h.update(material);
        Self {
            key: h.finalize().into(),
        }
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body);
        mac
    }

    /// A token continuing after `last_id` for `account`.
    pub fn issue(&self, account: i64, last_id: i64) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_LEN);
        bytes.extend_from_slice(&account.to_be_bytes());
        bytes.extend_from_slice(&last_id.to_be_bytes());
        let tag = self.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The `last_id` a token carries, if it is genuine and for `account`.
    pub fn open(&self, account: i64, token: &str) -> Option<i64> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        if bytes.len() != TOKEN_LEN {
            return None;
        }
        let (body, tag) = bytes.split_at(16);
        self.mac(body).verify_truncated_left(tag).ok()?;
        let issued_for = i64::from_be_bytes(body[..8].try_into().ok()?);
        let last_id = i64::from_be_bytes(body[8..].try_into().ok()?);
        (issued_for == account).then_some(last_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let t = PageTokens::new(b"k");
        let token = t.issue(7, 1234);
        assert_eq!(t.open(7, &token), Some(1234));
        assert_eq!(t.open(8, &token), None, "bound to its account");
        assert_eq!(
            PageTokens::new(b"other").open(7, &token),
            None,
            "bound to the key"
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[12] ^= 1;
        assert_eq!(t.open(7, &URL_SAFE_NO_PAD.encode(&bytes)), None, "tampered");
        assert_eq!(t.open(7, "not a token"), None);
        assert_eq!(t.open(7, ""), None);
    }
}
