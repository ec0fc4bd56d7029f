//! End-to-end tests of the credentials service (R1, R2, R4, R14).

mod support;

use estate_proto::common::CredentialKind;
use estate_proto::consent::{
    ConsentMethod, GrantConsentRequest, IssueAttestationRequest, Purpose, WithdrawConsentRequest,
};
use estate_proto::credentials::*;
use estate_proto::identity::{CreateGateRequest, GateDirection};
use estate_test_support::{CredentialClient, TestMesh};
use support::*;
use tonic::Code;

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

fn kinds(k: &[CredentialKind]) -> Vec<i32> {
    k.iter().map(|k| *k as i32).collect()
}

fn card(person: &str, estate: &str, uid: &str) -> IssueCredentialRequest {
    IssueCredentialRequest {
        person_id: person.into(),
        estate_ids: vec![estate.into()],
        secret: Some(issue_credential_request::Secret::Card(CardSecret {
            uid: uid.into(),
            facility_code: String::new(),
        })),
        ..Default::default()
    }
}

fn pin(person: &str, estate: &str, unit: &str, pin: &str) -> IssueCredentialRequest {
    IssueCredentialRequest {
        person_id: person.into(),
        estate_ids: vec![estate.into()],
        secret: Some(issue_credential_request::Secret::Pin(PinSecret { pin: pin.into(), unit_id: unit.into() })),
        ..Default::default()
    }
}

fn qr(person: &str, estate: &str) -> IssueCredentialRequest {
    IssueCredentialRequest {
        person_id: person.into(),
        estate_ids: vec![estate.into()],
        secret: Some(issue_credential_request::Secret::Qr(QrSecret {})),
        ..Default::default()
    }
}

fn present_card(uid: &str) -> VerifyCredentialRequest {
    VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Card(PresentedCard {
            uid: uid.into(),
            facility_code: String::new(),
        })),
    }
}

fn present_pin(unit: &str, pin: &str) -> VerifyCredentialRequest {
    VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Pin(PresentedPin {
            unit_id: unit.into(),
            pin: pin.into(),
        })),
    }
}

fn qr_code(issued: &IssuedCredential, at_unix: u64) -> anyhow::Result<VerifyCredentialRequest> {
    let seed = data_encoding::BASE32_NOPAD.decode(issued.secret.as_bytes())?;
    let code = estate_credentials::totp::code_at(&seed, at_unix, 30).ok_or_else(|| anyhow::anyhow!("no code"))?;
    let id = issued.credential.as_ref().map(|c| c.id.clone()).unwrap_or_default();
    Ok(VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Qr(PresentedQr { payload: format!("EM1.{id}.{code}") })),
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn outcome(g: &mut CredentialClient, req: VerifyCredentialRequest) -> anyhow::Result<VerifyOutcome> {
    let v = g.verify_credential(req).await?.into_inner();
    Ok(VerifyOutcome::try_from(v.outcome)?)
}

#[tokio::test]
async fn face_only_and_unreadable_policies_are_refused() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    let set = |accepted: &[CredentialKind]| SetEstatePolicyRequest {
        estate_id: w.estate.id.clone(),
        accepted_kinds: kinds(accepted),
        alternative_kinds: vec![],
    };
    let (c, m) = err(op.set_estate_policy(set(&[CredentialKind::Face])).await);
    assert!(c == Code::FailedPrecondition && m.contains("R1"), "{m}");
    let (c, m) = err(op.set_estate_policy(set(&[CredentialKind::Face, CredentialKind::Card])).await);
    assert!(c == Code::FailedPrecondition && m.contains("R2"), "{m}");
    // The world's gate reads card and face only: a policy of PIN + QR leaves face alone there.
    let (c, m) = err(op.set_estate_policy(set(&[CredentialKind::Face, CredentialKind::Pin, CredentialKind::Qr])).await);
    assert!(c == Code::FailedPrecondition && m.contains("North gate"), "{m}");
    assert_eq!(err(op.set_estate_policy(set(&[])).await).0, Code::InvalidArgument);
    let ok = op
        .set_estate_policy(set(&[CredentialKind::Face, CredentialKind::Card, CredentialKind::Qr]))
        .await?
        .into_inner();
    assert!(!ok.is_default);
    assert_eq!(ok.alternative_kinds, kinds(&[CredentialKind::Qr, CredentialKind::Card]));
    let read = op.get_estate_policy(GetEstatePolicyRequest { estate_id: w.estate.id.clone() }).await?.into_inner();
    assert_eq!(read.accepted_kinds, ok.accepted_kinds);
    mesh.stop().await
}

