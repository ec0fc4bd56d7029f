//! Who may call what: the kinds of principal each RPC of the mesh accepts
//! (R14). The [`AuthLayer`](crate::AuthLayer) checks this table right after
//! the token, before the request is decoded, so a caller of the wrong kind
//! gets PERMISSION_DENIED whatever it sends, and learns nothing from the
//! answer. Handlers then check scope (tenant, estate, person) themselves.
//!
//! An RPC missing from the table is refused (deny by default); a unit test
//! keeps the table in step with the contract.

use crate::principal::Principal;

/// A kind of caller, as the table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The platform administrator.
    Admin,
    /// Staff of a property group.
    Operator,
    /// A gate controller.
    Gate,
    /// A resident (or guardian).
    Resident,
    /// A regulator.
    Regulator,
    /// A mesh service with this name (`*`: any service).
    Service(&'static str),
}

impl Kind {
    /// Whether `principal` is of this kind.
    pub fn admits(self, principal: &Principal) -> bool {
        match (self, principal) {
            (Kind::Admin, Principal::PlatformAdmin)
            | (Kind::Operator, Principal::Operator { .. })
            | (Kind::Gate, Principal::Gate { .. })
            | (Kind::Resident, Principal::Resident { .. })
            | (Kind::Regulator, Principal::Regulator { .. }) => true,
            (Kind::Service(allowed), Principal::Service { name }) => allowed == "*" || allowed == name,
            _ => false,
        }
    }

    fn label(self) -> String {
        match self {
            Kind::Admin => "the platform admin".to_owned(),
            Kind::Operator => "operators".to_owned(),
            Kind::Gate => "gates".to_owned(),
            Kind::Resident => "residents".to_owned(),
            Kind::Regulator => "regulators".to_owned(),
            Kind::Service("*") => "mesh services".to_owned(),
            Kind::Service(name) => format!("the {name} service"),
        }
    }
}

use Kind::{Admin as A, Gate as G, Operator as O, Regulator as J, Resident as R};

const ANY: &[Kind] = &[A, O, G, R, J, Kind::Service("*")];
const CONSENT: Kind = Kind::Service("consent");
const GATE: Kind = Kind::Service("gate");

/// `(service, method, kinds)`: service is the short package name.
const TABLE: &[(&str, &str, &[Kind])] = &[
    // audit
    ("audit", "QueryEntries", &[O]),
    ("audit", "GetLatestCheckpoint", &[O, G, R]),
    ("audit", "Export", &[J]),
    ("audit", "AccessReport", &[R]),
    ("audit", "Append", &[Kind::Service("*")]),
    // consent
    ("consent", "PublishNotice", &[O]),
    ("consent", "GetCurrentNotice", &[O, G, R]),
    ("consent", "ListNotices", &[O]),
    ("consent", "GrantConsent", &[R]),
    ("consent", "WithdrawConsent", &[R]),
    ("consent", "GetConsent", &[O, G, R]),
    ("consent", "ListConsents", &[O, R]),
    ("consent", "IssueAttestation", &[O, G, R]),
    ("consent", "RecordImpactAssessment", &[O]),
    ("consent", "SetFaceVerification", &[O]),
    ("consent", "GetFaceVerification", &[O, G, R]),
    ("consent", "GetFilingStatus", &[O]),
    ("consent", "ListDeletionRequests", &[O]),
    ("consent", "GetDeletionCertificate", &[O, R]),
    ("consent", "RequestFaceDeletion", &[R]),
    // credentials
    ("credentials", "IssueCredential", &[O, R]),
    ("credentials", "GetCredential", &[O, R]),
    ("credentials", "ListCredentials", &[O, R]),
    ("credentials", "SuspendCredential", &[O, R]),
    ("credentials", "ReinstateCredential", &[O]),
    ("credentials", "RevokeCredential", &[O, R]),
    ("credentials", "RotateCredential", &[O, R]),
    ("credentials", "SetEstatePolicy", &[O]),
    ("credentials", "GetEstatePolicy", &[O, G, R]),
    ("credentials", "RequestAlternative", &[R]),
    ("credentials", "VerifyCredential", &[O, G]),
    // facematch
    ("facematch", "Enrol", &[O, G, R, CONSENT]),
    ("facematch", "Identify", &[O, G, GATE]),
    ("facematch", "Verify", &[O, G, GATE]),
    ("facematch", "Delete", &[O, CONSENT]),
    ("facematch", "GetCertificate", &[O, CONSENT]),
    ("facematch", "ListEnrolled", &[O, CONSENT]),
    ("facematch", "CountPersons", &[O, CONSENT]),
    ("facematch", "GetCertificateKeys", &[O, G, R, CONSENT, GATE]),
    ("facematch", "SetThreshold", &[O]),
    ("facematch", "ReadJournal", &[O, CONSENT]),
    // gate
    ("gate", "Decide", &[O, G]),
    ("gate", "WatchChanges", &[G]),
    ("gate", "GetOfflineBundle", &[G]),
    ("gate", "AckBundle", &[G]),
    ("gate", "UploadOfflineDecisions", &[G]),
    ("gate", "SetGateRules", &[O]),
    ("gate", "GetGateRules", &[O]),
    ("gate", "ListGateStatus", &[O]),
    // identity
    ("identity", "CreateTenant", &[A]),
    ("identity", "GetTenant", &[A, O, G, R, J]),
    ("identity", "UpdateTenant", &[A, O]),
    ("identity", "ListTenants", &[A, O, G, R, J]),
    ("identity", "DeactivateTenant", &[A]),
    ("identity", "CreateEstate", &[O]),
    ("identity", "GetEstate", &[O, G]),
    ("identity", "UpdateEstate", &[O]),
    ("identity", "ListEstates", &[O]),
    ("identity", "DeactivateEstate", &[O]),
    ("identity", "CreateGate", &[O]),
    ("identity", "GetGate", &[O, G]),
    ("identity", "UpdateGate", &[O]),
    ("identity", "ListGates", &[O]),
    ("identity", "DeactivateGate", &[O]),
    ("identity", "CreateUnit", &[O]),
    ("identity", "GetUnit", &[O]),
    ("identity", "UpdateUnit", &[O]),
    ("identity", "ListUnits", &[O]),
    ("identity", "DeactivateUnit", &[O]),
    ("identity", "CreatePerson", &[O]),
    ("identity", "GetPerson", &[O, R]),
    ("identity", "UpdatePerson", &[O]),
    ("identity", "ListPersons", &[O]),
    ("identity", "DeactivatePerson", &[O]),
    ("identity", "CreateResidency", &[O]),
    ("identity", "GetResidency", &[O, R]),
    ("identity", "UpdateResidency", &[O]),
    ("identity", "ListResidencies", &[O, R]),
    ("identity", "EndResidency", &[O]),
    ("identity", "IssueToken", &[A, O]),
    ("identity", "WhoAmI", ANY),
];

