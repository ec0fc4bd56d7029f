//! The `estate.audit.v1.AuditService` implementation (R11, R12, R13, R14, R17).

use crate::log::{AuditLog, IndexOf};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use estate_audit_bundle::{FORMAT, indexes_digest, sign_summary};
use estate_auth::{Caller, Principal, caller};
use estate_core::{Error, Result, now_ms, parse_id};
use estate_crypto::KeyedHasher;
use estate_identity::directory;
use estate_proto::audit::audit_service_server::AuditService;
use estate_proto::audit::*;
use estate_proto::common::{ActorKind, AuditEvent};
use estate_store::outbox::{self, Change};
use estate_store::{Db, db_error};
use prost::Message;
use sqlx::Any;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const PAGE: i64 = 1000;

/// The audit service.
#[derive(Debug, Clone)]
pub struct AuditDesk {
    db: Db,
    log: AuditLog,
    hasher: KeyedHasher,
    max_page_size: u32,
}

#[derive(Debug, sqlx::FromRow)]
struct EntryRow {
    idx: i64,
    event: Vec<u8>,
    chain_hash: Vec<u8>,
    appended_at: i64,
}

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    let (seconds, nanos) = estate_core::ms_to_timestamp_parts(ms);
    Some(prost_types::Timestamp { seconds, nanos })
}

fn ms(t: &Option<prost_types::Timestamp>, default: i64) -> i64 {
    t.as_ref().map_or(default, |t| t.seconds.saturating_mul(1000))
}

fn entry_of(r: EntryRow) -> Entry {
    let decoded = AuditEvent::decode(r.event.as_slice()).ok();
    Entry {
        index: r.idx,
        event: r.event,
        chain_hash: hex::encode(&r.chain_hash),
        appended_at: ts(r.appended_at),
        decoded,
    }
}

/// Entry filter: tenant, then optional estate, person, action, period.
struct EntryQuery {
    tenant: String,
    estate: String,
    person: String,
    action: String,
    from_ms: i64,
    until_ms: i64,
}

fn entry_query(tenant: &str, estate: &str, person: &str, action: &str, from_ms: i64, until_ms: i64) -> EntryQuery {
    EntryQuery {
        tenant: tenant.to_owned(),
        estate: estate.to_owned(),
        person: person.to_owned(),
        action: action.to_owned(),
        from_ms,
        until_ms,
    }
}

/// Which entries a page statement reads.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The entries from `idx > after` on.
    After(i64),
    /// These entries (ascending), as an index listed them.
    Listed(&'a [i64]),
}

/// Entries looked up by index at most per statement.
const LISTED_PER_FETCH: usize = 512;

impl EntryQuery {
    /// The page statement. Parameters: `$1` tenant, `$2`/`$3` period, the
    /// filters' strings, then `after` or the listed entries, then `limit`.
    /// An index's listing is filtered like any other entry: a page never
    /// rests on the index alone.
    fn sql(&self, source: Source<'_>) -> (String, Vec<String>) {
        let mut sql = String::from(
            "SELECT e.idx, e.event, e.chain_hash, e.appended_at FROM audit_entries e \
             WHERE e.tenant_id = $1 AND e.occurred_at >= $2 AND e.occurred_at < $3",
        );
        let mut strings = Vec::new();
        for (col, v) in
            [("e.estate_id", &self.estate), ("e.person_pseudonym", &self.person), ("e.action", &self.action)]
        {
            if !v.is_empty() {
                strings.push(v.clone());
                sql.push_str(&format!(" AND {col} = ${}", strings.len() + 3));
            }
        }
        let n = strings.len() + 3;
        match source {
            Source::After(_) => sql.push_str(&format!(" AND e.idx > ${} ORDER BY e.idx LIMIT ${}", n + 1, n + 2)),
            Source::Listed(list) => {
                let params: Vec<String> = (n + 1..=n + list.len()).map(|i| format!("${i}")).collect();
                sql.push_str(&format!(
                    " AND e.idx IN ({}) ORDER BY e.idx LIMIT ${}",
                    params.join(", "),
                    n + list.len() + 1
                ));
            }
        }
        (sql, strings)
    }

