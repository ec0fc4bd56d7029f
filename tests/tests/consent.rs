//! End-to-end tests of the consent service (R3, R4, R5, R7, R9, R16, R17).

mod support;

use estate_attestation::{AttestationError, Expected, KeySet};
use estate_auth::Principal;
use estate_proto::consent::*;
use estate_proto::identity::*;
use estate_test_support::{ConsentClient, TestMesh};
use support::*;
use tonic::Code;

const NOTICE_ZH: &str = "本小区在门禁处使用人脸识别核验住户身份。您可以随时撤回同意，并改用门禁卡、密码或二维码通行。";
const NOTICE_EN: &str = "This estate uses face verification at its gates. You may withdraw at any time and use a card, PIN or QR pass instead.";

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

/// A tenant whose estate has a notice, an assessment and face enabled.
struct Setup {
    w: World,
    notice: Notice,
    op: ConsentClient,
}

fn sha256(text: &str) -> String {
    estate_crypto::sha256_hex(text.as_bytes())
}

async fn setup(mesh: &TestMesh, name: &str) -> anyhow::Result<Setup> {
    let w = world(mesh, name, "120101").await?;
    let mut op = mesh.consent(&w.operator_token)?;
    let notice = op
        .publish_notice(PublishNoticeRequest {
            estate_id: w.estate.id.clone(),
            text_zh_cn: NOTICE_ZH.into(),
            text_en: NOTICE_EN.into(),
            effective_from: None,
        })
        .await?
        .into_inner();
    op.record_impact_assessment(RecordImpactAssessmentRequest {
        estate_id: w.estate.id.clone(),
        author: "Tianjin Privacy Assessors Ltd".into(),
        assessed_on: "2026-10-01".into(),
        document_sha256: "ab".repeat(32),
    })
    .await?;
    op.set_face_verification(SetFaceVerificationRequest { estate_id: w.estate.id.clone(), enabled: true }).await?;
    Ok(Setup { w, notice, op })
}

fn resident_token(mesh: &TestMesh, w: &World, person_id: &str) -> anyhow::Result<String> {
    Ok(mesh.token_for(Principal::Resident { tenant_id: w.tenant.id.clone(), person_id: person_id.into() })?.token)
}

fn grant(estate_id: &str, version: i64, hash: &str) -> GrantConsentRequest {
    GrantConsentRequest {
        estate_id: estate_id.into(),
        person_id: String::new(),
        purposes: vec![Purpose::FaceVerificationAtGates as i32],
        notice_version: version,
        notice_text_sha256: hash.into(),
        affirmative_act: true,
        bundled_agreement_ids: vec![],
        method: ConsentMethod::AppTap as i32,
        paper_form_scan_sha256: String::new(),
    }
}

