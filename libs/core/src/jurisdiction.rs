//! Administrative division codes (GB/T 2260), used to scope regulators (R12).

use crate::{Error, Result};

/// A six-digit administrative division code: "120000" is a province-level
/// area (Tianjin), "120100" a prefecture, "120101" a county-level district.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JurisdictionCode(String);

impl JurisdictionCode {
    /// Parses a code, naming `field` when it is not six digits.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let v = value.trim();
        if v.len() != 6 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid(field, "must be a six-digit administrative division code such as 120101"));
        }
        if v.starts_with("00") {
            return Err(Error::invalid(field, "must not start with 00"));
        }
        Ok(Self(v.to_owned()))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a regulator holding this code has authority over `other`:
    /// a province code (xx0000) covers its whole province, a prefecture code
    /// (xxxx00) its prefecture, a district code only itself.
    pub fn covers(&self, other: &str) -> bool {
        let me = self.0.as_str();
        if other.len() != 6 {
            return false;
        }
        if me.ends_with("0000") {
            other[..2] == me[..2]
        } else if me.ends_with("00") {
            other[..4] == me[..4]
        } else {
            other == me
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn province_prefecture_and_district_scopes() -> Result<()> {
        let tianjin = JurisdictionCode::parse("code", "120000")?;
        let heping = JurisdictionCode::parse("code", "120101")?;
        let city = JurisdictionCode::parse("code", "120100")?;
        assert!(tianjin.covers("120101"));
        assert!(!tianjin.covers("110101"));
        assert!(city.covers("120101"));
        assert!(!city.covers("120201"));
        assert!(heping.covers("120101"));
        assert!(!heping.covers("120102"));
        Ok(())
    }

    #[test]
    fn rejects_malformed_codes() {
        for bad in ["", "12010", "1201011", "12a101", "000000"] {
            assert!(JurisdictionCode::parse("code", bad).is_err(), "{bad}");
        }
    }
}
