//! The hot-path view of credentials a gate decision reads (R15): keyed card /
//! visitor hashes -> holder, status, validity, estates. In memory when
//! embedded, in Redis (shared by every gate replica) when distributed.
//!
//! Filled from the database on a miss (`SET NX`, so a fill never overwrites a
//! fresher value), refreshed from the database after every credential change
//! event (a compare-and-set on the credential version, so two replicas
//! refreshing out of order cannot put an older state back), and bounded in
//! staleness by a TTL in case an event is lost. Unknown hashes are cached
//! too, so a stream of made-up cards costs one database read per card per TTL.

use estate_core::{Error, Result};
use estate_credentials::directory::CredentialFacts;
use estate_proto::common::CredentialKind;
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What the cache stores for one hash: the facts, or that nothing matched.
#[derive(Clone, PartialEq, Message)]
struct CachedCredential {
    #[prost(bool, tag = "1")]
    found: bool,
    #[prost(string, tag = "2")]
    id: String,
    #[prost(string, tag = "3")]
    person_pseudonym: String,
    #[prost(int32, tag = "4")]
    kind: i32,
    #[prost(string, tag = "5")]
    status: String,
    #[prost(int64, tag = "6")]
    valid_from: i64,
    #[prost(int64, optional, tag = "7")]
    valid_until: Option<i64>,
    #[prost(int64, tag = "8")]
    version: i64,
    #[prost(string, repeated, tag = "9")]
    estate_ids: Vec<String>,
}

impl CachedCredential {
    fn of(facts: Option<&CredentialFacts>) -> Self {
        match facts {
            None => Self::default(),
            Some(f) => Self {
                found: true,
                id: f.id.clone(),
                person_pseudonym: f.person_pseudonym.clone(),
                kind: f.kind as i32,
                status: f.status.clone(),
                valid_from: f.valid_from,
                valid_until: f.valid_until,
                version: f.version,
                estate_ids: f.estate_ids.clone(),
            },
        }
    }

    fn into_facts(self) -> Option<CredentialFacts> {
        self.found.then(|| CredentialFacts {
            id: self.id,
            person_pseudonym: self.person_pseudonym,
            kind: CredentialKind::try_from(self.kind).unwrap_or(CredentialKind::Unspecified),
            status: self.status,
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            version: self.version,
            estate_ids: self.estate_ids,
        })
    }
}

/// Compare-and-set for a refresh: keeps the stored value when it is the same
/// credential at a higher version. Values are "<credential id>|<version,
/// 20 digits>|<hex protobuf>".
const REFRESH_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local cid, cver = string.match(cur, '^([^|]*)|([0-9]+)|')
  local nid, nver = string.match(ARGV[1], '^([^|]*)|([0-9]+)|')
  if cid and nid and cid == nid and cver > nver then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
";

fn encode(value: &CachedCredential) -> String {
    let id = if value.found { value.id.as_str() } else { "-" };
    format!("{id}|{:020}|{}", value.version.max(0), hex::encode(value.encode_to_vec()))
}

fn decode(text: &str) -> Option<CachedCredential> {
    let payload = text.rsplit('|').next()?;
    CachedCredential::decode(hex::decode(payload).ok()?.as_slice()).ok()
}

fn redis_error(e: redis::RedisError) -> Error {
    Error::Unavailable(format!("the gate cache (redis) is unreachable: {e}"))
}

/// After a Redis failure, the hot path leaves Redis alone this long and uses
/// the database, so that an outage costs one timeout, not one per decision.
const BACKOFF_MS: i64 = 2_000;

/// Remembers a Redis failure for [`BACKOFF_MS`].
#[derive(Debug, Default)]
pub(crate) struct Breaker(std::sync::atomic::AtomicI64);

