//! Tenant isolation (R14): a principal of tenant A can neither read, list,
//! change nor even detect tenant B's objects. For every identity RPC the
//! answer to "B's id" is exactly the answer to "an id that exists nowhere".
//! Also: missing, expired, forged and tampered tokens are UNAUTHENTICATED.

mod support;

use estate_auth::{Principal, TokenAuthority};
use estate_proto::identity::*;
use estate_test_support::TestMesh;
use support::*;
use tonic::Code;

type Answer = (Code, String);

fn answer<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<Answer> {
    r.err().map(|s| (s.code(), s.message().to_owned()))
}

/// Asserts that the foreign object and a nonexistent one give the same
/// refusal, and that it is a refusal (NOT_FOUND, PERMISSION_DENIED, or an
/// INVALID_ARGUMENT naming a reference that does not resolve).
fn same(rpc: &str, foreign: Option<Answer>, nowhere: Option<Answer>) {
    let foreign = foreign.unwrap_or_else(|| panic!("{rpc}: tenant A reached tenant B's object"));
    let nowhere = nowhere.unwrap_or_else(|| panic!("{rpc}: call with a nonexistent id succeeded"));
    assert!(
        matches!(foreign.0, Code::NotFound | Code::PermissionDenied | Code::InvalidArgument),
        "{rpc}: unexpected {foreign:?}"
    );
    assert_eq!(foreign, nowhere, "{rpc}: the answer reveals that tenant B's object exists");
}

