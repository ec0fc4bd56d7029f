//! Fixtures for tests: a tenant with one of everything, created through the
//! public API, and tokens for its principals.

use crate::{IdentityClient, TestMesh};
use estate_proto::common::CredentialKind;
use estate_proto::identity::*;

/// One tenant's objects, created through the public API.
#[derive(Debug, Clone)]
pub struct World {
    pub tenant: Tenant,
    pub operator_token: String,
    pub estate: Estate,
    pub gate: Gate,
    pub unit: Unit,
    pub person: Person,
    pub residency: Residency,
}

/// The operator grant of an IssueToken request.
pub fn grant_operator(tenant_id: &str, estate_ids: Vec<String>) -> issue_token_request::Principal {
    issue_token_request::Principal::Operator(OperatorGrant { tenant_id: tenant_id.to_owned(), estate_ids })
}

/// Creates a tenant as admin, an operator token for it, and an estate, gate,
/// unit, person and residency as that operator.
pub async fn world(mesh: &TestMesh, name: &str, jurisdiction: &str) -> anyhow::Result<World> {
    let mut admin = mesh.admin()?;
    let tenant = admin
        .create_tenant(CreateTenantRequest { name: name.into(), jurisdiction_code: jurisdiction.into() })
        .await?
        .into_inner();
    let operator_token = admin
        .issue_token(IssueTokenRequest {
            principal: Some(grant_operator(&tenant.id, vec![])),
            subject: format!("ops@{name}"),
            ttl_seconds: 3600,
        })
        .await?
        .into_inner()
        .token;
    let mut op = mesh.identity(&operator_token)?;
    let estate = op
        .create_estate(CreateEstateRequest {
            name: format!("{name} Garden"),
            address: "1 Nanjing Road".into(),
            jurisdiction_code: jurisdiction.into(),
        })
        .await?
        .into_inner();
    let gate = op
        .create_gate(CreateGateRequest {
            estate_id: estate.id.clone(),
            name: "North gate".into(),
            direction: GateDirection::In as i32,
            supported_kinds: vec![CredentialKind::Card as i32, CredentialKind::Face as i32],
        })
        .await?
        .into_inner();
    let unit = op
        .create_unit(CreateUnitRequest {
            estate_id: estate.id.clone(),
            building: "3".into(),
            unit: "2".into(),
            room: "1201".into(),
        })
        .await?
        .into_inner();
    let person = op
        .create_person(CreatePersonRequest {
            display_name: "Gu Wei".into(),
            phone: "138 0013 8000".into(),
            birth_date: "1980-05-01".into(),
            guardian_person_id: String::new(),
        })
        .await?
        .into_inner();
    let residency = op
        .create_residency(CreateResidencyRequest {
            person_id: person.id.clone(),
            unit_id: unit.id.clone(),
            role: ResidencyRole::Owner as i32,
            valid_from: None,
            valid_until: None,
        })
        .await?
        .into_inner();
    Ok(World { tenant, operator_token, estate, gate, unit, person, residency })
}

/// An identity client with the world's operator token.
pub fn operator(mesh: &TestMesh, w: &World) -> anyhow::Result<IdentityClient> {
    mesh.identity(&w.operator_token)
}

/// An audit event a tenant's services recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The event.
    pub event: estate_proto::common::AuditEvent,
}

/// Every audit event recorded for a tenant, wherever it is: in the outbox
/// (written with a change, copied to the log by the relay) or only in the
/// audit log (the all-in-one gate appends its decisions there directly).
/// Outbox events first, in write order, then the log's others in log order.
pub async fn recorded_events(mesh: &TestMesh, tenant_id: &str) -> anyhow::Result<Vec<Recorded>> {
    use prost::Message;
    let pool = mesh.db().pool();
    let mut out: Vec<Recorded> = estate_store::outbox::for_tenant(pool, tenant_id)
        .await?
        .into_iter()
        .map(|r| Recorded { event: r.event })
        .collect();
    let mut ids: std::collections::HashSet<String> = out.iter().map(|r| r.event.event_id.clone()).collect();
    let logged: Vec<(String, Vec<u8>)> = sqlx::query_as::<sqlx::Any, (String, Vec<u8>)>(
        "SELECT event_id, event FROM audit_entries WHERE tenant_id = $1 ORDER BY idx",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    for (id, bytes) in logged {
        if ids.insert(id) {
            let event = estate_proto::common::AuditEvent::decode(bytes.as_slice())?;
            out.push(Recorded { event });
        }
    }
    Ok(out)
}

/// Number of audit events recorded for a tenant (see [`recorded_events`]).
pub async fn outbox_count(mesh: &TestMesh, tenant_id: &str) -> anyhow::Result<usize> {
    Ok(recorded_events(mesh, tenant_id).await?.len())
}

/// A random id that exists nowhere.
pub fn random_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Publishes a notice, records an assessment and enables face at the world's
/// estate; returns the SHA-256 of the Chinese notice text.
pub async fn enable_face(mesh: &TestMesh, w: &World) -> anyhow::Result<(i64, String)> {
    use estate_proto::consent::*;
    let text = "本小区门禁可使用人脸识别，您可随时撤回并改用其他方式通行。";
    let mut op = mesh.consent(&w.operator_token)?;
    let notice = op
        .publish_notice(PublishNoticeRequest {
            estate_id: w.estate.id.clone(),
            text_zh_cn: text.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    op.record_impact_assessment(RecordImpactAssessmentRequest {
        estate_id: w.estate.id.clone(),
        author: "DPO".into(),
        assessed_on: "2026-10-01".into(),
        document_sha256: "ab".repeat(32),
    })
    .await?;
    op.set_face_verification(SetFaceVerificationRequest { estate_id: w.estate.id.clone(), enabled: true }).await?;
    Ok((notice.version, estate_crypto::sha256_hex(text.as_bytes())))
}

/// Face consent at `estate_id`, granted in the app by the resident holding
/// `resident_token`, under the notice [`enable_face`] returned.
pub async fn grant_face_consent(
    mesh: &TestMesh,
    resident_token: &str,
    estate_id: &str,
    (notice_version, notice_sha256): (i64, String),
) -> anyhow::Result<estate_proto::consent::Consent> {
    use estate_proto::consent::*;
    Ok(mesh
        .consent(resident_token)?
        .grant_consent(GrantConsentRequest {
            estate_id: estate_id.into(),
            purposes: vec![Purpose::FaceVerificationAtGates as i32],
            notice_version,
            notice_text_sha256: notice_sha256,
            affirmative_act: true,
            method: ConsentMethod::AppTap as i32,
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// A resident token for a person of the world's tenant.
pub fn resident(mesh: &TestMesh, w: &World, person_id: &str) -> anyhow::Result<String> {
    Ok(mesh
        .token_for(estate_auth::Principal::Resident { tenant_id: w.tenant.id.clone(), person_id: person_id.into() })?
        .token)
}

/// A gate token for the world's gate.
pub fn gate(mesh: &TestMesh, w: &World) -> anyhow::Result<String> {
    Ok(mesh
        .token_for(estate_auth::Principal::Gate {
            tenant_id: w.tenant.id.clone(),
            estate_id: w.estate.id.clone(),
            gate_id: w.gate.id.clone(),
        })?
        .token)
}
