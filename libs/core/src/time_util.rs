//! Time as stored: milliseconds since the Unix epoch, UTC.

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Splits milliseconds into (seconds, nanos) for protobuf timestamps.
pub fn ms_to_timestamp_parts(ms: i64) -> (i64, i32) {
    let secs = ms.div_euclid(1000);
    let nanos = i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0);
    (secs, nanos)
}