#[tokio::test]
async fn tenant_a_cannot_read_change_or_detect_tenant_b() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let b = world(&mesh, "Beta", "120101").await?;
    let b_outbox = outbox_count(&mesh, &b.tenant.id).await?;
    let mut op = operator(&mesh, &a)?;
    let n = random_id;

    // Tenants.
    same(
        "GetTenant",
        answer(op.get_tenant(GetTenantRequest { id: b.tenant.id.clone() }).await),
        answer(op.get_tenant(GetTenantRequest { id: n() }).await),
    );
    same(
        "UpdateTenant",
        answer(
            op.update_tenant(UpdateTenantRequest {
                id: b.tenant.id.clone(),
                name: Some("x".into()),
                jurisdiction_code: None,
            })
            .await,
        ),
        answer(
            op.update_tenant(UpdateTenantRequest { id: n(), name: Some("x".into()), jurisdiction_code: None }).await,
        ),
    );
    same(
        "DeactivateTenant",
        answer(op.deactivate_tenant(DeactivateTenantRequest { id: b.tenant.id.clone() }).await),
        answer(op.deactivate_tenant(DeactivateTenantRequest { id: n() }).await),
    );

    // Estates.
    same(
        "GetEstate",
        answer(op.get_estate(GetEstateRequest { id: b.estate.id.clone() }).await),
        answer(op.get_estate(GetEstateRequest { id: n() }).await),
    );
    same(
        "UpdateEstate",
        answer(
            op.update_estate(UpdateEstateRequest {
                id: b.estate.id.clone(),
                name: Some("x".into()),
                ..Default::default()
            })
            .await,
        ),
        answer(op.update_estate(UpdateEstateRequest { id: n(), name: Some("x".into()), ..Default::default() }).await),
    );
    same(
        "DeactivateEstate",
        answer(op.deactivate_estate(DeactivateEstateRequest { id: b.estate.id.clone() }).await),
        answer(op.deactivate_estate(DeactivateEstateRequest { id: n() }).await),
    );

    // Gates.
    let gate_in =
        |estate_id: String| CreateGateRequest { estate_id, name: "G".into(), direction: 1, supported_kinds: vec![1] };
    same(
        "CreateGate",
        answer(op.create_gate(gate_in(b.estate.id.clone())).await),
        answer(op.create_gate(gate_in(n())).await),
    );
    same(
        "GetGate",
        answer(op.get_gate(GetGateRequest { id: b.gate.id.clone() }).await),
        answer(op.get_gate(GetGateRequest { id: n() }).await),
    );
    same(
        "UpdateGate",
        answer(
            op.update_gate(UpdateGateRequest { id: b.gate.id.clone(), name: Some("x".into()), ..Default::default() })
                .await,
        ),
        answer(op.update_gate(UpdateGateRequest { id: n(), name: Some("x".into()), ..Default::default() }).await),
    );
    same(
        "DeactivateGate",
        answer(op.deactivate_gate(DeactivateGateRequest { id: b.gate.id.clone() }).await),
        answer(op.deactivate_gate(DeactivateGateRequest { id: n() }).await),
    );

    // Units.
    let unit_in = |estate_id: String| CreateUnitRequest {
        estate_id,
        building: "1".into(),
        unit: String::new(),
        room: "1".into(),
    };
    same(
        "CreateUnit",
        answer(op.create_unit(unit_in(b.estate.id.clone())).await),
        answer(op.create_unit(unit_in(n())).await),
    );
    same(
        "GetUnit",
        answer(op.get_unit(GetUnitRequest { id: b.unit.id.clone() }).await),
        answer(op.get_unit(GetUnitRequest { id: n() }).await),
    );
    same(
        "UpdateUnit",
        answer(
            op.update_unit(UpdateUnitRequest { id: b.unit.id.clone(), room: Some("2".into()), ..Default::default() })
                .await,
        ),
        answer(op.update_unit(UpdateUnitRequest { id: n(), room: Some("2".into()), ..Default::default() }).await),
    );
    same(
        "DeactivateUnit",
        answer(op.deactivate_unit(DeactivateUnitRequest { id: b.unit.id.clone() }).await),
        answer(op.deactivate_unit(DeactivateUnitRequest { id: n() }).await),
    );

    // Persons.
    let ward_of = |guardian: String| CreatePersonRequest {
        display_name: "W".into(),
        guardian_person_id: guardian,
        ..Default::default()
    };
    same(
        "CreatePerson(guardian)",
        answer(op.create_person(ward_of(b.person.id.clone())).await),
        answer(op.create_person(ward_of(n())).await),
    );
    same(
        "GetPerson",
        answer(op.get_person(GetPersonRequest { id: b.person.id.clone() }).await),
        answer(op.get_person(GetPersonRequest { id: n() }).await),
    );
    same(
        "UpdatePerson",
        answer(
            op.update_person(UpdatePersonRequest {
                id: b.person.id.clone(),
                display_name: Some("x".into()),
                ..Default::default()
            })
            .await,
        ),
        answer(
            op.update_person(UpdatePersonRequest { id: n(), display_name: Some("x".into()), ..Default::default() })
                .await,
        ),
    );
    same(
        "UpdatePerson(guardian)",
        answer(
            op.update_person(UpdatePersonRequest {
                id: a.person.id.clone(),
                guardian_person_id: Some(b.person.id.clone()),
                ..Default::default()
            })
            .await,
        ),
        answer(
            op.update_person(UpdatePersonRequest {
                id: a.person.id.clone(),
                guardian_person_id: Some(n()),
                ..Default::default()
            })
            .await,
        ),
    );
    same(
        "DeactivatePerson",
        answer(op.deactivate_person(DeactivatePersonRequest { id: b.person.id.clone() }).await),
        answer(op.deactivate_person(DeactivatePersonRequest { id: n() }).await),
    );

    // Residencies.
    let residency = |person_id: String, unit_id: String| CreateResidencyRequest {
        person_id,
        unit_id,
        role: 1,
        valid_from: None,
        valid_until: None,
    };
    same(
        "CreateResidency(unit)",
        answer(op.create_residency(residency(a.person.id.clone(), b.unit.id.clone())).await),
        answer(op.create_residency(residency(a.person.id.clone(), n())).await),
    );
    let spare_unit = op.create_unit(unit_in(a.estate.id.clone())).await?.into_inner();
    same(
        "CreateResidency(person)",
        answer(op.create_residency(residency(b.person.id.clone(), spare_unit.id.clone())).await),
        answer(op.create_residency(residency(n(), spare_unit.id.clone())).await),
    );
    same(
        "GetResidency",
        answer(op.get_residency(GetResidencyRequest { id: b.residency.id.clone() }).await),
        answer(op.get_residency(GetResidencyRequest { id: n() }).await),
    );
    same(
        "UpdateResidency",
        answer(
            op.update_residency(UpdateResidencyRequest {
                id: b.residency.id.clone(),
                role: Some(2),
                valid_until: None,
            })
            .await,
        ),
        answer(op.update_residency(UpdateResidencyRequest { id: n(), role: Some(2), valid_until: None }).await),
    );
    same(
        "EndResidency",
        answer(op.end_residency(EndResidencyRequest { id: b.residency.id.clone(), reason: String::new() }).await),
        answer(op.end_residency(EndResidencyRequest { id: n(), reason: String::new() }).await),
    );

    // Tokens for B's principals.
    let tok = |p: issue_token_request::Principal| IssueTokenRequest {
        principal: Some(p),
        subject: "x".into(),
        ttl_seconds: 60,
    };
    use issue_token_request::Principal as P;
    same(
        "IssueToken(operator)",
        answer(op.issue_token(tok(grant_operator(&b.tenant.id, vec![]))).await),
        answer(op.issue_token(tok(grant_operator(&n(), vec![]))).await),
    );
    same(
        "IssueToken(operator estates)",
        answer(op.issue_token(tok(grant_operator("", vec![b.estate.id.clone()]))).await),
        answer(op.issue_token(tok(grant_operator("", vec![n()]))).await),
    );
    same(
        "IssueToken(gate)",
        answer(op.issue_token(tok(P::Gate(GateGrant { gate_id: b.gate.id.clone() }))).await),
        answer(op.issue_token(tok(P::Gate(GateGrant { gate_id: n() }))).await),
    );
    same(
        "IssueToken(resident)",
        answer(op.issue_token(tok(P::Resident(ResidentGrant { person_id: b.person.id.clone() }))).await),
        answer(op.issue_token(tok(P::Resident(ResidentGrant { person_id: n() }))).await),
    );

    // Lists: B's objects never appear, and filtering by B's ids looks empty,
    // exactly like filtering by ids that exist nowhere.
    let tenants =
        op.list_tenants(ListTenantsRequest { include_deactivated: true, ..Default::default() }).await?.into_inner();
    assert_eq!(tenants.tenants.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![a.tenant.id.clone()]);
    let estates =
        op.list_estates(ListEstatesRequest { include_deactivated: true, ..Default::default() }).await?.into_inner();
    assert!(estates.estates.iter().all(|e| e.tenant_id == a.tenant.id));
    let gates = op.list_gates(ListGatesRequest { include_deactivated: true, ..Default::default() }).await?.into_inner();
    assert!(gates.gates.iter().all(|g| g.tenant_id == a.tenant.id));
    assert_eq!(
        op.list_gates(ListGatesRequest { estate_id: b.estate.id.clone(), ..Default::default() }).await?.into_inner(),
        op.list_gates(ListGatesRequest { estate_id: n(), ..Default::default() }).await?.into_inner()
    );
    assert_eq!(
        op.list_units(ListUnitsRequest { estate_id: b.estate.id.clone(), ..Default::default() }).await?.into_inner(),
        op.list_units(ListUnitsRequest { estate_id: n(), ..Default::default() }).await?.into_inner()
    );
    let persons =
        op.list_persons(ListPersonsRequest { include_deactivated: true, ..Default::default() }).await?.into_inner();
    assert!(persons.persons.iter().all(|p| p.tenant_id == a.tenant.id));
    // The same phone number in tenant B is not found through tenant A.
    let by_phone =
        op.list_persons(ListPersonsRequest { phone: "13800138000".into(), ..Default::default() }).await?.into_inner();
    assert!(by_phone.persons.iter().all(|p| p.tenant_id == a.tenant.id));
    assert_eq!(
        op.list_residencies(ListResidenciesRequest {
            person_id: b.person.id.clone(),
            include_ended: true,
            ..Default::default()
        })
        .await?
        .into_inner(),
        op.list_residencies(ListResidenciesRequest { person_id: n(), include_ended: true, ..Default::default() })
            .await?
            .into_inner()
    );
    assert_eq!(
        op.list_residencies(ListResidenciesRequest {
            unit_id: b.unit.id.clone(),
            include_ended: true,
            ..Default::default()
        })
        .await?
        .into_inner(),
        op.list_residencies(ListResidenciesRequest { unit_id: n(), include_ended: true, ..Default::default() })
            .await?
            .into_inner()
    );

    // Nothing of B changed.
    assert_eq!(outbox_count(&mesh, &b.tenant.id).await?, b_outbox);
    let mut bop = operator(&mesh, &b)?;
    assert_eq!(bop.get_estate(GetEstateRequest { id: b.estate.id.clone() }).await?.into_inner(), b.estate);
    assert_eq!(bop.get_gate(GetGateRequest { id: b.gate.id.clone() }).await?.into_inner(), b.gate);
    assert_eq!(bop.get_person(GetPersonRequest { id: b.person.id.clone() }).await?.into_inner(), b.person);
    assert_eq!(bop.get_residency(GetResidencyRequest { id: b.residency.id.clone() }).await?.into_inner(), b.residency);
    mesh.stop().await
}

