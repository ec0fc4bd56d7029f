//! Rotating QR codes: TOTP (RFC 6238) over HMAC-SHA1 with 8 digits, which
//! the resident app derives from the credential's secret. The mesh accepts a
//! code for the current step or `window` steps either side, and each step at
//! most once per credential (replay protection lives with the caller, which
//! records the last accepted step).

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Digits of a code.
pub const DIGITS: u32 = 8;

/// The HOTP value (RFC 4226) for `counter`.
pub fn hotp(secret: &[u8], counter: u64) -> Option<u32> {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).ok()?;
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[19] & 0x0f);
    let bin = (u32::from(digest[offset]) & 0x7f) << 24
        | u32::from(digest[offset + 1]) << 16
        | u32::from(digest[offset + 2]) << 8
        | u32::from(digest[offset + 3]);
    Some(bin % 10u32.pow(DIGITS))
}

/// The code for time `unix` with `step` seconds, zero-padded.
pub fn code_at(secret: &[u8], unix: u64, step: u64) -> Option<String> {
    hotp(secret, unix / step.max(1)).map(|c| format!("{c:0width$}", width = DIGITS as usize))
}

/// The step whose code equals `code` within `window` steps of `unix`, if any.
pub fn matching_step(secret: &[u8], code: &str, unix: u64, step: u64, window: u64) -> Option<u64> {
    let now = unix / step.max(1);
    let first = now.saturating_sub(window);
    (first..=now + window).find(|s| hotp(secret, *s).is_some_and(|c| format!("{c:0w$}", w = DIGITS as usize) == code))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1 seed, 8 digits.
    #[test]
    fn rfc_6238_vectors() {
        let seed = b"12345678901234567890";
        for (t, want) in
            [(59u64, "94287082"), (1_111_111_109, "07081804"), (1_234_567_890, "89005924"), (2_000_000_000, "69279037")]
        {
            assert_eq!(code_at(seed, t, 30).as_deref(), Some(want), "t={t}");
        }
    }

    #[test]
    fn window_accepts_neighbours_only() {
        let seed = b"12345678901234567890";
        let code = code_at(seed, 1_000_000, 30).unwrap_or_default();
        assert_eq!(matching_step(seed, &code, 1_000_000 + 30, 30, 1), Some(1_000_000 / 30));
        assert_eq!(matching_step(seed, &code, 1_000_000 + 90, 30, 1), None);
    }
}