#[tokio::test]
async fn withdrawing_face_consent_keeps_every_other_credential_working() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Beta", "120101").await?;
    let (version, sha) = enable_face(&mesh, &w).await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    op.issue_credential(card(&w.person.id, &w.estate.id, "04:A1:B2:C3")).await?;
    op.issue_credential(pin(&w.person.id, &w.estate.id, &w.unit.id, "739146")).await?;
    let q = op.issue_credential(qr(&w.person.id, &w.estate.id)).await?.into_inner();

    // Face reference, with the resident's consent attestation.
    let mut consent = mesh.consent(&resident(&mesh, &w, &w.person.id)?)?;
    let granted = consent
        .grant_consent(GrantConsentRequest {
            estate_id: w.estate.id.clone(),
            person_id: String::new(),
            purposes: vec![Purpose::FaceVerificationAtGates as i32],
            notice_version: version,
            notice_text_sha256: sha,
            affirmative_act: true,
            bundled_agreement_ids: vec![],
            method: ConsentMethod::AppTap as i32,
            paper_form_scan_sha256: String::new(),
        })
        .await?
        .into_inner();
    let att = consent
        .issue_attestation(IssueAttestationRequest { consent_id: granted.id.clone(), ttl_seconds: 0 })
        .await?
        .into_inner();
    let face = op
        .issue_credential(IssueCredentialRequest {
            person_id: w.person.id.clone(),
            estate_ids: vec![w.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Face(FaceReference {
                enrolment_ref: "fm-123".into(),
                attestation: Some(att.clone()),
            })),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(face.credential.as_ref().map(|c| c.consent_id.clone()), Some(granted.id.clone()));
    // A face reference without consent, or for another estate, is refused.
    let (c, _) = err(op
        .issue_credential(IssueCredentialRequest {
            person_id: w.person.id.clone(),
            estate_ids: vec![w.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Face(FaceReference {
                enrolment_ref: "fm-1".into(),
                attestation: None,
            })),
            ..Default::default()
        })
        .await);
    assert_eq!(c, Code::InvalidArgument);

    consent.withdraw_consent(WithdrawConsentRequest { consent_id: granted.id }).await?;

    // R4: the card, the PIN and the QR pass all still work.
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    assert_eq!(outcome(&mut g, present_card("04a1b2c3")).await?, VerifyOutcome::Valid);
    assert_eq!(outcome(&mut g, present_pin(&w.unit.id, "739146")).await?, VerifyOutcome::Valid);
    assert_eq!(outcome(&mut g, qr_code(&q, now_unix())?).await?, VerifyOutcome::Valid);
    // The face reference itself is revoked by the sweep (within its interval).
    let face_id = face.credential.map(|c| c.id).unwrap_or_default();
    let mut status = CredentialStatus::Active;
    for _ in 0..100 {
        let c = op.get_credential(GetCredentialRequest { id: face_id.clone() }).await?.into_inner();
        status = CredentialStatus::try_from(c.status)?;
        if status == CredentialStatus::Revoked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, CredentialStatus::Revoked);
    mesh.stop().await
}

#[tokio::test]
async fn an_alternative_is_issued_even_when_the_operator_restricts_it() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Gamma", "120101").await?;
    let mut ident = operator(&mesh, &w)?;
    ident
        .create_gate(CreateGateRequest {
            estate_id: w.estate.id.clone(),
            name: "East gate".into(),
            direction: GateDirection::Both as i32,
            supported_kinds: kinds(&[CredentialKind::Qr, CredentialKind::Card]),
        })
        .await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    // The operator offers only cards as alternatives.
    op.set_estate_policy(SetEstatePolicyRequest {
        estate_id: w.estate.id.clone(),
        accepted_kinds: kinds(&[CredentialKind::Card, CredentialKind::Qr, CredentialKind::Face]),
        alternative_kinds: kinds(&[CredentialKind::Card]),
    })
    .await?;
    let mut me = mesh.credentials(&resident(&mesh, &w, &w.person.id)?)?;
    let got = me
        .request_alternative(RequestAlternativeRequest { estate_id: w.estate.id.clone(), ..Default::default() })
        .await?
        .into_inner();
    let issued = got.issued.ok_or_else(|| anyhow::anyhow!("nothing issued"))?;
    assert_eq!(issued.credential.as_ref().map(|c| c.kind), Some(CredentialKind::Qr as i32));
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    assert_eq!(outcome(&mut g, qr_code(&issued, now_unix())?).await?, VerifyOutcome::Valid);

    // Asking for a card: the request is recorded and a working pass issued at once.
    let got = me
        .request_alternative(RequestAlternativeRequest {
            estate_id: w.estate.id.clone(),
            preferred_kind: CredentialKind::Card as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!got.card_request_id.is_empty());
    assert!(got.note.contains("card"), "{}", got.note);
    assert!(got.issued.is_some_and(|i| !i.secret.is_empty()));
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let alt: Vec<_> = rows.iter().filter(|r| r.event.action == "credential.alternative").collect();
    assert_eq!(alt.len(), 2);
    assert_eq!(alt[1].event.attributes.get("requested_kind").map(String::as_str), Some("card"));
    // An operator cannot ask on a resident's behalf.
    assert_eq!(
        err(op
            .request_alternative(RequestAlternativeRequest { estate_id: w.estate.id.clone(), ..Default::default() })
            .await)
        .0,
        Code::PermissionDenied
    );
    mesh.stop().await
}

#[tokio::test]
async fn pins_lock_after_five_failures() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Delta", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    op.issue_credential(pin(&w.person.id, &w.estate.id, &w.unit.id, "739146")).await?;
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    assert_eq!(outcome(&mut g, present_pin(&w.unit.id, "739146")).await?, VerifyOutcome::Valid);
    for _ in 0..4 {
        assert_eq!(outcome(&mut g, present_pin(&w.unit.id, "000001")).await?, VerifyOutcome::Unknown);
    }
    assert_eq!(outcome(&mut g, present_pin(&w.unit.id, "000001")).await?, VerifyOutcome::Locked);
    // Even the right PIN is refused while locked.
    assert_eq!(outcome(&mut g, present_pin(&w.unit.id, "739146")).await?, VerifyOutcome::Locked);
    mesh.stop().await
}

