//! RED metrics per RPC (rate, errors, duration), served in the Prometheus
//! text format on `metrics.listen` (`GET /metrics`), recorded by the per-RPC
//! layer. Counters are process-wide atomics; one map entry per method.
//!
//! - `estate_rpc_requests_total{method, code}`: calls answered, by gRPC
//!   status code name (rate, and errors: every code but `OK`).
//! - `estate_rpc_duration_seconds{method}`: histogram of the time to the
//!   response headers (for a stream, to its start).
//! - `estate_rpc_in_flight{method}`: calls being handled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Upper bounds of the duration buckets, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// gRPC status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Debug, Default)]
struct MethodStats {
    codes: [AtomicU64; 17],
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
    in_flight: AtomicI64,
}

/// The process's RPC metrics.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    methods: RwLock<BTreeMap<String, Arc<MethodStats>>>,
}

/// The process-wide registry.
pub fn global() -> &'static RpcMetrics {
    static GLOBAL: OnceLock<RpcMetrics> = OnceLock::new();
    GLOBAL.get_or_init(RpcMetrics::default)
}

/// A call in progress; finish it with [`Call::done`].
#[derive(Debug)]
pub struct Call {
    stats: Arc<MethodStats>,
    started: std::time::Instant,
}

impl Call {
    /// Records the answer's status code and the elapsed time.
    pub fn done(self, code: i64) {
        let elapsed = self.started.elapsed();
        let s = &self.stats;
        let idx = usize::try_from(code).ok().filter(|c| *c < CODES.len()).unwrap_or(2);
        s.codes[idx].fetch_add(1, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
        s.sum_micros.fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|le| secs <= *le) {
            s.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RpcMetrics {
    fn stats(&self, method: &str) -> Arc<MethodStats> {
        if let Ok(m) = self.methods.read()
            && let Some(s) = m.get(method)
        {
            return s.clone();
        }
        let mut m = match self.methods.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        m.entry(method.to_owned()).or_default().clone()
    }

    /// Starts timing a call of `method` (the gRPC path).
    pub fn start(&self, method: &str) -> Call {
        let stats = self.stats(method);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Call { stats, started: std::time::Instant::now() }
    }

    /// The Prometheus text exposition of every method seen so far.
    pub fn render(&self) -> String {
        let methods = match self.methods.read() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>(),
            Err(poisoned) => poisoned.into_inner().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let mut out = String::new();
        out.push_str("# HELP estate_rpc_requests_total gRPC calls answered, by method and status code.\n");
        out.push_str("# TYPE estate_rpc_requests_total counter\n");
        for (m, s) in &methods {
            for (i, c) in s.codes.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "estate_rpc_requests_total{{method=\"{m}\",code=\"{}\"}} {n}", CODES[i]);
                }
            }
        }
        out.push_str("# HELP estate_rpc_duration_seconds Time to the response headers, by method.\n");
        out.push_str("# TYPE estate_rpc_duration_seconds histogram\n");
        for (m, s) in &methods {
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += s.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "estate_rpc_duration_seconds_bucket{{method=\"{m}\",le=\"{le}\"}} {cumulative}");
            }
            let count = s.count.load(Ordering::Relaxed);
            let sum = Duration::from_micros(s.sum_micros.load(Ordering::Relaxed)).as_secs_f64();
            let _ = writeln!(out, "estate_rpc_duration_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "estate_rpc_duration_seconds_sum{{method=\"{m}\"}} {sum}");
            let _ = writeln!(out, "estate_rpc_duration_seconds_count{{method=\"{m}\"}} {count}");
        }
        out.push_str("# HELP estate_rpc_in_flight gRPC calls being handled, by method.\n");
        out.push_str("# TYPE estate_rpc_in_flight gauge\n");
        for (m, s) in &methods {
            let _ = writeln!(out, "estate_rpc_in_flight{{method=\"{m}\"}} {}", s.in_flight.load(Ordering::Relaxed));
        }
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) on `listener` until the task is
/// aborted. HTTP/1.1 by hyper.
pub fn serve(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(global().render())))
                    } else {
                        http::Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    })
}
