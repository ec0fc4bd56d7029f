//! End-to-end tests of the audit log (R11, R12, R13, R17): delivery without
//! loss or duplicates, exports regulators verify offline, tamper detection.

mod support;

use estate_audit_bundle::{Bundle, VerifyError, write_record};
use estate_auth::Principal;
use estate_proto::audit::export_record::Record;
use estate_proto::audit::*;
use estate_proto::identity::{CreateUnitRequest, EndResidencyRequest};
use estate_test_support::TestMesh;
use prost::Message;
use std::collections::HashMap;
use support::*;
use tonic::Code;

/// Waits until the tenant's audit log holds every outbox event of the tenant.
async fn settled(mesh: &TestMesh, tenant: &str, op_token: &str) -> anyhow::Result<usize> {
    let mut audit = mesh.audit(op_token)?;
    for _ in 0..100 {
        let want = outbox_count(mesh, tenant).await?;
        let got = audit
            .query_entries(QueryEntriesRequest { page_size: 500, ..Default::default() })
            .await?
            .into_inner()
            .entries
            .len();
        if got == want {
            return Ok(got);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the relay did not deliver every event")
}

async fn keys(mesh: &TestMesh) -> anyhow::Result<HashMap<String, [u8; 32]>> {
    let published = mesh.audit("")?.get_verifying_keys(GetAuditKeysRequest {}).await?.into_inner();
    let mut out = HashMap::new();
    for k in published.keys {
        out.insert(k.key_id, <[u8; 32]>::try_from(k.public_key.as_slice())?);
    }
    Ok(out)
}

/// Exports as a regulator and returns the bundle's lines.
async fn export(mesh: &TestMesh, regulator: &str, tenant: &str, previous: i64) -> anyhow::Result<Vec<String>> {
    let mut client = mesh.audit(regulator)?;
    let mut stream = client
        .export(ExportRequest { tenant_id: tenant.into(), previous_tree_size: previous, ..Default::default() })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(rec) = stream.message().await? {
        let mut buf = Vec::new();
        write_record(&mut buf, &rec)?;
        out.push(String::from_utf8(buf)?.trim_end().to_owned());
    }
    Ok(out)
}

fn bundle(lines: &[String]) -> anyhow::Result<Bundle> {
    Ok(Bundle::read(lines.join("\n").as_bytes())?)
}

fn record_of(line: &str) -> anyhow::Result<ExportRecord> {
    use base64::Engine;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let b = base64::engine::general_purpose::STANDARD.decode(v["record"].as_str().unwrap_or_default())?;
    Ok(ExportRecord::decode(b.as_slice())?)
}

fn line_of(rec: &ExportRecord) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    write_record(&mut buf, rec)?;
    Ok(String::from_utf8(buf)?.trim_end().to_owned())
}

fn entry_lines(lines: &[String]) -> Vec<usize> {
    lines.iter().enumerate().filter(|(_, l)| l.contains("\"type\":\"entry\"")).map(|(i, _)| i).collect()
}

#[tokio::test]
async fn the_relay_delivers_every_event_exactly_once() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let n = settled(&mesh, &w.tenant.id, &w.operator_token).await?;
    assert_eq!(n, 7);
    // A crash after the append but before the outbox was marked: the rows
    // come round again, and the log takes none of them twice.
    estate_store::sqlx::query::<estate_store::sqlx::Any>("UPDATE outbox_events SET delivered_at = NULL")
        .execute(mesh.db().pool())
        .await?;
    for _ in 0..100 {
        if estate_store::outbox::pending(mesh.db().pool(), 0, 10).await?.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(estate_store::outbox::pending(mesh.db().pool(), 0, 10).await?.is_empty());
    assert_eq!(settled(&mesh, &w.tenant.id, &w.operator_token).await?, 7);
    let entries =
        mesh.audit(&w.operator_token)?.query_entries(QueryEntriesRequest::default()).await?.into_inner().entries;
    let indexes: Vec<i64> = entries.iter().map(|e| e.index).collect();
    assert_eq!(indexes, (0..7).collect::<Vec<_>>());
    mesh.stop().await
}

/// Delivered outbox rows are deleted after `audit.outbox_retention_secs`
/// (the log holds their events); the log keeps every entry. (That
/// undelivered rows are never pruned: `estate_store::outbox` unit tests.)
#[tokio::test]
async fn delivered_outbox_rows_are_pruned_after_their_retention() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn_with(|s| s.audit.outbox_retention_secs = 1).await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let mut audit = mesh.audit(&w.operator_token)?;
    let mut pruned = false;
    for _ in 0..100 {
        let logged = audit.query_entries(QueryEntriesRequest::default()).await?.into_inner().entries.len();
        let outbox = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?.len();
        if logged == 7 && outbox == 0 {
            pruned = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(pruned, "the relay kept delivered rows past their retention");
    let logged = audit.query_entries(QueryEntriesRequest::default()).await?.into_inner().entries;
    assert_eq!(logged.len(), 7, "pruning the outbox touched the log");

    mesh.stop().await
}

#[tokio::test]
async fn exports_verify_offline_and_every_tamper_is_caught() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Tianjin Group", "120101").await?;
    settled(&mesh, &w.tenant.id, &w.operator_token).await?;
    let regulator = mesh.token_for(Principal::Regulator { jurisdiction_codes: vec!["120000".into()] })?.token;
    let keys = keys(&mesh).await?;
    let first = export(&mesh, &regulator, &w.tenant.id, 0).await?;
    let ok = bundle(&first)?.verify(&keys, None)?;
    assert_eq!(ok.entries, 7);
    assert_eq!(ok.tenant_id, w.tenant.id);
    let entries = entry_lines(&first);

    // A changed entry.
    let mut changed = first.clone();
    let mut rec = record_of(&changed[entries[3]])?;
    if let Some(Record::Entry(e)) = rec.record.as_mut()
        && let Some(entry) = e.entry.as_mut()
    {
        let last = entry.event.len() - 1;
        entry.event[last] ^= 1;
    }
    changed[entries[3]] = line_of(&rec)?;
    assert!(matches!(bundle(&changed)?.verify(&keys, None), Err(VerifyError::NotIncluded { index: 3, .. })));
    // A removed, an inserted and a reordered entry.
    let mut removed = first.clone();
    removed.remove(entries[2]);
    assert!(matches!(bundle(&removed)?.verify(&keys, None), Err(VerifyError::EntrySetChanged { .. })));
    let mut inserted = first.clone();
    inserted.insert(entries[2], first[entries[4]].clone());
    assert!(matches!(bundle(&inserted)?.verify(&keys, None), Err(VerifyError::EntrySetChanged { .. })));
    let mut reordered = first.clone();
    reordered.swap(entries[1], entries[5]);
    assert!(matches!(bundle(&reordered)?.verify(&keys, None), Err(VerifyError::EntrySetChanged { .. })));
    // An entry moved to another index.
    let mut moved = first.clone();
    let mut rec = record_of(&moved[entries[1]])?;
    if let Some(Record::Entry(e)) = rec.record.as_mut()
        && let Some(entry) = e.entry.as_mut()
    {
        entry.index = 2;
    }
    moved[entries[1]] = line_of(&rec)?;
    assert!(bundle(&moved)?.verify(&keys, None).is_err());
    // A forged checkpoint (another root), and one signed by another key.
    let cp_line = first.iter().position(|l| l.contains("\"type\":\"checkpoint\"")).unwrap_or_default();
    let mut forged = first.clone();
    let mut rec = record_of(&forged[cp_line])?;
    if let Some(Record::Checkpoint(c)) = rec.record.as_mut() {
        let mut cp = Checkpoint::decode(c.checkpoint.as_slice())?;
        cp.root_hash = "00".repeat(32);
        c.checkpoint = cp.encode_to_vec();
    }
    forged[cp_line] = line_of(&rec)?;
    assert_eq!(bundle(&forged)?.verify(&keys, None).err(), Some(VerifyError::ForgedCheckpoint));
    let stranger = estate_crypto::SigningKeyPair::generate()?;
    let mut resigned = first.clone();
    let mut rec = record_of(&resigned[cp_line])?;
    if let Some(Record::Checkpoint(c)) = rec.record.as_mut() {
        let mut cp = Checkpoint::decode(c.checkpoint.as_slice())?;
        cp.root_hash = "00".repeat(32);
        let mut again = estate_audit_bundle::sign_checkpoint(&stranger, &cp);
        again.key_id = c.key_id.clone();
        *c = again;
    }
    resigned[cp_line] = line_of(&rec)?;
    assert_eq!(bundle(&resigned)?.verify(&keys, None).err(), Some(VerifyError::ForgedCheckpoint));

    // The log grows; the next export proves it only grew.
    let mut ident = operator(&mesh, &w)?;
    ident
        .create_unit(CreateUnitRequest {
            estate_id: w.estate.id.clone(),
            building: "9".into(),
            unit: String::new(),
            room: "1".into(),
        })
        .await?;
    ident.end_residency(EndResidencyRequest { id: w.residency.id.clone(), reason: "moved out".into() }).await?;
    settled(&mesh, &w.tenant.id, &w.operator_token).await?;
    let second = export(&mesh, &regulator, &w.tenant.id, ok.tree_size).await?;
    let grown = bundle(&second)?.verify(&keys, Some(&bundle(&first)?))?;
    assert!(grown.consistency_checked);
    assert!(grown.tree_size > ok.tree_size);
    // The first export was itself audited.
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    assert!(rows.iter().any(|r| r.event.action == "audit.export"));
    mesh.stop().await
}

#[tokio::test]
async fn a_row_changed_in_the_database_is_caught_by_the_verifier() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Beta", "120101").await?;
    settled(&mesh, &w.tenant.id, &w.operator_token).await?;
    let regulator = mesh.token_for(Principal::Regulator { jurisdiction_codes: vec!["120101".into()] })?.token;
    let keys = keys(&mesh).await?;
    let before = export(&mesh, &regulator, &w.tenant.id, 0).await?;
    bundle(&before)?.verify(&keys, None)?;
    // Someone with database access rewrites entry 4's event.
    let (stored,): (Vec<u8>,) = estate_store::sqlx::query_as::<estate_store::sqlx::Any, (Vec<u8>,)>(
        "SELECT event FROM audit_entries WHERE tenant_id = $1 AND idx = 4",
    )
    .bind(&w.tenant.id)
    .fetch_one(mesh.db().pool())
    .await?;
    let mut event = estate_proto::common::AuditEvent::decode(stored.as_slice())?;
    event.action = "nothing.happened".into();
    estate_store::sqlx::query::<estate_store::sqlx::Any>(
        "UPDATE audit_entries SET event = $1 WHERE tenant_id = $2 AND idx = 4",
    )
    .bind(event.encode_to_vec())
    .bind(&w.tenant.id)
    .execute(mesh.db().pool())
    .await?;
    let after = export(&mesh, &regulator, &w.tenant.id, 0).await?;
    let err = bundle(&after)?.verify(&keys, None).err();
    assert!(matches!(err, Some(VerifyError::NotIncluded { index: 4, .. })), "{err:?}");
    mesh.stop().await
}