    async fn fetch(&self, db: &Db, source: Source<'_>, limit: i64) -> Result<Vec<EntryRow>> {
        let (sql, strings) = self.sql(source);
        let mut q = sqlx::query_as::<Any, EntryRow>(sqlx::AssertSqlSafe(sql))
            .bind(self.tenant.clone())
            .bind(self.from_ms)
            .bind(self.until_ms);
        for s in strings {
            q = q.bind(s);
        }
        match source {
            Source::After(after) => q = q.bind(after),
            Source::Listed(list) => {
                for idx in list {
                    q = q.bind(*idx);
                }
            }
        }
        q.bind(limit).fetch_all(db.pool()).await.map_err(db_error)
    }

    /// Up to `limit` entries after index `after`, in log order. By person
    /// (or, without one, by estate): the entries its index lists below its
    /// mark, then the entries the indexer has not reached yet (the mark is
    /// read first, and everything below it is indexed, so no entry is
    /// missed or read twice).
    async fn page(&self, db: &Db, log: &AuditLog, after: i64, limit: i64) -> Result<Vec<EntryRow>> {
        let (which, key) = if !self.person.is_empty() {
            (IndexOf::Person, &self.person)
        } else if !self.estate.is_empty() {
            (IndexOf::Estate, &self.estate)
        } else {
            return self.fetch(db, Source::After(after), limit).await;
        };
        let mark = log.indexed_below(&self.tenant).await?;
        let mut rows = Vec::new();
        let mut cursor = Some(after);
        while let Some(from) = cursor.filter(|from| from + 1 < mark) {
            let (listed, more) = log.indexed(&self.tenant, which, key, from, mark).await?;
            let mut rest = listed.as_slice();
            while !rest.is_empty() {
                let want = limit - i64::try_from(rows.len()).unwrap_or(i64::MAX);
                if want <= 0 {
                    return Ok(rows);
                }
                // As many as the page still wants (other filters may drop
                // some: then the next ones), within the statement's bound.
                let take = usize::try_from(want).unwrap_or(usize::MAX).clamp(16, LISTED_PER_FETCH).min(rest.len());
                let (now, later) = rest.split_at(take);
                rows.extend(self.fetch(db, Source::Listed(now), want).await?);
                rest = later;
            }
            cursor = more;
        }
        let got = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if got < limit {
            rows.extend(self.fetch(db, Source::After(after.max(mark - 1)), limit - got).await?);
        }
        Ok(rows)
    }
}

impl AuditDesk {
    /// A desk over the log.
    pub fn new(db: Db, log: AuditLog, hasher: KeyedHasher, max_page_size: u32) -> Self {
        Self { db, log, hasher, max_page_size }
    }

    async fn query_entries(&self, caller: &Caller, r: QueryEntriesRequest) -> Result<QueryEntriesResponse> {
        let tenant = caller.operator_tenant()?.to_owned();
        if r.estate_id.is_empty() {
            if caller.operator_estate_limit().is_some() {
                return Err(Error::invalid("estate_id", "is required for an estate-limited operator"));
            }
        } else {
            caller.operator_for_estate(&parse_id("estate_id", &r.estate_id)?)?;
        }
        let size = match r.page_size {
            0 => 100,
            n if n < 0 => return Err(Error::invalid("page_size", "must not be negative")),
            n => i64::from(n).min(i64::from(self.max_page_size)),
        };
        let after = if r.page_token.is_empty() {
            -1
        } else {
            URL_SAFE_NO_PAD
                .decode(&r.page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.strip_prefix("a1:").and_then(|n| n.parse::<i64>().ok()))
                .ok_or_else(|| Error::invalid("page_token", "is not a token returned by this call"))?
        };
        let q =
            entry_query(&tenant, &r.estate_id, &r.person_pseudonym, &r.action, ms(&r.from, 0), ms(&r.until, i64::MAX));
        let rows = q.page(&self.db, &self.log, after, size + 1).await?;
        let more = rows.len() as i64 > size;
        let entries: Vec<Entry> = rows.into_iter().take(size as usize).map(entry_of).collect();
        let next = match (more, entries.last()) {
            (true, Some(e)) => URL_SAFE_NO_PAD.encode(format!("a1:{}", e.index)),
            _ => String::new(),
        };
        Ok(QueryEntriesResponse { entries, next_page_token: next })
    }

    async fn get_latest_checkpoint(&self, caller: &Caller, _r: GetLatestCheckpointRequest) -> Result<SignedCheckpoint> {
        let tenant = caller.tenant_id()?.to_owned();
        self.log.checkpoint_now(&tenant).await?.ok_or(Error::NotFound("checkpoint"))
    }

