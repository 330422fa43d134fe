//! Bounded echoes of caller input in error messages and details.

/// Longest piece of caller input (in characters) an error message repeats.
pub const MAX_ECHO_CHARS: usize = 64;

/// Caller input as an error message may repeat it: quoted and escaped
/// (`{:?}`), cut to [`MAX_ECHO_CHARS`] characters with an ellipsis and the
/// full length when longer. A 4 MB mask path comes back as about 100 bytes,
/// so no error outgrows what a default client accepts.
pub fn echo(input: &str) -> String {
    let mut chars = input.char_indices();
    match chars.nth(MAX_ECHO_CHARS) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes in all)", &input[..cut], input.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_long_input_is_cut() {
        assert_eq!(echo("writer"), "\"writer\"");
        assert_eq!(echo(&"é".repeat(64)), format!("{:?}", "é".repeat(64)));
        let long = "x".repeat(4 << 20);
        let e = echo(&long);
        assert!(e.len() < 120, "{e}");
        assert!(e.starts_with(&format!("\"{}\"…", "x".repeat(64))), "{e}");
        assert!(e.ends_with("(4194304 bytes in all)"), "{e}");
        assert_eq!(echo("a\0b"), "\"a\\0b\"");
    }
}
