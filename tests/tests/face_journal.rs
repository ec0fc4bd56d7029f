//! Consent copies facematch's journal into the audit outbox (R11), and must
//! not believe a facematch that lies (R9, R14): this facematch answers every
//! journal read with an honest entry and three forged ones — an event of
//! another tenant, a non-face action, an event without an id. Only the
//! honest one is recorded, once, however often the journal is read.

mod support;

use estate_core::Result;
use estate_facematch::FaceMatcher;
use estate_proto::common::AuditEvent;
use estate_proto::consent::VerifyingKeys;
use estate_proto::facematch::*;
use estate_test_support::TestMesh;
use futures_util::future::BoxFuture;
use support::*;

#[derive(Debug)]
struct LyingFacematch {
    tenant: String,
    other_tenant: String,
}

impl LyingFacematch {
    fn entries(&self) -> Vec<JournalEntry> {
        let event = |seq: i64, tenant: &str, action: &str, id: &str| JournalEntry {
            seq,
            event: Some(AuditEvent {
                event_id: id.into(),
                tenant_id: tenant.into(),
                action: action.into(),
                object_type: "face_template".into(),
                object_id: format!("t-{seq}"),
                source: "facematch".into(),
                ..Default::default()
            }),
        };
        vec![
            event(1, &self.tenant, "face.enrol", "fm-honest-1"),
            event(2, &self.other_tenant, "face.enrol", "fm-forged-other-tenant"),
            event(3, &self.tenant, "credential.revoke", "fm-forged-not-face"),
            event(4, &self.tenant, "face.delete", ""),
        ]
    }
}

fn refused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T>> {
    Box::pin(async { Err(estate_core::Error::precondition("not part of this test")) })
}

impl FaceMatcher for LyingFacematch {
    fn identify<'a>(&'a self, _: &'a str, _: IdentifyRequest) -> BoxFuture<'a, Result<MatchResult>> {
        refused()
    }
    fn delete<'a>(&'a self, _: &'a str, _: DeleteRequest) -> BoxFuture<'a, Result<DeletionCertificate>> {
        refused()
    }
    fn list_enrolled<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Vec<EnrolledPerson>>> {
        refused()
    }
    fn count<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<PersonCount>> {
        refused()
    }
    fn certificate_keys<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<VerifyingKeys>> {
        refused()
    }
    fn journal<'a>(&'a self, tenant: &'a str, after: i64, _: u32) -> BoxFuture<'a, Result<Vec<JournalEntry>>> {
        // It answers any tenant's read with the same entries, ignoring the
        // cursor on purpose (a replay).
        let _ = (tenant, after);
        let entries = self.entries();
        Box::pin(async move { Ok(entries) })
    }
}

#[tokio::test]
async fn forged_journal_entries_are_refused_and_honest_ones_recorded_once() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let a = world(&mesh, "Alpha", "120101").await?;
    let b = world(&mesh, "Beta", "120101").await?;
    // The copy reads the journals of tenants with consents.
    let notice = enable_face(&mesh, &a).await?;
    let me = resident(&mesh, &a, &a.person.id)?;
    grant_face_consent(&mesh, &me, &a.estate.id, notice).await?;
    let liar = LyingFacematch { tenant: a.tenant.id.clone(), other_tenant: b.tenant.id.clone() };
    let b_before = outbox_count(&mesh, &b.tenant.id).await?;

    let mut recorded = 0;
    for _ in 0..3 {
        recorded += estate_consent::face_journal::import(mesh.db(), &liar).await?;
    }
    assert_eq!(recorded, 1, "only the honest entry is recorded, and once");
    let rows = estate_store::outbox::for_tenant(mesh.db().pool(), &a.tenant.id).await?;
    let from_facematch: Vec<&str> =
        rows.iter().filter(|r| r.event.event_id.starts_with("fm-")).map(|r| r.event.event_id.as_str()).collect();
    assert_eq!(from_facematch, ["fm-honest-1"]);
    assert!(rows.iter().all(|r| r.event.action != "credential.revoke" || r.event.source != "facematch"));
    assert_eq!(outbox_count(&mesh, &b.tenant.id).await?, b_before, "an event was recorded for another tenant");
    mesh.stop().await
}
