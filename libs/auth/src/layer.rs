//! The tower layer that authenticates every gRPC call before it reaches a
//! handler.

use crate::principal::Caller;
use crate::token::VerifyingKeys;
use futures_util::future::BoxFuture;
use std::task::{Context, Poll};
use tonic::Status;

/// Metadata key that correlates a call with its audit events.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub use estate_proto::TOKEN_HEADER;

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

/// Verifies the `authorization: Bearer …` (or [`TOKEN_HEADER`]) metadata of
/// every call, then checks
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
        .unwrap_or_else(|| estate_core::encode_id(uuid::Uuid::new_v4()))
}

/// The token a request carries: `authorization: Bearer <token>` or
/// [`TOKEN_HEADER`]`: <token>`, not both.
fn token_of<B>(req: &http::Request<B>) -> Result<&str, Status> {
    let headers = req.headers();
    match (headers.get(http::header::AUTHORIZATION), headers.get(TOKEN_HEADER)) {
        (Some(_), Some(_)) => Err(Status::unauthenticated(format!(
            "send the token once: in \"authorization: Bearer <token>\" or in \"{TOKEN_HEADER}\", not both"
        ))),
        (None, None) => Err(Status::unauthenticated(format!(
            "missing authorization metadata; send \"authorization: Bearer <token>\" (or \"{TOKEN_HEADER}: <token>\")"
        ))),
        (Some(value), None) => {
            let text =
                value.to_str().map_err(|_| Status::unauthenticated("the authorization metadata is not valid text"))?;
            text.strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization metadata must be \"Bearer <token>\""))
        }
        (None, Some(value)) => value
            .to_str()
            .map_err(|_| Status::unauthenticated(format!("the {TOKEN_HEADER} metadata is not valid text"))),
    }
}

fn authenticate<B>(keys: &VerifyingKeys, req: &http::Request<B>) -> Result<Caller, Status> {
    let request_id = request_id_of(req);
    let token = token_of(req)?;
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
    req.extensions().get::<Caller>().cloned().ok_or_else(not_authenticated)
}

/// [`caller`], taken out of the request rather than copied (a unary call's
/// handler, which has no further use for it there).
pub fn take_caller<T>(req: &mut tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions_mut().remove::<Caller>().ok_or_else(not_authenticated)
}

fn not_authenticated() -> Status {
    Status::unauthenticated("the call was not authenticated")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::Principal;
    use crate::token::TokenAuthority;
    use estate_crypto::SigningKeyPair;

    fn request(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().uri("/estate.gate.v1.GateService/Decide");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap_or_default()
    }

    #[test]
    fn the_token_is_taken_from_either_header_and_not_from_both() -> Result<(), Box<dyn std::error::Error>> {
        let authority = TokenAuthority::new("estate-mesh", &SigningKeyPair::from_seed([3; 32]))?;
        let keys = authority.verifying_keys();
        let gate = Principal::Gate { tenant_id: "t1".into(), estate_id: "e1".into(), gate_id: "g1".into() };
        let token = authority.issue(gate.clone(), "gate", 60)?.token;
        let bearer = format!("Bearer {token}");

        let by_authorization = authenticate(keys, &request(&[("authorization", &bearer)]))?;
        assert_eq!(by_authorization.principal, gate);
        let by_token_header = authenticate(keys, &request(&[(TOKEN_HEADER, &token)]))?;
        assert_eq!(by_token_header.principal, gate);

        let both = authenticate(keys, &request(&[("authorization", &bearer), (TOKEN_HEADER, &token)]));
        assert!(both.is_err_and(|s| s.code() == tonic::Code::Unauthenticated && s.message().contains("not both")));
        let none = authenticate(keys, &request(&[]));
        assert!(none.is_err_and(|s| s.code() == tonic::Code::Unauthenticated && s.message().contains(TOKEN_HEADER)));
        // The bare header takes the token alone, verified as strictly.
        let prefixed = authenticate(keys, &request(&[(TOKEN_HEADER, &bearer)]));
        assert!(prefixed.is_err_and(|s| s.code() == tonic::Code::Unauthenticated));
        // One character inside the signature changed (not the last one,
        // whose low bits base64 does not use).
        let at = token.len() - 10;
        let swapped = if token.as_bytes()[at] == b'A' { "B" } else { "A" };
        let forged = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        let forged = authenticate(keys, &request(&[(TOKEN_HEADER, &forged)]));
        assert!(forged.is_err_and(|s| s.code() == tonic::Code::Unauthenticated));
        Ok(())
    }

    #[test]
    fn a_handler_takes_the_caller_the_layer_put_there() -> Result<(), Box<dyn std::error::Error>> {
        let authority = TokenAuthority::new("estate-mesh", &SigningKeyPair::from_seed([3; 32]))?;
        let gate = Principal::Gate { tenant_id: "t1".into(), estate_id: "e1".into(), gate_id: "g1".into() };
        let token = authority.issue(gate.clone(), "gate", 60)?.token;
        let authenticated = authenticate(authority.verifying_keys(), &request(&[(TOKEN_HEADER, &token)]))?;
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(authenticated);
        assert_eq!(take_caller(&mut req)?.principal, gate);
        let again = take_caller(&mut req);
        assert!(again.is_err_and(|s| s.code() == tonic::Code::Unauthenticated), "taken once");
        let unauthenticated = caller(&tonic::Request::new(()));
        assert!(unauthenticated.is_err_and(|s| s.code() == tonic::Code::Unauthenticated));
        Ok(())
    }
}
