//! PIN attempt limits: after `max_failures` wrong PINs at one unit within the
//! window, PIN entry there is locked for the lockout time. Counters live in
//! Redis when the mesh is distributed (so every replica sees the same count)
//! and in process memory when embedded.

use estate_core::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Limits and where the counters live.
pub struct PinLimiter {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    store: Store,
}

impl std::fmt::Debug for PinLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinLimiter")
            .field("max_failures", &self.max_failures)
            .field("redis", &matches!(self.store, Store::Redis(_)))
            .finish_non_exhaustive()
    }
}

enum Store {
    Local(Mutex<HashMap<String, LocalEntry>>),
    Redis(redis::aio::ConnectionManager),
}

#[derive(Default)]
struct LocalEntry {
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// Atomically: refuse when locked; else count the attempt (the window
/// starts at the first); past the limit, lock and refuse. Returns the
/// attempt's number, or -1 when refused.
const BEGIN_ATTEMPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], 1, 'EX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return -1
end
return n
";

fn redis_error(e: redis::RedisError) -> Error {
    tracing::warn!(error = %e, "redis unavailable for pin attempt counters");
    Error::Unavailable("the PIN attempt counter store is unavailable, retry shortly".into())
}

impl PinLimiter {
    /// A limiter over Redis when given, in process otherwise.
    pub fn new(
        max_failures: u32,
        window: Duration,
        lockout: Duration,
        redis: Option<redis::aio::ConnectionManager>,
    ) -> Self {
        let store = match redis {
            Some(conn) => Store::Redis(conn),
            None => Store::Local(Mutex::new(HashMap::new())),
        };
        Self { max_failures: max_failures.max(1), window, lockout, store }
    }

    /// Reserves one attempt at `key` before the PIN is checked: `None` when
    /// entry there is locked (or this attempt would exceed the limit, which
    /// locks it), else the attempt's number in the window. Reserving first
    /// is what makes the limit hold under concurrency: attempts made at the
    /// same moment, on any replica, each take a number, so no more than
    /// `max_failures` PINs are ever checked per window, however many arrive
    /// together.
    pub async fn begin_attempt(&self, key: &str) -> Result<Option<u32>> {
        match &self.store {
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Error::Internal("pin limiter lock poisoned".into()))?;
                let now = Instant::now();
                let entry = map.entry(key.to_owned()).or_default();
                if entry.locked_until.is_some_and(|t| t > now) {
                    return Ok(None);
                }
                entry.failures.retain(|t| now.duration_since(*t) < self.window);
                entry.failures.push(now);
                let n = u32::try_from(entry.failures.len()).unwrap_or(u32::MAX);
                if n > self.max_failures {
                    entry.locked_until = Some(now + self.lockout);
                    entry.failures.clear();
                    return Ok(None);
                }
                Ok(Some(n))
            }
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let n: i64 = redis::Script::new(BEGIN_ATTEMPT)
                    .key(format!("estate:pinlock:{key}"))
                    .key(format!("estate:pinfail:{key}"))
                    .arg(self.max_failures)
                    .arg(self.window.as_secs().max(1))
                    .arg(self.lockout.as_secs().max(1))
                    .invoke_async(&mut conn)
                    .instrument(estate_bus::redis_span("EVALSHA begin_attempt"))
                    .await
                    .map_err(redis_error)?;
                Ok(u32::try_from(n).ok().filter(|n| *n > 0))
            }
        }
    }

    /// Records that attempt number `n` (from [`Self::begin_attempt`]) was a
    /// wrong PIN; returns whether entry is now locked (the limit's last).
    pub async fn record_failure(&self, key: &str, n: u32) -> Result<bool> {
        if n < self.max_failures {
            return Ok(false);
        }
        match &self.store {
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Error::Internal("pin limiter lock poisoned".into()))?;
                let entry = map.entry(key.to_owned()).or_default();
                entry.locked_until = Some(Instant::now() + self.lockout);
                entry.failures.clear();
            }
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let _: () = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(format!("estate:pinlock:{key}"))
                    .arg(1)
                    .arg("EX")
                    .arg(self.lockout.as_secs().max(1))
                    .ignore()
                    .cmd("DEL")
                    .arg(format!("estate:pinfail:{key}"))
                    .ignore()
                    .query_async(&mut conn)
                    .instrument(estate_bus::redis_span("MULTI SET DEL"))
                    .await
                    .map_err(redis_error)?;
            }
        }
        Ok(true)
    }

    /// Clears the failure count after a correct PIN.
    pub async fn record_success(&self, key: &str) -> Result<()> {
        match &self.store {
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Error::Internal("pin limiter lock poisoned".into()))?;
                if let Some(e) = map.get_mut(key) {
                    e.failures.clear();
                }
                Ok(())
            }
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let _: () = redis::cmd("DEL")
                    .arg(format!("estate:pinfail:{key}"))
                    .query_async(&mut conn)
                    .instrument(estate_bus::redis_span("DEL"))
                    .await
                    .map_err(redis_error)?;
                Ok(())
            }
        }
    }
}
