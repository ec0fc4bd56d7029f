//! Who is calling, proven by a bearer token the mesh signed (Ed25519, JWT
//! `EdDSA`), and what that caller may touch (R14).
//!
//! The [`AuthLayer`] tower layer verifies the token of every call before any
//! handler runs, refuses kinds of caller the RPC's [`policy`] does not name,
//! and puts a [`Caller`] into the request extensions. Handlers
//! take the tenant from [`Caller`], never from a request field. Health checks
//! and reflection are open, as load balancers and grpcurl need them.

mod layer;
pub mod policy;
mod principal;
pub mod tls;
mod token;

pub use estate_telemetry::HANDLER_SPAN;
pub use layer::{AuthLayer, AuthService, REQUEST_ID_HEADER, TOKEN_HEADER, caller, take_caller};
pub use principal::{Caller, Principal};
pub use token::{IssuedToken, TokenAuthority, VerifyingKeys};

/// Implements unary RPCs of a tonic service trait (inside a
/// `#[tonic::async_trait] impl`): each authenticates the caller, calls the
/// inherent method of the same name with it, logs a refusal's code (never its
/// input) and maps the domain error to a gRPC status.
///
/// `estate_auth::unary_rpcs!("identity", Identity; create_tenant(CreateTenantRequest) -> Tenant; …)`
#[macro_export]
macro_rules! unary_rpcs {
    ($service:literal, $ty:ty; $($name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                request: ::tonic::Request<$req>,
            ) -> ::std::pin::Pin<
                Box<dyn ::std::future::Future<Output = ::std::result::Result<::tonic::Response<$resp>, ::tonic::Status>> + Send + 'async_trait>,
            >
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                let span = ::tracing::info_span!(
                    $crate::HANDLER_SPAN,
                    otel.name = concat!($service, ".", stringify!($name)),
                    service = $service,
                    method = stringify!($name)
                );
                Box::pin(::tracing::Instrument::instrument(
                    async move {
                        let mut request = request;
                        let caller = $crate::take_caller(&mut request)?;
                        let result = <$ty>::$name(self, &caller, request.into_inner()).await;
                        if let Err(e) = &result {
                            ::tracing::debug!(code = ?e.code(), "call refused");
                        }
                        result.map(::tonic::Response::new).map_err(::tonic::Status::from)
                    },
                    span,
                ))
            }
        )*
    };
}
