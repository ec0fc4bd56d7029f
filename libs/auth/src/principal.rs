//! Principals and the scope checks that follow from them (R14).

use estate_core::{Error, JurisdictionCode, Result};
use estate_crypto::KeyedHasher;
use estate_proto::common::{Actor, ActorKind};
use serde::{Deserialize, Serialize};

/// The kinds of caller the mesh knows. Serialised into token claims under
/// the `pk` tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pk", rename_all = "snake_case")]
pub enum Principal {
    /// The bootstrap administrator: creates tenants and issues tokens. Holds
    /// no tenant, so it reads no tenant's residents.
    PlatformAdmin,
    /// Staff of a property group; `estate_ids` empty means every estate.
    Operator {
        tenant_id: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        estate_ids: Vec<String>,
    },
    /// A gate controller of one estate.
    Gate { tenant_id: String, estate_id: String, gate_id: String },
    /// A resident acting for themselves (and for minors they are guardian of).
    Resident { tenant_id: String, person_id: String },
    /// A regulator with authority over administrative division codes.
    Regulator { jurisdiction_codes: Vec<String> },
    /// A mesh service acting for itself (an outbox relay shipping to audit).
    Service { name: String },
}

/// An authenticated call: the principal, the token it came with and the
/// request id used to correlate audit events.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What the caller is.
    pub principal: Principal,
    /// Token subject: a staff login or device label (no personal data).
    pub subject: String,
    /// Token id (`jti`).
    pub token_id: String,
    /// Token expiry, seconds since the epoch.
    pub expires_at: i64,
    /// `x-request-id` of the call, or a generated one.
    pub request_id: String,
}

impl Caller {
    /// The caller as an audit actor, by role; residents appear by pseudonym
    /// (R17), staff and devices by token subject or gate id.
    pub fn actor(&self, hasher: &KeyedHasher) -> Actor {
        let (kind, id) = match &self.principal {
            Principal::PlatformAdmin => (ActorKind::PlatformAdmin, self.subject.clone()),
            Principal::Operator { .. } => (ActorKind::Operator, self.subject.clone()),
            Principal::Gate { gate_id, .. } => (ActorKind::Gate, gate_id.clone()),
            Principal::Resident { tenant_id, person_id } => {
                (ActorKind::Resident, hasher.pseudonym(tenant_id, person_id))
            }
            Principal::Regulator { .. } => (ActorKind::Regulator, self.subject.clone()),
            Principal::Service { name } => (ActorKind::Service, name.clone()),
        };
        Actor { kind: kind as i32, id }
    }

    /// The tenant the caller belongs to, or PERMISSION_DENIED for principals
    /// without one (admin, regulator).
    pub fn tenant_id(&self) -> Result<&str> {
        match &self.principal {
            Principal::Operator { tenant_id, .. }
            | Principal::Gate { tenant_id, .. }
            | Principal::Resident { tenant_id, .. } => Ok(tenant_id),
            Principal::PlatformAdmin => Err(Error::denied(
                "the platform admin holds no tenant; issue an operator token for the tenant and call with it",
            )),
            Principal::Regulator { .. } => Err(Error::denied("regulators cannot call tenant operations")),
            Principal::Service { .. } => Err(Error::denied("a service token holds no tenant")),
        }
    }

    /// Requires an operator; returns its tenant.
    pub fn operator_tenant(&self) -> Result<&str> {
        match &self.principal {
            Principal::Operator { tenant_id, .. } => Ok(tenant_id),
            _ => Err(Error::denied("this call needs an operator token")),
        }
    }

    /// Requires an operator with authority over every estate of its tenant.
    pub fn unrestricted_operator_tenant(&self) -> Result<&str> {
        match &self.principal {
            Principal::Operator { tenant_id, estate_ids } if estate_ids.is_empty() => Ok(tenant_id),
            Principal::Operator { .. } => {
                Err(Error::denied("this call needs an operator token valid for every estate of the tenant"))
            }
            _ => Err(Error::denied("this call needs an operator token")),
        }
    }

    /// Requires an operator allowed to manage `estate_id`; returns its tenant.
    /// Decided from the token alone, so the answer is the same whether the
    /// estate exists, belongs to another tenant or not (R14).
    pub fn operator_for_estate(&self, estate_id: &str) -> Result<&str> {
        match &self.principal {
            Principal::Operator { tenant_id, estate_ids } => {
                if estate_ids.is_empty() || estate_ids.iter().any(|e| e == estate_id) {
                    Ok(tenant_id)
                } else {
                    Err(Error::denied("this operator token is not valid for that estate"))
                }
            }
            _ => Err(Error::denied("this call needs an operator token")),
        }
    }

    /// The estates an operator is limited to (`None`: all of its tenant).
    pub fn operator_estate_limit(&self) -> Option<&[String]> {
        match &self.principal {
            Principal::Operator { estate_ids, .. } if !estate_ids.is_empty() => Some(estate_ids),
            _ => None,
        }
    }

    /// Whether the caller is the platform admin.
    pub fn is_platform_admin(&self) -> bool {
        matches!(self.principal, Principal::PlatformAdmin)
    }

    /// Requires the platform admin.
    pub fn require_platform_admin(&self) -> Result<()> {
        if self.is_platform_admin() { Ok(()) } else { Err(Error::denied("this call needs the platform admin token")) }
    }

    /// The regulator's jurisdictions, if the caller is one.
    pub fn regulator_jurisdictions(&self) -> Option<Vec<JurisdictionCode>> {
        match &self.principal {
            Principal::Regulator { jurisdiction_codes } => Some(
                jurisdiction_codes
                    .iter()
                    .filter_map(|c| JurisdictionCode::parse("jurisdiction_codes", c).ok())
                    .collect(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(principal: Principal) -> Caller {
        Caller { principal, subject: "s".into(), token_id: "j".into(), expires_at: 0, request_id: "r".into() }
    }

    #[test]
    fn estate_limited_operator_is_refused_other_estates() {
        let c = caller(Principal::Operator { tenant_id: "t".into(), estate_ids: vec!["e1".into()] });
        assert!(c.operator_for_estate("e1").is_ok());
        assert!(c.operator_for_estate("e2").is_err());
        assert!(c.unrestricted_operator_tenant().is_err());
    }

    #[test]
    fn admin_and_regulator_hold_no_tenant() {
        assert!(caller(Principal::PlatformAdmin).tenant_id().is_err());
        assert!(caller(Principal::Regulator { jurisdiction_codes: vec!["120000".into()] }).tenant_id().is_err());
    }
}