    async fn access_report(&self, caller: &Caller, _r: AccessReportRequest) -> Result<AccessReportResponse> {
        let Principal::Resident { tenant_id, person_id } = &caller.principal else {
            return Err(Error::denied("the access report is the resident's own; operators query entries"));
        };
        let pseudonym = self.hasher.pseudonym(tenant_id, person_id);
        let q = entry_query(tenant_id, "", &pseudonym, "", 0, i64::MAX);
        let mut lines = Vec::new();
        let mut after = -1;
        loop {
            let rows = q.page(&self.db, &self.log, after, PAGE).await?;
            let Some(last) = rows.last().map(|r| r.idx) else { break };
            for row in rows {
                let entry = entry_of(row);
                let Some(ev) = entry.decoded else { continue };
                let role = match ev.actor.as_ref().and_then(|a| ActorKind::try_from(a.kind).ok()) {
                    Some(ActorKind::PlatformAdmin) => "platform admin",
                    Some(ActorKind::Operator) => "operator (property staff)",
                    Some(ActorKind::Gate) => "gate device",
                    Some(ActorKind::Resident) => "resident or guardian",
                    Some(ActorKind::Regulator) => "regulator",
                    Some(ActorKind::Service) => "automatic (mesh service)",
                    _ => "unknown",
                };
                let why = ["reason", "purpose", "outcome"]
                    .iter()
                    .find_map(|k| ev.attributes.get(*k).cloned())
                    .unwrap_or_else(|| ev.action.replace('.', " "));
                lines.push(AccessReportLine {
                    when: ev.occurred_at,
                    what: ev.action,
                    estate_id: ev.estate_id,
                    by_role: role.into(),
                    why,
                    index: entry.index,
                });
            }
            after = last;
        }
        Ok(AccessReportResponse { person_pseudonym: pseudonym, lines })
    }

    /// Checks a regulator's authority over the tenant; the answer is the same
    /// for tenants outside the jurisdiction and tenants that do not exist.
    async fn regulator_scope(&self, caller: &Caller, tenant_id: &str) -> Result<()> {
        let codes = caller.regulator_jurisdictions().ok_or_else(|| Error::denied("exports are for regulators"))?;
        let jurisdiction = directory::tenant_jurisdiction(&self.db, tenant_id).await?;
        match jurisdiction {
            Some(j) if codes.iter().any(|c| c.covers(&j)) => Ok(()),
            _ => Err(Error::denied("the tenant is not in this regulator's jurisdiction")),
        }
    }