/// Forty wrong PINs sent at once (a brute-force burst, or a gate hammered
/// through several connections): still no more than five are checked, the
/// rest are refused as locked, and then the right PIN is refused too.
#[tokio::test]
async fn a_burst_of_pins_is_checked_no_more_than_the_limit() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Burst", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    op.issue_credential(pin(&w.person.id, &w.estate.id, &w.unit.id, "739146")).await?;
    let g = mesh.credentials(&gate(&mesh, &w)?)?;
    let attempts = (0..40).map(|i| {
        let mut g = g.clone();
        let unit = w.unit.id.clone();
        tokio::spawn(async move { outcome(&mut g, present_pin(&unit, &format!("{:06}", 100_000 + i))).await })
    });
    let mut checked = 0;
    for a in attempts {
        match a.await?? {
            VerifyOutcome::Unknown => checked += 1,
            VerifyOutcome::Locked => {}
            other => anyhow::bail!("a wrong PIN answered {other:?}"),
        }
    }
    assert!(checked <= 5, "{checked} wrong PINs were checked; the limit is 5");
    assert_eq!(outcome(&mut g.clone(), present_pin(&w.unit.id, "739146")).await?, VerifyOutcome::Locked);
    mesh.stop().await
}

#[tokio::test]
async fn qr_codes_rotate_and_cannot_be_replayed() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Epsilon", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    let q = op.issue_credential(qr(&w.person.id, &w.estate.id)).await?.into_inner();
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    // The steps below are relative to the server's present 30-second step, so
    // start well inside one: near its end, wait for the next.
    let into_step = now_unix() % 30;
    if into_step > 20 {
        tokio::time::sleep(std::time::Duration::from_secs(30 - into_step)).await;
    }
    let now = now_unix();
    assert_eq!(outcome(&mut g, qr_code(&q, now)?).await?, VerifyOutcome::Valid);
    assert_eq!(outcome(&mut g, qr_code(&q, now)?).await?, VerifyOutcome::Replayed);
    // An older step inside the window is a replay too; a code from long ago is unknown.
    assert_eq!(outcome(&mut g, qr_code(&q, now - 30)?).await?, VerifyOutcome::Replayed);
    assert_eq!(outcome(&mut g, qr_code(&q, now - 3600)?).await?, VerifyOutcome::Unknown);
    let junk = VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Qr(PresentedQr { payload: "not a pass".into() })),
    };
    assert_eq!(outcome(&mut g, junk).await?, VerifyOutcome::Unknown);
    // Rotation makes a new secret; the old one stops.
    let id = q.credential.as_ref().map(|c| c.id.clone()).unwrap_or_default();
    let rotated = op.rotate_credential(RotateCredentialRequest { id, card: None, pin: None }).await?.into_inner();
    assert_ne!(rotated.secret, q.secret);
    assert_eq!(outcome(&mut g, qr_code(&q, now + 30)?).await?, VerifyOutcome::Unknown);
    assert_eq!(outcome(&mut g, qr_code(&rotated, now + 30)?).await?, VerifyOutcome::Valid);
    mesh.stop().await
}

