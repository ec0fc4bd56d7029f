//! The distributed mode end to end: identity, consent, credentials, audit and
//! facematch as separate processes, and TWO gate processes, on loopback ports,
//! sharing one database (PostgreSQL when ESTATE_TEST_DATABASE_URL is set,
//! else a SQLite file) and Redis (a private redis-server started here, else
//! ESTATE_TEST_REDIS_URL; on a machine with neither, the replicas share
//! nothing but the database and a revocation reaches the other replica when
//! its cache entry expires, 1 s here). Every listener is mutual TLS: services
//! call each other (gate and consent -> facematch) with client certificates,
//! and a caller without one is refused. A resident's story runs across them;
//! a burst of wrong PINs across both replicas checks no more than the limit;
//! one gate replica is killed with SIGKILL under load, the other keeps
//! serving, and every decision a gate acknowledged is in the audit log
//! exactly once; then the private Redis is stopped and the remaining replica
//! keeps deciding, and enforcing a new revocation, from the database.

mod support;

use estate_auth::{Principal, TokenAuthority};
use estate_crypto::SigningKeyPair;
use estate_proto::audit::audit_service_client::AuditServiceClient;
use estate_proto::audit::{ExportRequest, GetAuditKeysRequest};
use estate_proto::common::{AuditEvent, CredentialKind};
use estate_proto::consent::consent_service_client::ConsentServiceClient;
use estate_proto::consent::*;
use estate_proto::credentials::credential_service_client::CredentialServiceClient;
use estate_proto::credentials::*;
use estate_proto::facematch::facematch_service_client::FacematchServiceClient;
use estate_proto::facematch::{DeletionCertificate, EnrolRequest, FaceSample, GetCertificateKeysRequest};
use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::gate::*;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_proto::identity::*;
use estate_test_support::{Bearer, REDIS_ENV, ServiceProcess, TestDatabase, face_assets};
use prost::Message;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

const BINS: [&str; 6] =
    ["estate-identity", "estate-consent", "estate-credentials", "estate-audit", "estate-gate", "estate-facematch"];

/// The service binaries, beside this test. Always (re)built here: a binary
/// left in the target directory by an earlier build of other sources would
/// otherwise be tested instead of this code (a no-op when up to date).
fn binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow::anyhow!("no target directory"))?.to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--bins"]);
    for b in BINS {
        cmd.args(["-p", b]);
    }
    anyhow::ensure!(cmd.status()?.success(), "building the service binaries failed");
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A Redis for this test: a private server when `redis-server` is installed
/// (so that the test can stop it), else the shared one, else none.
struct Redis {
    url: Option<String>,
    child: Option<KillOnDrop>,
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn redis() -> anyhow::Result<Redis> {
    let port = free_port()?;
    let Ok(child) = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        if let Ok(url) = std::env::var(REDIS_ENV) {
            return Ok(Redis { url: Some(url), child: None });
        }
        eprintln!("no Redis: the gate replicas share only the database");
        return Ok(Redis { url: None, child: None });
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Redis { url: Some(format!("redis://127.0.0.1:{port}")), child: Some(KillOnDrop(child)) })
}

fn key_line(k: &SigningKeyPair) -> String {
    estate_crypto::key_list::line(k.key_id(), &k.public_key_bytes()) + "\n"
}

/// A test CA with one certificate for every service (server and client
/// use) and one for the test's own client, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: tonic::transport::ClientTlsConfig,
}

fn pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "estate-mesh test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, server: bool| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        if server {
            p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse()?));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let (cert, key) = leaf("estate-services", true)?;
    let (client_cert, client_key) = leaf("test-operator-console", false)?;
    let pki =
        Pki { ca: dir.join("ca.pem"), cert: dir.join("svc.pem"), key: dir.join("svc.key"), client: Default::default() };
    std::fs::write(&pki.ca, ca_cert.pem())?;
    std::fs::write(&pki.cert, cert)?;
    std::fs::write(&pki.key, key)?;
    let client = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_cert.pem()))
        .identity(tonic::transport::Identity::from_pem(client_cert, client_key));
    Ok(Pki { client, ..pki })
}

