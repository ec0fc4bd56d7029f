//! End-to-end tests of facematch (R5, R6, R8, R9, R16) and the gate's face
//! path, with a real face-embedding model on real photos (installed from
//! package registries by `tools/fetch-face-assets.sh`).

mod support;

use estate_facematch::prep;
use estate_proto::common::CredentialKind;
use estate_proto::consent::*;
use estate_proto::credentials::{
    CardSecret, FaceReference, IssueCredentialRequest, PresentedCard, issue_credential_request,
};
use estate_proto::facematch::{
    DeletionCertificate, EnrolRequest, FaceSample, GetCertificateKeysRequest, IdentifyRequest, SetThresholdRequest,
};
use estate_proto::gate::{DecideRequest, FaceProbe, Reason, decide_request};
use estate_proto::identity::*;
use estate_test_support::{ConsentClient, TestMesh, face_assets};
use prost::Message;
use std::path::{Path, PathBuf};
use support::*;
use tonic::Code;

/// Aligned-enough face crops (112x112 PNG) of the package photos, plus
/// augmented copies of each (mirrored, brighter, darker).
struct Faces {
    crops: std::collections::HashMap<String, Vec<u8>>,
}

impl Faces {
    fn load(assets: &Path) -> anyhow::Result<Self> {
        let detector = prep::Detector::load(&assets.join("model/fr_detect.onnx"))?;
        let mut crops = std::collections::HashMap::new();
        for name in ["obama", "obama2", "obama3", "biden"] {
            let frame = prep::decode(&std::fs::read(assets.join(format!("images/{name}.jpg")))?)?;
            let face = detector.detect(&frame)?.ok_or_else(|| anyhow::anyhow!("no face found in {name}.jpg"))?;
            let png = prep::crop(&frame, &face, 112)?;
            let img = prep::decode(&png)?;
            crops.insert(format!("{name}-mirrored"), encode(&image::imageops::flip_horizontal(&img))?);
            crops.insert(format!("{name}-bright"), encode(&image::imageops::colorops::brighten(&img, 30))?);
            crops.insert(format!("{name}-dark"), encode(&image::imageops::colorops::brighten(&img, -30))?);
            crops.insert(name.to_owned(), png);
        }
        Ok(Self { crops })
    }

    fn get(&self, name: &str) -> Vec<u8> {
        self.crops.get(name).cloned().unwrap_or_default()
    }
}

