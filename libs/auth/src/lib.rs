//! Who is calling, proven by a bearer token the mesh signed (Ed25519, JWT
//! `EdDSA`), and what that caller may touch (R14).
//!
//! The [`AuthLayer`] tower layer verifies the token of every call before any
//! handler runs and puts a [`Caller`] into the request extensions. Handlers
//! take the tenant from [`Caller`], never from a request field. Health checks
//! and reflection are open, as load balancers and grpcurl need them.

mod layer;
mod principal;
mod token;

pub use layer::{AuthLayer, AuthService, REQUEST_ID_HEADER, caller};
pub use principal::{Caller, Principal};
pub use token::{IssuedToken, TokenAuthority, VerifyingKeys};
