//! `audit-bench`: append throughput of the audit log against a plain batched
//! INSERT baseline measured in the same run on the same database, then a full
//! regulator export over real gRPC and its offline verification, with the peak
//! memory of this process. Prints figures for BENCHMARKS.md.
//!
//! `cargo run --release -p estate-bench --bin audit-bench -- --entries 100000`
//! (PostgreSQL at ESTATE_BENCH_DATABASE_URL or the local default; `--sqlite`
//! for the embedded engine).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use estate_audit::AuditLog;
use estate_auth::Principal;
use estate_proto::audit::audit_service_client::AuditServiceClient;
use estate_proto::audit::{ExportRequest, QueryEntriesRequest, export_record::Record};
use estate_proto::common::{Actor, ActorKind, AuditEvent};
use estate_store::sqlx::{self, Any, Connection};
use prost::Message;
use std::io::Write;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// Entries to append and export.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Events per batch (the relay's default is 500).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Use SQLite in a temporary directory instead of PostgreSQL.
    #[arg(long)]
    sqlite: bool,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// People the events name, in turn.
const PERSONS: usize = 5000;

fn event(tenant: &str, i: usize) -> (Vec<u8>, AuditEvent) {
    let (seconds, nanos) = estate_core::ms_to_timestamp_parts(estate_core::now_ms());
    let e = AuditEvent {
        event_id: format!("00000000-0000-7000-8000-{i:012x}"),
        tenant_id: tenant.to_owned(),
        estate_id: "0190a5f0-0000-7000-8000-000000000001".into(),
        actor: Some(Actor { kind: ActorKind::Gate as i32, id: "0190a5f0-0000-7000-8000-00000000000a".into() }),
        action: "credential.verify".into(),
        object_type: "credential".into(),
        object_id: uuid::Uuid::now_v7().to_string(),
        person_pseudonym: format!("psn_{:032x}", i % PERSONS),
        occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
        request_id: uuid::Uuid::new_v4().to_string(),
        attributes: [("outcome".to_owned(), "VERIFY_OUTCOME_VALID".to_owned()), ("kind".to_owned(), "card".to_owned())]
            .into_iter()
            .collect(),
        concerns_minor: false,
        source: "credentials".into(),
    };
    (e.encode_to_vec(), e)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let base = std::env::var("ESTATE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db_name = format!("estate_bench_{}", uuid::Uuid::new_v4().simple());
    let url = if args.sqlite {
        format!("sqlite://{}", dir.path().join("bench.db").display())
    } else {
        sqlx::any::install_default_drivers();
        let mut c = sqlx::AnyConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut c).await?;
        let (prefix, _) = base.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("database url has no /database"))?;
        format!("{prefix}/{db_name}")
    };

    let mut settings = estate_config::Settings::load_with_env(None, Vec::new())?;
    settings.data_dir = dir.path().to_path_buf();
    settings.listen = "127.0.0.1:0".parse()?;
    settings.database.url = Some(url.clone());
    settings.database.statement_timeout_ms = 0;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    runtime.db.migrate_outbox().await?;
    estate_identity::migrate(&runtime.db).await?;
    estate_audit::migrate(&runtime.db).await?;
    let db = runtime.db.clone();
    let tenant = uuid::Uuid::now_v7().to_string();
    sqlx::query::<Any>("INSERT INTO tenants (id, name, jurisdiction_code, status, created_at, updated_at) VALUES ($1, 'Bench', '120101', 'active', 0, 0)")
        .bind(&tenant)
        .execute(db.pool())
        .await?;
    // The event's bytes as the log keeps them (migration 5004).
    let bytes_type = if args.sqlite { "BLOB" } else { "BYTEA" };
    sqlx::query::<Any>(sqlx::AssertSqlSafe(format!("CREATE TABLE bench_plain (tenant_id TEXT NOT NULL, idx BIGINT NOT NULL, event_id TEXT NOT NULL, event {bytes_type} NOT NULL, PRIMARY KEY (tenant_id, idx))")))
        .execute(db.pool())
        .await?;

    println!(
        "audit-bench: {} entries, batches of {}, {}",
        args.entries,
        args.batch,
        if args.sqlite { "SQLite" } else { "PostgreSQL" }
    );
    // Events are made batch by batch (deterministically, so the baseline and
    // the log get the same ones), so the process holds no copy of the log.
    let batch_of = |b: usize| -> Vec<(Vec<u8>, AuditEvent)> {
        (b * args.batch..((b + 1) * args.batch).min(args.entries)).map(|i| event(&tenant, i)).collect()
    };
    let batches = args.entries.div_ceil(args.batch);
    let sample = batch_of(0);
    println!(
        "  event size: {} bytes on average",
        sample.iter().map(|e| e.0.len()).sum::<usize>() / sample.len().max(1)
    );

    // Baseline: the same rows and bytes, plain multi-row INSERTs (400 rows a
    // statement, as the log writes), one transaction per batch; no hashing, no
    // chain, no duplicate check.
    let t = Instant::now();
    for b in 0..batches {
        let chunk = batch_of(b);
        let mut tx = db.begin().await?;
        for (c, rows) in chunk.chunks(400).enumerate() {
            let values: Vec<String> = (0..rows.len())
                .map(|i| format!("(${}, ${}, ${}, ${})", i * 4 + 1, i * 4 + 2, i * 4 + 3, i * 4 + 4))
                .collect();
            let sql = format!("INSERT INTO bench_plain (tenant_id, idx, event_id, event) VALUES {}", values.join(", "));
            let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql));
            for (i, (raw, e)) in rows.iter().enumerate() {
                q = q
                    .bind(tenant.clone())
                    .bind(i64::try_from(b * args.batch + c * 400 + i)?)
                    .bind(e.event_id.clone())
                    .bind(raw.clone());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    let plain = args.entries as f64 / t.elapsed().as_secs_f64();
    println!("  plain batched INSERT:   {plain:>10.0} rows/s");

    let log = AuditLog::new(db.clone(), runtime.keys.audit_signing.clone(), 1000, 60);
    let t = Instant::now();
    for b in 0..batches {
        log.append(&batch_of(b)).await?;
    }
    let audit = args.entries as f64 / t.elapsed().as_secs_f64();
    println!("  audit append:           {audit:>10.0} entries/s  ({:.2} x the baseline)", audit / plain);
    let rss_after_append = peak_rss_mib();
    // After a bulk load, refresh planner statistics as autovacuum would in
    // steady state (it runs at most once a minute); otherwise PostgreSQL plans
    // the export's page queries for an empty table.
    if !args.sqlite {
        sqlx::query::<Any>("ANALYZE audit_entries").execute(db.pool()).await?;
    }

    // Export over real gRPC, streamed to a file, then verified offline.
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(estate_audit::server(&runtime, log.clone()));
    let app = estate_runtime::GrpcApp::build(&runtime, routes, &[estate_audit::SERVICE_NAME]).await?;
    let port = app.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    let regulator =
        runtime.tokens.issue(Principal::Regulator { jurisdiction_codes: vec!["120000".into()] }, "bench", 3600)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
    let mut client = AuditServiceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut req = tonic::Request::new(ExportRequest { tenant_id: tenant.clone(), ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {}", regulator.token).parse()?);
    let path = dir.path().join("export.jsonl");
    let t = Instant::now();
    let mut stream = client.export(req).await?.into_inner();
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut exported = 0usize;
    while let Some(rec) = stream.message().await? {
        if matches!(rec.record, Some(Record::Entry(_))) {
            exported += 1;
        }
        estate_audit_bundle::write_record(&mut file, &rec)?;
    }
    file.flush()?;
    let export_secs = t.elapsed().as_secs_f64();
    let size_mib = std::fs::metadata(&path)?.len() as f64 / (1024.0 * 1024.0);
    println!(
        "  export (gRPC stream):   {:>10.0} entries/s  ({exported} entries, {size_mib:.0} MiB bundle, {export_secs:.1} s)",
        exported as f64 / export_secs
    );
    let rss_after_export = peak_rss_mib();

    // The person and estate indexes brought up to the head, then queries
    // by person (the resident's access report and operators' queries read
    // the person index) against pages of the whole log (the primary key's
    // range, no index of ours): the same page size, the same server.
    let t = Instant::now();
    let indexed = log.index_entries_now(&tenant).await?;
    println!("  index (person, estate): {:>10.0} entries/s", indexed as f64 / t.elapsed().as_secs_f64());
    let operator = runtime.tokens.issue(
        Principal::Operator { tenant_id: tenant.clone(), estate_ids: Vec::new() },
        "bench",
        3600,
    )?;
    let persons = args.entries.min(PERSONS);
    let rounds = 500usize;
    for (label, by_person) in [("page of the whole log", false), ("query by person", true)] {
        let mut times = Vec::with_capacity(rounds);
        let mut got = 0usize;
        for r in 0..rounds {
            let (person, page_token) = if by_person {
                // Spread over the people, so the pages come from all over the log.
                (format!("psn_{:032x}", (r * 7919) % persons), String::new())
            } else {
                let after = (r * 7919) % args.entries.max(1);
                (String::new(), URL_SAFE_NO_PAD.encode(format!("a1:{after}")))
            };
            let mut req = tonic::Request::new(QueryEntriesRequest {
                person_pseudonym: person,
                page_size: 20,
                page_token,
                ..Default::default()
            });
            req.metadata_mut().insert("authorization", format!("Bearer {}", operator.token).parse()?);
            let t = Instant::now();
            got += client.query_entries(req).await?.into_inner().entries.len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "  {label:<22}  p50 {:>6.2} ms  p99 {:>6.2} ms  ({rounds} pages of up to 20, {got} entries)",
            times[rounds / 2],
            times[rounds * 99 / 100]
        );
    }
    let _ = stop_tx.send(());
    let _ = server.await;

    let key = runtime.keys.audit_signing.clone();
    let keys = [(key.key_id().to_owned(), key.public_key_bytes())].into_iter().collect();
    let t = Instant::now();
    let bundle = estate_audit_bundle::Bundle::read(std::io::BufReader::new(std::fs::File::open(&path)?))?;
    let verified = bundle.verify(&keys, None)?;
    let verify_secs = t.elapsed().as_secs_f64();
    println!(
        "  offline verify:         {:>10.0} entries/s  ({} entries, {verify_secs:.1} s)",
        verified.entries as f64 / verify_secs,
        verified.entries
    );
    println!(
        "  peak RSS: {rss_after_append:.0} MiB after append, {rss_after_export:.0} MiB after export, {:.0} MiB after verify",
        peak_rss_mib()
    );

    runtime.db.close().await;
    if !args.sqlite {
        let mut c = sqlx::AnyConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
            .execute(&mut c)
            .await?;
    }
    Ok(())
}