#[tokio::test]
async fn resident_grants_gets_an_attestation_and_withdraws_in_one_call() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let s = setup(&mesh, "Haihe").await?;
    let w = &s.w;
    let mut me = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;

    // The resident's app fetches the current notice and shows it.
    let shown = me
        .get_current_notice(GetCurrentNoticeRequest { estate_id: w.estate.id.clone(), language: "en".into() })
        .await?
        .into_inner();
    assert_eq!(shown.text, NOTICE_EN);
    assert_eq!(shown.text_sha256, sha256(NOTICE_EN));
    assert_eq!(shown.version, 1);
    // What was published is what is served, hashed as stored.
    assert_eq!(s.notice.version, 1);
    let published: Vec<(String, String)> =
        s.notice.texts.iter().map(|t| (t.language.clone(), t.text_sha256.clone())).collect();
    assert_eq!(published, [("zh-CN".to_owned(), sha256(NOTICE_ZH)), ("en".to_owned(), sha256(NOTICE_EN))]);

    let consent = me.grant_consent(grant(&w.estate.id, shown.version, &shown.text_sha256)).await?.into_inner();
    assert_eq!(consent.status, ConsentStatus::Active as i32);
    assert_eq!(consent.person_pseudonym, w.person.pseudonym);
    assert!(!consent.granted_by_guardian);
    // One active consent per person, estate and purpose.
    assert_eq!(err(me.grant_consent(grant(&w.estate.id, 1, &shown.text_sha256)).await).0, Code::AlreadyExists);

    // Attestation, verified offline with keys fetched without any token.
    let att = me
        .issue_attestation(IssueAttestationRequest { consent_id: consent.id.clone(), ttl_seconds: 60 })
        .await?
        .into_inner();
    let published = mesh.consent_anonymous().get_verifying_keys(GetVerifyingKeysRequest {}).await?.into_inner();
    let keys = KeySet::from_published(&published);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let expected =
        Expected { tenant_id: &w.tenant.id, estate_id: &w.estate.id, purpose: Purpose::FaceVerificationAtGates };
    let claims = estate_attestation::verify(&att, &keys, &expected, now)?;
    assert_eq!(claims.person_pseudonym, w.person.pseudonym);
    assert_eq!(claims.consent_id, consent.id);
    assert_eq!(claims.notice_text_sha256, sha256(NOTICE_EN));
    assert_eq!(estate_attestation::verify(&att, &keys, &expected, now + 61), Err(AttestationError::Expired));
    let elsewhere = Expected { estate_id: "another-estate", ..expected };
    assert_eq!(estate_attestation::verify(&att, &keys, &elsewhere, now), Err(AttestationError::WrongEstate));
    let mut tampered = att.clone();
    tampered.claims[5] ^= 0x20;
    assert!(estate_attestation::verify(&tampered, &keys, &expected, now).is_err());
    assert_eq!(estate_attestation::verify(&att, &KeySet::default(), &expected, now), Err(AttestationError::UnknownKey));

    // Withdrawal: one call, one deletion request.
    let withdrawn = me.withdraw_consent(WithdrawConsentRequest { consent_id: consent.id.clone() }).await?.into_inner();
    assert_eq!(withdrawn.status, ConsentStatus::Withdrawn as i32);
    assert!(withdrawn.withdrawn_at.is_some());
    assert!(!withdrawn.deletion_request_id.is_empty());
    me.withdraw_consent(WithdrawConsentRequest { consent_id: consent.id.clone() }).await?;
    let requests =
        s.op.clone()
            .list_deletion_requests(ListDeletionRequestsRequest { estate_id: w.estate.id.clone(), pending_only: false })
            .await?
            .into_inner()
            .requests;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].id, withdrawn.deletion_request_id);
    assert_eq!(requests[0].person_pseudonym, w.person.pseudonym);
    assert_eq!(requests[0].reason, DeletionReason::ConsentWithdrawn as i32);
    // No attestation for a withdrawn consent.
    assert_eq!(
        err(me.issue_attestation(IssueAttestationRequest { consent_id: consent.id.clone(), ttl_seconds: 0 }).await).0,
        Code::FailedPrecondition
    );

    // History shows the grant and the withdrawal.
    let history =
        me.list_consents(ListConsentsRequest { include_inactive: true, ..Default::default() }).await?.into_inner();
    assert_eq!(history.consents.len(), 1);
    assert!(history.consents[0].granted_at.is_some() && history.consents[0].withdrawn_at.is_some());

    // No coercion (R4): the person's residency and record are untouched.
    let mut ident = operator(&mesh, w)?;
    let res = ident.get_residency(GetResidencyRequest { id: w.residency.id.clone() }).await?.into_inner();
    assert_eq!(res.status, ResidencyStatus::Active as i32);
    let person = ident.get_person(GetPersonRequest { id: w.person.id.clone() }).await?.into_inner();
    assert_eq!(person, w.person);

    // Audit: every step, pseudonyms only.
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    // (The deletion's own tombstone, written when facematch answers, is
    // covered in tests/tests/facematch.rs.)
    let consent_events: Vec<_> = rows
        .iter()
        .filter(|r| r.event.source == "consent" && r.event.action != "face_deletion.fulfil")
        .map(|r| r.event.clone())
        .collect();
    let actions: Vec<&str> = consent_events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "notice.publish",
            "impact_assessment.record",
            "face_verification.enable",
            "consent.grant",
            "consent.attest",
            "consent.withdraw"
        ]
    );
    for e in consent_events.iter().filter(|e| e.action.starts_with("consent.")) {
        assert_eq!(e.person_pseudonym, w.person.pseudonym);
        let bytes = prost::Message::encode_to_vec(e);
        assert!(!String::from_utf8_lossy(&bytes).contains(&w.person.id), "{} names the person id", e.action);
    }
    mesh.stop().await
}

