//! Idempotency keys. A caller that may have to retry a unary call — its
//! answer was lost, its deadline passed — sends `idempotency-key: <key>`
//! with it. The first call with a key runs; its answer, if it succeeded, is
//! kept for `limits.idempotency_ttl_secs`, and a retry with the same key and
//! the same request gets that answer again (marked `idempotent-replay: true`)
//! without running twice: no second person, card or audit event.
//!
//! - Keys are per caller: the principal, the token subject and the RPC, so
//!   two callers never share a key by accident and one cannot read the
//!   other's answer.
//! - The same key with a different request is INVALID_ARGUMENT; a retry
//!   while the first call still runs is ABORTED (retry shortly); a call that
//!   failed keeps nothing, so its retry runs again.
//! - Answers can hold secrets (a new PIN, a token), so they are sealed
//!   (AES-256-GCM, bound to the key) before they are stored.
//! - Stored in Redis when `redis.url` is set, shared by every replica, and
//!   otherwise in the process (the embedded default), at most
//!   [`LOCAL_BUDGET`] bytes. Answers over [`MAX_KEPT_ANSWER`] (a long list)
//!   are not kept: the key is released and a retry runs again, which for a
//!   read changes nothing.
//!
//! A key guards against retries while the mesh is up. If a process dies
//! after its transaction committed but before the answer was stored, the
//! key is released when its pending mark expires (the request ceiling plus a
//! margin) and a later retry runs again; flows that must be exactly-once
//! across crashes also have a unique key in the database (offline uploads
//! per gate and sequence, facematch request ids, deletion sources).

use bytes::Bytes;
use estate_auth::Caller;
use estate_crypto::{SecretBox, sha256, sha256_hex};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Status;
use tonic::body::Body;

/// The metadata key a caller sets.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Set on an answer that was replayed rather than produced by this call.
pub const REPLAY_HEADER: &str = "idempotent-replay";
/// Most bytes (keys and kept answers) an in-process store holds at once.
pub const LOCAL_BUDGET: usize = 64 << 20;
/// Largest answer kept for retries.
pub const MAX_KEPT_ANSWER: usize = 64 << 10;

const PENDING: u8 = b'P';
const DONE: u8 = b'D';

/// The in-process store: key → (expiry, value), and the bytes it holds.
#[derive(Debug, Default)]
pub struct LocalMap {
    entries: HashMap<String, (Instant, Vec<u8>)>,
    bytes: usize,
}

impl LocalMap {
    fn insert(&mut self, key: &str, until: Instant, value: &[u8]) {
        self.remove(key);
        self.bytes += key.len() + value.len();
        self.entries.insert(key.to_owned(), (until, value.to_vec()));
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, v)) = self.entries.remove(key) {
            self.bytes -= key.len() + v.len();
        }
    }

    fn prune(&mut self, now: Instant) {
        let expired: Vec<String> =
            self.entries.iter().filter(|(_, (until, _))| *until <= now).map(|(k, _)| k.clone()).collect();
        for k in expired {
            self.remove(&k);
        }
    }
}

/// Where answers are kept.
#[derive(Clone)]
pub enum Store {
    /// Shared by every replica.
    Redis(redis::aio::ConnectionManager),
    /// This process only.
    Local(Arc<Mutex<LocalMap>>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Redis(_) => "Store::Redis",
            Store::Local(_) => "Store::Local",
        })
    }
}

fn unavailable(e: redis::RedisError) -> Status {
    tracing::warn!(error = %e, "idempotency store unavailable");
    Status::unavailable("the idempotency store (Redis) is unavailable; retry the call in a moment")
}

impl Store {
    /// Stores `value` under `key` unless the key is held; true if stored.
    async fn reserve(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool, Status> {
        match self {
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                let set: Option<String> = redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                Ok(set.is_some())
            }
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Status::internal("idempotency store poisoned"))?;
                let now = Instant::now();
                if map.entries.get(key).is_some_and(|(until, _)| *until > now) {
                    return Ok(false);
                }
                if map.bytes + key.len() + MAX_KEPT_ANSWER + 64 > LOCAL_BUDGET {
                    map.prune(now);
                    if map.bytes + key.len() + MAX_KEPT_ANSWER + 64 > LOCAL_BUDGET {
                        return Err(Status::resource_exhausted(
                            "too many idempotency keys are held; retry later, or call without a key",
                        ));
                    }
                }
                map.insert(key, now + ttl, value);
                Ok(true)
            }
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Status> {
        match self {
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(unavailable)
            }
            Store::Local(map) => {
                let map = map.lock().map_err(|_| Status::internal("idempotency store poisoned"))?;
                Ok(map.entries.get(key).filter(|(until, _)| *until > Instant::now()).map(|(_, v)| v.clone()))
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), Status> {
        match self {
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(unavailable)
            }
            Store::Local(map) => {
                let mut map = map.lock().map_err(|_| Status::internal("idempotency store poisoned"))?;
                map.insert(key, Instant::now() + ttl, value);
                Ok(())
            }
        }
    }

