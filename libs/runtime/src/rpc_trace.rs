//! One span per RPC, joined to the caller's trace when the request carries a
//! W3C `traceparent`: the server side of trace propagation across gRPC hops.
//! The span records the method and the gRPC status of unary answers; the
//! same layer feeds the RED metrics (`crate::metrics`).

use futures_util::future::BoxFuture;
use std::task::{Context, Poll};
use tracing::Instrument;

/// Tower layer adding the per-RPC span (outermost, so authentication is
/// inside it).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// The service produced by [`RpcTraceLayer`].
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcTrace<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        if let Some(parent) = req.headers().get("traceparent").and_then(|v| v.to_str().ok()) {
            estate_telemetry::set_parent(&span, parent);
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let recorder = span.clone();
        let call = crate::metrics::global().start(&method);
        Box::pin(
            async move {
                let response = match inner.call(req).await {
                    Ok(r) => r,
                    Err(e) => {
                        call.done(2);
                        return Err(e);
                    }
                };
                // Unary answers carry the status in the headers; streams in
                // trailers, which are not seen here (0 until proven otherwise).
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                recorder.record("rpc.grpc.status_code", code);
                call.done(code);
                Ok(response)
            }
            .instrument(span),
        )
    }
}