#[tokio::test]
async fn every_invalid_grant_is_refused_with_the_reason() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let s = setup(&mesh, "Binhai").await?;
    let w = &s.w;
    let mut me = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;
    let e = &w.estate.id;
    let good_hash = sha256(NOTICE_ZH);
    let before = outbox_count(&mesh, &w.tenant.id).await?;

    let mut two = grant(e, 1, &good_hash);
    two.purposes.push(Purpose::Marketing as i32);
    let (c, m) = err(me.grant_consent(two).await);
    assert!(c == Code::InvalidArgument && m.contains("purposes"), "{m}");
    let mut marketing = grant(e, 1, &good_hash);
    marketing.purposes = vec![Purpose::Marketing as i32];
    assert_eq!(err(me.grant_consent(marketing).await).0, Code::InvalidArgument);
    let mut bundled = grant(e, 1, &good_hash);
    bundled.bundled_agreement_ids = vec!["property-service-contract-2026".into()];
    let (c, m) = err(me.grant_consent(bundled).await);
    assert!(c == Code::InvalidArgument && m.contains("bundled_agreement_ids"), "{m}");
    let mut ticked = grant(e, 1, &good_hash);
    ticked.affirmative_act = false;
    let (c, m) = err(me.grant_consent(ticked).await);
    assert!(c == Code::InvalidArgument && m.contains("affirmative_act"), "{m}");
    let mut paper = grant(e, 1, &good_hash);
    paper.method = ConsentMethod::SignedPaperForm as i32;
    let (c, m) = err(me.grant_consent(paper).await);
    assert!(c == Code::InvalidArgument && m.contains("paper_form_scan_sha256"), "{m}");
    let mut no_method = grant(e, 1, &good_hash);
    no_method.method = 0;
    assert_eq!(err(me.grant_consent(no_method).await).0, Code::InvalidArgument);

    // A hash of some other text, and a stale version.
    let (c, m) = err(me.grant_consent(grant(e, 1, &sha256("some other text"))).await);
    assert!(c == Code::FailedPrecondition && m.contains("notice_text_sha256"), "{m}");
    s.op.clone()
        .publish_notice(PublishNoticeRequest {
            estate_id: e.clone(),
            text_zh_cn: format!("{NOTICE_ZH} 第二版"),
            text_en: String::new(),
            effective_from: None,
        })
        .await?;
    let (c, m) = err(me.grant_consent(grant(e, 1, &good_hash)).await);
    assert!(c == Code::FailedPrecondition && m.contains("version 2"), "{m}");

    // An operator cannot consent on a resident's behalf.
    let mut op_req = grant(e, 2, &sha256(&format!("{NOTICE_ZH} 第二版")));
    op_req.person_id = w.person.id.clone();
    assert_eq!(err(s.op.clone().grant_consent(op_req).await).0, Code::PermissionDenied);

    // A person without a residency at the estate.
    let mut ident = operator(&mesh, w)?;
    let visitor = ident
        .create_person(CreatePersonRequest {
            display_name: "Visitor".into(),
            birth_date: "1990-01-01".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut v = mesh.consent(&resident_token(&mesh, w, &visitor.id)?)?;
    let (c, m) = err(v.grant_consent(grant(e, 2, &sha256(&format!("{NOTICE_ZH} 第二版")))).await);
    assert!(c == Code::FailedPrecondition && m.contains("residency"), "{m}");

    // A paper form with its scan hash is a valid way to consent.
    let mut paper = grant(e, 2, &sha256(&format!("{NOTICE_ZH} 第二版")));
    paper.method = ConsentMethod::SignedPaperForm as i32;
    paper.paper_form_scan_sha256 = "cd".repeat(32);
    let c = me.grant_consent(paper).await?.into_inner();
    assert_eq!(c.method, ConsentMethod::SignedPaperForm as i32);
    assert_eq!(c.notice_version, 2);
    // Refusals left no trace in the outbox; the notice, the visitor's record
    // and the grant did.
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before + 3);
    mesh.stop().await
}

