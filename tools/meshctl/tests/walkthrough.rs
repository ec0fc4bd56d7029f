//! The README walk-through, run with the real `meshctl` binary against a
//! real mesh: if this passes, the walk-through works as written.

use estate_test_support::TestMesh;
use std::process::Command;

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

struct Shell {
    endpoint: String,
    token: String,
}

impl Shell {
    fn run(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(args)
            .env("ESTATE_ENDPOINT", &self.endpoint)
            .env("ESTATE_TOKEN", &self.token)
            .output()?;
        Ok((out.status.success(), String::from_utf8(out.stdout)?.trim().to_owned(), String::from_utf8(out.stderr)?))
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.run(args)?;
        anyhow::ensure!(ok, "meshctl {args:?} failed: {err}");
        Ok(out)
    }
}

fn sh_gate_token(sh: &Shell, operator_token: &str, gate: &str) -> anyhow::Result<String> {
    let op = Shell { endpoint: sh.endpoint.clone(), token: operator_token.to_owned() };
    op.ok(&["-o", "id", "token", "issue", "gate", "--gate", gate, "--subject", "north-gate-controller"])
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_walkthrough_works_as_written() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let admin_token = std::fs::read_to_string(mesh.data_dir.path().join("admin.token"))?.trim().to_owned();
    let mut sh = Shell { endpoint: mesh.endpoint(), token: admin_token.clone() };

    let tenant = sh.ok(&["-o", "id", "tenant", "create", "--name", "Haihe Property", "--jurisdiction", "120101"])?;
    sh.token = sh.ok(&["-o", "id", "token", "issue", "operator", "--tenant", &tenant, "--subject", "ops@haihe"])?;
    let estate = sh.ok(&[
        "-o",
        "id",
        "estate",
        "create",
        "--name",
        "Riverside Garden",
        "--address",
        "1 Haihe Road, Heping",
        "--jurisdiction",
        "120101",
    ])?;
    let gate = sh.ok(&[
        "-o",
        "id",
        "gate",
        "add",
        "--estate",
        &estate,
        "--name",
        "North gate",
        "--direction",
        "in",
        "--kinds",
        "card,qr,face",
    ])?;
    let unit =
        sh.ok(&["-o", "id", "unit", "add", "--estate", &estate, "--building", "3", "--unit", "2", "--room", "1201"])?;
    let person = sh.ok(&[
        "-o",
        "id",
        "person",
        "add",
        "--name",
        "Gu Wei",
        "--phone",
        "13800138000",
        "--birth-date",
        "1980-05-01",
    ])?;
    let residency =
        sh.ok(&["-o", "id", "residency", "add", "--person", &person, "--unit", &unit, "--role", "owner"])?;

    let gates = sh.ok(&["gate", "list", "--estate", &estate])?;
    assert!(gates.contains("North gate") && gates.contains("card,qr,face"), "{gates}");
    let persons = sh.ok(&["person", "list"])?;
    assert!(persons.contains("Gu Wei") && persons.contains("…8000") && !persons.contains("13800138000"), "{persons}");
    let json = sh.ok(&["-o", "json", "person", "list", "--phone", "138 0013 8000"])?;
    let parsed: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(parsed[0]["id"], serde_json::Value::String(person.clone()));
    let gate_token =
        sh.ok(&["-o", "id", "token", "issue", "gate", "--gate", &gate, "--subject", "north-gate-controller"])?;
    assert_eq!(gate_token.split('.').count(), 3);

    // Face-only gates are refused with a message citing R1.
    let (ok, _, err) = sh.run(&["gate", "add", "--estate", &estate, "--name", "Face only", "--kinds", "face"])?;
    assert!(!ok);
    assert!(err.contains("FailedPrecondition") && err.contains("R1"), "{err}");

    // Face verification: a notice, an impact assessment, then the resident's own consent.
    let dir = tempfile::tempdir()?;
    let notice = dir.path().join("notice-zh.txt");
    std::fs::write(&notice, "本小区门禁可使用人脸识别。您可随时撤回同意，并改用门禁卡、密码或二维码。\n")?;
    let assessment = dir.path().join("assessment.pdf");
    std::fs::write(&assessment, b"%PDF-1.7 impact assessment")?;
    let notice_s = notice.display().to_string();
    let assessment_s = assessment.display().to_string();
    sh.ok(&["notice", "publish", "--estate", &estate, "--zh-file", &notice_s])?;
    sh.ok(&[
        "assessment",
        "record",
        "--estate",
        &estate,
        "--author",
        "Haihe DPO",
        "--date",
        "2026-11-01",
        "--document",
        &assessment_s,
    ])?;
    let face = sh.ok(&["face", "enable", "--estate", &estate])?;
    assert!(face.contains("true"), "{face}");

    let operator_token = sh.token.clone();
    sh.token = sh.ok(&["-o", "id", "token", "issue", "resident", "--person", &person, "--subject", "gu-wei-app"])?;
    let shown = sh.ok(&["notice", "show", "--estate", &estate])?;
    let sha = sha256_hex(&std::fs::read(&notice)?);
    assert!(shown.contains(&sha), "{shown}");
    let (ok, _, err) =
        sh.run(&["consent", "grant", "--estate", &estate, "--notice-version", "1", "--notice-sha256", &sha])?;
    assert!(!ok && err.contains("--affirm"), "{err}");
    let consent = sh.ok(&[
        "-o",
        "id",
        "consent",
        "grant",
        "--estate",
        &estate,
        "--notice-version",
        "1",
        "--notice-sha256",
        &sha,
        "--affirm",
    ])?;
    let attestation = sh.ok(&["consent", "attest", &consent])?;
    assert!(attestation.contains("signature_b64"), "{attestation}");
    let dir = tempfile::tempdir()?;
    let template: String = (1..=512).map(|i| format!("{:.5}\n", (i as f64).sin())).collect();
    let template_file = dir.path().join("template.txt");
    std::fs::write(&template_file, template)?;
    let enrolled = sh.ok(&["face", "enrol", "--consent", &consent, "--template", &template_file.to_string_lossy()])?;
    assert!(enrolled.contains("1 template(s)"), "{enrolled}");
    let withdrawn = sh.ok(&["consent", "withdraw", &consent])?;
    assert!(withdrawn.contains("withdrawn"), "{withdrawn}");
    let cert_file = dir.path().join("deletion.cert");
    let shown = sh.ok(&["deletion", "show", "--consent", &consent, "--out", &cert_file.to_string_lossy()])?;
    assert!(shown.contains("templates_deleted  1") && shown.contains("withdrawal"), "{shown}");
    let keys = sh.ok(&["deletion", "keys"])?;
    let keys_file = dir.path().join("deletion.keys");
    std::fs::write(&keys_file, format!("{keys}\n"))?;
    let verified =
        sh.ok(&["deletion", "verify", &cert_file.to_string_lossy(), "--keys", &keys_file.to_string_lossy()])?;
    assert!(verified.starts_with("OK: signature verified"), "{verified}");
    // A tampered certificate is refused.
    let mut bytes = std::fs::read(&cert_file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&cert_file, bytes)?;
    let (ok, _, err) =
        sh.run(&["deletion", "verify", &cert_file.to_string_lossy(), "--keys", &keys_file.to_string_lossy()])?;
    assert!(!ok, "a tampered certificate verified: {err}");
    sh.token = operator_token;
    let deletions = sh.ok(&["consent", "deletions", "--estate", &estate])?;
    assert!(deletions.contains("consent withdrawn"), "{deletions}");
    let filing = sh.ok(&["consent", "filing"])?;
    assert!(filing.contains("persons_with_face_consent"), "{filing}");

    // Credentials: never face-only; an alternative on demand; a gate's check.
    let (ok, _, err) = sh.run(&["policy", "set", "--estate", &estate, "--accept", "face"])?;
    assert!(!ok && err.contains("R1"), "{err}");
    sh.ok(&["policy", "set", "--estate", &estate, "--accept", "card,qr,face", "--alternatives", "card"])?;
    let card = sh.ok(&[
        "-o",
        "id",
        "credential",
        "issue",
        "card",
        "--person",
        &person,
        "--estate",
        &estate,
        "--uid",
        "04A1B2C3",
    ])?;
    let listed = sh.ok(&["credential", "list", "--person", &person])?;
    assert!(listed.contains(&card), "{listed}");
    let resident_token =
        sh.ok(&["-o", "id", "token", "issue", "resident", "--person", &person, "--subject", "gu-wei-app"])?;
    let operator_token = std::mem::replace(&mut sh.token, resident_token);
    let alt = sh.ok(&["alternative", "request", "--estate", &estate])?;
    assert!(alt.contains("secret_shown_once") && alt.contains("qr"), "{alt}");
    let gate_token = sh_gate_token(&sh, &operator_token, &gate)?;
    sh.token = gate_token.clone();
    let verdict = sh.ok(&["verify", "--card", "04a1b2c3"])?;
    assert!(verdict.contains("VALID"), "{verdict}");

    // Gates: a test decision, the offline bundle, rules, revocation, status.
    sh.token = operator_token;
    let decided = sh.ok(&["gate", "decide", "--gate", &gate, "--card", "04a1b2c3"])?;
    assert!(decided.contains("ADMIT") && decided.contains(&card), "{decided}");
    let operator_token = std::mem::replace(&mut sh.token, gate_token);
    let saved = dir.path().join("north.bundle");
    let bundle = sh.ok(&["gate", "bundle", "--out", &saved.display().to_string()])?;
    assert!(bundle.contains("verified") && bundle.contains("entries") && saved.exists(), "{bundle}");
    assert!(!String::from_utf8_lossy(&std::fs::read(&saved)?).contains("04A1B2C3"));
    sh.token = operator_token;
    let rules = sh.ok(&[
        "gate",
        "set-rules",
        &gate,
        "--anti-passback",
        "--window",
        "visitor=06:00-23:30",
        "--bundle-ttl",
        "43200",
    ])?;
    assert!(rules.contains("visitor=06:00-23:30") && rules.contains("43200"), "{rules}");
    sh.ok(&["credential", "revoke", &card, "--reason", "lost"])?;
    let decided = sh.ok(&["gate", "decide", "--gate", &gate, "--card", "04a1b2c3"])?;
    assert!(decided.contains("DENY") && decided.contains("REVOKED"), "{decided}");
    let status = sh.ok(&["gate", "status", "--estate", &estate, "--stale"])?;
    assert!(status.contains(&gate) && status.contains(&card), "{status}");

    let ended = sh.ok(&["residency", "end", &residency, "--reason", "moved out"])?;
    assert!(ended.contains("ended"), "{ended}");
    let me = sh.ok(&["whoami"])?;
    assert!(me.contains("operator") && me.contains(&tenant), "{me}");

    // The resident reads what was done with their data.
    let operator_token = sh.token.clone();
    sh.token = sh.ok(&["-o", "id", "token", "issue", "resident", "--person", &person, "--subject", "gu-wei-app"])?;
    let report_file = dir.path().join("my-data.txt");
    let wrote = sh.ok(&["audit", "report", "--out", &report_file.display().to_string()])?;
    assert!(wrote.contains("lines"), "{wrote}");
    assert!(std::fs::read_to_string(&report_file)?.contains("consent.grant"));

    // A regulator exports the log and verifies it offline with the public key.
    let keys_file = dir.path().join("audit.keys");
    std::fs::write(&keys_file, sh.ok(&["audit", "keys"])?)?;
    sh.token = admin_token.clone();
    sh.token =
        sh.ok(&["-o", "id", "token", "issue", "regulator", "--jurisdiction", "120000", "--subject", "tj-regulator"])?;
    let bundle = dir.path().join("export.jsonl");
    let wrote = sh.ok(&["audit", "export", "--tenant", &tenant, "--out", &bundle.display().to_string()])?;
    assert!(wrote.contains("entries"), "{wrote}");
    let verdict =
        sh.ok(&["audit", "verify", &bundle.display().to_string(), "--keys", &keys_file.display().to_string()])?;
    assert!(verdict.starts_with("OK"), "{verdict}");
    let text = std::fs::read_to_string(&bundle)?;
    let tampered_path = dir.path().join("tampered.jsonl");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(2);
    std::fs::write(&tampered_path, lines.join("\n"))?;
    let (ok, _, err) =
        sh.run(&["audit", "verify", &tampered_path.display().to_string(), "--keys", &keys_file.display().to_string()])?;
    assert!(!ok && err.contains("removed"), "{err}");
    sh.token = operator_token;

    // Without a token the mesh refuses, and meshctl says why.
    sh.token = String::new();
    let (ok, _, err) = sh.run(&["estate", "list"])?;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    mesh.stop().await
}
