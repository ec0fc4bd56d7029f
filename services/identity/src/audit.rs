//! Building the audit events identity writes to the outbox (R11, R17).

use estate_auth::{Caller, Principal};
use estate_crypto::KeyedHasher;
use estate_proto::common::{Actor, ActorKind, AuditEvent};
use std::collections::HashMap;

/// Tenant id used for platform-level events (tokens issued to regulators or
/// admins), which belong to no tenant's log.
pub const PLATFORM_TENANT: &str = "platform";

/// The actor of a call, by role; residents appear by pseudonym (R17).
pub(crate) fn actor_of(caller: &Caller, hasher: &KeyedHasher) -> Actor {
    let (kind, id) = match &caller.principal {
        Principal::PlatformAdmin => (ActorKind::PlatformAdmin, caller.subject.clone()),
        Principal::Operator { .. } => (ActorKind::Operator, caller.subject.clone()),
        Principal::Gate { gate_id, .. } => (ActorKind::Gate, gate_id.clone()),
        Principal::Resident { tenant_id, person_id } => (ActorKind::Resident, hasher.pseudonym(tenant_id, person_id)),
        Principal::Regulator { .. } => (ActorKind::Regulator, caller.subject.clone()),
    };
    Actor { kind: kind as i32, id }
}

/// One state change, described for the audit log.
#[derive(Debug)]
pub(crate) struct Change<'a> {
    pub tenant_id: &'a str,
    pub action: &'static str,
    pub object_type: &'static str,
    pub object_id: &'a str,
    pub estate_id: &'a str,
    pub person_pseudonym: &'a str,
    pub concerns_minor: bool,
    pub attributes: Vec<(&'static str, String)>,
}

impl<'a> Change<'a> {
    pub(crate) fn new(tenant_id: &'a str, action: &'static str, object_type: &'static str, object_id: &'a str) -> Self {
        Self {
            tenant_id,
            action,
            object_type,
            object_id,
            estate_id: "",
            person_pseudonym: "",
            concerns_minor: false,
            attributes: Vec::new(),
        }
    }

    pub(crate) fn estate(mut self, estate_id: &'a str) -> Self {
        self.estate_id = estate_id;
        self
    }

    pub(crate) fn person(mut self, pseudonym: &'a str, minor: bool) -> Self {
        self.person_pseudonym = pseudonym;
        self.concerns_minor = minor;
        self
    }

    pub(crate) fn attr(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }

    pub(crate) fn into_event(self, caller: &Caller, hasher: &KeyedHasher) -> AuditEvent {
        let now = estate_core::now_ms();
        let (seconds, nanos) = estate_core::ms_to_timestamp_parts(now);
        AuditEvent {
            event_id: estate_core::new_id(),
            tenant_id: self.tenant_id.to_owned(),
            estate_id: self.estate_id.to_owned(),
            actor: Some(actor_of(caller, hasher)),
            action: self.action.to_owned(),
            object_type: self.object_type.to_owned(),
            object_id: self.object_id.to_owned(),
            person_pseudonym: self.person_pseudonym.to_owned(),
            occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
            request_id: caller.request_id.clone(),
            attributes: self.attributes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<HashMap<_, _>>(),
            concerns_minor: self.concerns_minor,
            source: "identity".to_owned(),
        }
    }
}