#[tokio::test]
async fn face_needs_an_impact_assessment_before_it_is_enabled() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Nankai", "120104").await?;
    let mut op = mesh.consent(&w.operator_token)?;
    let (c, m) = err(op
        .set_face_verification(SetFaceVerificationRequest { estate_id: w.estate.id.clone(), enabled: true })
        .await);
    assert!(c == Code::FailedPrecondition && m.contains("impact assessment"), "{m}");
    op.publish_notice(PublishNoticeRequest {
        estate_id: w.estate.id.clone(),
        text_zh_cn: NOTICE_ZH.into(),
        ..Default::default()
    })
    .await?;
    let mut me = mesh.consent(&resident_token(&mesh, &w, &w.person.id)?)?;
    let (c, m) = err(me.grant_consent(grant(&w.estate.id, 1, &sha256(NOTICE_ZH))).await);
    assert!(c == Code::FailedPrecondition && m.contains("not enabled"), "{m}");
    let bad = op
        .record_impact_assessment(RecordImpactAssessmentRequest {
            estate_id: w.estate.id.clone(),
            author: "A".into(),
            assessed_on: "2026-10-01".into(),
            document_sha256: "not-a-hash".into(),
        })
        .await;
    assert_eq!(err(bad).0, Code::InvalidArgument);
    let a = op
        .record_impact_assessment(RecordImpactAssessmentRequest {
            estate_id: w.estate.id.clone(),
            author: "A".into(),
            assessed_on: "2026-10-01".into(),
            document_sha256: "ef".repeat(32),
        })
        .await?
        .into_inner();
    let status = op
        .set_face_verification(SetFaceVerificationRequest { estate_id: w.estate.id.clone(), enabled: true })
        .await?
        .into_inner();
    assert!(status.enabled);
    assert_eq!(status.assessment_id, a.id);
    let read =
        me.get_face_verification(GetFaceVerificationRequest { estate_id: w.estate.id.clone() }).await?.into_inner();
    assert!(read.enabled);
    mesh.stop().await
}