#[tokio::test]
async fn visitor_passes_stop_after_their_entries_or_window() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Zeta", "120101").await?;
    let mut host = mesh.credentials(&resident(&mesh, &w, &w.person.id)?)?;
    let now = now_unix() as i64;
    let pass = |from: i64, until: i64, entries: i32| IssueCredentialRequest {
        person_id: String::new(),
        estate_ids: vec![w.estate.id.clone()],
        valid_from: Some(prost_types::Timestamp { seconds: from, nanos: 0 }),
        valid_until: Some(prost_types::Timestamp { seconds: until, nanos: 0 }),
        label: "plumber".into(),
        secret: Some(issue_credential_request::Secret::Visitor(VisitorPass { max_entries: entries })),
    };
    let v = host.issue_credential(pass(now - 60, now + 3600, 2)).await?.into_inner();
    assert_eq!(v.credential.as_ref().map(|c| c.host_person_id.clone()), Some(w.person.id.clone()));
    let present = |code: &str| VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Visitor(PresentedVisitor { code: code.into() })),
    };
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    assert_eq!(outcome(&mut g, present(&v.secret)).await?, VerifyOutcome::Valid);
    assert_eq!(outcome(&mut g, present(&v.secret.to_lowercase())).await?, VerifyOutcome::Valid);
    assert_eq!(outcome(&mut g, present(&v.secret)).await?, VerifyOutcome::Exhausted);
    let old = host.issue_credential(pass(now - 7200, now - 3600, 5)).await?.into_inner();
    assert_eq!(outcome(&mut g, present(&old.secret)).await?, VerifyOutcome::Expired);
    let later = host.issue_credential(pass(now + 3600, now + 7200, 5)).await?.into_inner();
    assert_eq!(outcome(&mut g, present(&later.secret)).await?, VerifyOutcome::NotYetValid);
    let (c, m) = err(host.issue_credential(pass(now, now + 30 * 86_400, 1)).await);
    assert!(c == Code::InvalidArgument && m.contains("valid_until"), "{m}");
    let (c, m) = err(host.issue_credential(pass(now, now + 60, 0)).await);
    assert!(c == Code::InvalidArgument && m.contains("max_entries"), "{m}");
    // A resident issues only visitor passes.
    let (c, _) = err(host.issue_credential(card(&w.person.id, &w.estate.id, "DEADBEEF")).await);
    assert_eq!(c, Code::PermissionDenied);
    mesh.stop().await
}