fn encode(img: &image::RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

fn image(png: Vec<u8>) -> Option<FaceSample> {
    Some(FaceSample { template: Vec::new(), image: png })
}

async fn mesh_with_model(assets: &Path) -> anyhow::Result<TestMesh> {
    let model = assets.join("model/fr_feature.onnx");
    TestMesh::spawn_with(move |s| s.facematch.model_path = Some(model)).await
}

async fn add_person(mesh: &TestMesh, w: &World, estate_id: &str, name: &str) -> anyhow::Result<Person> {
    let mut op = operator(mesh, w)?;
    let person = op
        .create_person(CreatePersonRequest {
            display_name: name.into(),
            phone: String::new(),
            birth_date: "1975-03-02".into(),
            guardian_person_id: String::new(),
        })
        .await?
        .into_inner();
    let unit = op
        .create_unit(CreateUnitRequest {
            estate_id: estate_id.into(),
            building: "9".into(),
            unit: "1".into(),
            room: format!("{}", 100 + name.len()),
        })
        .await?
        .into_inner();
    op.create_residency(CreateResidencyRequest {
        person_id: person.id.clone(),
        unit_id: unit.id,
        role: ResidencyRole::Owner as i32,
        valid_from: None,
        valid_until: None,
    })
    .await?;
    Ok(person)
}

/// The person grants face consent at the estate; returns (consent, resident client).
async fn consent_to_face(
    mesh: &TestMesh,
    w: &World,
    estate_id: &str,
    person_id: &str,
    notice: &(i64, String),
) -> anyhow::Result<(Consent, ConsentClient)> {
    let mut me = mesh.consent(&resident(mesh, w, person_id)?)?;
    let consent = me
        .grant_consent(GrantConsentRequest {
            estate_id: estate_id.into(),
            person_id: String::new(),
            purposes: vec![Purpose::FaceVerificationAtGates as i32],
            notice_version: notice.0,
            notice_text_sha256: notice.1.clone(),
            affirmative_act: true,
            bundled_agreement_ids: vec![],
            method: ConsentMethod::AppTap as i32,
            paper_form_scan_sha256: String::new(),
        })
        .await?
        .into_inner();
    Ok((consent, me))
}

async fn attestation(me: &mut ConsentClient, consent_id: &str, ttl: i64) -> anyhow::Result<SignedAttestation> {
    Ok(me
        .issue_attestation(IssueAttestationRequest { consent_id: consent_id.into(), ttl_seconds: ttl })
        .await?
        .into_inner())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn faces_are_matched_within_one_estate_deleted_with_proof_and_unreadable_afterwards() -> anyhow::Result<()> {
    let assets = face_assets()?;
    let faces = Faces::load(&assets)?;
    let mesh = mesh_with_model(&assets).await?;
    let w = world(&mesh, "Haihe", "120101").await?;
    let notice = enable_face(&mesh, &w).await?;
    let mut ops = mesh.facematch(&w.operator_token)?;
    let estate_a = w.estate.id.clone();
    // The model is used on unaligned crops here; its scores for the same
    // person run 0.30-0.45 and for different people below 0.25.
    ops.set_threshold(SetThresholdRequest { estate_id: estate_a.clone(), threshold: 0.28 }).await?;

    // A second estate of the same tenant, with its own gallery.
    let estate_b = operator(&mesh, &w)?
        .create_estate(CreateEstateRequest {
            name: "Haihe East".into(),
            address: "2 Jiefang Road".into(),
            jurisdiction_code: "120101".into(),
        })
        .await?
        .into_inner();
    let world_b = World { estate: estate_b.clone(), ..w.clone() };
    let notice_b = enable_face(&mesh, &world_b).await?;
    ops.set_threshold(SetThresholdRequest { estate_id: estate_b.id.clone(), threshold: 0.28 }).await?;

    let obama = w.person.clone();
    let biden = add_person(&mesh, &w, &estate_a, "Biden").await?;
    let twin = add_person(&mesh, &w, &estate_b.id, "Twin").await?;

    let (obama_consent, mut obama_me) = consent_to_face(&mesh, &w, &estate_a, &obama.id, &notice).await?;
    let (biden_consent, mut biden_me) = consent_to_face(&mesh, &w, &estate_a, &biden.id, &notice).await?;
    let (twin_consent, mut twin_me) = consent_to_face(&mesh, &w, &estate_b.id, &twin.id, &notice_b).await?;

    // Enrolment is refused without a valid attestation.
    let enrol = |estate: &str, person: &str, att: Option<SignedAttestation>, png: Vec<u8>| EnrolRequest {
        estate_id: estate.into(),
        person_pseudonym: person.into(),
        attestation: att,
        face: image(png),
        request_id: String::new(),
    };
    let (c, m) = err(ops.enrol(enrol(&estate_a, &obama.pseudonym, None, faces.get("obama"))).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    let short = attestation(&mut obama_me, &obama_consent.id, 1).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (c, m) = err(ops.enrol(enrol(&estate_a, &obama.pseudonym, Some(short), faces.get("obama"))).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("expired"), "{m}");
    let att = attestation(&mut obama_me, &obama_consent.id, 0).await?;
    let (c, m) = err(ops.enrol(enrol(&estate_b.id, &obama.pseudonym, Some(att.clone()), faces.get("obama"))).await);
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("another estate"), "{m}");
    let mut tampered = att.clone();
    let last = tampered.claims.len() - 1;
    tampered.claims[last] ^= 1;
    let (c, m) = err(ops.enrol(enrol(&estate_a, &obama.pseudonym, Some(tampered), faces.get("obama"))).await);
    assert_eq!(c, Code::PermissionDenied, "{m}");
    let (c, _) = err(ops.enrol(enrol(&estate_a, &biden.pseudonym, Some(att.clone()), faces.get("biden"))).await);
    assert_eq!(c, Code::PermissionDenied, "another person's attestation");
    // Bad faces: not an image, a template of the wrong size or all zeros.
    let (c, _) = err(ops.enrol(enrol(&estate_a, &obama.pseudonym, Some(att.clone()), b"not an image".to_vec())).await);
    assert_eq!(c, Code::InvalidArgument);
    let mut zero = enrol(&estate_a, &obama.pseudonym, Some(att.clone()), Vec::new());
    zero.face = Some(FaceSample { template: vec![0.0; 512], image: Vec::new() });
    assert_eq!(err(ops.enrol(zero).await).0, Code::InvalidArgument);
    let mut short_t = enrol(&estate_a, &obama.pseudonym, Some(att.clone()), Vec::new());
    short_t.face = Some(FaceSample { template: vec![0.5; 128], image: Vec::new() });
    assert_eq!(err(ops.enrol(short_t).await).0, Code::InvalidArgument);

    // Enrol: Obama and Biden at A; the twin (enrolled with Obama's face) at B.
    ops.enrol(enrol(&estate_a, &obama.pseudonym, Some(att), faces.get("obama"))).await?;
    let att = attestation(&mut biden_me, &biden_consent.id, 0).await?;
    ops.enrol(enrol(&estate_a, &biden.pseudonym, Some(att), faces.get("biden"))).await?;
    let att = attestation(&mut twin_me, &twin_consent.id, 0).await?;
    ops.enrol(enrol(&estate_b.id, &twin.pseudonym, Some(att), faces.get("obama-mirrored"))).await?;

    // Identify within estate A: the right person for other photos and
    // augmented copies, never the twin of estate B.
    let identify = |estate: &str, png: Vec<u8>| IdentifyRequest { estate_id: estate.into(), probe: image(png) };
    for (probe, who) in [
        ("obama2", &obama),
        ("obama3", &obama),
        ("obama-bright", &obama),
        ("obama-dark", &obama),
        ("obama-mirrored", &obama),
        ("biden-mirrored", &biden),
        ("biden-bright", &biden),
        ("biden-dark", &biden),
    ] {
        let m = ops.identify(identify(&estate_a, faces.get(probe))).await?.into_inner();
        assert!(m.matched, "{probe}: no match (score {})", m.score);
        assert_eq!(m.person_pseudonym, who.pseudonym, "{probe} matched the wrong person (score {})", m.score);
        assert_ne!(m.person_pseudonym, twin.pseudonym);
    }
    // In estate B only the twin exists: Biden's face matches nobody there.
    let m = ops.identify(identify(&estate_b.id, faces.get("biden"))).await?.into_inner();
    assert!(!m.matched || m.person_pseudonym == twin.pseudonym);
    assert_ne!(m.person_pseudonym, biden.pseudonym);
    // A gate of estate A cannot search estate B's gallery.
    let gate_token = gate(&mesh, &w)?;
    let (c, _) = err(mesh.facematch(&gate_token)?.identify(identify(&estate_b.id, faces.get("obama"))).await);
    assert_eq!(c, Code::PermissionDenied);
    // Another tenant's operator reaches only their own tenant's engine: even
    // naming estate A's id, they search their own (empty) data.
    let other = world(&mesh, "Nankai", "120104").await?;
    let mut theirs = mesh.facematch(&other.operator_token)?;
    for estate in [&other.estate.id, &estate_a] {
        let m = theirs.identify(identify(estate, faces.get("obama"))).await?.into_inner();
        assert!(!m.matched && m.person_pseudonym.is_empty());
    }

    // At the gate: a face reference for Obama, then a face decision.
    let mut creds = mesh.credentials(&w.operator_token)?;
    creds
        .issue_credential(IssueCredentialRequest {
            person_id: obama.id.clone(),
            estate_ids: vec![estate_a.clone()],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "04A1B2C3".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        })
        .await?;
    let att = attestation(&mut obama_me, &obama_consent.id, 0).await?;
    creds
        .issue_credential(IssueCredentialRequest {
            person_id: obama.id.clone(),
            estate_ids: vec![estate_a.clone()],
            secret: Some(issue_credential_request::Secret::Face(FaceReference {
                enrolment_ref: "facematch".into(),
                attestation: Some(att),
            })),
            ..Default::default()
        })
        .await?;
    let mut at_gate = mesh.gate(&gate_token)?;
    let face = |png: Vec<u8>| DecideRequest {
        presented: Some(decide_request::Presented::Face(FaceProbe { template: Vec::new(), image: png })),
        gate_id: String::new(),
    };
    let probe = faces.get("obama2");
    let d = at_gate.decide(face(probe.clone())).await?.into_inner();
    assert_eq!(Reason::try_from(d.reason)?, Reason::Ok, "{}", d.message);
    assert_eq!(d.person_pseudonym, obama.pseudonym);
    assert_eq!(d.kind, CredentialKind::Face as i32);
    // Biden is enrolled but holds no face reference: matched, not admitted.
    let d = at_gate.decide(face(faces.get("biden-bright"))).await?.into_inner();
    assert_eq!(Reason::try_from(d.reason)?, Reason::Unknown, "{}", d.message);

    // Keep a copy of facematch's database from before the withdrawal.
    let tenant_dir = mesh.data_dir.path().join("facematch").join(&w.tenant.id);
    let copy = tempfile::tempdir()?;
    let registry = mesh.face_registry().cloned().ok_or_else(|| anyhow::anyhow!("no embedded facematch"))?;
    let engine = registry.engine(&w.tenant.id).await?;
    estate_store::sqlx::query(estate_store::sqlx::AssertSqlSafe(format!(
        "VACUUM INTO '{}'",
        copy.path().join("faces.db").display()
    )))
    .execute(engine.db().pool())
    .await?;

    // A matched person whose consent is no longer active is refused at the
    // gate even before facematch has deleted (here the consent row is ended
    // behind everyone's back, then restored).
    let set_status = |status: &'static str, id: String| {
        let db = mesh.db().clone();
        async move {
            estate_store::sqlx::query("UPDATE consents SET status = $1 WHERE id = $2")
                .bind(status)
                .bind(id)
                .execute(db.pool())
                .await
        }
    };
    set_status("ended", biden_consent.id.clone()).await?;
    let d = at_gate.decide(face(faces.get("biden-bright"))).await?.into_inner();
    assert_eq!(Reason::try_from(d.reason)?, Reason::FaceNotConsented, "{}", d.message);
    set_status("active", biden_consent.id.clone()).await?;

    // Withdrawal: one call; the sweep hands the request to facematch at once.
    let withdrawn =
        obama_me.withdraw_consent(WithdrawConsentRequest { consent_id: obama_consent.id.clone() }).await?.into_inner();
    // The card still works (R4).
    let d = at_gate
        .decide(DecideRequest {
            presented: Some(decide_request::Presented::Card(PresentedCard {
                uid: "04A1B2C3".into(),
                facility_code: String::new(),
            })),
            gate_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(Reason::try_from(d.reason)?, Reason::Ok);
    let mut stored = None;
    for _ in 0..100 {
        match obama_me
            .get_deletion_certificate(GetDeletionCertificateRequest {
                deletion_request_id: withdrawn.deletion_request_id.clone(),
            })
            .await
        {
            Ok(s) => {
                stored = Some(s.into_inner());
                break;
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(s) => return Err(s.into()),
        }
    }
    let stored = stored.ok_or_else(|| anyhow::anyhow!("no certificate within 5 s of the withdrawal"))?;
    // Handing over again does nothing.
    let eraser = estate_consent::FacematchEraser(registry.clone());
    assert_eq!(estate_consent::fulfil_pending(mesh.db(), &eraser).await?, 0);

    // No longer matched anywhere.
    let m = ops.identify(identify(&estate_a, faces.get("obama2"))).await?.into_inner();
    assert_ne!(m.person_pseudonym, obama.pseudonym);
    let d = at_gate.decide(face(faces.get("obama2"))).await?.into_inner();
    assert_ne!(Reason::try_from(d.reason)?, Reason::Ok);

    // The certificate: fetched by the person, verified offline.
    let cert = DeletionCertificate::decode(stored.certificate.as_slice())?;
    let keys = ops.get_certificate_keys(GetCertificateKeysRequest {}).await?.into_inner();
    let body = estate_facematch::certificate::verify(&cert, &estate_attestation::KeySet::from_published(&keys))?;
    assert_eq!(body.person_pseudonym, obama.pseudonym);
    assert_eq!(body.tenant_id, w.tenant.id);
    assert_eq!(body.estate_ids, vec![estate_a.clone()]);
    assert_eq!(body.templates_deleted, 1);
    assert_eq!(body.key_ids_destroyed.len(), 1);
    assert_eq!(body.request_id, withdrawn.deletion_request_id);
    // Another resident cannot fetch it.
    let (c, _) = err(biden_me
        .get_deletion_certificate(GetDeletionCertificateRequest {
            deletion_request_id: withdrawn.deletion_request_id.clone(),
        })
        .await);
    assert_eq!(c, Code::NotFound);
    // The tombstone is in the audit outbox, with no face data.
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let tomb = rows
        .iter()
        .find(|r| r.event.action == "face_deletion.fulfil")
        .ok_or_else(|| anyhow::anyhow!("no tombstone"))?;
    assert_eq!(tomb.event.attributes.get("templates_deleted").map(String::as_str), Some("1"));

    // Crypto-shredding: the copy from before still holds the ciphertext, but
    // its data key is gone from the vault, so nobody can read it.
    let copied = format!("sqlite://{}", copy.path().join("faces.db").display());
    estate_store::sqlx::any::install_default_drivers();
    let mut conn = <estate_store::sqlx::AnyConnection as estate_store::sqlx::Connection>::connect(&copied).await?;
    let (key_id, sealed): (String, Vec<u8>) =
        estate_store::sqlx::query_as("SELECT key_id, sealed FROM fm_templates WHERE person_pseudonym = $1")
            .bind(&obama.pseudonym)
            .fetch_one(&mut conn)
            .await?;
    assert!(!sealed.is_empty());
    assert_eq!(body.key_ids_destroyed, vec![key_id.clone()]);
    let tenant_key: [u8; 32] = std::fs::read(tenant_dir.join("tenant.key"))?.as_slice().try_into()?;
    let vault = estate_facematch::vault::Vault::open(&tenant_dir.join("vault"), &w.tenant.id, tenant_key)?;
    assert!(matches!(vault.get(&key_id), Err(estate_facematch::vault::VaultError::Missing(_))));
    assert!(!files_under(&tenant_dir.join("vault")).iter().any(|p| p.to_string_lossy().contains(&key_id)));
    // Biden's key, by contrast, still opens his template in the same copy.
    let (bkey, bsealed): (String, Vec<u8>) =
        estate_store::sqlx::query_as("SELECT key_id, sealed FROM fm_templates WHERE person_pseudonym = $1")
            .bind(&biden.pseudonym)
            .fetch_one(&mut conn)
            .await?;
    assert!(vault.get(&bkey).is_ok() && bsealed.len() > 512 * 4);

    // The probe image is nowhere on disk (R8): no file under the data
    // directory holds any part of it.
    let needle = &probe[probe.len() / 2..probe.len() / 2 + 64];
    for f in files_under(mesh.data_dir.path()) {
        let bytes = std::fs::read(&f)?;
        assert!(!contains(&bytes, needle), "{} holds probe image bytes", f.display());
    }

    // R16: the count of persons with templates, also in the filing status.
    let count = engine.count().await?;
    assert_eq!((count.persons, count.templates), (2, 2));
    let filing = mesh.consent(&w.operator_token)?.get_filing_status(GetFilingStatusRequest {}).await?.into_inner();
    assert_eq!(filing.persons_with_templates, 2);
    assert!(filing.message.contains("facematch holds face data of 2"), "{}", filing.message);

    // An operator deletes a person at every estate at once; a retry with the
    // same request id returns the same certificate and deletes nothing more.
    let all = estate_proto::facematch::DeleteRequest {
        person_pseudonym: twin.pseudonym.clone(),
        estate_id: String::new(),
        reason: estate_proto::facematch::DeletionReason::Request as i32,
        request_id: "erase-everywhere-1".into(),
    };
    let first = ops.delete(all.clone()).await?.into_inner();
    let again = ops.delete(all).await?.into_inner();
    assert_eq!(first.body, again.body);
    let body = first.decoded.unwrap_or_default();
    assert_eq!((body.estate_ids, body.templates_deleted), (vec![estate_b.id.clone()], 1));
    assert_eq!(engine.count().await?.persons, 1);
    mesh.stop().await
}

#[tokio::test]
async fn without_facematch_a_face_is_refused_with_a_hint_and_cards_still_work() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn_with(|s| s.facematch.embedded = false).await?;
    let w = world(&mesh, "Hexi", "120103").await?;
    let mut at_gate = mesh.gate(&gate(&mesh, &w)?)?;
    let d = at_gate
        .decide(DecideRequest {
            presented: Some(decide_request::Presented::Face(FaceProbe { template: vec![0.1; 512], image: Vec::new() })),
            gate_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(Reason::try_from(d.reason)?, Reason::FaceUnavailable);
    assert!(d.message.contains("card") && d.message.contains("never required"), "{}", d.message);
    mesh.stop().await
}

#[tokio::test]
async fn templates_whose_consent_ended_are_swept_and_certified() -> anyhow::Result<()> {
    // Templates only (no model): the terminal extracted them.
    let mesh = TestMesh::spawn_with(|s| s.consent.sweep_interval_secs = 3600).await?;
    let w = world(&mesh, "Jinnan", "120112").await?;
    let notice = enable_face(&mesh, &w).await?;
    let (consent, mut me) = consent_to_face(&mesh, &w, &w.estate.id, &w.person.id, &notice).await?;
    let att = attestation(&mut me, &consent.id, 0).await?;
    let mut ops = mesh.facematch(&w.operator_token)?;
    let template: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let enrolled = ops
        .enrol(EnrolRequest {
            estate_id: w.estate.id.clone(),
            person_pseudonym: w.person.pseudonym.clone(),
            attestation: Some(att),
            face: Some(FaceSample { template: template.clone(), image: Vec::new() }),
            request_id: "enrol-1".into(),
        })
        .await?
        .into_inner();
    // Idempotent per request id.
    let again = ops
        .enrol(EnrolRequest {
            estate_id: w.estate.id.clone(),
            person_pseudonym: w.person.pseudonym.clone(),
            attestation: Some(attestation(&mut me, &consent.id, 0).await?),
            face: Some(FaceSample { template: template.clone(), image: Vec::new() }),
            request_id: "enrol-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!((again.template_id, again.templates), (enrolled.template_id, 1));
    // 1:1 verify.
    let v = ops
        .verify(estate_proto::facematch::VerifyRequest {
            estate_id: w.estate.id.clone(),
            person_pseudonym: w.person.pseudonym.clone(),
            probe: Some(FaceSample { template: template.iter().map(|x| x * 2.0).collect(), image: Vec::new() }),
        })
        .await?
        .into_inner();
    assert!(v.matched && v.score > 0.999);

    // The consent ends behind facematch's back (as if a hand-off had been
    // lost): the retention sweep finds the template and deletes it.
    estate_store::sqlx::query("UPDATE consents SET status = 'ended' WHERE id = $1")
        .bind(&consent.id)
        .execute(mesh.db().pool())
        .await?;
    let registry = mesh.face_registry().cloned().ok_or_else(|| anyhow::anyhow!("no embedded facematch"))?;
    assert_eq!(estate_consent::sweep_retention(mesh.db(), registry.as_ref()).await?, 1);
    assert_eq!(estate_consent::sweep_retention(mesh.db(), registry.as_ref()).await?, 0, "one request per enrolment");
    let eraser = estate_consent::FacematchEraser(registry.clone());
    assert_eq!(estate_consent::fulfil_pending(mesh.db(), &eraser).await?, 1);
    let requests = mesh
        .consent(&w.operator_token)?
        .list_deletion_requests(ListDeletionRequestsRequest { estate_id: w.estate.id.clone(), pending_only: false })
        .await?
        .into_inner()
        .requests;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].reason, DeletionReason::RetentionExpired as i32);
    assert!(requests[0].fulfilled && !requests[0].certificate_id.is_empty());
    let engine = registry.engine(&w.tenant.id).await?;
    assert_eq!(engine.count().await?.persons, 0);
    assert_eq!(estate_consent::sweep_retention(mesh.db(), registry.as_ref()).await?, 0);
    mesh.stop().await
}

#[tokio::test]
async fn a_person_demands_deletion_and_gets_a_certificate() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Beichen", "120113").await?;
    let notice = enable_face(&mesh, &w).await?;
    let (consent, mut me) = consent_to_face(&mesh, &w, &w.estate.id, &w.person.id, &notice).await?;
    // The resident enrols through their app with their own attestation.
    let att = attestation(&mut me, &consent.id, 0).await?;
    let mut fm = mesh.facematch(&resident(&mesh, &w, &w.person.id)?)?;
    let template: Vec<f32> = (0..512).map(|i| ((i * 7 % 31) as f32) - 15.0).collect();
    fm.enrol(EnrolRequest {
        estate_id: w.estate.id.clone(),
        person_pseudonym: w.person.pseudonym.clone(),
        attestation: Some(att),
        face: Some(FaceSample { template: template.clone(), image: Vec::new() }),
        request_id: String::new(),
    })
    .await?;
    // A resident cannot search the gallery.
    let (c, _) = err(fm
        .identify(IdentifyRequest {
            estate_id: w.estate.id.clone(),
            probe: Some(FaceSample { template, image: Vec::new() }),
        })
        .await);
    assert_eq!(c, Code::PermissionDenied);

    let request = me
        .request_face_deletion(RequestFaceDeletionRequest { estate_id: w.estate.id.clone(), person_id: String::new() })
        .await?
        .into_inner();
    assert_eq!(request.reason, DeletionReason::PersonRequest as i32);
    let ended = me.get_consent(GetConsentRequest { id: consent.id.clone() }).await?.into_inner();
    assert_eq!(ended.status, ConsentStatus::Withdrawn as i32);
    let mut stored = None;
    for _ in 0..100 {
        match me
            .get_deletion_certificate(GetDeletionCertificateRequest { deletion_request_id: request.id.clone() })
            .await
        {
            Ok(s) => {
                stored = Some(s.into_inner());
                break;
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(s) => return Err(s.into()),
        }
    }
    let stored = stored.ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    let body = DeletionCertificate::decode(stored.certificate.as_slice())?.decoded.unwrap_or_default();
    assert_eq!(body.templates_deleted, 1);
    assert_eq!(body.reason, estate_proto::facematch::DeletionReason::Request as i32);
    // Only residents ask; an operator cannot demand it for them.
    let (c, _) = err(mesh
        .consent(&w.operator_token)?
        .request_face_deletion(RequestFaceDeletionRequest {
            estate_id: w.estate.id.clone(),
            person_id: w.person.id.clone(),
        })
        .await);
    assert_eq!(c, Code::PermissionDenied);
    mesh.stop().await
}

/// Waits until the tenant's outbox holds an event with each of `actions`.
async fn wait_for_events(
    mesh: &TestMesh,
    tenant_id: &str,
    actions: &[&str],
) -> anyhow::Result<Vec<estate_store::outbox::OutboxRow>> {
    for _ in 0..300 {
        let rows = estate_store::outbox::for_tenant(mesh.db().pool(), tenant_id).await?;
        if actions.iter().all(|a| rows.iter().any(|r| r.event.action == *a)) {
            return Ok(rows);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the outbox never held all of {actions:?}")
}

#[tokio::test]
async fn every_processing_of_face_data_lands_in_the_audit_log() -> anyhow::Result<()> {
    use estate_proto::common::ActorKind;
    use estate_proto::facematch::{DeleteRequest, DeletionReason as FmReason};
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Xiqing", "120111").await?;
    let notice = enable_face(&mesh, &w).await?;
    let (consent, mut me) = consent_to_face(&mesh, &w, &w.estate.id, &w.person.id, &notice).await?;
    let template: Vec<f32> = (0..512).map(|i| ((i * 11 % 29) as f32) - 14.0).collect();
    let mut ops = mesh.facematch(&w.operator_token)?;
    let enrol = |att: SignedAttestation| EnrolRequest {
        estate_id: w.estate.id.clone(),
        person_pseudonym: w.person.pseudonym.clone(),
        attestation: Some(att),
        face: Some(FaceSample { template: template.clone(), image: Vec::new() }),
        request_id: "enrol-at-the-desk-1".into(),
    };
    let enrolled = ops.enrol(enrol(attestation(&mut me, &consent.id, 0).await?)).await?.into_inner();
    // A retried enrolment is the same enrolment: no second template, no second event.
    let again = ops.enrol(enrol(attestation(&mut me, &consent.id, 0).await?)).await?.into_inner();
    assert_eq!(again.template_id, enrolled.template_id);
    ops.set_threshold(SetThresholdRequest { estate_id: w.estate.id.clone(), threshold: 0.5 }).await?;
    let m = ops
        .identify(IdentifyRequest {
            estate_id: w.estate.id.clone(),
            probe: Some(FaceSample { template: template.clone(), image: Vec::new() }),
        })
        .await?
        .into_inner();
    assert!(m.matched && m.person_pseudonym == w.person.pseudonym);
    // An operator deletes directly at facematch (not through consent).
    let cert = ops
        .delete(DeleteRequest {
            person_pseudonym: w.person.pseudonym.clone(),
            estate_id: String::new(),
            reason: FmReason::Request as i32,
            request_id: "desk-deletion-1".into(),
        })
        .await?
        .into_inner();
    let body = cert.decoded.unwrap_or_default();

    let rows =
        wait_for_events(&mesh, &w.tenant.id, &["face.enrol", "face.threshold", "face.search", "face.delete"]).await?;
    let of = |action: &str| rows.iter().filter(|r| r.event.action == action).map(|r| &r.event).collect::<Vec<_>>();
    let enrols = of("face.enrol");
    assert_eq!(enrols.len(), 1, "one enrolment, one event");
    let e = enrols[0];
    assert_eq!((e.source.as_str(), e.estate_id.as_str()), ("facematch", w.estate.id.as_str()));
    assert_eq!(e.person_pseudonym, w.person.pseudonym);
    assert_eq!(e.object_id, enrolled.template_id);
    assert_eq!(e.request_id, "enrol-at-the-desk-1");
    assert_eq!(e.actor.as_ref().map(|a| a.kind), Some(ActorKind::Operator as i32));
    assert_eq!(e.attributes.get("consent_id"), Some(&consent.id));
    assert!(!e.concerns_minor);
    let s = of("face.search");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].person_pseudonym, w.person.pseudonym);
    assert_eq!(s[0].attributes.get("matched").map(String::as_str), Some("true"));
    let d = of("face.delete");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].object_id, body.certificate_id);
    assert_eq!(d[0].request_id, "desk-deletion-1");
    assert_eq!(d[0].attributes.get("reason").map(String::as_str), Some("request"));
    assert_eq!(d[0].attributes.get("templates").map(String::as_str), Some("1"));
    assert_eq!(d[0].actor.as_ref().map(|a| a.kind), Some(ActorKind::Operator as i32));
    // No event carries the template (R8, R17): none of its bytes, none of its numbers.
    let raw: Vec<u8> = template.iter().flat_map(|x| x.to_le_bytes()).collect();
    for r in &rows {
        assert!(!contains(&r.payload, &raw[..64]), "{} carries template bytes", r.event.action);
    }

    // The relay ships them into the hash-chained log, each once, even after
    // further copies of the journal have run.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut audit = mesh.audit(&w.operator_token)?;
    let mut in_log = 0;
    for _ in 0..100 {
        let mut n = 0;
        for action in ["face.enrol", "face.threshold", "face.search", "face.delete"] {
            let q = estate_proto::audit::QueryEntriesRequest { action: action.into(), ..Default::default() };
            n += audit.query_entries(q).await?.into_inner().entries.len();
        }
        in_log = n;
        if n >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(in_log, 4, "each face event exactly once in the audit log");
    mesh.stop().await
}