#[tokio::test]
async fn a_request_field_never_selects_the_tenant() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let b = world(&mesh, "Beta", "120101").await?;
    // Forge nothing: a valid token of A's gate, asking for B's gate by id.
    let gate_token = mesh
        .token_for(Principal::Gate {
            tenant_id: a.tenant.id.clone(),
            estate_id: a.estate.id.clone(),
            gate_id: a.gate.id.clone(),
        })?
        .token;
    let mut gate = mesh.identity(&gate_token)?;
    assert_eq!(
        gate.get_gate(GetGateRequest { id: b.gate.id.clone() }).await.err().map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    // A resident of A asking for B's person.
    let resident =
        mesh.token_for(Principal::Resident { tenant_id: a.tenant.id.clone(), person_id: a.person.id.clone() })?.token;
    let mut res = mesh.identity(&resident)?;
    let foreign = res
        .get_person(GetPersonRequest { id: b.person.id.clone() })
        .await
        .err()
        .map(|s| (s.code(), s.message().to_owned()));
    let nowhere =
        res.get_person(GetPersonRequest { id: random_id() }).await.err().map(|s| (s.code(), s.message().to_owned()));
    assert_eq!(foreign, nowhere);
    mesh.stop().await
}

#[tokio::test]
async fn missing_expired_forged_and_tampered_tokens_are_unauthenticated() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let req = || GetTenantRequest { id: String::new() };

    let mut anon = mesh.identity_anonymous();
    let s = anon.get_tenant(req()).await.err();
    assert_eq!(s.as_ref().map(|s| s.code()), Some(Code::Unauthenticated));
    assert!(s.map(|s| s.message().contains("authorization")).unwrap_or(false));

    let operator = Principal::Operator { tenant_id: a.tenant.id.clone(), estate_ids: vec![] };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let expired = mesh.tokens().issue_between(operator.clone(), "old", now - 7200, now - 3600)?.token;
    let s = mesh.identity(&expired)?.get_tenant(req()).await.err();
    assert_eq!(s.as_ref().map(|s| s.code()), Some(Code::Unauthenticated));
    assert!(s.map(|s| s.message().contains("expired")).unwrap_or(false));

    // Signed by a key the mesh does not know, even with the same key id shape.
    let foreign_key = estate_crypto_key()?;
    let forged = TokenAuthority::new("estate-mesh", &foreign_key)?.issue(operator.clone(), "mallory", 600)?.token;
    assert_eq!(mesh.identity(&forged)?.get_tenant(req()).await.err().map(|s| s.code()), Some(Code::Unauthenticated));

    // A genuine token whose claims were swapped for another tenant's.
    let genuine = mesh.tokens().issue(operator.clone(), "alice", 600)?.token;
    let other = TokenAuthority::new("estate-mesh", &foreign_key)?
        .issue(Principal::Operator { tenant_id: random_id(), estate_ids: vec![] }, "alice", 600)?
        .token;
    let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
    parts[1] = other.split('.').nth(1).unwrap_or_default().to_owned();
    let tampered = parts.join(".");
    assert_eq!(mesh.identity(&tampered)?.get_tenant(req()).await.err().map(|s| s.code()), Some(Code::Unauthenticated));

    // Right key, wrong issuer.
    let wrong_issuer = TokenAuthority::new("someone-else", &foreign_key)?.issue(operator, "x", 600)?.token;
    assert_eq!(
        mesh.identity(&wrong_issuer)?.get_tenant(req()).await.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );

    for junk in ["", "Bearer", "a.b.c", "eyJhbGciOiJub25lIn0.e30."] {
        let r = mesh.identity(junk)?.get_tenant(req()).await.err().map(|s| s.code());
        assert_eq!(r, Some(Code::Unauthenticated), "{junk:?}");
    }
    mesh.stop().await
}

fn estate_crypto_key() -> anyhow::Result<estate_crypto::SigningKeyPair> {
    Ok(estate_crypto::SigningKeyPair::generate()?)
}
