//! Person facts the law cares about: age for the minors rule (R7) and phone
//! numbers, which are stored only as keyed hashes.

use crate::{Error, Result};
use time::{Date, OffsetDateTime, macros::format_description};

/// PIPL Art. 31: under 14 needs a guardian's consent.
pub const MINOR_AGE_YEARS: i32 = 14;

/// A birth date, validated to be a real past date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthDate(Date);

impl BirthDate {
    /// Parses "YYYY-MM-DD", naming `field` on error.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let fmt = format_description!("[year]-[month]-[day]");
        let date =
            Date::parse(value.trim(), &fmt).map_err(|_| Error::invalid(field, "must be a date written YYYY-MM-DD"))?;
        let today = OffsetDateTime::now_utc().date();
        if date > today {
            return Err(Error::invalid(field, "must not be in the future"));
        }
        if date.year() < 1900 {
            return Err(Error::invalid(field, "must be after 1900-01-01"));
        }
        Ok(Self(date))
    }

    /// The date as "YYYY-MM-DD".
    pub fn to_iso(self) -> String {
        let fmt = format_description!("[year]-[month]-[day]");
        self.0.format(&fmt).unwrap_or_default()
    }

    /// Whole years of age on `on`.
    pub fn age_on(self, on: Date) -> i32 {
        let mut age = on.year() - self.0.year();
        if (on.month() as u8, on.day()) < (self.0.month() as u8, self.0.day()) {
            age -= 1;
        }
        age
    }

    /// Whether the person is under 14 today (R7).
    pub fn is_minor_today(self) -> bool {
        self.age_on(OffsetDateTime::now_utc().date()) < MINOR_AGE_YEARS
    }
}

/// Normalises a phone number for keyed hashing: drops spaces, dashes and
/// brackets, keeps an optional leading "+", then 6 to 15 digits (E.164 length).
/// A mainland mobile without country code ("138…") is prefixed with "+86" so
/// both spellings hash alike.
pub fn normalise_phone(field: &'static str, value: &str) -> Result<String> {
    let cleaned: String = value.chars().filter(|c| !matches!(c, ' ' | '-' | '(' | ')')).collect();
    let (plus, digits) = match cleaned.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, cleaned.as_str()),
    };
    if digits.len() < 6 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(field, "must be 6 to 15 digits with an optional leading +"));
    }
    if !plus && digits.len() == 11 && digits.starts_with('1') {
        return Ok(format!("+86{digits}"));
    }
    Ok(if plus { format!("+{digits}") } else { digits.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn age_counts_whole_years() -> Result<()> {
        let b = BirthDate::parse("birth_date", "2012-06-15")?;
        assert_eq!(b.age_on(date!(2026 - 06 - 14)), 13);
        assert_eq!(b.age_on(date!(2026 - 06 - 15)), 14);
        Ok(())
    }

    #[test]
    fn phone_spellings_normalise_alike() -> Result<()> {
        assert_eq!(normalise_phone("phone", "138 0013 8000")?, "+8613800138000");
        assert_eq!(normalise_phone("phone", "+86-138-0013-8000")?, "+8613800138000");
        assert!(normalise_phone("phone", "12ab").is_err());
        Ok(())
    }

    #[test]
    fn rejects_future_and_malformed_dates() {
        assert!(BirthDate::parse("birth_date", "2999-01-01").is_err());
        assert!(BirthDate::parse("birth_date", "2010-13-01").is_err());
        assert!(BirthDate::parse("birth_date", "yesterday").is_err());
    }
}
