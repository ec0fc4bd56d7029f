//! End-to-end tests of the identity service over real gRPC on loopback, on
//! SQLite by default and on PostgreSQL when ESTATE_TEST_DATABASE_URL is set.

mod support;

use estate_auth::Principal;
use estate_proto::common::{ActorKind, CredentialKind, RecordStatus};
use estate_proto::identity::*;
use estate_test_support::TestMesh;
use prost::Message;
use support::*;
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test]
async fn identity_lifecycle_with_one_outbox_row_per_change() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Wanke", "120101").await?;
    // tenant.create, token.issue, estate/gate/unit/person/residency create = 7 events.
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, 7);

    let mut op = operator(&mesh, &w)?;
    assert_eq!(op.get_estate(GetEstateRequest { id: w.estate.id.clone() }).await?.into_inner(), w.estate);
    assert_eq!(op.get_gate(GetGateRequest { id: w.gate.id.clone() }).await?.into_inner(), w.gate);
    assert_eq!(op.get_unit(GetUnitRequest { id: w.unit.id.clone() }).await?.into_inner(), w.unit);
    assert_eq!(op.get_person(GetPersonRequest { id: w.person.id.clone() }).await?.into_inner(), w.person);
    assert_eq!(op.get_residency(GetResidencyRequest { id: w.residency.id.clone() }).await?.into_inner(), w.residency);
    assert_eq!(op.get_tenant(GetTenantRequest { id: String::new() }).await?.into_inner(), w.tenant);

    // The phone is kept as a keyed hash plus the last four digits only.
    assert_eq!(w.person.phone_last4, "8000");
    assert!(w.person.pseudonym.starts_with("psn_"));
    assert!(!w.person.is_minor);

    let before = outbox_count(&mesh, &w.tenant.id).await?;
    let e = op
        .update_estate(UpdateEstateRequest {
            id: w.estate.id.clone(),
            name: Some("Wanke Garden II".into()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(e.name, "Wanke Garden II");
    let g = op
        .update_gate(UpdateGateRequest {
            id: w.gate.id.clone(),
            supported_kinds: Some(CredentialKindList { kinds: vec![CredentialKind::Qr as i32] }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(g.supported_kinds, vec![CredentialKind::Qr as i32]);
    let u = op
        .update_unit(UpdateUnitRequest { id: w.unit.id.clone(), room: Some("1202".into()), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(u.room, "1202");
    let p = op
        .update_person(UpdatePersonRequest {
            id: w.person.id.clone(),
            phone: Some("+86 139 0000 1234".into()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(p.phone_last4, "1234");
    let r = op
        .update_residency(UpdateResidencyRequest {
            id: w.residency.id.clone(),
            role: Some(ResidencyRole::Occupant as i32),
            valid_until: None,
        })
        .await?
        .into_inner();
    assert_eq!(r.role, ResidencyRole::Occupant as i32);
    let t = op
        .update_tenant(UpdateTenantRequest {
            id: String::new(),
            name: Some("Wanke Property".into()),
            jurisdiction_code: None,
        })
        .await?
        .into_inner();
    assert_eq!(t.name, "Wanke Property");
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before + 6);

    // Lookup by phone compares keyed hashes; any spelling of the number works.
    let found =
        op.list_persons(ListPersonsRequest { phone: "13900001234".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(found.persons.len(), 1);
    assert_eq!(found.persons[0].id, w.person.id);

    // Ending the residency is one event; ending it again changes nothing.
    let before = outbox_count(&mesh, &w.tenant.id).await?;
    let ended = op
        .end_residency(EndResidencyRequest { id: w.residency.id.clone(), reason: "moved out".into() })
        .await?
        .into_inner();
    assert_eq!(ended.status, ResidencyStatus::Ended as i32);
    assert!(ended.valid_until.is_some());
    op.end_residency(EndResidencyRequest { id: w.residency.id.clone(), reason: String::new() }).await?;
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before + 1);

    // Deactivations, each one event; records stay readable.
    op.deactivate_gate(DeactivateGateRequest { id: w.gate.id.clone() }).await?;
    op.deactivate_unit(DeactivateUnitRequest { id: w.unit.id.clone() }).await?;
    op.deactivate_person(DeactivatePersonRequest { id: w.person.id.clone() }).await?;
    let e = op.deactivate_estate(DeactivateEstateRequest { id: w.estate.id.clone() }).await?.into_inner();
    assert_eq!(e.status, RecordStatus::Deactivated as i32);
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before + 5);
    assert!(op.list_estates(ListEstatesRequest::default()).await?.into_inner().estates.is_empty());
    let all =
        op.list_estates(ListEstatesRequest { include_deactivated: true, ..Default::default() }).await?.into_inner();
    assert_eq!(all.estates.len(), 1);

    let mut admin = mesh.admin()?;
    let t = admin.deactivate_tenant(DeactivateTenantRequest { id: w.tenant.id.clone() }).await?.into_inner();
    assert_eq!(t.status, RecordStatus::Deactivated as i32);
    // A deactivated tenant cannot change anything.
    let (c, m) = code(
        op.create_estate(CreateEstateRequest {
            name: "X".into(),
            address: "Y".into(),
            jurisdiction_code: "120101".into(),
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    mesh.stop().await
}

#[tokio::test]
async fn outbox_events_name_persons_by_pseudonym_only() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Longfor", "120102").await?;
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let actions: Vec<&str> = rows.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "token.issue",
            "estate.create",
            "gate.create",
            "unit.create",
            "person.create",
            "residency.create"
        ]
    );
    for row in &rows {
        let bytes = row.event.encode_to_vec();
        let text = String::from_utf8_lossy(&bytes);
        for personal in ["Gu Wei", "13800138000", &w.person.id] {
            assert!(!text.contains(personal), "{} carries {personal}", row.event.action);
        }
        // The phone's last four digits, in everything but the machine-made
        // values, where four digits turn up by chance (a UUID's "-8000-",
        // a Unix time such as 1795580001: this check failed once in CI).
        let mut told = row.event.clone();
        for id in [&mut told.event_id, &mut told.tenant_id, &mut told.estate_id, &mut told.object_id] {
            id.clear();
        }
        told.request_id.clear();
        told.person_pseudonym.clear();
        told.occurred_at = None;
        if let Some(actor) = told.actor.as_mut() {
            actor.id.clear();
        }
        told.attributes.retain(|_, v| {
            uuid::Uuid::parse_str(v).is_err() && !(v.len() >= 10 && v.bytes().all(|b| b.is_ascii_digit()))
        });
        let told = told.encode_to_vec();
        assert!(!String::from_utf8_lossy(&told).contains("8000"), "{} carries the phone's last four", row.event.action);
        assert_eq!(row.event.source, "identity");
        assert!(!row.event.request_id.is_empty());
    }
    let person_event = rows.iter().find(|r| r.event.action == "person.create").map(|r| r.event.clone());
    assert_eq!(person_event.map(|e| e.person_pseudonym), Some(w.person.pseudonym.clone()));
    let first = &rows[0].event;
    assert_eq!(first.actor.as_ref().map(|a| a.kind), Some(ActorKind::PlatformAdmin as i32));
    mesh.stop().await
}

#[tokio::test]
async fn failed_changes_leave_no_outbox_row() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Poly", "120103").await?;
    let mut op = operator(&mesh, &w)?;
    let before = outbox_count(&mesh, &w.tenant.id).await?;

    // Unique violation inside the transaction.
    let dup = CreateUnitRequest {
        estate_id: w.estate.id.clone(),
        building: "3".into(),
        unit: "2".into(),
        room: "1201".into(),
    };
    assert_eq!(code(op.create_unit(dup).await).0, Code::AlreadyExists);
    let dup_gate = CreateGateRequest {
        estate_id: w.estate.id.clone(),
        name: "North gate".into(),
        direction: GateDirection::In as i32,
        supported_kinds: vec![CredentialKind::Card as i32],
    };
    assert_eq!(code(op.create_gate(dup_gate).await).0, Code::AlreadyExists);
    let dup_res = CreateResidencyRequest {
        person_id: w.person.id.clone(),
        unit_id: w.unit.id.clone(),
        role: ResidencyRole::Owner as i32,
        valid_from: None,
        valid_until: None,
    };
    assert_eq!(code(op.create_residency(dup_res).await).0, Code::AlreadyExists);
    // Precondition failures after reads inside the transaction.
    assert_eq!(
        code(op.deactivate_unit(DeactivateUnitRequest { id: w.unit.id.clone() }).await).0,
        Code::FailedPrecondition
    );
    assert_eq!(
        code(op.deactivate_estate(DeactivateEstateRequest { id: w.estate.id.clone() }).await).0,
        Code::FailedPrecondition
    );
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before);
    // And nothing was half-written: the unit is still active.
    assert_eq!(
        op.get_unit(GetUnitRequest { id: w.unit.id.clone() }).await?.into_inner().status,
        RecordStatus::Active as i32
    );
    mesh.stop().await
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Vanke", "120104").await?;
    let mut admin = mesh.admin()?;
    let mut op = operator(&mesh, &w)?;

    let cases: Vec<(&str, (Code, String))> = vec![
        (
            "name",
            code(
                admin
                    .create_tenant(CreateTenantRequest { name: "  ".into(), jurisdiction_code: "120101".into() })
                    .await,
            ),
        ),
        (
            "jurisdiction_code",
            code(
                admin.create_tenant(CreateTenantRequest { name: "A".into(), jurisdiction_code: "12-01".into() }).await,
            ),
        ),
        ("id", code(admin.deactivate_tenant(DeactivateTenantRequest { id: "not-an-id".into() }).await)),
        (
            "address",
            code(
                op.create_estate(CreateEstateRequest {
                    name: "E".into(),
                    address: String::new(),
                    jurisdiction_code: "120101".into(),
                })
                .await,
            ),
        ),
        (
            "name",
            code(
                op.create_estate(CreateEstateRequest {
                    name: "x".repeat(201),
                    address: "a".into(),
                    jurisdiction_code: "120101".into(),
                })
                .await,
            ),
        ),
        (
            "estate_id",
            code(
                op.create_gate(CreateGateRequest {
                    estate_id: String::new(),
                    name: "g".into(),
                    direction: 1,
                    supported_kinds: vec![1],
                })
                .await,
            ),
        ),
        (
            "direction",
            code(
                op.create_gate(CreateGateRequest {
                    estate_id: w.estate.id.clone(),
                    name: "g".into(),
                    direction: 0,
                    supported_kinds: vec![1],
                })
                .await,
            ),
        ),
        (
            "direction",
            code(
                op.create_gate(CreateGateRequest {
                    estate_id: w.estate.id.clone(),
                    name: "g".into(),
                    direction: 99,
                    supported_kinds: vec![1],
                })
                .await,
            ),
        ),
        (
            "supported_kinds",
            code(
                op.create_gate(CreateGateRequest {
                    estate_id: w.estate.id.clone(),
                    name: "g".into(),
                    direction: 1,
                    supported_kinds: vec![],
                })
                .await,
            ),
        ),
        (
            "supported_kinds",
            code(
                op.create_gate(CreateGateRequest {
                    estate_id: w.estate.id.clone(),
                    name: "g".into(),
                    direction: 1,
                    supported_kinds: vec![42],
                })
                .await,
            ),
        ),
        (
            "room",
            code(
                op.create_unit(CreateUnitRequest {
                    estate_id: w.estate.id.clone(),
                    building: "1".into(),
                    unit: String::new(),
                    room: String::new(),
                })
                .await,
            ),
        ),
        (
            "display_name",
            code(op.create_person(CreatePersonRequest { display_name: String::new(), ..Default::default() }).await),
        ),
        (
            "phone",
            code(
                op.create_person(CreatePersonRequest {
                    display_name: "P".into(),
                    phone: "12ab".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "birth_date",
            code(
                op.create_person(CreatePersonRequest {
                    display_name: "P".into(),
                    birth_date: "31/12/2010".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "birth_date",
            code(
                op.create_person(CreatePersonRequest {
                    display_name: "P".into(),
                    birth_date: "2999-01-01".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "guardian_person_id",
            code(
                op.create_person(CreatePersonRequest {
                    display_name: "P".into(),
                    guardian_person_id: "nope".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "role",
            code(
                op.create_residency(CreateResidencyRequest {
                    person_id: w.person.id.clone(),
                    unit_id: w.unit.id.clone(),
                    role: 0,
                    valid_from: None,
                    valid_until: None,
                })
                .await,
            ),
        ),
        (
            "valid_until",
            code(
                op.create_residency(CreateResidencyRequest {
                    person_id: w.person.id.clone(),
                    unit_id: w.unit.id.clone(),
                    role: 1,
                    valid_from: Some(prost_types::Timestamp { seconds: 2_000_000_000, nanos: 0 }),
                    valid_until: Some(prost_types::Timestamp { seconds: 1_000_000_000, nanos: 0 }),
                })
                .await,
            ),
        ),
        (
            "page_token",
            code(op.list_units(ListUnitsRequest { page_token: "garbage".into(), ..Default::default() }).await),
        ),
        ("page_size", code(op.list_units(ListUnitsRequest { page_size: -5, ..Default::default() }).await)),
        (
            "request",
            code(op.update_estate(UpdateEstateRequest { id: w.estate.id.clone(), ..Default::default() }).await),
        ),
        (
            "subject",
            code(
                op.issue_token(IssueTokenRequest {
                    principal: Some(issue_token_request::Principal::Gate(GateGrant { gate_id: w.gate.id.clone() })),
                    subject: String::new(),
                    ttl_seconds: 0,
                })
                .await,
            ),
        ),
        (
            "principal",
            code(op.issue_token(IssueTokenRequest { principal: None, subject: "x".into(), ttl_seconds: 0 }).await),
        ),
        (
            "ttl_seconds",
            code(
                op.issue_token(IssueTokenRequest {
                    principal: Some(issue_token_request::Principal::Gate(GateGrant { gate_id: w.gate.id.clone() })),
                    subject: "x".into(),
                    ttl_seconds: 10_000_000_000,
                })
                .await,
            ),
        ),
    ];
    for (field, (c, message)) in cases {
        assert_eq!(c, Code::InvalidArgument, "{field}: {message}");
        assert!(message.contains(field), "message {message:?} should name {field}");
    }
    mesh.stop().await
}

#[tokio::test]
async fn face_only_gate_is_refused() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Greentown", "330106").await?;
    let mut op = operator(&mesh, &w)?;
    let (c, m) = code(
        op.create_gate(CreateGateRequest {
            estate_id: w.estate.id.clone(),
            name: "Face only".into(),
            direction: GateDirection::In as i32,
            supported_kinds: vec![CredentialKind::Face as i32],
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);
    assert!(m.contains("R1"), "{m}");
    let (c, _) = code(
        op.update_gate(UpdateGateRequest {
            id: w.gate.id.clone(),
            supported_kinds: Some(CredentialKindList { kinds: vec![CredentialKind::Face as i32] }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);
    mesh.stop().await
}

#[tokio::test]
async fn minors_guardians_and_resident_scope() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Country Garden", "440606").await?;
    let mut op = operator(&mesh, &w)?;
    let child = op
        .create_person(CreatePersonRequest {
            display_name: "Gu Xiaoming".into(),
            phone: String::new(),
            birth_date: "2019-03-01".into(),
            guardian_person_id: w.person.id.clone(),
        })
        .await?
        .into_inner();
    assert!(child.is_minor);
    assert_eq!(child.guardian_person_id, w.person.id);
    // A minor cannot be a guardian.
    let (c, _) = code(
        op.create_person(CreatePersonRequest {
            display_name: "Other".into(),
            guardian_person_id: child.id.clone(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);
    // Nobody is their own guardian.
    let (c, _) = code(
        op.update_person(UpdatePersonRequest {
            id: child.id.clone(),
            guardian_person_id: Some(child.id.clone()),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);

    // The guardian, as a resident, reads their own record and the minor's.
    let token = op
        .issue_token(IssueTokenRequest {
            principal: Some(issue_token_request::Principal::Resident(ResidentGrant { person_id: w.person.id.clone() })),
            subject: "resident-app".into(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token;
    let mut resident = mesh.identity(&token)?;
    assert_eq!(resident.get_person(GetPersonRequest { id: w.person.id.clone() }).await?.into_inner().id, w.person.id);
    assert_eq!(resident.get_person(GetPersonRequest { id: child.id.clone() }).await?.into_inner().id, child.id);
    let mine = resident.list_residencies(ListResidenciesRequest::default()).await?.into_inner();
    assert_eq!(mine.residencies.len(), 1);
    // But not a neighbour, nor operator calls.
    let neighbour =
        op.create_person(CreatePersonRequest { display_name: "Li".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(
        code(resident.get_person(GetPersonRequest { id: neighbour.id.clone() }).await).0,
        Code::PermissionDenied
    );
    assert_eq!(code(resident.get_person(GetPersonRequest { id: random_id() }).await).0, Code::PermissionDenied);
    assert_eq!(code(resident.list_persons(ListPersonsRequest::default()).await).0, Code::PermissionDenied);
    assert_eq!(code(resident.create_estate(CreateEstateRequest::default()).await).0, Code::PermissionDenied);
    let who = resident.who_am_i(WhoAmIRequest {}).await?.into_inner();
    assert_eq!(who.kind, ActorKind::Resident as i32);
    assert_eq!(who.person_id, w.person.id);

    // Minors are flagged in audit (R7).
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let flagged = rows.iter().filter(|r| r.event.person_pseudonym == child.pseudonym).all(|r| r.event.concerns_minor);
    assert!(flagged);
    mesh.stop().await
}

#[tokio::test]
async fn residency_end_is_announced_for_face_data_deletion() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Sunac", "120105").await?;
    let mut op = operator(&mesh, &w)?;
    let mut events = mesh.bus().subscribe();
    op.end_residency(EndResidencyRequest { id: w.residency.id.clone(), reason: "lease ended".into() }).await?;
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let ev = events.recv().await?;
            if ev.topic == estate_identity_topic() {
                return anyhow::Ok(ev);
            }
        }
    })
    .await??;
    let ended = ResidencyEnded::decode(ev.payload.as_slice())?;
    assert_eq!(ended.residency_id, w.residency.id);
    assert_eq!(ended.person_pseudonym, w.person.pseudonym);
    assert_eq!(ended.estate_id, w.estate.id);
    assert!(ended.last_at_estate);
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let end = rows.iter().find(|r| r.event.action == "residency.end").map(|r| r.event.clone());
    let end = end.ok_or_else(|| anyhow::anyhow!("no residency.end event"))?;
    assert_eq!(end.event_id, ended.event_id);
    assert_eq!(end.attributes.get("last_at_estate").map(String::as_str), Some("true"));
    mesh.stop().await
}

fn estate_identity_topic() -> &'static str {
    "identity.residency.ended"
}

#[tokio::test]
async fn pages_cover_everything_once() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Evergrande", "120106").await?;
    let mut op = operator(&mesh, &w)?;
    for room in 0..7 {
        op.create_unit(CreateUnitRequest {
            estate_id: w.estate.id.clone(),
            building: "9".into(),
            unit: String::new(),
            room: format!("{room}"),
        })
        .await?;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = op
            .list_units(ListUnitsRequest {
                estate_id: w.estate.id.clone(),
                page_size: 3,
                page_token: token.clone(),
                include_deactivated: false,
            })
            .await?
            .into_inner();
        pages += 1;
        seen.extend(page.units.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 8);
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 8);
    mesh.stop().await
}

#[tokio::test]
async fn estate_limited_operators_and_gates_stay_in_their_estate() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "China Resources", "110105").await?;
    let mut op = operator(&mesh, &w)?;
    let second = op
        .create_estate(CreateEstateRequest {
            name: "Second".into(),
            address: "2 Road".into(),
            jurisdiction_code: "110105".into(),
        })
        .await?
        .into_inner();
    let limited = op
        .issue_token(IssueTokenRequest {
            principal: Some(grant_operator("", vec![second.id.clone()])),
            subject: "site-manager".into(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token;
    let mut lim = mesh.identity(&limited)?;
    let listed = lim.list_estates(ListEstatesRequest::default()).await?.into_inner();
    assert_eq!(listed.estates.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![second.id.clone()]);
    assert_eq!(code(lim.get_estate(GetEstateRequest { id: w.estate.id.clone() }).await).0, Code::PermissionDenied);
    assert_eq!(code(lim.get_gate(GetGateRequest { id: w.gate.id.clone() }).await).0, Code::PermissionDenied);
    assert!(lim.list_gates(ListGatesRequest::default()).await?.into_inner().gates.is_empty());
    assert_eq!(
        code(
            lim.create_estate(CreateEstateRequest {
                name: "N".into(),
                address: "A".into(),
                jurisdiction_code: "110105".into()
            })
            .await
        )
        .0,
        Code::PermissionDenied
    );
    // It cannot widen its own grant.
    let (c, _) = code(
        lim.issue_token(IssueTokenRequest {
            principal: Some(grant_operator("", vec![])),
            subject: "x".into(),
            ttl_seconds: 60,
        })
        .await,
    );
    assert_eq!(c, Code::PermissionDenied);

    // A gate token reads its own gate and estate only.
    let gate_token = op
        .issue_token(IssueTokenRequest {
            principal: Some(issue_token_request::Principal::Gate(GateGrant { gate_id: w.gate.id.clone() })),
            subject: "north-gate-controller".into(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token;
    let mut gate = mesh.identity(&gate_token)?;
    assert_eq!(gate.get_gate(GetGateRequest { id: w.gate.id.clone() }).await?.into_inner().id, w.gate.id);
    assert_eq!(gate.get_estate(GetEstateRequest { id: w.estate.id.clone() }).await?.into_inner().id, w.estate.id);
    assert_eq!(code(gate.get_estate(GetEstateRequest { id: second.id.clone() }).await).0, Code::PermissionDenied);
    assert_eq!(code(gate.list_persons(ListPersonsRequest::default()).await).0, Code::PermissionDenied);
    mesh.stop().await
}

#[tokio::test]
async fn regulators_see_tenants_of_their_jurisdiction_only() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let tianjin = world(&mesh, "Tianjin Group", "120101").await?;
    let beijing = world(&mesh, "Beijing Group", "110101").await?;
    let token = mesh.token_for(Principal::Regulator { jurisdiction_codes: vec!["120000".into()] })?.token;
    let mut reg = mesh.identity(&token)?;
    let listed = reg.list_tenants(ListTenantsRequest::default()).await?.into_inner();
    assert_eq!(listed.tenants.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![tianjin.tenant.id.clone()]);
    assert_eq!(
        reg.get_tenant(GetTenantRequest { id: tianjin.tenant.id.clone() }).await?.into_inner().id,
        tianjin.tenant.id
    );
    assert_eq!(code(reg.get_tenant(GetTenantRequest { id: beijing.tenant.id.clone() }).await).0, Code::NotFound);
    assert_eq!(code(reg.list_estates(ListEstatesRequest::default()).await).0, Code::PermissionDenied);
    assert_eq!(code(reg.list_persons(ListPersonsRequest::default()).await).0, Code::PermissionDenied);
    mesh.stop().await
}