#[tokio::test]
async fn suspend_reinstate_revoke_and_rotate_are_enforced_and_announced() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Eta", "120101").await?;
    let mut events = mesh.bus().subscribe();
    let mut op = mesh.credentials(&w.operator_token)?;
    let c = op.issue_credential(card(&w.person.id, &w.estate.id, "11223344")).await?.into_inner();
    let id = c.credential.map(|c| c.id).unwrap_or_default();
    let mut g = mesh.credentials(&gate(&mesh, &w)?)?;
    let change = |id: &str| ChangeCredentialRequest { id: id.into(), reason: "lost".into() };
    op.suspend_credential(change(&id)).await?;
    assert_eq!(outcome(&mut g, present_card("11223344")).await?, VerifyOutcome::Suspended);
    op.reinstate_credential(change(&id)).await?;
    assert_eq!(outcome(&mut g, present_card("11223344")).await?, VerifyOutcome::Valid);
    let rotated = op
        .rotate_credential(RotateCredentialRequest {
            id: id.clone(),
            card: Some(CardSecret { uid: "55667788".into(), facility_code: String::new() }),
            pin: None,
        })
        .await?
        .into_inner();
    assert_eq!(rotated.credential.as_ref().map(|c| c.version), Some(4));
    assert_eq!(outcome(&mut g, present_card("11223344")).await?, VerifyOutcome::Unknown);
    assert_eq!(outcome(&mut g, present_card("55667788")).await?, VerifyOutcome::Valid);
    let revoked = op.revoke_credential(change(&id)).await?.into_inner();
    assert_eq!(revoked.status, CredentialStatus::Revoked as i32);
    assert_eq!(outcome(&mut g, present_card("55667788")).await?, VerifyOutcome::Revoked);
    assert_eq!(err(op.reinstate_credential(change(&id)).await).0, Code::FailedPrecondition);
    // A revoked card can be issued again to someone.
    op.issue_credential(card(&w.person.id, &w.estate.id, "55667788")).await?;
    // ...but an active one cannot be assigned twice.
    assert_eq!(err(op.issue_credential(card(&w.person.id, &w.estate.id, "55667788")).await).0, Code::AlreadyExists);

    let mut seen = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(std::time::Duration::from_millis(500), events.recv()).await {
        if ev.topic == estate_credentials::CREDENTIAL_CHANGED_TOPIC {
            let c = <CredentialChanged as prost::Message>::decode(ev.payload.as_slice())?;
            if c.credential_id == id {
                seen.push(c.change);
            }
        }
    }
    assert_eq!(seen, ["issue", "suspend", "reinstate", "rotate", "revoke"]);
    mesh.stop().await
}