#[tokio::test]
async fn a_ten_year_old_is_enrolled_only_through_a_linked_guardian() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let s = setup(&mesh, "Hexi").await?;
    let w = &s.w;
    let mut ident = operator(&mesh, w)?;
    let year = time_now_year() - 10;
    let child = ident
        .create_person(CreatePersonRequest {
            display_name: "Gu Xiaoming".into(),
            birth_date: format!("{year}-01-15"),
            guardian_person_id: w.person.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(child.is_minor);
    ident
        .create_residency(CreateResidencyRequest {
            person_id: child.id.clone(),
            unit_id: w.unit.id.clone(),
            role: ResidencyRole::Occupant as i32,
            valid_from: None,
            valid_until: None,
        })
        .await?;
    let stranger = ident
        .create_person(CreatePersonRequest {
            display_name: "Li".into(),
            birth_date: "1985-01-01".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let hash = sha256(NOTICE_ZH);

    // The child cannot consent for themselves.
    let mut kid = mesh.consent(&resident_token(&mesh, w, &child.id)?)?;
    let (c, m) = err(kid.grant_consent(grant(&w.estate.id, 1, &hash)).await);
    assert!(c == Code::FailedPrecondition && m.contains("guardian"), "{m}");
    // A resident who is not the linked guardian cannot either.
    let mut other = mesh.consent(&resident_token(&mesh, w, &stranger.id)?)?;
    let mut for_child = grant(&w.estate.id, 1, &hash);
    for_child.person_id = child.id.clone();
    assert_eq!(err(other.grant_consent(for_child.clone()).await).0, Code::PermissionDenied);
    // The linked guardian can.
    let mut parent = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;
    let consent = parent.grant_consent(for_child).await?.into_inner();
    assert!(consent.granted_by_guardian && consent.concerns_minor);
    assert_eq!(consent.person_id, child.id);
    assert_eq!(consent.guardian_person_id, w.person.id);
    // The guardian can act on it without being the person; the stranger cannot see it.
    let att = parent
        .issue_attestation(IssueAttestationRequest { consent_id: consent.id.clone(), ttl_seconds: 0 })
        .await?
        .into_inner();
    assert!(att.decoded.clone().is_some_and(|d| d.concerns_minor));
    assert_eq!(err(other.get_consent(GetConsentRequest { id: consent.id.clone() }).await).0, Code::PermissionDenied);
    let listed = parent.list_consents(ListConsentsRequest::default()).await?.into_inner();
    assert_eq!(listed.consents.len(), 1);
    // The guardian enrols the child's face with that attestation.
    let mut fm = mesh.facematch(&resident_token(&mesh, w, &w.person.id)?)?;
    fm.enrol(estate_proto::facematch::EnrolRequest {
        estate_id: w.estate.id.clone(),
        person_pseudonym: child.pseudonym.clone(),
        attestation: Some(att.clone()),
        face: Some(estate_proto::facematch::FaceSample {
            template: (0..512).map(|i| ((i * 5 % 23) as f32) - 11.0).collect(),
            image: Vec::new(),
        }),
        request_id: String::new(),
    })
    .await?;
    parent.withdraw_consent(WithdrawConsentRequest { consent_id: consent.id.clone() }).await?;
    // Minors are flagged in audit (R7).
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let about_child: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.event.person_pseudonym == child.pseudonym
                && r.event.source == "consent"
                && r.event.action != "face_deletion.fulfil"
        })
        .collect();
    assert_eq!(about_child.len(), 3);
    assert!(about_child.iter().all(|r| r.event.concerns_minor));
    // The deletion's tombstone, once facematch has answered, is flagged too.
    let mut tombstone = None;
    for _ in 0..100 {
        let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
        tombstone = rows
            .into_iter()
            .find(|r| r.event.person_pseudonym == child.pseudonym && r.event.action == "face_deletion.fulfil");
        if tombstone.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(tombstone.is_some_and(|r| r.event.concerns_minor));
    // So are facematch's own records of the enrolment and the deletion,
    // copied from its journal.
    let mut from_facematch = Vec::new();
    for _ in 0..300 {
        let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
        from_facematch = rows
            .into_iter()
            .filter(|r| r.event.source == "facematch" && r.event.person_pseudonym == child.pseudonym)
            .map(|r| r.event)
            .collect::<Vec<_>>();
        if from_facematch.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let actions: Vec<&str> = from_facematch.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["face.enrol", "face.delete"]);
    assert!(from_facematch.iter().all(|e| e.concerns_minor));
    // Facematch cannot tell whether the child or the guardian used the
    // attestation, so the enrolment names no resident.
    assert_eq!(from_facematch[0].actor.as_ref().map(|a| a.id.as_str()), Some(""));
    mesh.stop().await
}

fn time_now_year() -> i64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i64
}

#[tokio::test]
async fn moving_out_ends_consent_and_requests_deletion_exactly_once() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let s = setup(&mesh, "Dongli").await?;
    let w = &s.w;
    let mut me = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;
    let consent = me.grant_consent(grant(&w.estate.id, 1, &sha256(NOTICE_ZH))).await?.into_inner();
    operator(&mesh, w)?
        .end_residency(EndResidencyRequest { id: w.residency.id.clone(), reason: "moved out".into() })
        .await?;

    // The bus wakes the sweep; wait for its request, which the embedded
    // facematch fulfils at once (with nothing enrolled, the certificate says 0).
    let mut op = s.op.clone();
    let mut requests = Vec::new();
    for _ in 0..100 {
        requests = op
            .list_deletion_requests(ListDeletionRequestsRequest { estate_id: w.estate.id.clone(), pending_only: false })
            .await?
            .into_inner()
            .requests;
        if requests.iter().any(|r| r.fulfilled) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].reason, DeletionReason::ResidencyEnded as i32);
    assert_eq!(requests[0].person_pseudonym, w.person.pseudonym);
    let ended = op.get_consent(GetConsentRequest { id: consent.id.clone() }).await?.into_inner();
    assert_eq!(ended.status, ConsentStatus::Ended as i32);
    assert_eq!(ended.deletion_request_id, requests[0].id);

    // Running the sweep again, by hand, changes nothing.
    assert_eq!(estate_consent::sweep_residency_ends(mesh.db()).await?, 0);
    let again = op
        .list_deletion_requests(ListDeletionRequestsRequest { estate_id: w.estate.id.clone(), pending_only: false })
        .await?
        .into_inner()
        .requests;
    assert_eq!(again.len(), 1);
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    assert_eq!(rows.iter().filter(|r| r.event.action == "face_deletion.request").count(), 1);
    mesh.stop().await
}

