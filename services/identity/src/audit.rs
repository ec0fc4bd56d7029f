//! Identity's audit constants.

/// Tenant id used for platform-level events (tokens issued to regulators or
/// admins), which belong to no tenant's log.
pub const PLATFORM_TENANT: &str = "platform";