#[tokio::test]
async fn no_card_pin_or_qr_secret_is_stored_in_clear() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Theta", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    op.issue_credential(card(&w.person.id, &w.estate.id, "04A1B2C3D4E5")).await?;
    op.issue_credential(pin(&w.person.id, &w.estate.id, &w.unit.id, "739146")).await?;
    let q = op.issue_credential(qr(&w.person.id, &w.estate.id)).await?.into_inner();
    let mut host = mesh.credentials(&resident(&mesh, &w, &w.person.id)?)?;
    let now = now_unix() as i64;
    let v = host
        .issue_credential(IssueCredentialRequest {
            estate_ids: vec![w.estate.id.clone()],
            valid_until: Some(prost_types::Timestamp { seconds: now + 3600, nanos: 0 }),
            secret: Some(issue_credential_request::Secret::Visitor(VisitorPass { max_entries: 1 })),
            ..Default::default()
        })
        .await?
        .into_inner();
    let seed = data_encoding::BASE32_NOPAD.decode(q.secret.as_bytes())?;
    let dump = dump_database(&mesh).await?;
    assert!(dump.len() > 1000, "the dump looks empty");
    let needles: Vec<Vec<u8>> = vec![
        b"04A1B2C3D4E5".to_vec(),
        b"04a1b2c3d4e5".to_vec(),
        b"739146".to_vec(),
        q.secret.as_bytes().to_vec(),
        hex_lower(&seed).into_bytes(),
        seed.clone(),
        v.secret.as_bytes().to_vec(),
    ];
    for needle in needles {
        assert!(!dump.windows(needle.len()).any(|w| w == needle.as_slice()), "a secret is in the dump");
    }
    mesh.stop().await
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every byte the database holds: the SQLite files, or `pg_dump` output.
async fn dump_database(mesh: &TestMesh) -> anyhow::Result<Vec<u8>> {
    let url = mesh.db_url().to_owned();
    if let Some(path) = url.strip_prefix("sqlite://") {
        let mut all = Vec::new();
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                all.extend(bytes);
            }
        }
        return Ok(all);
    }
    let out = std::process::Command::new("pg_dump").arg("--data-only").arg(&url).output()?;
    anyhow::ensure!(out.status.success(), "pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

#[tokio::test]
async fn credentials_stay_inside_their_tenant() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let b = world(&mesh, "Beta", "120101").await?;
    let mut a_op = mesh.credentials(&a.operator_token)?;
    let issued = a_op.issue_credential(card(&a.person.id, &a.estate.id, "CAFEBABE")).await?.into_inner();
    let a_id = issued.credential.map(|c| c.id).unwrap_or_default();
    let mut b_op = mesh.credentials(&b.operator_token)?;
    let n = random_id;
    let same = |rpc: &str, foreign: (Code, String), nowhere: (Code, String)| {
        assert!(matches!(foreign.0, Code::NotFound | Code::PermissionDenied), "{rpc}: {foreign:?}");
        assert_eq!(foreign, nowhere, "{rpc} reveals tenant A's object");
    };
    same(
        "IssueCredential(estate)",
        err(b_op.issue_credential(card(&b.person.id, &a.estate.id, "01020304")).await),
        err(b_op.issue_credential(card(&b.person.id, &n(), "01020304")).await),
    );
    same(
        "IssueCredential(person)",
        err(b_op.issue_credential(card(&a.person.id, &b.estate.id, "01020304")).await),
        err(b_op.issue_credential(card(&n(), &b.estate.id, "01020304")).await),
    );
    same(
        "GetCredential",
        err(b_op.get_credential(GetCredentialRequest { id: a_id.clone() }).await),
        err(b_op.get_credential(GetCredentialRequest { id: n() }).await),
    );
    let ch = |id: String| ChangeCredentialRequest { id, reason: String::new() };
    same(
        "SuspendCredential",
        err(b_op.suspend_credential(ch(a_id.clone())).await),
        err(b_op.suspend_credential(ch(n())).await),
    );
    same(
        "ReinstateCredential",
        err(b_op.reinstate_credential(ch(a_id.clone())).await),
        err(b_op.reinstate_credential(ch(n())).await),
    );
    same(
        "RevokeCredential",
        err(b_op.revoke_credential(ch(a_id.clone())).await),
        err(b_op.revoke_credential(ch(n())).await),
    );
    let rot = |id: String| RotateCredentialRequest { id, card: None, pin: None };
    same(
        "RotateCredential",
        err(b_op.rotate_credential(rot(a_id.clone())).await),
        err(b_op.rotate_credential(rot(n())).await),
    );
    let pol = |estate_id: String| SetEstatePolicyRequest {
        estate_id,
        accepted_kinds: kinds(&[CredentialKind::Card, CredentialKind::Qr]),
        alternative_kinds: vec![],
    };
    same(
        "SetEstatePolicy",
        err(b_op.set_estate_policy(pol(a.estate.id.clone())).await),
        err(b_op.set_estate_policy(pol(n())).await),
    );
    same(
        "GetEstatePolicy",
        err(b_op.get_estate_policy(GetEstatePolicyRequest { estate_id: a.estate.id.clone() }).await),
        err(b_op.get_estate_policy(GetEstatePolicyRequest { estate_id: n() }).await),
    );
    let mut b_res = mesh.credentials(&resident(&mesh, &b, &b.person.id)?)?;
    let alt = |estate_id: String| RequestAlternativeRequest { estate_id, ..Default::default() };
    same(
        "RequestAlternative",
        err(b_res.request_alternative(alt(a.estate.id.clone())).await),
        err(b_res.request_alternative(alt(n())).await),
    );
    same(
        "GetCredential(resident)",
        err(b_res.get_credential(GetCredentialRequest { id: a_id.clone() }).await),
        err(b_res.get_credential(GetCredentialRequest { id: n() }).await),
    );
    // Lists and verification: A's card is invisible and unknown to B.
    let listed = b_op
        .list_credentials(ListCredentialsRequest { include_revoked: true, ..Default::default() })
        .await?
        .into_inner();
    assert!(listed.credentials.is_empty());
    let mut b_gate = mesh.credentials(&gate(&mesh, &b)?)?;
    assert_eq!(outcome(&mut b_gate, present_card("CAFEBABE")).await?, VerifyOutcome::Unknown);
    same(
        "VerifyCredential(estate)",
        err(b_op
            .verify_credential(VerifyCredentialRequest { estate_id: a.estate.id.clone(), ..present_card("CAFEBABE") })
            .await),
        err(b_op.verify_credential(VerifyCredentialRequest { estate_id: n(), ..present_card("CAFEBABE") }).await),
    );
    // A's card still works at A.
    let mut a_gate = mesh.credentials(&gate(&mesh, &a)?)?;
    assert_eq!(outcome(&mut a_gate, present_card("CAFEBABE")).await?, VerifyOutcome::Valid);
    mesh.stop().await
}