impl Breaker {
    fn open(&self) -> bool {
        estate_core::now_ms() < self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn trip(&self) {
        self.0.store(estate_core::now_ms() + BACKOFF_MS, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs one Redis command, traced as `op`, unless Redis failed lately;
    /// a failure trips the breaker.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        cmd: &redis::Cmd,
        op: &'static str,
    ) -> Result<T> {
        self.call(async { cmd.query_async(conn).instrument(estate_bus::redis_span(op)).await.map_err(redis_error) })
            .await
    }

    /// Runs `op` unless Redis failed lately; a failure trips the breaker.
    async fn call<T>(&self, op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if self.open() {
            return Err(Error::Unavailable("redis failed recently; using the database".into()));
        }
        let r = op.await;
        if r.is_err() {
            self.trip();
        }
        r
    }
}

enum Backend {
    /// Each value with the moment it expires ([`CredentialCache::lifetime`]).
    Memory {
        entries: RwLock<HashMap<String, (Instant, CachedCredential)>>,
        capacity: usize,
    },
    Redis(redis::aio::ConnectionManager),
}

/// The credential view; cheap to clone.
#[derive(Clone)]
pub struct CredentialCache {
    backend: Arc<Backend>,
    ttl: Duration,
    breaker: Arc<Breaker>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.backend {
            Backend::Memory { .. } => "memory",
            Backend::Redis(_) => "redis",
        };
        f.debug_struct("CredentialCache").field("backend", &kind).field("ttl", &self.ttl).finish()
    }
}

fn key(tenant: &str, hash: &str) -> String {
    format!("estate:gate:cred:{tenant}:{hash}")
}

/// The share of the time to live by which a value's life may be cut short.
const TTL_SPREAD: u32 = 10;

impl CredentialCache {
    /// In Redis when `redis` is given, else in this process.
    pub fn new(redis: Option<redis::aio::ConnectionManager>, ttl: Duration, capacity: usize) -> Self {
        let backend = match redis {
            Some(conn) => Backend::Redis(conn),
            None => Backend::Memory { entries: RwLock::new(HashMap::new()), capacity: capacity.max(1) },
        };
        Self { backend: Arc::new(backend), ttl, breaker: Arc::default() }
    }

    /// Whether the view is in Redis (a network round trip per lookup), not
    /// in this process.
    pub fn is_remote(&self) -> bool {
        matches!(&*self.backend, Backend::Redis(_))
    }

    /// How long the value of `hash` is kept: the time to live, less up to a
    /// tenth of it, by the hash (keyed, so evenly spread). Cards first
    /// presented together (a gate coming up, a benchmark's first pass)
    /// otherwise expired together, and their re-reads came at once.
    fn lifetime(&self, hash: &str) -> Duration {
        let spread = hash.get(..4).and_then(|h| u16::from_str_radix(h, 16).ok()).unwrap_or(0);
        let cut =
            (self.ttl / TTL_SPREAD).checked_mul(u32::from(spread)).map_or(Duration::ZERO, |d| d / u32::from(u16::MAX));
        self.ttl.saturating_sub(cut)
    }

