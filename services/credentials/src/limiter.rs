//! PIN attempt limits: after `max_failures` wrong PINs at one unit within the
//! window, PIN entry there is locked for the lockout time. Counters live in
//! Redis when the mesh is distributed (so every replica sees the same count)
//! and in process memory when embedded.

use estate_core::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    /// Whether PIN entry at `key` is locked.
    pub async fn is_locked(&self, key: &str) -> Result<bool> {
        match &self.store {
            Store::Local(map) => {
                let map = map.lock().map_err(|_| Error::Internal("pin limiter lock poisoned".into()))?;
                Ok(map.get(key).and_then(|e| e.locked_until).is_some_and(|t| t > Instant::now()))
            }
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let exists: bool = redis::cmd("EXISTS")
                    .arg(format!("estate:pinlock:{key}"))
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                Ok(exists)
            }
        }
    }

    /// Records a wrong PIN; returns whether entry is now locked.
    pub async fn record_failure(&self, key: &str) -> Result<bool> {
        match &self.store {
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Error::Internal("pin limiter lock poisoned".into()))?;
                let now = Instant::now();
                let entry = map.entry(key.to_owned()).or_default();
                entry.failures.retain(|t| now.duration_since(*t) < self.window);
                entry.failures.push(now);
                if entry.failures.len() >= self.max_failures as usize {
                    entry.locked_until = Some(now + self.lockout);
                    entry.failures.clear();
                    return Ok(true);
                }
                Ok(false)
            }
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let counter = format!("estate:pinfail:{key}");
                let (count, _): (u64, bool) = redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(&counter)
                    .cmd("EXPIRE")
                    .arg(&counter)
                    .arg(self.window.as_secs().max(1))
                    .arg("NX")
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                if count >= u64::from(self.max_failures) {
                    let _: () = redis::pipe()
                        .atomic()
                        .cmd("SET")
                        .arg(format!("estate:pinlock:{key}"))
                        .arg(1)
                        .arg("EX")
                        .arg(self.lockout.as_secs().max(1))
                        .ignore()
                        .cmd("DEL")
                        .arg(&counter)
                        .ignore()
                        .query_async(&mut conn)
                        .await
                        .map_err(redis_error)?;
                    return Ok(true);
                }
                Ok(false)
            }
        }
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
                    .await
                    .map_err(redis_error)?;
                Ok(())
            }
        }
    }
}