#[tokio::test]
async fn consents_stay_inside_their_tenant() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = setup(&mesh, "Alpha").await?;
    let b = setup(&mesh, "Beta").await?;
    let mut a_res = mesh.consent(&resident_token(&mesh, &a.w, &a.w.person.id)?)?;
    let consent = a_res.grant_consent(grant(&a.w.estate.id, 1, &sha256(NOTICE_ZH))).await?.into_inner();

    let mut b_op = b.op.clone();
    let foreign = err(b_op.get_consent(GetConsentRequest { id: consent.id.clone() }).await);
    let nowhere = err(b_op.get_consent(GetConsentRequest { id: random_id() }).await);
    assert_eq!(foreign, nowhere);
    assert_eq!(foreign.0, Code::NotFound);
    assert!(
        b_op.list_consents(ListConsentsRequest { include_inactive: true, ..Default::default() })
            .await?
            .into_inner()
            .consents
            .is_empty()
    );
    let foreign = err(b_op
        .publish_notice(PublishNoticeRequest {
            estate_id: a.w.estate.id.clone(),
            text_zh_cn: "x".into(),
            ..Default::default()
        })
        .await);
    let nowhere = err(b_op
        .publish_notice(PublishNoticeRequest { estate_id: random_id(), text_zh_cn: "x".into(), ..Default::default() })
        .await);
    assert_eq!(foreign, nowhere);
    let foreign =
        err(b_op.issue_attestation(IssueAttestationRequest { consent_id: consent.id.clone(), ttl_seconds: 0 }).await);
    let nowhere =
        err(b_op.issue_attestation(IssueAttestationRequest { consent_id: random_id(), ttl_seconds: 0 }).await);
    assert_eq!(foreign, nowhere);

    let mut b_res = mesh.consent(&resident_token(&mesh, &b.w, &b.w.person.id)?)?;
    let foreign = err(b_res.withdraw_consent(WithdrawConsentRequest { consent_id: consent.id.clone() }).await);
    let nowhere = err(b_res.withdraw_consent(WithdrawConsentRequest { consent_id: random_id() }).await);
    assert_eq!(foreign, nowhere);
    let foreign = err(b_res
        .get_current_notice(GetCurrentNoticeRequest { estate_id: a.w.estate.id.clone(), language: String::new() })
        .await);
    let nowhere = err(b_res
        .get_current_notice(GetCurrentNoticeRequest { estate_id: random_id(), language: String::new() })
        .await);
    assert_eq!(foreign, nowhere);
    // A's consent is still active.
    assert_eq!(
        a_res.get_consent(GetConsentRequest { id: consent.id.clone() }).await?.into_inner().status,
        ConsentStatus::Active as i32
    );
    mesh.stop().await
}