    async fn release(&self, key: &str) {
        match self {
            Store::Redis(conn) => {
                let mut conn = conn.clone();
                if let Err(e) = redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await {
                    tracing::warn!(error = %e, "could not release an idempotency key; it expires by itself");
                }
            }
            Store::Local(map) => {
                if let Ok(mut map) = map.lock() {
                    map.remove(key);
                }
            }
        }
    }
}

/// Settings of the layer.
#[derive(Clone)]
struct Shared {
    store: Store,
    sealer: SecretBox,
    ttl: Duration,
    pending_ttl: Duration,
    max_body: usize,
    streaming: Arc<HashSet<String>>,
}

/// Tower layer honouring `idempotency-key` on unary calls. Runs inside the
/// authentication layer (it needs the caller).
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Option<Shared>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer").field("enabled", &self.shared.is_some()).finish()
    }
}

impl IdempotencyLayer {
    /// Keeps answers `ttl` (zero: keys are ignored) in `store`, sealed with
    /// `sealer`; a call's pending mark lasts `pending_ttl`. A keyed request
    /// is buffered (to compare retries), so it may hold at most
    /// `max_message_bytes`, the transport's own limit.
    pub fn new(
        store: Store,
        sealer: SecretBox,
        ttl: Duration,
        pending_ttl: Duration,
        max_message_bytes: usize,
    ) -> Self {
        if ttl.is_zero() {
            return Self { shared: None };
        }
        let streaming = Arc::new(streaming_paths());
        // One gRPC message: a 5-byte frame header and the message.
        let max_body = max_message_bytes.saturating_add(5);
        Self { shared: Some(Shared { store, sealer, ttl, pending_ttl, max_body, streaming }) }
    }
}

/// The paths of the mesh's streaming RPCs (keys apply to unary calls).
fn streaming_paths() -> HashSet<String> {
    estate_proto::rpcs().into_iter().filter(|r| r.streaming).map(|r| r.path).collect()
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency { inner, shared: self.shared.clone() }
    }
}

/// The service produced by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Option<Shared>,
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("enabled", &self.shared.is_some()).finish()
    }
}

/// The storage key of a caller's idempotency key for `path`.
fn scope(caller: &Caller, path: &str, key: &str) -> String {
    let principal = serde_json::to_string(&caller.principal).unwrap_or_default();
    let scope = sha256_hex(format!("{principal}\n{}\n{path}\n{key}", caller.subject).as_bytes());
    format!("estate:idem:{scope}")
}

fn valid_key(value: &http::HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    (!text.is_empty() && text.len() <= 128 && text.chars().all(|c| c.is_ascii_graphic())).then(|| text.to_owned())
}