#[tokio::test]
async fn bad_credential_input_names_the_field() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Iota", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    let p = &w.person.id;
    let e = &w.estate.id;
    let cases: Vec<(&str, (Code, String))> = vec![
        (
            "secret",
            err(op
                .issue_credential(IssueCredentialRequest {
                    person_id: p.clone(),
                    estate_ids: vec![e.clone()],
                    ..Default::default()
                })
                .await),
        ),
        (
            "estate_ids",
            err(op
                .issue_credential(IssueCredentialRequest {
                    person_id: p.clone(),
                    secret: Some(issue_credential_request::Secret::Qr(QrSecret {})),
                    ..Default::default()
                })
                .await),
        ),
        ("person_id", err(op.issue_credential(qr("nobody", e)).await)),
        ("card", err(op.issue_credential(card(p, e, "xyz")).await)),
        ("pin.pin", err(op.issue_credential(pin(p, e, &w.unit.id, "12")).await)),
        ("pin.pin", err(op.issue_credential(pin(p, e, &w.unit.id, "111111")).await)),
        ("pin.unit_id", err(op.issue_credential(pin(p, e, "", "739146")).await)),
        ("id", err(op.get_credential(GetCredentialRequest { id: "bad".into() }).await)),
        (
            "accepted_kinds",
            err(op
                .set_estate_policy(SetEstatePolicyRequest {
                    estate_id: e.clone(),
                    accepted_kinds: vec![99],
                    alternative_kinds: vec![],
                })
                .await),
        ),
        (
            "alternative_kinds",
            err(op
                .set_estate_policy(SetEstatePolicyRequest {
                    estate_id: e.clone(),
                    accepted_kinds: kinds(&[CredentialKind::Card, CredentialKind::Qr]),
                    alternative_kinds: kinds(&[CredentialKind::Visitor]),
                })
                .await),
        ),
        (
            "presented",
            err(op.verify_credential(VerifyCredentialRequest { estate_id: e.clone(), presented: None }).await),
        ),
        (
            "page_token",
            err(op.list_credentials(ListCredentialsRequest { page_token: "zz".into(), ..Default::default() }).await),
        ),
    ];
    for (field, (c, m)) in cases {
        assert_eq!(c, Code::InvalidArgument, "{field}: {m}");
        assert!(m.contains(field), "{m:?} should name {field}");
    }
    mesh.stop().await
}
