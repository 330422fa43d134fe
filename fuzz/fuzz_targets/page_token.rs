//! ListTransactions page tokens: any string is refused or opens to exactly
//! the token that would have been issued (no second encoding of a token).
#![no_main]

use billing_svc::page_token::PageTokens;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tokens = PageTokens::new(b"fuzz page-token key, 32 bytes long");
    let (account, rest) = match data.split_first() {
        Some((a, rest)) => (i64::from(*a), rest),
        None => (0, data),
    };
    let Ok(token) = std::str::from_utf8(rest) else {
        return;
    };
    if let Some(last_id) = tokens.open(account, token) {
        assert_eq!(tokens.issue(account, last_id), token, "non-canonical token accepted");
    }
    // Round trip for ids the bytes name.
    if rest.len() >= 8 {
        let id = i64::from_le_bytes(rest[..8].try_into().unwrap());
        let issued = tokens.issue(account, id);
        assert_eq!(tokens.open(account, &issued), Some(id));
        assert_eq!(tokens.open(account.wrapping_add(1), &issued), None);
    }
});
