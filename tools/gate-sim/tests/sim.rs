//! `gate-sim` as a user runs it: a bundle, an online decision, offline
//! decisions against an unreachable endpoint, and the upload that follows.

use estate_proto::credentials::*;
use estate_test_support::TestMesh;
use estate_test_support::fixtures::{gate, world};
use std::process::Command;

fn sim(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_gate-sim")).args(args).output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

#[tokio::test(flavor = "multi_thread")]
async fn gate_sim_decides_online_then_offline_and_uploads() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Sim", "120101").await?;
    mesh.credentials(&w.operator_token)?
        .issue_credential(IssueCredentialRequest {
            person_id: w.person.id.clone(),
            estate_ids: vec![w.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "04A1B2C3".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        })
        .await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("gate.token");
    std::fs::write(&token_file, gate(&mesh, &w)?)?;
    let state = dir.path().join("state");
    let script = dir.path().join("gate.script");
    std::fs::write(&script, "# a morning at the North gate\nbundle\ncard 04A1B2C3\ncard DEADBEEF\n")?;
    let online = mesh.endpoint();
    let common = |endpoint: &str| {
        vec![
            "--endpoint".to_owned(),
            endpoint.to_owned(),
            "--token-file".to_owned(),
            token_file.display().to_string(),
            "--state-dir".to_owned(),
            state.display().to_string(),
            "--timeout-ms".to_owned(),
            "1000".to_owned(),
        ]
    };
    let args = |endpoint: &str, rest: &[&str]| {
        let mut a = common(endpoint);
        a.extend(rest.iter().map(|s| (*s).to_owned()));
        a
    };
    let run = |a: Vec<String>| sim(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let (ok, out, err) = run(args(&online, &["replay", &script.display().to_string()]))?;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines[0]["bundle_version"], 1);
    assert_eq!((lines[1]["mode"].as_str(), lines[1]["verdict"].as_str()), (Some("online"), Some("VERDICT_ADMIT")));
    assert_eq!(lines[2]["reason"].as_str(), Some("REASON_UNKNOWN"));

    // Nothing listens on port 1: the gate decides from its bundle.
    let (ok, out, err) = run(args("http://127.0.0.1:1", &["decide", "card", "04:a1:b2:c3"]))?;
    assert!(ok, "{err}");
    let d: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        (d["mode"].as_str(), d["verdict"].as_str(), d["sequence"].as_i64()),
        (Some("offline"), Some("VERDICT_ADMIT"), Some(1))
    );
    let (_, out, _) = run(args("http://127.0.0.1:1", &["status"]))?;
    let s: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!((s["pending_uploads"].as_i64(), s["bundle_version"].as_i64()), (Some(1), Some(1)));

    let (ok, out, err) = run(args(&online, &["upload"]))?;
    assert!(ok, "{err}");
    let u: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!((u["uploaded"].as_i64(), u["duplicates"].as_i64()), (Some(1), Some(0)));
    let rows = estate_test_support::fixtures::recorded_events(&mesh, &w.tenant.id).await?;
    assert_eq!(rows.iter().filter(|r| r.event.action == "gate.decide.offline").count(), 1);

    // A bad presentation is refused with a hint, not sent.
    let (ok, _, err) = run(args(&online, &["decide", "badge", "1"]))?;
    assert!(!ok && err.contains("card UID"), "{err}");
    mesh.stop().await
}
