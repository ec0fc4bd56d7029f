//! R9 at run time: `estate-facematch` runs in a network namespace that has
//! only a loopback interface, under strace; it serves a full round of calls
//! (health, enrol, identify, verify, count, delete) and the trace shows that
//! it never called connect() or sent a datagram to any address, even with an
//! OTLP endpoint configured.
//!
//! As root (CI) the test thread enters a new network namespace itself; as
//! another user it re-runs itself under `unshare --user --map-root-user
//! --net` (unprivileged user namespaces). Needs `strace` and `ip`.

use estate_auth::{Principal, TokenAuthority};
use estate_crypto::SigningKeyPair;
use estate_proto::consent::{AttestationClaims, Purpose};
use estate_proto::facematch::facematch_service_client::FacematchServiceClient;
use estate_proto::facematch::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const PORT: u16 = 50_611;

fn key_line(k: &SigningKeyPair) -> String {
    estate_crypto::key_list::line(k.key_id(), &k.public_key_bytes()) + "\n"
}

async fn round_of_calls(token: &str, consent_key: &SigningKeyPair, tenant: &str) -> anyhow::Result<()> {
    let endpoint = format!("http://127.0.0.1:{PORT}");
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(c) = tonic::transport::Endpoint::from_shared(endpoint.clone())?.connect().await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.ok_or_else(|| anyhow::anyhow!("facematch did not start listening in the namespace"))?;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}").parse()?;
    let mut fm = FacematchServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status =
        health.check(tonic_health::pb::HealthCheckRequest { service: estate_facematch::SERVICE_NAME.into() }).await?;
    assert_eq!(status.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let estate = uuid::Uuid::now_v7().to_string();
    let now = estate_core::now_ms() / 1000;
    let claims = AttestationClaims {
        format: estate_attestation::FORMAT,
        tenant_id: tenant.into(),
        estate_id: estate.clone(),
        person_pseudonym: "psn_0123".into(),
        purpose: Purpose::FaceVerificationAtGates as i32,
        notice_text_sha256: "ab".repeat(32),
        consent_id: "c-1".into(),
        issued_at_unix: now,
        expires_at_unix: now + 300,
        concerns_minor: false,
    };
    let template: Vec<f32> = (0..512).map(|i| ((i * 13 % 29) as f32) - 14.0).collect();
    fm.enrol(EnrolRequest {
        estate_id: estate.clone(),
        person_pseudonym: "psn_0123".into(),
        attestation: Some(estate_attestation::sign(consent_key, &claims)),
        face: Some(FaceSample { template: template.clone(), image: Vec::new() }),
        request_id: "r-1".into(),
    })
    .await?;
    let m = fm
        .identify(IdentifyRequest {
            estate_id: estate.clone(),
            probe: Some(FaceSample { template: template.clone(), image: Vec::new() }),
        })
        .await?
        .into_inner();
    assert!(m.matched && m.person_pseudonym == "psn_0123");
    let v = fm
        .verify(VerifyRequest {
            estate_id: estate.clone(),
            person_pseudonym: "psn_0123".into(),
            probe: Some(FaceSample { template, image: Vec::new() }),
        })
        .await?
        .into_inner();
    assert!(v.matched);
    assert_eq!(fm.count_persons(CountPersonsRequest {}).await?.into_inner().persons, 1);
    let cert = fm
        .delete(DeleteRequest {
            person_pseudonym: "psn_0123".into(),
            estate_id: estate,
            reason: DeletionReason::Request as i32,
            request_id: "d-1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(cert.decoded.map(|b| b.templates_deleted), Some(1));
    Ok(())
}

const TEST_NAME: &str = "facematch_serves_in_a_loopback_only_namespace_and_never_connects_out";

#[test]
fn facematch_serves_in_a_loopback_only_namespace_and_never_connects_out() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() && std::env::var_os("ESTATE_NETNS_INNER").is_none() {
        let status = Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "--"])
            .arg(std::env::current_exe()?)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env("ESTATE_NETNS_INNER", "1")
            .status()?;
        anyhow::ensure!(status.success(), "the test failed inside `unshare --user --map-root-user --net`");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let tenant = uuid::Uuid::now_v7().to_string();
    let token_key = SigningKeyPair::generate()?;
    let consent_key = SigningKeyPair::generate()?;
    std::fs::write(dir.path().join("tokens.keys"), key_line(&token_key))?;
    std::fs::write(dir.path().join("consent.keys"), key_line(&consent_key))?;
    let authority = TokenAuthority::new("estate-mesh", &token_key)?;
    let token =
        authority.issue(Principal::Operator { tenant_id: tenant.clone(), estate_ids: vec![] }, "ops", 600)?.token;
    let trace = dir.path().join("strace.log");

    // Everything below runs on one thread that first leaves the host's
    // network namespace; the processes it starts inherit the new one.
    let work = {
        let dir = dir.path().to_path_buf();
        let trace = trace.clone();
        let tenant = tenant.clone();
        std::thread::spawn(move || -> anyhow::Result<String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                anyhow::anyhow!("cannot create a network namespace ({e}); this test needs root or CAP_SYS_ADMIN")
            })?;
            let up = Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
            anyhow::ensure!(up.success(), "ip link set lo up failed");
            let links = Command::new("ip").args(["-o", "link"]).output()?;
            let links = String::from_utf8_lossy(&links.stdout).to_string();
            let mut child = {
                use std::os::unix::process::CommandExt;
                Command::new("strace")
                    .args(["-f", "-qq", "-e", "trace=connect,sendto,sendmsg,bind", "-o"])
                    .arg(&trace)
                    .arg(env!("CARGO_BIN_EXE_estate-facematch"))
                    .env("ESTATE__LISTEN", format!("127.0.0.1:{PORT}"))
                    .env("ESTATE__DATA_DIR", dir.join("data"))
                    .env("ESTATE__FACEMATCH__TENANT_ID", &tenant)
                    .env("ESTATE__FACEMATCH__CONSENT_KEYS_FILE", dir.join("consent.keys"))
                    .env("ESTATE__FACEMATCH__TOKEN_KEYS_FILE", dir.join("tokens.keys"))
                    // Configured, and still never contacted (R9).
                    .env("ESTATE__TELEMETRY__OTLP_ENDPOINT", "http://10.20.30.40:4317")
                    .env("ESTATE__TELEMETRY__LOG_FILTER", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()?
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let result = rt.block_on(round_of_calls(&token, &consent_key, &tenant));
            let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let mut exited = false;
            for _ in 0..100 {
                if child.try_wait()?.is_some() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !exited {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
            }
            result?;
            Ok(links)
        })
    };
    let links = work.join().map_err(|_| anyhow::anyhow!("the namespace thread panicked"))??;
    // Only loopback existed.
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:"), "{links}");

    let log = std::fs::read_to_string(&trace)?;
    // strace saw the process: it bound its listener.
    assert!(log.contains(&format!("htons({PORT})")) && log.contains("bind("), "strace recorded nothing useful:\n{log}");
    let outbound: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("connect(")
                || ((l.contains("sendto(") || l.contains("sendmsg(")) && l.contains("sa_family=AF_INET"))
        })
        .collect();
    assert!(outbound.is_empty(), "facematch tried to connect out:\n{}", outbound.join("\n"));
    Ok(())
}