    /// When a value of `hash` stored now expires.
    fn expiry(&self, now: Instant, hash: &str) -> Instant {
        now.checked_add(self.lifetime(hash)).unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX)))
    }

    /// `Some(facts)` on a hit (`facts` is `None` for a known-unknown hash),
    /// `None` on a miss.
    pub async fn get(&self, tenant: &str, hash: &str) -> Result<Option<Option<CredentialFacts>>> {
        let k = key(tenant, hash);
        match &*self.backend {
            Backend::Memory { entries, .. } => {
                let guard = entries.read().map_err(|_| Error::Internal("gate cache lock poisoned".into()))?;
                let now = Instant::now();
                Ok(guard.get(&k).filter(|(until, _)| now < *until).map(|(_, v)| v.clone().into_facts()))
            }
            Backend::Redis(conn) => {
                let mut conn = conn.clone();
                let text: Option<String> = self.breaker.query(&mut conn, redis::cmd("GET").arg(&k), "GET").await?;
                Ok(text.as_deref().and_then(decode).map(CachedCredential::into_facts))
            }
        }
    }

    /// Stores what a miss read from the database, unless a value arrived
    /// meanwhile.
    pub async fn fill(&self, tenant: &str, hash: &str, facts: Option<&CredentialFacts>) -> Result<()> {
        let k = key(tenant, hash);
        let value = CachedCredential::of(facts);
        match &*self.backend {
            Backend::Memory { entries, capacity } => {
                let mut guard = entries.write().map_err(|_| Error::Internal("gate cache lock poisoned".into()))?;
                let now = Instant::now();
                if guard.len() >= *capacity {
                    guard.retain(|_, (until, _)| now < *until);
                    if guard.len() >= *capacity {
                        return Ok(());
                    }
                }
                match guard.get(&k) {
                    Some((until, _)) if now < *until => {}
                    _ => {
                        guard.insert(k, (self.expiry(now, hash), value));
                    }
                }
                Ok(())
            }
            Backend::Redis(conn) => {
                let mut conn = conn.clone();
                let ttl = self.lifetime(hash).as_secs().max(1);
                let set = redis::cmd("SET").arg(&k).arg(encode(&value)).arg("NX").arg("EX").arg(ttl).to_owned();
                let _: Option<String> = self.breaker.query(&mut conn, &set, "SET").await?;
                Ok(())
            }
        }
    }

    /// Stores the state read from the database after a change event, unless
    /// a newer version of the same credential is already there.
    pub async fn refresh(&self, tenant: &str, hash: &str, facts: Option<&CredentialFacts>) -> Result<()> {
        let k = key(tenant, hash);
        let value = CachedCredential::of(facts);
        match &*self.backend {
            Backend::Memory { entries, .. } => {
                let mut guard = entries.write().map_err(|_| Error::Internal("gate cache lock poisoned".into()))?;
                let keep = guard.get(&k).is_some_and(|(_, cur)| {
                    cur.found && value.found && cur.id == value.id && cur.version > value.version
                });
                if !keep {
                    guard.insert(k, (self.expiry(Instant::now(), hash), value));
                }
                Ok(())
            }
            Backend::Redis(conn) => {
                let mut conn = conn.clone();
                let _: i64 = redis::Script::new(REFRESH_SCRIPT)
                    .key(&k)
                    .arg(encode(&value))
                    .arg(self.lifetime(hash).as_secs().max(1))
                    .invoke_async(&mut conn)
                    .instrument(estate_bus::redis_span("EVALSHA refresh_script"))
                    .await
                    .map_err(redis_error)?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: &str, version: i64, status: &str) -> CredentialFacts {
        CredentialFacts {
            id: id.into(),
            person_pseudonym: "psn_1".into(),
            kind: CredentialKind::Card,
            status: status.into(),
            valid_from: 0,
            valid_until: None,
            version,
            estate_ids: vec!["e".into()],
        }
    }

    #[tokio::test]
    async fn refresh_never_puts_an_older_version_back() -> Result<()> {
        let cache = CredentialCache::new(None, Duration::from_secs(60), 100);
        cache.refresh("t", "h", Some(&facts("c1", 3, "revoked"))).await?;
        cache.refresh("t", "h", Some(&facts("c1", 2, "active"))).await?;
        let got = cache.get("t", "h").await?.flatten().map(|f| f.status);
        assert_eq!(got.as_deref(), Some("revoked"));
        // A fill after a refresh changes nothing either.
        cache.fill("t", "h", Some(&facts("c1", 1, "active"))).await?;
        assert_eq!(cache.get("t", "h").await?.flatten().map(|f| f.version), Some(3));
        // Another credential with the same card replaces a revoked one.
        cache.refresh("t", "h", Some(&facts("c2", 1, "active"))).await?;
        assert_eq!(cache.get("t", "h").await?.flatten().map(|f| f.id), Some("c2".to_owned()));
        Ok(())
    }

    #[tokio::test]
    async fn values_expire_spread_over_the_last_tenth_of_the_ttl() -> Result<()> {
        let ttl = Duration::from_secs(60);
        let cache = CredentialCache::new(None, ttl, 100);
        assert_eq!(cache.lifetime("0000aa"), ttl);
        assert_eq!(cache.lifetime("ffffaa"), ttl - ttl / TTL_SPREAD);
        let mid = cache.lifetime("8000aa");
        assert!(mid < ttl && mid > ttl - ttl / TTL_SPREAD, "{mid:?}");
        assert_eq!(cache.lifetime("not hex"), ttl);
        // A huge setting neither overflows nor panics.
        let huge = CredentialCache::new(None, Duration::from_secs(u64::MAX / 2), 100);
        assert!(huge.lifetime("ffff") > Duration::from_secs(u64::MAX / 4));
        let _ = huge.expiry(Instant::now(), "ffff");

        // Stored values follow their own lifetimes.
        let before = Instant::now();
        cache.fill("t", "0000", Some(&facts("c1", 1, "active"))).await?;
        cache.fill("t", "ffff", Some(&facts("c2", 1, "active"))).await?;
        let Backend::Memory { entries, .. } = &*cache.backend else { panic!("a memory cache") };
        let (early, late) = {
            let entries = entries.read().map_err(|_| Error::Internal("lock poisoned".into()))?;
            (entries[&key("t", "ffff")].0, entries[&key("t", "0000")].0)
        };
        assert!(late >= before + ttl);
        assert!(early < before + ttl - ttl / TTL_SPREAD + Duration::from_secs(1));
        assert!(cache.get("t", "ffff").await?.is_some());
        Ok(())
    }

    #[test]
    fn encoded_values_round_trip() {
        let v = CachedCredential::of(Some(&facts("c1", 7, "active")));
        let text = encode(&v);
        assert!(text.starts_with("c1|00000000000000000007|"));
        assert_eq!(decode(&text), Some(v));
        assert_eq!(decode(&encode(&CachedCredential::of(None))).map(|c| c.found), Some(false));
    }
}
