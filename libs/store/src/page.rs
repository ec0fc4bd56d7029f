//! Opaque page tokens. A token encodes the last id of the previous page;
//! ids are UUIDv7 so id order is creation order.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use estate_core::{Error, Result};

const DEFAULT_PAGE_SIZE: u32 = 50;

/// A validated page request.
#[derive(Debug, Clone)]
pub struct Page {
    /// Rows to return.
    pub size: u32,
    /// Return rows with id greater than this ("" for the first page).
    pub after_id: String,
}

impl Page {
    /// Validates `page_size` (0 = default 50, at most `max`) and `page_token`.
    pub fn parse(page_size: i32, page_token: &str, max: u32) -> Result<Self> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE.min(max),
            n if n < 0 => return Err(Error::invalid("page_size", "must not be negative")),
            n => u32::try_from(n).unwrap_or(max).min(max),
        };
        let after_id = if page_token.is_empty() {
            String::new()
        } else {
            let raw = URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_token)?;
            let id = raw.strip_prefix("p1:").ok_or_else(bad_token)?;
            estate_core::parse_id("page_token", id).map_err(|_| bad_token())?
        };
        Ok(Self { size, after_id })
    }

    /// Rows to fetch: one more than the page, to learn whether another follows.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.size) + 1
    }

    /// Cuts the extra row off and returns the next page token ("" at the end).
    pub fn finish<T>(&self, mut rows: Vec<T>, id_of: impl Fn(&T) -> &str) -> (Vec<T>, String) {
        let size = self.size as usize;
        if rows.len() > size {
            rows.truncate(size);
            let next = rows.last().map(|r| encode(id_of(r))).unwrap_or_default();
            (rows, next)
        } else {
            (rows, String::new())
        }
    }
}

fn bad_token() -> Error {
    Error::invalid("page_token", "is not a token returned by this list call; start again with an empty token")
}

fn encode(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("p1:{last_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() -> Result<()> {
        let id = estate_core::new_id();
        let token = encode(&id);
        let page = Page::parse(10, &token, 500)?;
        assert_eq!(page.after_id, id);
        assert!(Page::parse(10, "garbage!", 500).is_err());
        assert!(Page::parse(-1, "", 500).is_err());
        assert_eq!(Page::parse(100_000, "", 500)?.size, 500);
        Ok(())
    }
}
