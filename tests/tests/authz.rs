//! The authorisation matrix (issue: hardening, point 2; R14), generated from
//! the contract: every RPC of every mesh service, as listed in the descriptor
//! set the servers publish, is called
//!
//! 1. by every kind of principal the RPC is not for (platform admin,
//!    operator, gate, resident, regulator, the consent / gate / identity
//!    services), with a valid token of the same tenant: the answer must be
//!    exactly PERMISSION_DENIED, naming who may call, whatever the request
//!    holds (it is refused before the request is decoded);
//! 2. by every kind it is for, but with a token of another tenant (or, for a
//!    regulator, another jurisdiction), with a request naming tenant A's
//!    objects (every `*_id` field filled from A's world): the answer must be
//!    exactly the answer to the same request naming ids that exist nowhere
//!    (so B cannot even detect A's objects), never success with A's data,
//!    and A's outbox must not grow.
//!
//! The expected kinds per RPC are written out below as the specification;
//! the mesh enforces its own copy (`estate_auth::policy`).

mod support;

use estate_auth::Principal;
use estate_proto::consent::{Consent, IssueAttestationRequest, RequestFaceDeletionRequest};
use estate_proto::credentials::{CardSecret, IssueCredentialRequest, issue_credential_request};
use estate_proto::facematch::{EnrolRequest, FaceSample};
use estate_test_support::TestMesh;
use std::collections::{BTreeMap, HashMap};
use support::raw::{Rpc, call, every_rpc};
use support::*;
use tonic::Code;

/// Who each RPC is for. A: platform admin, O: operator, G: gate,
/// R: resident, J: regulator; `consent`, `gate`, `*`: service principals
/// (`*` any service).
const SPEC: &[(&str, &str)] = &[
    ("audit.QueryEntries", "O"),
    ("audit.GetLatestCheckpoint", "O G R"),
    ("audit.GetVerifyingKeys", "open"),
    ("audit.Export", "J"),
    ("audit.AccessReport", "R"),
    ("audit.Append", "*"),
    ("consent.PublishNotice", "O"),
    ("consent.GetCurrentNotice", "O G R"),
    ("consent.ListNotices", "O"),
    ("consent.GrantConsent", "R"),
    ("consent.WithdrawConsent", "R"),
    ("consent.GetConsent", "O G R"),
    ("consent.ListConsents", "O R"),
    ("consent.IssueAttestation", "O G R"),
    ("consent.GetVerifyingKeys", "open"),
    ("consent.RecordImpactAssessment", "O"),
    ("consent.SetFaceVerification", "O"),
    ("consent.GetFaceVerification", "O G R"),
    ("consent.GetFilingStatus", "O"),
    ("consent.ListDeletionRequests", "O"),
    ("consent.GetDeletionCertificate", "O R"),
    ("consent.RequestFaceDeletion", "R"),
    ("credentials.IssueCredential", "O R"),
    ("credentials.GetCredential", "O R"),
    ("credentials.ListCredentials", "O R"),
    ("credentials.SuspendCredential", "O R"),
    ("credentials.ReinstateCredential", "O"),
    ("credentials.RevokeCredential", "O R"),
    ("credentials.RotateCredential", "O R"),
    ("credentials.SetEstatePolicy", "O"),
    ("credentials.GetEstatePolicy", "O G R"),
    ("credentials.RequestAlternative", "R"),
    ("credentials.VerifyCredential", "O G"),
    ("facematch.Enrol", "O G R consent"),
    ("facematch.Identify", "O G gate"),
    ("facematch.Verify", "O G gate"),
    ("facematch.Delete", "O consent"),
    ("facematch.GetCertificate", "O consent"),
    ("facematch.ListEnrolled", "O consent"),
    ("facematch.CountPersons", "O consent"),
    ("facematch.GetCertificateKeys", "O G R consent gate"),
    ("facematch.SetThreshold", "O"),
    ("facematch.ReadJournal", "O consent"),
    ("gate.Decide", "O G"),
    ("gate.WatchChanges", "G"),
    ("gate.GetOfflineBundle", "G"),
    ("gate.AckBundle", "G"),
    ("gate.UploadOfflineDecisions", "G"),
    ("gate.GetBundleKeys", "open"),
    ("gate.SetGateRules", "O"),
    ("gate.GetGateRules", "O"),
    ("gate.ListGateStatus", "O"),
    ("identity.CreateTenant", "A"),
    ("identity.GetTenant", "A O G R J"),
    ("identity.UpdateTenant", "A O"),
    ("identity.ListTenants", "A O G R J"),
    ("identity.DeactivateTenant", "A"),
    ("identity.CreateEstate", "O"),
    ("identity.GetEstate", "O G"),
    ("identity.UpdateEstate", "O"),
    ("identity.ListEstates", "O"),
    ("identity.DeactivateEstate", "O"),
    ("identity.CreateGate", "O"),
    ("identity.GetGate", "O G"),
    ("identity.UpdateGate", "O"),
    ("identity.ListGates", "O"),
    ("identity.DeactivateGate", "O"),
    ("identity.CreateUnit", "O"),
    ("identity.GetUnit", "O"),
    ("identity.UpdateUnit", "O"),
    ("identity.ListUnits", "O"),
    ("identity.DeactivateUnit", "O"),
    ("identity.CreatePerson", "O"),
    ("identity.GetPerson", "O R"),
    ("identity.UpdatePerson", "O"),
    ("identity.ListPersons", "O"),
    ("identity.DeactivatePerson", "O"),
    ("identity.CreateResidency", "O"),
    ("identity.GetResidency", "O R"),
    ("identity.UpdateResidency", "O"),
    ("identity.ListResidencies", "O R"),
    ("identity.EndResidency", "O"),
    ("identity.IssueToken", "A O"),
    ("identity.WhoAmI", "A O G R J *"),
];