#[tokio::test]
async fn the_filing_count_warns_before_the_threshold() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn_with(|s| {
        s.consent.filing_warning_at = 1;
        s.consent.filing_threshold = 2;
    })
    .await?;
    let s = setup(&mesh, "Jinnan").await?;
    let w = &s.w;
    let mut op = s.op.clone();
    let status = op.get_filing_status(GetFilingStatusRequest {}).await?.into_inner();
    assert_eq!((status.persons_with_face_consent, status.level), (0, FilingLevel::Ok as i32));
    let mut me = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;
    me.grant_consent(grant(&w.estate.id, 1, &sha256(NOTICE_ZH))).await?;
    let status = op.get_filing_status(GetFilingStatusRequest {}).await?.into_inner();
    assert_eq!((status.persons_with_face_consent, status.level), (1, FilingLevel::Warning as i32));
    let mut ident = operator(&mesh, w)?;
    let p2 = ident
        .create_person(CreatePersonRequest {
            display_name: "Zhao".into(),
            birth_date: "1970-02-02".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ident
        .create_residency(CreateResidencyRequest {
            person_id: p2.id.clone(),
            unit_id: w.unit.id.clone(),
            role: 2,
            valid_from: None,
            valid_until: None,
        })
        .await?;
    mesh.consent(&resident_token(&mesh, w, &p2.id)?)?.grant_consent(grant(&w.estate.id, 1, &sha256(NOTICE_ZH))).await?;
    let status = op.get_filing_status(GetFilingStatusRequest {}).await?.into_inner();
    assert_eq!((status.persons_with_face_consent, status.level), (2, FilingLevel::FilingRequired as i32));
    assert!(status.message.contains("filing"), "{}", status.message);
    mesh.stop().await
}

/// Stands in for facematch: counts erasures and returns a certificate.
struct CountingEraser(std::sync::atomic::AtomicUsize);

impl estate_consent::FaceDataEraser for CountingEraser {
    fn erase<'a>(
        &'a self,
        request: &'a DeletionRequest,
    ) -> futures_util::future::BoxFuture<'a, estate_core::Result<estate_proto::facematch::DeletionCertificate>> {
        Box::pin(async move {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = estate_proto::facematch::CertificateBody {
                format: estate_facematch::certificate::FORMAT,
                certificate_id: format!("cert-{}", request.id),
                tenant_id: request.tenant_id.clone(),
                person_pseudonym: request.person_pseudonym.clone(),
                request_id: request.id.clone(),
                ..Default::default()
            };
            Ok(estate_facematch::certificate::sign(&estate_crypto::SigningKeyPair::from_seed([5; 32]), &body))
        })
    }
}

#[tokio::test]
async fn deletion_requests_are_handed_over_once() -> anyhow::Result<()> {
    // Without the embedded facematch, so that only this test's eraser runs.
    let mesh = TestMesh::spawn_with(|s| s.facematch.embedded = false).await?;
    let s = setup(&mesh, "Wuqing").await?;
    let w = &s.w;
    let mut me = mesh.consent(&resident_token(&mesh, w, &w.person.id)?)?;
    let consent = me.grant_consent(grant(&w.estate.id, 1, &sha256(NOTICE_ZH))).await?.into_inner();
    let withdrawn = me.withdraw_consent(WithdrawConsentRequest { consent_id: consent.id }).await?.into_inner();

    let eraser = CountingEraser(std::sync::atomic::AtomicUsize::new(0));
    assert_eq!(estate_consent::fulfil_pending(mesh.db(), &eraser).await?, 1);
    assert_eq!(estate_consent::fulfil_pending(mesh.db(), &eraser).await?, 0);
    assert_eq!(eraser.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    let all =
        s.op.clone()
            .list_deletion_requests(ListDeletionRequestsRequest { estate_id: w.estate.id.clone(), pending_only: false })
            .await?
            .into_inner()
            .requests;
    assert_eq!(all.len(), 1);
    assert!(all[0].fulfilled);
    assert_eq!(all[0].certificate_id, format!("cert-{}", withdrawn.deletion_request_id));
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    assert_eq!(rows.iter().filter(|r| r.event.action == "face_deletion.fulfil").count(), 1);
    mesh.stop().await
}