    async fn export_records(
        &self,
        caller: &Caller,
        r: ExportRequest,
        tx: tokio::sync::mpsc::Sender<Result<ExportRecord, Status>>,
    ) -> Result<()> {
        let tenant = parse_id("tenant_id", &r.tenant_id)?;
        if !r.estate_id.is_empty() {
            parse_id("estate_id", &r.estate_id)?;
        }
        self.regulator_scope(caller, &tenant).await?;
        // The export is itself a processing, audited (R11).
        let mut conn = self.db.begin().await?;
        let change = Change::new(&tenant, "audit.export", "tenant", &tenant)
            .estate(&r.estate_id)
            .attr("regulator", caller.subject.clone());
        outbox::record(&mut conn, &change.into_event(caller.actor(&self.hasher), &caller.request_id, "audit")).await?;
        conn.commit().await.map_err(db_error)?;

        let checkpoint = self.log.checkpoint_now(&tenant).await?.ok_or(Error::NotFound("audit log"))?;
        let size = checkpoint.decoded.as_ref().map_or(0, |d| d.tree_size);
        let size_u = u64::try_from(size).unwrap_or(0);
        let send = |rec: export_record::Record| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(ExportRecord { record: Some(rec) }))
                    .await
                    .map_err(|_| Error::Unavailable("the export stream was closed".into()))
            }
        };
        send(export_record::Record::Manifest(ExportManifest {
            format: FORMAT,
            tenant_id: tenant.clone(),
            estate_id: r.estate_id.clone(),
            from: r.from,
            until: r.until,
            tree_size: size,
            exported_at: ts(now_ms()),
        }))
        .await?;
        let q = entry_query(&tenant, &r.estate_id, "", "", ms(&r.from, 0), ms(&r.until, i64::MAX));
        let tree = self.log.tree(&tenant).await?;
        let mut after = -1;
        let mut indexes = Vec::new();
        loop {
            let rows = q.page(&self.db, &self.log, after, PAGE).await?;
            let rows: Vec<EntryRow> = rows.into_iter().filter(|e| e.idx < size).collect();
            let Some(last) = rows.last().map(|r| r.idx) else { break };
            let mut batch = Vec::with_capacity(rows.len());
            {
                let t = tree.lock().await;
                for row in rows {
                    let proof = t
                        .inclusion_proof(u64::try_from(row.idx).unwrap_or(u64::MAX), size_u)
                        .ok_or_else(|| Error::Internal("no inclusion proof for a stored entry".into()))?;
                    batch.push((row, proof));
                }
            }
            for (row, proof) in batch {
                indexes.push(row.idx);
                let entry = entry_of(row);
                send(export_record::Record::Entry(ExportedEntry {
                    entry: Some(entry),
                    inclusion_proof: proof.iter().map(hex::encode).collect(),
                }))
                .await?;
            }
            after = last;
        }
        if r.previous_tree_size > 0 && r.previous_tree_size < size {
            let t = tree.lock().await;
            let first = u64::try_from(r.previous_tree_size).unwrap_or(0);
            let proof =
                t.consistency_proof(first, size_u).ok_or(Error::invalid("previous_tree_size", "is beyond the log"))?;
            let first_root = t.root_at(first).map(hex::encode).unwrap_or_default();
            drop(t);
            send(export_record::Record::Consistency(ConsistencyProof {
                first_tree_size: r.previous_tree_size,
                first_root_hash: first_root,
                second_tree_size: size,
                proof: proof.iter().map(hex::encode).collect(),
            }))
            .await?;
        } else if r.previous_tree_size > size {
            return Err(Error::invalid("previous_tree_size", "is larger than the log"));
        }
        send(export_record::Record::Checkpoint(checkpoint)).await?;
        let summary = ExportSummary {
            tenant_id: tenant.clone(),
            tree_size: size,
            entry_count: i64::try_from(indexes.len()).unwrap_or(i64::MAX),
            indexes_sha256: indexes_digest(indexes.iter().copied()),
            estate_id: r.estate_id.clone(),
        };
        send(export_record::Record::Summary(sign_summary(self.log.key(), &summary))).await?;
        Ok(())
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportRecord, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditDesk {
    async fn query_entries(
        &self,
        request: Request<QueryEntriesRequest>,
    ) -> Result<Response<QueryEntriesResponse>, Status> {
        let caller = caller(&request)?;
        AuditDesk::query_entries(self, &caller, request.into_inner()).await.map(Response::new).map_err(Status::from)
    }

    async fn get_latest_checkpoint(
        &self,
        request: Request<GetLatestCheckpointRequest>,
    ) -> Result<Response<SignedCheckpoint>, Status> {
        let caller = caller(&request)?;
        AuditDesk::get_latest_checkpoint(self, &caller, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_verifying_keys(&self, _request: Request<GetAuditKeysRequest>) -> Result<Response<AuditKeys>, Status> {
        let key = self.log.key();
        Ok(Response::new(AuditKeys {
            keys: vec![AuditKey {
                key_id: key.key_id().to_owned(),
                algorithm: "ed25519".into(),
                public_key: key.public_key_bytes().to_vec(),
            }],
        }))
    }

    type ExportStream = ExportStream;

    async fn export(&self, request: Request<ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        // Scope is checked before the stream starts, so refusals are statuses.
        let tenant = parse_id("tenant_id", &r.tenant_id).map_err(Status::from)?;
        self.regulator_scope(&caller, &tenant).await.map_err(Status::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let desk = self.clone();
        tokio::spawn(async move {
            if let Err(e) = desk.export_records(&caller, r, tx.clone()).await {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn append(&self, request: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        let caller = caller(&request)?;
        if !matches!(caller.principal, Principal::Service { .. }) {
            return Err(Status::from(Error::denied("only a mesh service token may append to the audit log")));
        }
        let r = request.into_inner();
        if r.events.len() > 1000 {
            return Err(Status::from(Error::invalid("events", "send at most 1000 events per call")));
        }
        let mut events = Vec::with_capacity(r.events.len());
        for bytes in r.events {
            let event = AuditEvent::decode(bytes.as_slice()).map_err(|_| {
                Status::from(Error::invalid("events", "each item must be an encoded estate.common.v1.AuditEvent"))
            })?;
            if event.event_id.is_empty() || event.tenant_id.is_empty() {
                return Err(Status::from(Error::invalid("events", "every event needs an event_id and a tenant_id")));
            }
            events.push((bytes, event));
        }
        let done = self.log.append(&events).await.map_err(Status::from)?;
        Ok(Response::new(AppendResponse {
            appended: i64::try_from(done.appended).unwrap_or(i64::MAX),
            duplicates: i64::try_from(done.duplicates).unwrap_or(i64::MAX),
        }))
    }

    async fn access_report(
        &self,
        request: Request<AccessReportRequest>,
    ) -> Result<Response<AccessReportResponse>, Status> {
        let caller = caller(&request)?;
        AuditDesk::access_report(self, &caller, request.into_inner()).await.map(Response::new).map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Pace;
    use estate_store::DbOptions;
    use estate_test_support::TestDatabase;
    use std::time::Duration;

    /// Events for three people (and some for nobody) at two estates.
    fn events(from: usize, to: usize) -> Vec<(Vec<u8>, AuditEvent)> {
        (from..to)
            .map(|i| {
                let e = AuditEvent {
                    event_id: format!("evt-{i:06}"),
                    tenant_id: "tenant-a".into(),
                    estate_id: ["estate-1", "estate-2"][i % 2].into(),
                    person_pseudonym: ["p-ann", "p-bo", "p-cy", ""][i % 4].into(),
                    action: "gate.decide".into(),
                    ..Default::default()
                };
                (e.encode_to_vec(), e)
            })
            .collect()
    }

    /// The indexes of `person`'s entries (any person's, when empty; at
    /// `estate`, when given) among the first `n`, as [`events`] makes them.
    fn expected(person: &str, estate: Option<&str>, n: usize) -> Vec<i64> {
        events(0, n)
            .into_iter()
            .enumerate()
            .filter(|(_, (_, e))| {
                (person.is_empty() || e.person_pseudonym == person) && estate.is_none_or(|s| e.estate_id == s)
            })
            .map(|(i, _)| i64::try_from(i).unwrap_or(-1))
            .collect()
    }

    /// A fresh database (SQLite, or PostgreSQL when the tests are pointed at
    /// it) with the outbox and audit tables.
    async fn migrated(dir: &std::path::Path) -> anyhow::Result<(TestDatabase, Db)> {
        let test_db = TestDatabase::create(dir).await?;
        let db = Db::connect(&DbOptions {
            url: test_db.url().to_owned(),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout_ms: 0,
        })
        .await?;
        db.migrate_outbox().await?;
        crate::migrate(&db).await?;
        Ok((test_db, db))
    }

    /// [`migrated`] and a log over it that signs checkpoints only when asked
    /// (every 100,000 entries or hour).
    async fn with_log(dir: &std::path::Path) -> anyhow::Result<(TestDatabase, Db, AuditLog)> {
        let (test_db, db) = migrated(dir).await?;
        let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 100_000, 3600);
        Ok((test_db, db, log))
    }

    /// Every page of the query, `limit` entries at a time.
    async fn all(q: &EntryQuery, db: &Db, log: &AuditLog, limit: i64) -> anyhow::Result<Vec<i64>> {
        let mut got = Vec::new();
        let mut after = -1;
        loop {
            let rows = q.page(db, log, after, limit).await?;
            anyhow::ensure!(i64::try_from(rows.len())? <= limit, "a page longer than asked for");
            let Some(last) = rows.last().map(|r| r.idx) else { break };
            got.extend(rows.iter().map(|r| r.idx));
            after = last;
        }
        Ok(got)
    }

    /// Every entry index `which` lists under `key` below the mark.
    async fn listed(log: &AuditLog, which: IndexOf, key: &str) -> anyhow::Result<Vec<i64>> {
        let below = log.indexed_below("tenant-a").await?;
        let (mut out, mut after) = (Vec::new(), -1);
        loop {
            let (got, more) = log.indexed("tenant-a", which, key, after, below).await?;
            out.extend(got);
            match more {
                Some(next) => after = next,
                None => return Ok(out),
            }
        }
    }

    /// Every (key, entry) of index `which` below the mark, sorted.
    async fn listed_all(db: &Db, log: &AuditLog, which: IndexOf) -> anyhow::Result<Vec<(String, i64)>> {
        let kind = if which == IndexOf::Person { "person" } else { "estate" };
        let keys: Vec<(String,)> =
            sqlx::query_as::<Any, (String,)>("SELECT DISTINCT index_key FROM audit_index_postings WHERE kind = $1")
                .bind(kind)
                .fetch_all(db.pool())
                .await?;
        let mut out = Vec::new();
        for (key,) in keys {
            out.extend(listed(log, which, &key).await?.into_iter().map(|i| (key.clone(), i)));
        }
        out.sort();
        Ok(out)
    }

    /// Rows of `audit_index_postings`.
    async fn postings(db: &Db) -> anyhow::Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as::<Any, (i64,)>("SELECT COUNT(*) FROM audit_index_postings").fetch_one(db.pool()).await?;
        Ok(n)
    }

    /// A query by person (or by estate) finds each of its entries exactly
    /// once, in log order, before the indexes have been built, once they
    /// are complete, and when pages cross from an index to the entries it
    /// has not reached yet; other filters still apply. Indexing twice at
    /// once, or again, changes nothing.
    #[tokio::test]
    async fn queries_by_person_and_estate_see_every_entry_while_the_index_catches_up() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (test_db, db, log) = with_log(dir.path()).await?;
        log.append(&events(0, 2500)).await?;
        let bo = entry_query("tenant-a", "", "p-bo", "", 0, i64::MAX);
        let bo_at_2 = entry_query("tenant-a", "estate-2", "p-bo", "", 0, i64::MAX);
        let at_2 = entry_query("tenant-a", "estate-2", "", "", 0, i64::MAX);
        assert_eq!(log.indexed_below("tenant-a").await?, 0);
        assert_eq!(all(&bo, &db, &log, 7).await?, expected("p-bo", None, 2500));
        assert_eq!(all(&at_2, &db, &log, 7).await?, expected("", Some("estate-2"), 2500));

        // Two indexers at once (two processes on one database): each
        // window is written by one of them; small reads and transactions,
        // so that both cross several of each.
        let (a, b) = tokio::join!(
            log.index_entries_by("tenant-a", 700, 4, Pace::Spread(Duration::from_millis(20))),
            log.index_entries_by("tenant-a", 700, 4, Pace::Spread(Duration::from_millis(20)))
        );
        assert_eq!(a? + b?, 2500, "every entry indexed once, by one indexer or the other");
        assert_eq!(log.indexed_below("tenant-a").await?, 2500);
        assert_eq!(listed(&log, IndexOf::Person, "p-bo").await?, expected("p-bo", None, 2500));
        assert_eq!(listed(&log, IndexOf::Estate, "estate-2").await?, expected("", Some("estate-2"), 2500));
        assert!(listed(&log, IndexOf::Person, "estate-2").await?.is_empty(), "an estate is not a person");
        assert_eq!(all(&bo, &db, &log, 7).await?, expected("p-bo", None, 2500));
        assert_eq!(all(&bo_at_2, &db, &log, 1000).await?, expected("p-bo", Some("estate-2"), 2500));
        assert_eq!(all(&at_2, &db, &log, 7).await?, expected("", Some("estate-2"), 2500));

        log.append(&events(2500, 2800)).await?;
        // A window read before another indexer moved the mark is not
        // written: nothing of it is listed, and the mark stays.
        let stale =
            crate::log::windows(0, (2500..2800).map(|i| (i, "p-bo".to_owned(), "estate-2".to_owned())).collect(), 16);
        assert_eq!(stale.len(), 1);
        assert!(!log.write_window("tenant-a", &stale[0]).await?, "a window from an old mark was written");
        assert_eq!(log.indexed_below("tenant-a").await?, 2500);
        for limit in [1, 7, 1000] {
            assert_eq!(all(&bo, &db, &log, limit).await?, expected("p-bo", None, 2800), "pages of {limit}");
            assert_eq!(all(&at_2, &db, &log, limit).await?, expected("", Some("estate-2"), 2800), "pages of {limit}");
        }
        assert_eq!(all(&bo_at_2, &db, &log, 3).await?, expected("p-bo", Some("estate-2"), 2800));
        assert_eq!(log.index_entries("tenant-a", Duration::from_millis(20)).await?, 300);
        assert_eq!(log.index_entries("tenant-a", Duration::from_millis(20)).await?, 0);
        assert_eq!(log.indexed_below("tenant-a").await?, 2800);
        assert_eq!(all(&bo, &db, &log, 7).await?, expected("p-bo", None, 2800));
        assert_eq!(all(&at_2, &db, &log, 7).await?, expected("", Some("estate-2"), 2800));
        // Pages by person with another filter that drops most of what the
        // index lists, in pages that cross many lookups.
        let bo_at_1 = entry_query("tenant-a", "estate-1", "p-bo", "", 0, i64::MAX);
        assert!(all(&bo_at_1, &db, &log, 5).await?.is_empty(), "p-bo is only ever at estate-2");
        let nobody = entry_query("tenant-a", "", "p-nobody", "", 0, i64::MAX);
        assert!(all(&nobody, &db, &log, 7).await?.is_empty());
        db.close().await;
        test_db.drop().await
    }

    /// The background pace spreads a window's write transactions    /// The background pace spreads a window's write transactions over the
    /// time it is given: the last of `n` starts no earlier than `(n - 1) / n`
    /// of it after the first. (A lower bound only: sleeping never ends early.)
    #[tokio::test]
    async fn the_indexer_spreads_a_windows_transactions_over_its_time() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (test_db, db, log) = with_log(dir.path()).await?;
        log.append(&events(0, 100)).await?;
        // Two postings a transaction: each entry (a person and an estate,
        // or an estate alone after one with two) is a window of its own,
        // 100 transactions.
        let over = Duration::from_millis(400);
        let started = std::time::Instant::now();
        assert_eq!(log.index_entries_by("tenant-a", 1000, 2, Pace::Spread(over)).await?, 100);
        let took = started.elapsed();
        assert!(took >= over / 100 * 99, "100 transactions spread over {over:?} took only {took:?}");
        assert_eq!(postings(&db).await?, 175, "75 entries name a person, 100 an estate");
        assert_eq!(log.indexed_below("tenant-a").await?, 100);
        assert_eq!(
            all(&entry_query("tenant-a", "", "p-cy", "", 0, i64::MAX), &db, &log, 9).await?,
            expected("p-cy", None, 100)
        );
        db.close().await;
        test_db.drop().await
    }

    /// Checks the tenant's latest checkpoint: it covers `size` entries, with
    /// the root of a tree rebuilt from the stored entries, the stored chain
    /// hash of its last entry, and the log's signature.
    async fn check_latest_checkpoint(db: &Db, log: &AuditLog, size: i64) -> anyhow::Result<()> {
        let signed = log.latest_checkpoint("tenant-a").await?.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
        let cp = signed.decoded.clone().ok_or_else(|| anyhow::anyhow!("checkpoint not decoded"))?;
        assert_eq!(cp.tree_size, size);
        let rebuilt = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 100_000, 3600);
        let tree = rebuilt.tree("tenant-a").await?;
        let root = tree.lock().await.root_at(u64::try_from(size)?).ok_or_else(|| anyhow::anyhow!("short tree"))?;
        assert_eq!(cp.root_hash, hex::encode(root), "root of the first {size} entries");
        let (chain,): (Vec<u8>,) =
            sqlx::query_as::<Any, (Vec<u8>,)>("SELECT chain_hash FROM audit_entries WHERE tenant_id = $1 AND idx = $2")
                .bind("tenant-a")
                .bind(size - 1)
                .fetch_one(db.pool())
                .await?;
        assert_eq!(cp.chain_hash, hex::encode(chain), "chain hash of entry {}", size - 1);
        assert_eq!(signed.signature, estate_audit_bundle::sign_checkpoint(log.key(), &cp).signature);
        Ok(())
    }

    /// A checkpoint of the entries this process appended is signed from its
    /// tree and head in memory, and agrees with the stored log. Where they
    /// do not hold the whole log (no tree yet, another writer's entries in
    /// between) nothing is signed from memory; a checkpoint made from the
    /// database catches the tree up and memory serves again.
    #[tokio::test]
    async fn checkpoints_signed_from_memory_agree_with_the_stored_log() -> anyhow::Result<()> {
        use estate_store::outbox::AuditSink;
        let dir = tempfile::tempdir()?;
        let (test_db, db, log) = with_log(dir.path()).await?;
        let direct =
            |from: usize, to: usize| -> Vec<_> { events(from, to).into_iter().map(|(_, e)| log.prepare(e)).collect() };
        log.append_committed(&db, &direct(0, 10)).await?;
        assert!(!log.checkpoint_from_memory("tenant-a").await?, "no tree in memory yet");
        log.tree("tenant-a").await?;
        log.append_committed(&db, &direct(10, 30)).await?;
        assert!(log.checkpoint_from_memory("tenant-a").await?);
        check_latest_checkpoint(&db, &log, 30).await?;

        // Another writer appends; this process's next append finds the head
        // moved, and its tree lacks the other writer's entries.
        let other = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 100_000, 3600);
        other.append(&events(30, 35)).await?;
        log.append_committed(&db, &direct(35, 40)).await?;
        assert!(!log.checkpoint_from_memory("tenant-a").await?, "a tree without another writer's entries");
        check_latest_checkpoint(&db, &log, 30).await?;
        log.checkpoint_now("tenant-a").await?;
        check_latest_checkpoint(&db, &log, 40).await?;
        log.append_committed(&db, &direct(40, 45)).await?;
        assert!(log.checkpoint_from_memory("tenant-a").await?);
        check_latest_checkpoint(&db, &log, 45).await?;
        db.close().await;
        test_db.drop().await
    }

    /// A full window is written back to back only when the log reaches more
    /// than another window beyond it, or when this process does not know
    /// the log's head; otherwise it is spread like any other. A tenant with
    /// nothing to index takes no share of a sweep's time.
    #[tokio::test]
    async fn only_an_indexer_more_than_a_window_behind_skips_the_spread() -> anyhow::Result<()> {
        use estate_store::outbox::AuditSink;
        let dir = tempfile::tempdir()?;
        let (test_db, db, log) = with_log(dir.path()).await?;
        assert!(log.behind_beyond("tenant-a", 0, 16), "an unknown head counts as behind");
        assert!(!log.has_unindexed("tenant-a").await?, "an empty log has nothing to index");
        let direct: Vec<_> = events(0, 100).into_iter().map(|(_, e)| log.prepare(e)).collect();
        log.append_committed(&db, &direct).await?;
        assert!(log.has_unindexed("tenant-a").await?);
        assert!(!log.has_unindexed("tenant-b").await?);
        // The head is entry 99.
        assert!(log.behind_beyond("tenant-a", 15, 16));
        assert!(log.behind_beyond("tenant-a", 82, 16));
        assert!(!log.behind_beyond("tenant-a", 83, 16));
        assert!(!log.behind_beyond("tenant-a", 99, 16));
        assert!(log.behind_beyond("tenant-b", 99, 16), "another tenant's head is not this one's");
        assert_eq!(log.index_entries("tenant-a", Duration::from_millis(20)).await?, 100);
        assert!(!log.has_unindexed("tenant-a").await?, "every entry is indexed");
        db.close().await;
        test_db.drop().await
    }

    /// Entries appended by script (the all-in-one gate's decisions) reach
    /// the person and estate indexes from what the log kept in memory, and
    /// entries of another writer in between from the database: the indexes
    /// end up holding exactly the stored entries' persons and estates.
    #[tokio::test]
    async fn the_indexes_hold_the_stored_entries_whichever_way_they_were_read() -> anyhow::Result<()> {
        use estate_store::outbox::AuditSink;
        let dir = tempfile::tempdir()?;
        let (test_db, db, log) = with_log(dir.path()).await?;
        let other = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 100_000, 3600);
        let direct =
            |from: usize, to: usize| -> Vec<_> { events(from, to).into_iter().map(|(_, e)| log.prepare(e)).collect() };
        let stored = |sql: &'static str| {
            let db = db.clone();
            async move {
                let mut rows: Vec<(String, i64)> =
                    sqlx::query_as::<Any, (String, i64)>(sql).fetch_all(db.pool()).await?;
                rows.sort();
                anyhow::Ok(rows)
            }
        };
        log.append_committed(&db, &direct(0, 40)).await?;
        log.append_committed(&db, &direct(40, 100)).await?;
        assert_eq!(log.index_entries_by("tenant-a", 7, 5, Pace::Flat).await?, 100);
        log.append_committed(&db, &direct(100, 130)).await?;
        other.append(&events(130, 150)).await?;
        log.append_committed(&db, &direct(150, 190)).await?;
        log.append_committed(&db, &direct(190, 200)).await?;
        assert_eq!(log.index_entries_by("tenant-a", 16, 5, Pace::Spread(Duration::from_millis(20))).await?, 100);
        assert_eq!(log.index_entries("tenant-a", Duration::from_millis(20)).await?, 0);
        assert_eq!(log.indexed_below("tenant-a").await?, 200);
        assert_eq!(
            listed_all(&db, &log, IndexOf::Person).await?,
            stored("SELECT person_pseudonym, idx FROM audit_entries WHERE person_pseudonym <> ''").await?
        );
        assert_eq!(
            listed_all(&db, &log, IndexOf::Estate).await?,
            stored("SELECT estate_id, idx FROM audit_entries").await?
        );
        assert_eq!(
            all(&entry_query("tenant-a", "", "p-bo", "", 0, i64::MAX), &db, &log, 9).await?,
            expected("p-bo", None, 200)
        );
        db.close().await;
        test_db.drop().await
    }
}