/// The gRPC status of an answer: from its headers (trailers-only) or trailers.
fn grpc_status(headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> Option<String> {
    headers
        .get("grpc-status")
        .or_else(|| trailers.and_then(|t| t.get("grpc-status")))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn replay(data: Bytes) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = http_body_util::Full::new(data)
        .map_err(|never| match never {})
        .with_trailers(async move { Some(Ok::<_, Status>(trailers)) });
    let mut response = http::Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(REPLAY_HEADER, http::HeaderValue::from_static("true"));
    response
}

impl<S> tower::Service<http::Request<Body>> for Idempotency<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Most calls carry no key: nothing but this lookup on their path.
        let (Some(shared), Some(value)) = (self.shared.as_ref(), req.headers().get(IDEMPOTENCY_HEADER)) else {
            return Box::pin(inner.call(req));
        };
        let (shared, value) = (shared.clone(), value.clone());
        Box::pin(async move {
            match keyed(shared, inner, req, value).await {
                Ok(response) => response,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// A call that carries a key. The outer `Err` is an answer of the layer
/// itself; the inner result is the handler's.
async fn keyed<S>(
    shared: Shared,
    mut inner: S,
    req: http::Request<Body>,
    value: http::HeaderValue,
) -> Result<Result<http::Response<Body>, S::Error>, Status>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let key = valid_key(&value).ok_or_else(|| {
        Status::invalid_argument("idempotency-key must be 1 to 128 visible ASCII characters (a UUID, say)")
    })?;
    let path = req.uri().path().to_owned();
    if shared.streaming.contains(&path) {
        return Err(Status::invalid_argument(
            "idempotency-key applies to unary calls; this RPC streams, so send it without the key",
        ));
    }
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        // Open RPCs (published keys) change nothing; nothing to guard.
        return Ok(inner.call(req).await);
    };
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, shared.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Status::resource_exhausted(format!(
                "the request is larger than limits.max_message_bytes ({} bytes)",
                shared.max_body - 5
            )));
        }
        Err(_) => return Err(Status::cancelled("the request body did not arrive")),
    };
    let fingerprint = sha256(&bytes);
    let id = scope(&caller, &path, &key);

    let mut pending = vec![PENDING];
    pending.extend_from_slice(&fingerprint);
    let mut reserved = false;
    for _ in 0..2 {
        if shared.store.reserve(&id, &pending, shared.pending_ttl).await? {
            reserved = true;
            break;
        }
        let Some(held) = shared.store.get(&id).await? else {
            continue; // expired in between: try to reserve again
        };
        if held.len() < 33 || held[1..33] != fingerprint {
            return Err(Status::invalid_argument(
                "this idempotency-key was used for a different request; use a new key for each operation",
            ));
        }
        if held[0] != DONE {
            return Err(Status::aborted("a call with this idempotency-key is still running; retry in a moment"));
        }
        let data = shared.sealer.open("idempotency", &id, &held[33..]).ok_or_else(|| {
            Status::internal("the kept answer of this idempotency-key could not be opened; use a new key")
        })?;
        tracing::debug!(path, "answer replayed for an idempotency key");
        return Ok(Ok(replay(Bytes::from(data))));
    }
    if !reserved {
        return Err(Status::aborted("a call with this idempotency-key is still running; retry in a moment"));
    }

    let req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
    let response = match inner.call(req).await {
        Ok(r) => r,
        Err(e) => {
            shared.store.release(&id).await;
            return Ok(Err(e));
        }
    };
    if grpc_status(response.headers(), None).is_some() {
        // A trailers-only answer: an error; nothing happened, nothing kept.
        shared.store.release(&id).await;
        return Ok(Ok(response));
    }
    let (parts, body) = response.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(status) => {
            shared.store.release(&id).await;
            return Err(status);
        }
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    if grpc_status(&parts.headers, trailers.as_ref()).as_deref() == Some("0") && data.len() <= MAX_KEPT_ANSWER {
        let sealed = shared
            .sealer
            .seal("idempotency", &id, &data)
            .map_err(|_| Status::internal("could not seal the answer for its idempotency-key"))?;
        let mut done = vec![DONE];
        done.extend_from_slice(&fingerprint);
        done.extend_from_slice(&sealed);
        if let Err(status) = shared.store.put(&id, &done, shared.ttl).await {
            // The call did happen: answer it; a retry may run it again.
            tracing::warn!(code = ?status.code(), "an answer could not be kept for its idempotency key");
        }
    } else {
        shared.store.release(&id).await;
    }
    let mut rebuilt = http_body_util::Full::new(data).map_err(|never| match never {}).boxed_unsync();
    if let Some(trailers) = trailers {
        rebuilt = rebuilt.with_trailers(async move { Some(Ok::<_, Status>(trailers)) }).boxed_unsync();
    }
    Ok(Ok(http::Response::from_parts(parts, Body::new(rebuilt))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_short_visible_ascii() {
        let ok = http::HeaderValue::from_static("4b1d6c1e-0f8a-4c55-9a43-1d2b3c4d5e6f");
        assert!(valid_key(&ok).is_some());
        for bad in ["", "has space", &"k".repeat(129)] {
            let v = http::HeaderValue::from_str(bad).unwrap_or(http::HeaderValue::from_static(""));
            assert!(valid_key(&v).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn streaming_rpcs_are_known() {
        let s = streaming_paths();
        assert!(s.contains("/estate.gate.v1.GateService/WatchChanges"));
        assert!(s.contains("/estate.audit.v1.AuditService/Export"));
        assert!(!s.contains("/estate.gate.v1.GateService/Decide"));
    }

    #[tokio::test]
    async fn the_local_store_reserves_once_and_expires() -> Result<(), Status> {
        let store = Store::Local(Arc::default());
        let Store::Local(map) = &store else { return Ok(()) };
        assert!(store.reserve("k", b"P1", Duration::from_millis(50)).await?);
        assert!(!store.reserve("k", b"P2", Duration::from_millis(50)).await?);
        assert_eq!(store.get("k").await?, Some(b"P1".to_vec()));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.get("k").await?, None);
        assert!(store.reserve("k", b"P3", Duration::from_millis(50)).await?);
        store.release("k").await;
        assert_eq!(store.get("k").await?, None);
        assert_eq!(map.lock().map(|m| m.bytes).unwrap_or(1), 0, "released keys give their bytes back");
        // Full: a new key is refused until expired ones are pruned. The keys
        // live long enough (3 s) that none expires while the store fills, even
        // on a loaded machine (with 50 ms, a slow fill let early keys expire
        // and the count overshot).
        let big = vec![0u8; MAX_KEPT_ANSWER];
        let mut n = 0;
        let full = loop {
            match store.reserve(&format!("f{n}"), &big, Duration::from_secs(3)).await {
                Ok(true) => n += 1,
                other => break other,
            }
        };
        assert_eq!(full.map_err(|s| s.code()), Err(tonic::Code::ResourceExhausted));
        assert!(n > 900 && n < 1100, "{n} answers of 64 KiB in 64 MiB");
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert!(store.reserve("after", b"P", Duration::from_millis(50)).await?);
        Ok(())
    }
}