/// A mutual-TLS channel to a process.
async fn channel_with(addr: String, tls: tonic::transport::ClientTlsConfig) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?)
}

fn reason(d: &Decision) -> Reason {
    Reason::try_from(d.reason).unwrap_or(Reason::Unspecified)
}

fn card(uid: &str) -> DecideRequest {
    DecideRequest {
        presented: Some(decide_request::Presented::Card(PresentedCard {
            uid: uid.into(),
            facility_code: String::new(),
        })),
        gate_id: String::new(),
    }
}

fn issue_card(person: &str, estate: &str, uid: &str) -> IssueCredentialRequest {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resident_story_across_separate_processes_survives_a_killed_gate() -> anyhow::Result<()> {
    let bins = binaries()?;
    let bin = |name: &str| bins.join(name).display().to_string();
    let assets = face_assets()?;
    let dir = tempfile::tempdir()?;
    let db = TestDatabase::create(dir.path()).await?;
    let mut redis = redis().await?;
    let keys = dir.path().join("keys");
    let pki = pki(dir.path())?;
    let tls_client = pki.client.clone();
    let channel = move |p: &ServiceProcess| channel_with(p.addr.clone(), tls_client.clone());
    let mut base: Vec<(&str, String)> = vec![
        ("ESTATE__TLS__CERT_FILE", pki.cert.display().to_string()),
        ("ESTATE__TLS__KEY_FILE", pki.key.display().to_string()),
        ("ESTATE__TLS__CLIENT_CA_FILE", pki.ca.display().to_string()),
        ("ESTATE__TLS__CA_FILE", pki.ca.display().to_string()),
        ("ESTATE__TLS__CLIENT_CERT_FILE", pki.cert.display().to_string()),
        ("ESTATE__TLS__CLIENT_KEY_FILE", pki.key.display().to_string()),
        ("ESTATE__DATABASE__URL", db.url().to_owned()),
        ("ESTATE__KEYS__DIR", keys.display().to_string()),
        ("ESTATE__LISTEN", "127.0.0.1:0".into()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "warn".into()),
        ("ESTATE__DATA_DIR", dir.path().join("data").display().to_string()),
        ("ESTATE__DATABASE__MAX_CONNECTIONS", "4".into()),
    ];
    match &redis.url {
        Some(url) => base.push(("ESTATE__REDIS__URL", url.clone())),
        None => base.push(("ESTATE__GATE__CACHE_TTL_SECS", "1".into())),
    }
    let with = |extra: &[(&'static str, String)]| {
        let mut env = base.clone();
        env.extend(extra.iter().cloned());
        env
    };

    // Identity bootstraps the keys, its tables and the admin token.
    let admin_file = dir.path().join("admin.token");
    let status = std::process::Command::new(bin("estate-identity"))
        .arg("--write-admin-token")
        .arg(&admin_file)
        .envs(base.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "estate-identity --write-admin-token failed");
    let no_keygen = ("ESTATE__KEYS__GENERATE_MISSING", "false".to_owned());
    let identity = ServiceProcess::start(&bin("estate-identity"), &with(std::slice::from_ref(&no_keygen)))?;
    let admin = std::fs::read_to_string(&admin_file)?.trim().to_owned();
    let mut adm = IdentityServiceClient::with_interceptor(channel(&identity).await?, Bearer::new(&admin)?);

    let tenant = adm
        .create_tenant(CreateTenantRequest { name: "Haihe Property".into(), jurisdiction_code: "120101".into() })
        .await?
        .into_inner();
    let op_token = adm
        .issue_token(IssueTokenRequest {
            principal: Some(issue_token_request::Principal::Operator(OperatorGrant {
                tenant_id: tenant.id.clone(),
                estate_ids: vec![],
            })),
            subject: "ops@haihe".into(),
            ttl_seconds: 3600,
        })
        .await?
        .into_inner()
        .token;
    let mut ops = IdentityServiceClient::with_interceptor(channel(&identity).await?, Bearer::new(&op_token)?);
    let estate = ops
        .create_estate(CreateEstateRequest {
            name: "Riverside Garden".into(),
            address: "1 Haihe Road".into(),
            jurisdiction_code: "120101".into(),
        })
        .await?
        .into_inner();
    let gate_rec = ops
        .create_gate(CreateGateRequest {
            estate_id: estate.id.clone(),
            name: "North gate".into(),
            direction: GateDirection::In as i32,
            supported_kinds: vec![CredentialKind::Card as i32, CredentialKind::Face as i32, CredentialKind::Pin as i32],
        })
        .await?
        .into_inner();
    let unit = ops
        .create_unit(CreateUnitRequest {
            estate_id: estate.id.clone(),
            building: "3".into(),
            unit: "2".into(),
            room: "1201".into(),
        })
        .await?
        .into_inner();
    let person = ops
        .create_person(CreatePersonRequest {
            display_name: "Gu Wei".into(),
            phone: String::new(),
            birth_date: "1980-05-01".into(),
            guardian_person_id: String::new(),
        })
        .await?
        .into_inner();
    ops.create_residency(CreateResidencyRequest {
        person_id: person.id.clone(),
        unit_id: unit.id.clone(),
        role: ResidencyRole::Owner as i32,
        valid_from: None,
        valid_until: None,
    })
    .await?;

    // Facematch for this tenant: public keys only, service tokens for its
    // two callers.
    let token_key = SigningKeyPair::load_or_generate(&keys.join("token-signing.ed25519"), false)?;
    let consent_key = SigningKeyPair::load_or_generate(&keys.join("consent-attestation.ed25519"), false)?;
    std::fs::write(dir.path().join("token.keys"), key_line(&token_key))?;
    std::fs::write(dir.path().join("consent.keys"), key_line(&consent_key))?;
    let authority = TokenAuthority::new("estate-mesh", &token_key)?;
    for name in ["gate", "consent"] {
        let t = authority.issue(Principal::Service { name: name.into() }, name, 3600)?.token;
        std::fs::write(dir.path().join(format!("{name}.token")), t)?;
    }
    let facematch = ServiceProcess::start(
        &bin("estate-facematch"),
        &with(&[
            ("ESTATE__FACEMATCH__TENANT_ID", tenant.id.clone()),
            ("ESTATE__FACEMATCH__DIR", dir.path().join("facematch").display().to_string()),
            ("ESTATE__FACEMATCH__CONSENT_KEYS_FILE", dir.path().join("consent.keys").display().to_string()),
            ("ESTATE__FACEMATCH__TOKEN_KEYS_FILE", dir.path().join("token.keys").display().to_string()),
            ("ESTATE__FACEMATCH__MODEL_PATH", assets.join("model/fr_feature.onnx").display().to_string()),
        ]),
    )?;
    let endpoint_var: &'static str = Box::leak(format!("ESTATE__FACEMATCH__ENDPOINTS__{}", tenant.id).into_boxed_str());
    let fm_url = format!("https://{}", facematch.addr);
    let client_of = |service: &str| {
        with(&[
            no_keygen.clone(),
            (endpoint_var, fm_url.clone()),
            ("ESTATE__FACEMATCH__TOKEN_FILE", dir.path().join(format!("{service}.token")).display().to_string()),
        ])
    };
    // mTLS: without a client certificate, or in plaintext, nothing answers.
    let no_cert = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca)?));
    let refused = async |p: &ServiceProcess| -> bool {
        let anonymous = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("https://{}", p.addr)) else { return false };
        let Ok(ep) = ep.tls_config(no_cert.clone()) else { return false };
        let tls_refused = match ep.connect().await {
            Err(_) => true,
            Ok(ch) => tonic_health::pb::health_client::HealthClient::new(ch).check(anonymous.clone()).await.is_err(),
        };
        let plain_refused = match tonic::transport::Endpoint::from_shared(format!("http://{}", p.addr)) {
            Ok(ep) => match ep.connect().await {
                Err(_) => true,
                Ok(ch) => tonic_health::pb::health_client::HealthClient::new(ch).check(anonymous).await.is_err(),
            },
            Err(_) => false,
        };
        tls_refused && plain_refused
    };
    assert!(refused(&facematch).await, "facematch answered a caller without a client certificate");
    assert!(refused(&identity).await, "identity answered a caller without a client certificate");
    let consent = ServiceProcess::start(&bin("estate-consent"), &client_of("consent"))?;
    let credentials = ServiceProcess::start(&bin("estate-credentials"), &with(std::slice::from_ref(&no_keygen)))?;
    let audit = ServiceProcess::start(&bin("estate-audit"), &with(std::slice::from_ref(&no_keygen)))?;
    let gate_a = ServiceProcess::start(&bin("estate-gate"), &client_of("gate"))?;
    let gate_b = ServiceProcess::start(&bin("estate-gate"), &client_of("gate"))?;
    assert!(refused(&gate_b).await, "a gate replica answered a caller without a client certificate");

    // Consent: notice, assessment, face enabled; the resident consents.
    let mut k_op = ConsentServiceClient::with_interceptor(channel(&consent).await?, Bearer::new(&op_token)?);
    let text = "本小区门禁可使用人脸识别，您可随时撤回并改用其他方式通行。";
    let notice = k_op
        .publish_notice(PublishNoticeRequest {
            estate_id: estate.id.clone(),
            text_zh_cn: text.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    k_op.record_impact_assessment(RecordImpactAssessmentRequest {
        estate_id: estate.id.clone(),
        author: "DPO".into(),
        assessed_on: "2026-10-01".into(),
        document_sha256: "ab".repeat(32),
    })
    .await?;
    k_op.set_face_verification(SetFaceVerificationRequest { estate_id: estate.id.clone(), enabled: true }).await?;
    let resident = authority
        .issue(Principal::Resident { tenant_id: tenant.id.clone(), person_id: person.id.clone() }, "app", 3600)?
        .token;
    let mut k_me = ConsentServiceClient::with_interceptor(channel(&consent).await?, Bearer::new(&resident)?);
    let granted = k_me
        .grant_consent(GrantConsentRequest {
            estate_id: estate.id.clone(),
            person_id: String::new(),
            purposes: vec![Purpose::FaceVerificationAtGates as i32],
            notice_version: notice.version,
            notice_text_sha256: estate_crypto::sha256_hex(text.as_bytes()),
            affirmative_act: true,
            bundled_agreement_ids: vec![],
            method: ConsentMethod::AppTap as i32,
            paper_form_scan_sha256: String::new(),
        })
        .await?
        .into_inner();

    // Enrol the face (resident's app, real photo), then a card and a face
    // reference from credentials.
    let detector = estate_facematch::prep::Detector::load(&assets.join("model/fr_detect.onnx"))?;
    let crop = |name: &str| -> anyhow::Result<Vec<u8>> {
        let frame = estate_facematch::prep::decode(&std::fs::read(assets.join(format!("images/{name}.jpg")))?)?;
        let face = detector.detect(&frame)?.ok_or_else(|| anyhow::anyhow!("no face in {name}"))?;
        Ok(estate_facematch::prep::crop(&frame, &face, 112)?)
    };
    let att = k_me
        .issue_attestation(IssueAttestationRequest { consent_id: granted.id.clone(), ttl_seconds: 0 })
        .await?
        .into_inner();
    let mut fm_me = FacematchServiceClient::with_interceptor(channel(&facematch).await?, Bearer::new(&resident)?);
    fm_me
        .enrol(EnrolRequest {
            estate_id: estate.id.clone(),
            person_pseudonym: person.pseudonym.clone(),
            attestation: Some(att.clone()),
            face: Some(FaceSample { template: Vec::new(), image: crop("obama")? }),
            request_id: String::new(),
        })
        .await?;
    let mut fm_op = FacematchServiceClient::with_interceptor(channel(&facematch).await?, Bearer::new(&op_token)?);
    // One instance per tenant: another tenant's operator is refused outright.
    let stranger = authority
        .issue(Principal::Operator { tenant_id: uuid::Uuid::now_v7().to_string(), estate_ids: vec![] }, "x", 600)?
        .token;
    let refused_tenant = FacematchServiceClient::with_interceptor(channel(&facematch).await?, Bearer::new(&stranger)?)
        .count_persons(estate_proto::facematch::CountPersonsRequest {})
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(refused_tenant, Some(tonic::Code::PermissionDenied));
    fm_op
        .set_threshold(estate_proto::facematch::SetThresholdRequest { estate_id: estate.id.clone(), threshold: 0.28 })
        .await?;
    let mut cr = CredentialServiceClient::with_interceptor(channel(&credentials).await?, Bearer::new(&op_token)?);
    let first_card = cr.issue_credential(issue_card(&person.id, &estate.id, "5EED0001")).await?.into_inner();
    cr.issue_credential(issue_card(&person.id, &estate.id, "5EED0002")).await?;
    cr.issue_credential(IssueCredentialRequest {
        person_id: person.id.clone(),
        estate_ids: vec![estate.id.clone()],
        secret: Some(issue_credential_request::Secret::Face(FaceReference {
            enrolment_ref: "facematch".into(),
            attestation: Some(att),
        })),
        ..Default::default()
    })
    .await?;

    // Decide by face at replica A (gate -> facematch process) and by card at B.
    let gate_token = authority
        .issue(
            Principal::Gate {
                tenant_id: tenant.id.clone(),
                estate_id: estate.id.clone(),
                gate_id: gate_rec.id.clone(),
            },
            "north",
            3600,
        )?
        .token;
    let mut at_a = GateServiceClient::with_interceptor(channel(&gate_a).await?, Bearer::new(&gate_token)?);
    let mut at_b = GateServiceClient::with_interceptor(channel(&gate_b).await?, Bearer::new(&gate_token)?);
    let face = |png: Vec<u8>| DecideRequest {
        presented: Some(decide_request::Presented::Face(FaceProbe { template: Vec::new(), image: png })),
        gate_id: String::new(),
    };
    let d = at_a.decide(face(crop("obama2")?)).await?.into_inner();
    assert_eq!(reason(&d), Reason::Ok, "{}", d.message);
    assert_eq!(d.person_pseudonym, person.pseudonym);
    assert_eq!(reason(&at_b.decide(card("5EED0001")).await?.into_inner()), Reason::Ok);

    // Revoke: heard on the stream of replica A, denied at replica B at once
    // (with Redis; without, once B's cache entry expires).
    let mut stream = at_a.watch_changes(WatchChangesRequest {}).await?.into_inner();
    assert_eq!(stream.message().await?.map(|c| c.change), Some("subscribed".to_owned()));
    let first_id = first_card.credential.map(|c| c.id).unwrap_or_default();
    cr.revoke_credential(ChangeCredentialRequest { id: first_id.clone(), reason: "lost".into() }).await?;
    if redis.url.is_some() {
        // Earlier "issue" announcements may still arrive first; skip them.
        let change = loop {
            let c = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
            if c.as_ref().is_none_or(|c| c.change != "issue") {
                break c;
            }
        };
        assert_eq!(change.map(|c| (c.change, c.credential_id)), Some(("revoke".to_owned(), first_id)));
    } else {
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert_eq!(reason(&at_b.decide(card("5EED0001")).await?.into_inner()), Reason::Revoked);
    drop(stream);

    // PIN brute force across the replicas, under card load: 30 wrong PINs
    // at once, half through A and half through B. The attempt counter is
    // shared (Redis), and an attempt is counted before its PIN is checked,
    // so no more than the limit (5) are checked; then the unit is locked on
    // both replicas, even for the right PIN.
    cr.issue_credential(IssueCredentialRequest {
        person_id: person.id.clone(),
        estate_ids: vec![estate.id.clone()],
        secret: Some(issue_credential_request::Secret::Pin(PinSecret {
            pin: "739146".into(),
            unit_id: unit.id.clone(),
        })),
        ..Default::default()
    })
    .await?;
    let pin = |p: &str| DecideRequest {
        presented: Some(decide_request::Presented::Pin(PresentedPin { unit_id: unit.id.clone(), pin: p.into() })),
        gate_id: String::new(),
    };
    if redis.url.is_some() {
        let background = [at_a.clone(), at_b.clone()].map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..100 {
                    let _ = c.decide(card("5EED0002")).await;
                }
            })
        });
        let burst: Vec<_> = (0..30)
            .map(|i| {
                let mut c = if i % 2 == 0 { at_a.clone() } else { at_b.clone() };
                let req = pin(&format!("{:06}", 200_000 + i));
                tokio::spawn(async move { c.decide(req).await.map(|d| reason(&d.into_inner())) })
            })
            .collect();
        let mut checked = 0;
        for b in burst {
            match b.await?? {
                Reason::Unknown => checked += 1,
                Reason::Locked => {}
                other => anyhow::bail!("a wrong PIN was answered {other:?}"),
            }
        }
        for b in background {
            b.await?;
        }
        assert!(checked <= 5, "{checked} wrong PINs were checked across the replicas; the limit is 5");
        assert_eq!(reason(&at_a.decide(pin("739146")).await?.into_inner()), Reason::Locked);
        assert_eq!(reason(&at_b.decide(pin("739146")).await?.into_inner()), Reason::Locked);
        eprintln!("PIN burst: {checked} of 30 wrong PINs checked across two replicas, the rest refused as locked");
    }

    // Load on both replicas; replica A is killed with SIGKILL mid-load.
    let load = |mut client: GateServiceClient<_>, millis: u64| {
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut errors = 0usize;
            let until = std::time::Instant::now() + Duration::from_millis(millis);
            while std::time::Instant::now() < until {
                match client.decide(card("5EED0002")).await {
                    Ok(d) => acked.push(d.into_inner().decision_id),
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (acked, errors)
        })
    };
    let on_a = load(at_a.clone(), 1500);
    let on_b = load(at_b.clone(), 1500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate_a.kill()?;
    let (acked_a, _) = on_a.await?;
    let (acked_b, errors_b) = on_b.await?;
    assert_eq!(errors_b, 0, "replica B failed while A was killed");
    assert!(!acked_a.is_empty() && !acked_b.is_empty(), "{} / {}", acked_a.len(), acked_b.len());
    // B still serves after A is gone.
    assert_eq!(reason(&at_b.decide(card("5EED0002")).await?.into_inner()), Reason::Ok);

    // Withdraw: consent hands the deletion to the facematch process; the
    // certificate verifies with facematch's published key.
    let withdrawn =
        k_me.withdraw_consent(WithdrawConsentRequest { consent_id: granted.id.clone() }).await?.into_inner();
    let mut stored = None;
    for _ in 0..200 {
        let req = GetDeletionCertificateRequest { deletion_request_id: withdrawn.deletion_request_id.clone() };
        match k_me.get_deletion_certificate(req).await {
            Ok(s) => {
                stored = Some(s.into_inner());
                break;
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => return Err(s.into()),
        }
    }
    let stored = stored.ok_or_else(|| anyhow::anyhow!("no deletion certificate within 10 s"))?;
    let cert = DeletionCertificate::decode(stored.certificate.as_slice())?;
    let fm_keys = fm_op.get_certificate_keys(GetCertificateKeysRequest {}).await?.into_inner();
    let body = estate_facematch::certificate::verify(&cert, &estate_attestation::KeySet::from_published(&fm_keys))?;
    assert_eq!((body.templates_deleted, body.person_pseudonym.as_str()), (1, person.pseudonym.as_str()));
    let d = at_b.decide(face(crop("obama2")?)).await?.into_inner();
    assert_ne!(reason(&d), Reason::Ok);

    // Every acknowledged decision is in the audit log exactly once.
    let acked: std::collections::HashSet<String> = acked_a.iter().chain(&acked_b).cloned().collect();
    let pool = estate_store::Db::connect(&estate_store::DbOptions {
        url: db.url().to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout_ms: 0,
    })
    .await?;
    let mut logged: Vec<String> = Vec::new();
    for _ in 0..200 {
        let rows: Vec<(Vec<u8>,)> = estate_store::sqlx::query_as(
            "SELECT event FROM audit_entries WHERE tenant_id = $1 AND action = 'gate.decide'",
        )
        .bind(&tenant.id)
        .fetch_all(pool.pool())
        .await?;
        logged = rows
            .iter()
            .filter_map(|(b,)| AuditEvent::decode(b.as_slice()).ok())
            .filter_map(|e| e.attributes.get("decision_id").cloned())
            .collect();
        if acked.iter().all(|id| logged.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unique: std::collections::HashSet<&String> = logged.iter().collect();
    assert_eq!(unique.len(), logged.len(), "a decision is in the audit log twice");
    let missing = acked.iter().filter(|id| !unique.contains(id)).count();
    assert_eq!(missing, 0, "{missing} of {} acknowledged decisions are not in the audit log", acked.len());
    eprintln!(
        "load: {} decisions acknowledged by A before its SIGKILL, {} by B; {} decisions in the audit log, none twice",
        acked_a.len(),
        acked_b.len(),
        logged.len()
    );
    // Facematch's own acts reach the log too (R11): consent copies its
    // journal (enrolment, deletion) over mTLS with its service token.
    let mut face_actions: Vec<String> = Vec::new();
    for _ in 0..300 {
        let rows: Vec<(String,)> = estate_store::sqlx::query_as(
            "SELECT action FROM audit_entries WHERE tenant_id = $1 AND action IN ('face.enrol', 'face.delete') ORDER BY idx",
        )
        .bind(&tenant.id)
        .fetch_all(pool.pool())
        .await?;
        face_actions = rows.into_iter().map(|(a,)| a).collect();
        if face_actions.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(face_actions, ["face.enrol", "face.delete"], "facematch's journal in the audit log");
    pool.close().await;

    // Redis stops (its own server, when this test started one): the gate
    // replica keeps deciding from the database, and a revocation made now is
    // enforced at once, though no change stream carries it.
    if let Some(child) = redis.child.take() {
        drop(child);
        let started = std::time::Instant::now();
        assert_eq!(reason(&at_b.decide(card("5EED0002")).await?.into_inner()), Reason::Ok);
        let second = cr.issue_credential(issue_card(&person.id, &estate.id, "5EED0003")).await?.into_inner();
        assert_eq!(reason(&at_b.decide(card("5EED0003")).await?.into_inner()), Reason::Ok);
        let second_id = second.credential.map(|c| c.id).unwrap_or_default();
        cr.revoke_credential(ChangeCredentialRequest { id: second_id, reason: "stolen".into() }).await?;
        assert_eq!(reason(&at_b.decide(card("5EED0003")).await?.into_inner()), Reason::Revoked);
        let mut errors = 0;
        for _ in 0..200 {
            match at_b.decide(card("5EED0002")).await {
                Ok(d) => assert_eq!(reason(&d.into_inner()), Reason::Ok),
                Err(_) => errors += 1,
            }
        }
        assert_eq!(errors, 0, "decisions failed with Redis down");
        eprintln!("Redis stopped: 203 decisions and a revocation from the database in {:?}", started.elapsed());
    }

    // A regulator's export of the tenant verifies offline.
    let regulator = authority
        .issue(Principal::Regulator { jurisdiction_codes: vec!["120000".into()] }, "tj-regulator", 3600)?
        .token;
    let mut au = AuditServiceClient::with_interceptor(channel(&audit).await?, Bearer::new(&regulator)?);
    let published = au.get_verifying_keys(GetAuditKeysRequest {}).await?.into_inner();
    let mut audit_keys = std::collections::HashMap::new();
    for k in published.keys {
        audit_keys.insert(k.key_id, <[u8; 32]>::try_from(k.public_key.as_slice())?);
    }
    let mut export =
        au.export(ExportRequest { tenant_id: tenant.id.clone(), ..Default::default() }).await?.into_inner();
    let mut buf = Vec::new();
    while let Some(rec) = export.message().await? {
        estate_audit_bundle::write_record(&mut buf, &rec)?;
    }
    let verified = estate_audit_bundle::Bundle::read(buf.as_slice())?.verify(&audit_keys, None)?;
    assert!(verified.entries >= acked.len(), "{} entries", verified.entries);

    for p in [gate_b, consent, credentials, audit, facematch, identity] {
        p.stop_gracefully().await?;
    }
    db.drop().await
}