/// A principal kind of the matrix: its letter in [`SPEC`] and a principal of
/// that kind.
struct Kind {
    letter: &'static str,
    principal: Principal,
}

fn kinds(w: &World, jurisdiction: &str) -> Vec<Kind> {
    let t = w.tenant.id.clone();
    vec![
        Kind { letter: "A", principal: Principal::PlatformAdmin },
        Kind { letter: "O", principal: Principal::Operator { tenant_id: t.clone(), estate_ids: vec![] } },
        Kind {
            letter: "G",
            principal: Principal::Gate {
                tenant_id: t.clone(),
                estate_id: w.estate.id.clone(),
                gate_id: w.gate.id.clone(),
            },
        },
        Kind { letter: "R", principal: Principal::Resident { tenant_id: t, person_id: w.person.id.clone() } },
        Kind { letter: "J", principal: Principal::Regulator { jurisdiction_codes: vec![jurisdiction.into()] } },
        Kind { letter: "consent", principal: Principal::Service { name: "consent".into() } },
        Kind { letter: "gate", principal: Principal::Service { name: "gate".into() } },
        Kind { letter: "identity", principal: Principal::Service { name: "identity".into() } },
    ]
}

fn allows(spec: &str, kind: &Kind) -> bool {
    spec.split(' ').any(|k| k == kind.letter || (k == "*" && matches!(kind.principal, Principal::Service { .. })))
}

fn short(rpc: &Rpc) -> String {
    format!("{}.{}", rpc.service, rpc.method)
}

fn spec_of(rpc: &Rpc) -> anyhow::Result<&'static str> {
    SPEC.iter()
        .find(|(name, _)| *name == short(rpc))
        .map(|(_, s)| *s)
        .ok_or_else(|| anyhow::anyhow!("{} is not in the matrix's specification; add it", rpc.path))
}

