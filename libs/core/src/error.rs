//! The domain error and its one exhaustive mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Result with the domain [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure a caller can cause or observe. Messages say what to fix and
/// never carry a secret, a phone number, a PIN or face data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed; names the field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The object does not exist in the caller's scope. Also returned for
    /// objects of another tenant, so that their existence is not revealed (R14).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A uniqueness rule would be broken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller's principal may not do this; decided from the principal alone.
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credentials were presented.
    #[error("{0}")]
    Unauthenticated(String),
    /// The system is not in a state that allows the call; says which rule.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (database, cache) is unreachable; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A per-caller or per-process limit is reached; says which and what to do.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug or an unexpected storage failure; details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    /// An invalid-argument error naming `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument { field, reason: reason.into() }
    }

    /// A permission error with a message that states the rule.
    pub fn denied(reason: impl Into<String>) -> Self {
        Self::PermissionDenied(reason.into())
    }

    /// A failed-precondition error with a message that states the rule.
    pub fn precondition(reason: impl Into<String>) -> Self {
        Self::FailedPrecondition(reason.into())
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        if let Error::Internal(detail) = &err {
            tracing::error!(detail = %detail, "internal error");
        }
        Status::new(code, err.to_string())
    }
}
