//! Deadlines (gRPC `grpc-timeout`) and a ceiling on how long any call may
//! take (`limits.request_timeout_ms`). When the shorter of the two passes,
//! the handler's future is dropped — a transaction it held rolls back, a
//! lock it waited for is given up — and the caller gets DEADLINE_EXCEEDED
//! with what to do about it.
//!
//! tonic's transport honours `grpc-timeout` too, but answers CANCELLED
//! ("Timeout expired"); this layer runs inside it and fires a little earlier
//! (2% of the deadline, 1 to 20 ms), so callers see the status the gRPC
//! specification names. (A tonic client also enforces its own deadline and
//! may report CANCELLED "Timeout expired" locally if the answer is late.) Streams
//! are bounded only until their headers are sent: a `WatchChanges`
//! subscription lives on.

use futures_util::future::BoxFuture;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;

/// Tower layer bounding each call by its deadline and by `ceiling`.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    ceiling: Option<Duration>,
}

impl DeadlineLayer {
    /// `ceiling`: the longest any call may run (`None`: only callers' deadlines).
    pub fn new(ceiling: Option<Duration>) -> Self {
        Self { ceiling }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, ceiling: self.ceiling }
    }
}

/// The service produced by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    ceiling: Option<Duration>,
}

/// The caller's `grpc-timeout` (`1*8 digits` and a unit: H, M, S, m, u, n),
/// or `None` when absent or malformed (then only the ceiling applies).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Deadline<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let asked = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        // A little before the deadline (2%, 1 to 20 ms), so that the answer
        // reaches a caller still waiting for it and beats tonic's own timer.
        let asked =
            asked.map(|d| d.saturating_sub((d / 50).clamp(Duration::from_millis(1), Duration::from_millis(20))));
        let limit = match (asked, self.ceiling) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        let Some(limit) = limit else { return Box::pin(fut) };
        let from_caller = asked.is_some_and(|a| self.ceiling.is_none_or(|c| a <= c));
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    let ms = limit.as_millis();
                    let status = if from_caller {
                        Status::deadline_exceeded(format!(
                            "the call's deadline ({ms} ms) passed before it finished; its work was abandoned \
                             (a change it was making was rolled back, or had already committed); retry with a \
                             longer deadline, reusing the request id where the call takes one"
                        ))
                    } else {
                        Status::deadline_exceeded(format!(
                            "the call ran longer than this server allows (limits.request_timeout_ms = {ms}); \
                             its work was abandoned; retry later"
                        ))
                    };
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service};

    fn slow(
        ms: u64,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: http::Request<()>| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::default()))
        })
    }

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri("/estate.identity.v1.IdentityService/CreateUnit");
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(()).unwrap_or_default()
    }

    fn status_of(r: &http::Response<tonic::body::Body>) -> (Option<String>, String) {
        let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (h("grpc-status"), h("grpc-message").unwrap_or_default())
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_answered_deadline_exceeded() {
        let mut svc = DeadlineLayer::new(None).layer(slow(2_000));
        let started = std::time::Instant::now();
        let r = svc.call(request(Some("100m"))).await.unwrap_or_default();
        assert!(started.elapsed() < Duration::from_millis(1_500));
        let (code, message) = status_of(&r);
        assert_eq!(code.as_deref(), Some("4"));
        assert!(message.contains("deadline"), "{message}");
        // In time: the inner answer, untouched.
        let mut svc = DeadlineLayer::new(Some(Duration::from_secs(5))).layer(slow(10));
        let r = svc.call(request(Some("2S"))).await.unwrap_or_default();
        assert_eq!(status_of(&r).0, None);
        // No deadline and no ceiling: never cut.
        let mut svc = DeadlineLayer::new(None).layer(slow(50));
        assert_eq!(status_of(&svc.call(request(None)).await.unwrap_or_default()).0, None);
    }

    #[tokio::test]
    async fn the_ceiling_applies_without_a_deadline_and_names_the_setting() {
        let mut svc = DeadlineLayer::new(Some(Duration::from_millis(80))).layer(slow(2_000));
        let r = svc.call(request(None)).await.unwrap_or_default();
        let (code, message) = status_of(&r);
        assert_eq!(code.as_deref(), Some("4"));
        assert!(message.contains("limits.request_timeout_ms"), "{message}");
        // A longer deadline than the ceiling: the ceiling wins.
        let r = svc.call(request(Some("10S"))).await.unwrap_or_default();
        assert!(status_of(&r).1.contains("limits.request_timeout_ms"));
    }

    #[test]
    fn grpc_timeout_values_parse_as_the_specification_says() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "10", "123456789m", "-1m", "1.5S", "10x", "1 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