#[tokio::test]
async fn exports_and_reports_stay_in_scope() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Gamma", "120101").await?;
    settled(&mesh, &w.tenant.id, &w.operator_token).await?;
    let beijing = mesh.token_for(Principal::Regulator { jurisdiction_codes: vec!["110000".into()] })?.token;
    let mut other = mesh.audit(&beijing)?;
    let foreign = other
        .export(ExportRequest { tenant_id: w.tenant.id.clone(), ..Default::default() })
        .await
        .err()
        .map(|s| s.code());
    let nowhere =
        other.export(ExportRequest { tenant_id: random_id(), ..Default::default() }).await.err().map(|s| s.code());
    assert_eq!(foreign, Some(Code::PermissionDenied));
    assert_eq!(foreign, nowhere);
    let op_export = mesh
        .audit(&w.operator_token)?
        .export(ExportRequest { tenant_id: w.tenant.id.clone(), ..Default::default() })
        .await;
    assert_eq!(op_export.err().map(|s| s.code()), Some(Code::PermissionDenied));

    // The resident's report holds their entries only, readable.
    let mut me = mesh.audit(&resident(&mesh, &w, &w.person.id)?)?;
    let report = me.access_report(AccessReportRequest {}).await?.into_inner();
    assert_eq!(report.person_pseudonym, w.person.pseudonym);
    let what: Vec<&str> = report.lines.iter().map(|l| l.what.as_str()).collect();
    assert_eq!(what, ["person.create", "residency.create"]);
    assert!(report.lines.iter().all(|l| l.by_role.contains("operator")));
    assert_eq!(err_code(me.query_entries(QueryEntriesRequest::default()).await), Code::PermissionDenied);
    // Another tenant's operator sees nothing of this log.
    let other_world = world(&mesh, "Delta", "120101").await?;
    settled(&mesh, &other_world.tenant.id, &other_world.operator_token).await?;
    let theirs =
        mesh.audit(&other_world.operator_token)?.query_entries(QueryEntriesRequest::default()).await?.into_inner();
    assert!(theirs.entries.iter().all(|e| e.decoded.as_ref().is_some_and(|d| d.tenant_id == other_world.tenant.id)));
    mesh.stop().await
}

fn err_code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.err().map(|s| s.code()).unwrap_or(Code::Ok)
}