/// The kinds allowed to call `path` (`/estate.gate.v1.GateService/Decide`),
/// or `None` when the path is not an RPC of the mesh.
pub fn allowed(path: &str) -> Option<&'static [Kind]> {
    let rest = path.strip_prefix("/estate.")?;
    let (package, method) = rest.split_once('/')?;
    let (service, tail) = package.split_once(".v1.")?;
    if tail.contains('.') {
        return None;
    }
    TABLE.iter().find(|(s, m, _)| *s == service && *m == method).map(|(_, _, kinds)| *kinds)
}

/// Checks `principal` against the table: `Err` holds the message of the
/// PERMISSION_DENIED answer, naming who may make the call.
pub fn check(path: &str, principal: &Principal) -> Result<(), String> {
    let Some(kinds) = allowed(path) else {
        return Err("this RPC is not part of the mesh's access policy".to_owned());
    };
    if kinds.iter().any(|k| k.admits(principal)) {
        return Ok(());
    }
    let who: Vec<String> = kinds.iter().map(|k| k.label()).collect();
    Err(format!("this call is for {} only; a {} token cannot make it", who.join(", "), kind_name(principal)))
}

fn kind_name(p: &Principal) -> &'static str {
    match p {
        Principal::PlatformAdmin => "platform admin",
        Principal::Operator { .. } => "operator",
        Principal::Gate { .. } => "gate",
        Principal::Resident { .. } => "resident",
        Principal::Regulator { .. } => "regulator",
        Principal::Service { .. } => "service",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC of the contract has a row, and every row an RPC.
    #[test]
    fn the_table_covers_the_contract_exactly() {
        let paths: Vec<String> = estate_proto::rpcs().into_iter().map(|r| r.path).collect();
        assert!(paths.len() >= 84, "only {} RPCs in the descriptor set", paths.len());
        let open = crate::layer::OPEN_RPCS;
        for p in &paths {
            assert!(open.contains(&p.as_str()) || allowed(p).is_some(), "{p} has no row in the access policy");
        }
        assert_eq!(paths.len(), TABLE.len() + open.len(), "the table has rows for RPCs the contract lacks");
    }

    #[test]
    fn wrong_kinds_are_named_in_the_refusal() {
        let path = "/estate.identity.v1.IdentityService/CreateTenant";
        assert!(check(path, &Principal::PlatformAdmin).is_ok());
        let refusal =
            check(path, &Principal::Gate { tenant_id: "t".into(), estate_id: "e".into(), gate_id: "g".into() });
        assert_eq!(refusal, Err("this call is for the platform admin only; a gate token cannot make it".to_owned()));
        assert!(check("/estate.identity.v1.IdentityService/Nope", &Principal::PlatformAdmin).is_err());
        assert!(check("/estate.identity.v1.Other.IdentityService/WhoAmI", &Principal::PlatformAdmin).is_err());
        let append = "/estate.audit.v1.AuditService/Append";
        assert!(check(append, &Principal::Service { name: "identity".into() }).is_ok());
        let identify = "/estate.facematch.v1.FacematchService/Identify";
        assert!(check(identify, &Principal::Service { name: "gate".into() }).is_ok());
        assert!(check(identify, &Principal::Service { name: "consent".into() }).is_err());
    }
}
