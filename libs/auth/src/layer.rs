//! The tower layer that authenticates every gRPC call before it reaches a
//! handler.

use crate::principal::Caller;
use crate::token::VerifyingKeys;
use futures_util::future::BoxFuture;
use std::task::{Context, Poll};
use tonic::Status;

/// Metadata key that correlates a call with its audit events.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Paths anyone may call: health checks (probes), reflection (grpcurl) and
/// the published consent and audit verifying keys (public by design, R9, R12).
pub(crate) const OPEN_RPCS: [&str; 3] = [
    "/estate.consent.v1.ConsentService/GetVerifyingKeys",
    "/estate.audit.v1.AuditService/GetVerifyingKeys",
    "/estate.gate.v1.GateService/GetBundleKeys",
];

fn is_open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") || OPEN_RPCS.contains(&path)
}

/// Verifies the `authorization: Bearer …` metadata of every call, then checks
/// the caller's kind against the [access policy](crate::policy) of the RPC.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: VerifyingKeys,
}

impl AuthLayer {
    /// A layer accepting tokens signed by `keys`.
    pub fn new(keys: VerifyingKeys) -> Self {
        Self { keys }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, keys: self.keys.clone() }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    keys: VerifyingKeys,
}

fn request_id_of<B>(req: &http::Request<B>) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn authenticate<B>(keys: &VerifyingKeys, req: &http::Request<B>) -> Result<Caller, Status> {
    let request_id = request_id_of(req);
    let value = req.headers().get(http::header::AUTHORIZATION).ok_or_else(|| {
        Status::unauthenticated("missing authorization metadata; send \"authorization: Bearer <token>\"")
    })?;
    let text = value.to_str().map_err(|_| Status::unauthenticated("the authorization metadata is not valid text"))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("the authorization metadata must be \"Bearer <token>\""))?;
    let caller = keys.verify(token.trim(), request_id).map_err(Status::from)?;
    let path = req.uri().path();
    if path.starts_with("/estate.") {
        crate::policy::check(path, &caller.principal).map_err(Status::permission_denied)?;
    }
    Ok(caller)
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
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

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        // Take the service that was polled ready, leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !is_open_path(req.uri().path()) {
            match authenticate(&self.keys, &req) {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                }
                Err(status) => {
                    tracing::debug!(path = req.uri().path(), code = ?status.code(), "call rejected by authentication or the access policy");
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(inner.call(req))
    }
}

/// The authenticated caller of a request. Fails only if the server was built
/// without [`AuthLayer`], which is a bug.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().cloned().ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}