/// The object a method's bare `id` names (`GetEstate` → the estate), and
/// the field that names the same kind of object elsewhere.
const OBJECTS: [(&str, &str); 8] = [
    ("Tenant", "tenant_id"),
    ("Estate", "estate_id"),
    ("Gate", "gate_id"),
    ("Unit", "unit_id"),
    ("Person", "person_id"),
    ("Residency", "residency_id"),
    ("Credential", "credential_id"),
    ("Consent", "consent_id"),
];

/// Tenant A's ids by request field, for the id fields a request may carry.
struct Ids {
    by_field: HashMap<&'static str, String>,
}

impl Ids {
    fn of(w: &World, credential_id: &str, consent: &Consent, deletion_request_id: &str) -> Self {
        let by_field = HashMap::from([
            ("tenant_id", w.tenant.id.clone()),
            ("estate_id", w.estate.id.clone()),
            ("estate_ids", w.estate.id.clone()),
            ("gate_id", w.gate.id.clone()),
            ("unit_id", w.unit.id.clone()),
            ("person_id", w.person.id.clone()),
            ("guardian_person_id", w.person.id.clone()),
            ("residency_id", w.residency.id.clone()),
            ("credential_id", credential_id.to_owned()),
            ("consent_id", consent.id.clone()),
            ("person_pseudonym", consent.person_pseudonym.clone()),
            ("deletion_request_id", deletion_request_id.to_owned()),
        ]);
        Self { by_field }
    }

    /// The id for `field` of `rpc`'s request; a bare `id` names the object
    /// of the method (`GetEstate` → the estate).
    fn for_field(&self, rpc: &Rpc, field: &str) -> Option<&String> {
        if field == "id" {
            let (_, key) = OBJECTS.iter().find(|(noun, _)| rpc.method.ends_with(noun))?;
            return self.by_field.get(key);
        }
        self.by_field.get(field)
    }
}

/// The request of `rpc` with every id field it has filled from `ids`, or,
/// when `nowhere`, the same fields with fresh random ids.
fn request(rpc: &Rpc, ids: &Ids, nowhere: bool) -> Vec<u8> {
    let id = |field: &str| {
        let own = ids.by_field.get(field).cloned().unwrap_or_default();
        if nowhere { random_id() } else { own }
    };
    if let Some(full) = complete(&short(rpc), &id) {
        return full;
    }
    let mut out = Vec::new();
    for field in &rpc.input.field {
        let name = field.name.clone().unwrap_or_default();
        if field.r#type != Some(prost_types::field_descriptor_proto::Type::String as i32) {
            continue;
        }
        let value = ids.for_field(rpc, &name).map(|v| if nowhere { random_id() } else { v.clone() });
        if let (Some(value), Some(number)) = (value, field.number) {
            prost::encoding::string::encode(number as u32, &value, &mut out);
        }
    }
    out
}

