//! The text form of published Ed25519 public keys: one `key_id hex-key` per
//! line, `#` starts a comment. `meshctl audit keys` and `meshctl deletion
//! keys` print it; the audit verifier, facematch and `meshctl deletion
//! verify` read it.

/// One line of a key list.
pub fn line(key_id: &str, public_key: &[u8]) -> String {
    format!("{key_id} {}", hex::encode(public_key))
}

/// Parses a key list; names the line of the first malformed entry.
pub fn parse(text: &str) -> Result<Vec<(String, [u8; 32])>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(hex_key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected \"key_id public_key_hex\"", n + 1));
        };
        let key = hex::decode(hex_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| format!("line {}: the public key must be 64 hex characters", n + 1))?;
        out.push((id.to_owned(), key));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_bad_lines_are_named() {
        let text = format!("# keys\n{}\n\n{}  # second\n", line("a", &[1; 32]), line("b", &[2; 32]));
        assert_eq!(parse(&text), Ok(vec![("a".to_owned(), [1; 32]), ("b".to_owned(), [2; 32])]));
        assert!(parse("a 00").is_err_and(|e| e.starts_with("line 1")));
        assert!(parse("x\n").is_err());
        assert!(parse(&format!("{} extra", line("a", &[1; 32]))).is_err());
    }
}
