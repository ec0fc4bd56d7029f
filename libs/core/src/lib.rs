//! Domain vocabulary shared by every service: ids, credential kinds,
//! jurisdiction codes, minors (R7), time, and [`Error`] with its single mapping
//! to a gRPC status. No I/O lives here.

mod error;
mod jurisdiction;
mod person;
mod time_util;

pub use error::{Error, Result};
pub use jurisdiction::JurisdictionCode;
pub use person::{BirthDate, MINOR_AGE_YEARS, normalise_phone};
pub use time_util::{ms_to_timestamp_parts, now_ms};

/// Returns a new time-ordered identifier (UUIDv7, hyphenated, lowercase).
///
/// Time ordering lets list calls page by id without a separate sort key.
pub fn new_id() -> String {
    encode_id(uuid::Uuid::now_v7())
}

/// `id` in its hyphenated lower-case form, written straight into the string
/// (`to_string` goes through the formatting machinery: a decision makes
/// three ids, and that was a measurable share of its CPU).
pub fn encode_id(id: uuid::Uuid) -> String {
    id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).to_owned()
}

/// Checks that `value` is an id this mesh could have issued, naming `field`
/// in the error so the caller knows what to fix.
pub fn parse_id(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    match uuid::Uuid::try_parse(value) {
        Ok(u) => Ok(encode_id(u)),
        Err(_) => Err(Error::invalid(field, "must be an id returned by this mesh (a UUID)")),
    }
}

/// Validates a required free-text field: trimmed, non-empty, bounded, no
/// control characters.
pub fn required_text(field: &'static str, value: &str, max_chars: usize) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    bounded_text(field, v, max_chars)
}

/// Validates an optional free-text field (may be empty).
pub fn bounded_text(field: &'static str, value: &str, max_chars: usize) -> Result<String> {
    let v = value.trim();
    if v.chars().count() > max_chars {
        return Err(Error::invalid(field, format!("must be at most {max_chars} characters")));
    }
    if v.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_written_as_uuids_display_them() -> Result<()> {
        for id in [uuid::Uuid::nil(), uuid::Uuid::max(), uuid::Uuid::now_v7(), uuid::Uuid::new_v4()] {
            assert_eq!(encode_id(id), id.to_string());
        }
        let made = new_id();
        assert_eq!(parse_id("id", &made)?, made);
        assert_eq!(parse_id("id", &made.to_uppercase())?, made, "ids are kept in lower case");
        Ok(())
    }
}