/// Requests that carry more than ids, complete enough to pass validation so
/// that the scope check is what answers.
fn complete(rpc: &str, id: &dyn Fn(&str) -> String) -> Option<Vec<u8>> {
    use estate_proto::common::CredentialKind as K;
    use estate_proto::{consent as c, credentials as cr, facematch as f, identity as i};
    use prost::Message;
    let sha = "ab".repeat(32);
    Some(match rpc {
        "consent.PublishNotice" => {
            c::PublishNoticeRequest { estate_id: id("estate_id"), text_zh_cn: "通知".into(), ..Default::default() }
                .encode_to_vec()
        }
        "consent.GrantConsent" => c::GrantConsentRequest {
            estate_id: id("estate_id"),
            purposes: vec![c::Purpose::FaceVerificationAtGates as i32],
            notice_version: 1,
            notice_text_sha256: sha,
            affirmative_act: true,
            method: c::ConsentMethod::AppTap as i32,
            ..Default::default()
        }
        .encode_to_vec(),
        "consent.RecordImpactAssessment" => c::RecordImpactAssessmentRequest {
            estate_id: id("estate_id"),
            author: "DPO".into(),
            assessed_on: "2026-10-01".into(),
            document_sha256: sha,
        }
        .encode_to_vec(),
        "credentials.IssueCredential" => IssueCredentialRequest {
            person_id: id("person_id"),
            estate_ids: vec![id("estate_id")],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "04D4E5F6".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        }
        .encode_to_vec(),
        "credentials.SetEstatePolicy" => cr::SetEstatePolicyRequest {
            estate_id: id("estate_id"),
            accepted_kinds: vec![K::Card as i32],
            alternative_kinds: vec![],
        }
        .encode_to_vec(),
        "facematch.Verify" => f::VerifyRequest {
            estate_id: id("estate_id"),
            person_pseudonym: id("person_pseudonym"),
            probe: Some(f::FaceSample { template: vec![0.5; 512], image: Vec::new() }),
        }
        .encode_to_vec(),
        "facematch.Identify" => f::IdentifyRequest {
            estate_id: id("estate_id"),
            probe: Some(f::FaceSample { template: vec![0.5; 512], image: Vec::new() }),
        }
        .encode_to_vec(),
        "facematch.Delete" => f::DeleteRequest {
            person_pseudonym: id("person_pseudonym"),
            estate_id: id("estate_id"),
            reason: f::DeletionReason::Request as i32,
            request_id: random_id(),
        }
        .encode_to_vec(),
        "facematch.SetThreshold" => {
            f::SetThresholdRequest { estate_id: id("estate_id"), threshold: 0.5 }.encode_to_vec()
        }
        "identity.CreateEstate" => i::CreateEstateRequest {
            name: "Gamma".into(),
            address: "2 Binjiang Road".into(),
            jurisdiction_code: "120101".into(),
        }
        .encode_to_vec(),
        "identity.UpdateEstate" => {
            i::UpdateEstateRequest { id: id("estate_id"), name: Some("x".into()), ..Default::default() }.encode_to_vec()
        }
        "identity.CreateGate" => i::CreateGateRequest {
            estate_id: id("estate_id"),
            name: "South gate".into(),
            direction: i::GateDirection::In as i32,
            supported_kinds: vec![K::Card as i32],
        }
        .encode_to_vec(),
        "identity.UpdateGate" => {
            i::UpdateGateRequest { id: id("gate_id"), name: Some("x".into()), ..Default::default() }.encode_to_vec()
        }
        "identity.CreateUnit" => i::CreateUnitRequest {
            estate_id: id("estate_id"),
            building: "9".into(),
            unit: "1".into(),
            room: "101".into(),
        }
        .encode_to_vec(),
        "identity.UpdateUnit" => {
            i::UpdateUnitRequest { id: id("unit_id"), room: Some("102".into()), ..Default::default() }.encode_to_vec()
        }
        "identity.CreatePerson" => i::CreatePersonRequest {
            display_name: "Li Na".into(),
            guardian_person_id: id("person_id"),
            birth_date: "2020-01-01".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        "identity.CreateResidency" => i::CreateResidencyRequest {
            person_id: id("person_id"),
            unit_id: id("unit_id"),
            role: i::ResidencyRole::Owner as i32,
            ..Default::default()
        }
        .encode_to_vec(),
        "identity.UpdateResidency" => i::UpdateResidencyRequest {
            id: id("residency_id"),
            role: Some(i::ResidencyRole::Renter as i32),
            ..Default::default()
        }
        .encode_to_vec(),
        "identity.IssueToken" => i::IssueTokenRequest {
            principal: Some(i::issue_token_request::Principal::Gate(i::GateGrant { gate_id: id("gate_id") })),
            subject: "device-7".into(),
            ttl_seconds: 600,
        }
        .encode_to_vec(),
        _ => return None,
    })
}

async fn answer(mesh: &TestMesh, rpc: &Rpc, body: Vec<u8>, token: &str) -> Result<Vec<u8>, (Code, String)> {
    match tokio::time::timeout(std::time::Duration::from_secs(5), call(mesh.channel(), rpc, body, Some(token))).await {
        Ok(r) => r.map_err(|s| (s.code(), s.message().to_owned())),
        Err(_) => Ok(b"(stream open)".to_vec()),
    }
}

#[tokio::test]
async fn every_rpc_refuses_wrong_kinds_and_other_tenants_exactly() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let b = world(&mesh, "Beta", "310101").await?;
    let card = mesh
        .credentials(&a.operator_token)?
        .issue_credential(IssueCredentialRequest {
            person_id: a.person.id.clone(),
            estate_ids: vec![a.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "04A1B2C3".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        })
        .await?
        .into_inner();
    let card_id = card.credential.map(|c| c.id).unwrap_or_default();
    let notice = enable_face(&mesh, &a).await?;
    let resident_a = resident(&mesh, &a, &a.person.id)?;
    let consent = grant_face_consent(&mesh, &resident_a, &a.estate.id, notice).await?;
    let attestation = mesh
        .consent(&resident_a)?
        .issue_attestation(IssueAttestationRequest { consent_id: consent.id.clone(), ttl_seconds: 0 })
        .await?
        .into_inner();
    let deletion = mesh
        .consent(&resident_a)?
        .request_face_deletion(RequestFaceDeletionRequest { estate_id: a.estate.id.clone(), person_id: String::new() })
        .await?
        .into_inner();
    let ids = Ids::of(&a, &card_id, &consent, &deletion.id);

    let rpcs: Vec<Rpc> = every_rpc()?;
    assert!(rpcs.len() >= 84, "only {} RPCs found", rpcs.len());
    assert_eq!(rpcs.len(), SPEC.len(), "the specification names RPCs the contract lacks");

    // 1. Wrong kinds, same tenant: exactly PERMISSION_DENIED, whatever is sent.
    let mut tokens = Vec::new();
    for k in kinds(&a, "120101") {
        tokens.push((mesh.token_for(k.principal.clone())?.token, k));
    }
    let mut refused = 0;
    let mut let_through = 0;
    for rpc in &rpcs {
        let spec = spec_of(rpc)?;
        if spec == "open" {
            continue;
        }
        for (token, kind) in &tokens {
            let allowed = allows(spec, kind);
            // A caller of the right kind gets only the empty request: with
            // A's ids it would really deactivate A's gate, and so on.
            let bodies = if allowed { vec![Vec::new()] } else { vec![Vec::new(), request(rpc, &ids, false)] };
            for body in bodies {
                let got = answer(&mesh, rpc, body, token).await;
                let by_policy = matches!(&got, Err((Code::PermissionDenied, m)) if m.starts_with("this call is for "));
                if allowed {
                    assert!(!by_policy, "{}: {} is refused by the policy but the RPC is for it", rpc.path, kind.letter);
                    let_through += 1;
                } else {
                    assert!(
                        by_policy,
                        "{}: {} got {got:?}, not PERMISSION_DENIED by the policy",
                        rpc.path, kind.letter
                    );
                    refused += 1;
                }
            }
        }
    }

    // 2. Right kind, other tenant (or jurisdiction): the same answer as for
    //    ids that exist nowhere, and never A's data.
    let a_outbox = outbox_count(&mesh, &a.tenant.id).await?;
    let mut foreign_tokens = Vec::new();
    for k in kinds(&b, "310101") {
        if matches!(k.principal, Principal::PlatformAdmin | Principal::Service { .. }) {
            continue; // no tenant to be foreign to; service tokens are refused by the embedded facematch
        }
        foreign_tokens.push((mesh.token_for(k.principal.clone())?.token, k));
    }
    let a_ids: Vec<&String> = ids.by_field.values().collect();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let contains = |hay: &[u8], id: &String| hay.windows(id.len()).any(|w| w == id.as_bytes());
    let mut scoped = 0;
    let mut stopped_by_validation = Vec::new();
    let mut echoed: std::collections::HashSet<String> = std::collections::HashSet::new();
    for rpc in &rpcs {
        let spec = spec_of(rpc)?;
        for (token, kind) in &foreign_tokens {
            if spec == "open" || !allows(spec, kind) {
                continue;
            }
            let sent = request(rpc, &ids, false);
            if !a_ids.iter().any(|id| contains(&sent, id)) {
                continue; // names nothing of A (CreateEstate, ListTenants, …): nothing to be foreign to
            }
            let foreign = answer(&mesh, rpc, sent.clone(), token).await;
            let nowhere = answer(&mesh, rpc, request(rpc, &ids, true), token).await;
            match (&foreign, &nowhere) {
                (Err(f), Err(n)) => {
                    assert_eq!(
                        f, n,
                        "{} as {} of tenant B: A's objects are answered unlike absent ones",
                        rpc.path, kind.letter
                    );
                    *codes.entry(format!("{:?}", f.0)).or_default() += 1;
                    // "names no person of this tenant" is the scope check.
                    if f.0 == Code::InvalidArgument && !f.1.contains("names no") {
                        stopped_by_validation.push(format!("{} as {}", short(rpc), kind.letter));
                    }
                }
                (Ok(body), _) => {
                    // An id B put into a call that succeeded may come back
                    // (SetThreshold stores and echoes its estate id, and
                    // B's facematch journal then names it); any other id of
                    // A is a leak.
                    echoed.extend(a_ids.iter().filter(|id| contains(&sent, id)).map(|id| (*id).clone()));
                    for id in a_ids.iter().filter(|id| !echoed.contains(id.as_str())) {
                        assert!(
                            !contains(body, id),
                            "{} as {} of tenant B answered with tenant A's id",
                            rpc.path,
                            kind.letter
                        );
                    }
                    assert!(
                        nowhere.is_ok(),
                        "{} as {}: {nowhere:?} for absent ids, success for A's",
                        rpc.path,
                        kind.letter
                    );
                    *codes.entry("Ok (own data only)".into()).or_default() += 1;
                }
                (Err(f), Ok(_)) => {
                    panic!("{} as {}: refused for A's ids ({f:?}) but not for absent ones", rpc.path, kind.letter)
                }
            }
            scoped += 1;
        }
    }
    // Enrol needs a consent attestation, which B cannot forge: B's operator
    // and resident replaying A's genuine one are refused, and B's facematch
    // stays empty.
    for (token, kind) in &foreign_tokens {
        if !matches!(kind.principal, Principal::Operator { .. } | Principal::Resident { .. }) {
            continue;
        }
        let replay = EnrolRequest {
            estate_id: a.estate.id.clone(),
            person_pseudonym: consent.person_pseudonym.clone(),
            attestation: Some(attestation.clone()),
            face: Some(FaceSample { template: vec![0.5; 512], image: Vec::new() }),
            request_id: random_id(),
        };
        let got = mesh.facematch(token)?.enrol(replay).await.map(|_| ());
        let code = got.as_ref().err().map(tonic::Status::code);
        assert!(
            matches!(code, Some(Code::PermissionDenied | Code::InvalidArgument)),
            "tenant B's {} enrolled with tenant A's attestation: {got:?}",
            kind.letter
        );
        *codes.entry(format!("{:?}", code.unwrap_or(Code::Ok))).or_default() += 1;
        scoped += 1;
    }
    assert!(
        stopped_by_validation.iter().all(|c| c.starts_with("facematch.Enrol")),
        "these calls stop at input validation, so the matrix does not reach their scope check; give them a \
         complete request in `complete`: {stopped_by_validation:?}"
    );
    assert_eq!(outbox_count(&mesh, &a.tenant.id).await?, a_outbox, "a refused call changed tenant A's state");
    eprintln!(
        "{} RPCs: {refused} wrong-kind calls refused by the policy, {let_through} right-kind calls let through; \
         {scoped} other-tenant calls answered as for absent ids: {codes:?}; stopped by validation before \
         scope: {stopped_by_validation:?}",
        rpcs.len()
    );
    mesh.stop().await
}
