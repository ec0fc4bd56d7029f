//! Trace propagation: one gate decision is one trace, from the gate
//! controller's span (sent as a W3C `traceparent`) through the gate service's
//! RPC span and its hot-path cache lookup to the audit relay appending the
//! decision to the log — collected by an in-process span exporter.
//!
//! Its own test binary: it installs the process-wide tracing subscriber.

mod support;

use estate_proto::credentials::*;
use estate_proto::gate::*;
use estate_test_support::TestMesh;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(batch);
        }
        async { Ok(()) }
    }
}

impl Collected {
    fn of_trace(&self, trace_id: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .map(|s| s.iter().filter(|d| d.span_context.trace_id().to_string() == trace_id).cloned().collect())
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gate_decision_is_one_trace_from_the_gate_to_the_audit_log() -> anyhow::Result<()> {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(collected.clone()).build();
    estate_telemetry::set_propagator();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("estate-e2e")))
        .with(estate_telemetry::db_query_spans(provider.tracer("estate-e2e")))
        .try_init()?;

    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Traced", "120101").await?;
    mesh.credentials(&w.operator_token)?
        .issue_credential(IssueCredentialRequest {
            person_id: w.person.id.clone(),
            estate_ids: vec![w.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "7A7A7A7A".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        })
        .await?;

    // The gate controller's own span; its traceparent travels with the call.
    let controller = tracing::info_span!("gate.controller.present");
    let traceparent = controller
        .in_scope(estate_telemetry::current_traceparent)
        .ok_or_else(|| anyhow::anyhow!("no traceparent for the controller span"))?;
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace_id, controller_span_id) = (parts[1].to_owned(), parts[2].to_owned());
    let mut req = tonic::Request::new(DecideRequest {
        presented: Some(decide_request::Presented::Card(PresentedCard {
            uid: "7A7A7A7A".into(),
            facility_code: String::new(),
        })),
        gate_id: String::new(),
    });
    req.metadata_mut().insert("traceparent", traceparent.parse()?);
    let decision = mesh.gate(&gate(&mesh, &w)?)?.decide(req).await?.into_inner();
    assert_eq!(decision.verdict, Verdict::Admit as i32);

    // The relay appends the decision within its interval.
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = collected.of_trace(&trace_id);
        if spans.iter().any(|s| s.name == "audit.append") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let named = |name: &str| spans.iter().find(|s| s.name == name).cloned();
    let server =
        named("/estate.gate.v1.GateService/Decide").ok_or_else(|| anyhow::anyhow!("no RPC span: {spans:?}"))?;
    let handler = named("gate.decide").ok_or_else(|| anyhow::anyhow!("no handler span"))?;
    let cache = named("gate.cache.get");
    let append = named("audit.append").ok_or_else(|| anyhow::anyhow!("no audit span"))?;
    // One trace, parented as the call went: controller -> gate RPC -> handler
    // -> cache lookup (a span when the view is in Redis; in this process it
    // is a map lookup and has none); handler -> audit relay.
    assert_eq!(server.parent_span_id.to_string(), controller_span_id);
    assert!(server.parent_span_is_remote, "the RPC span continues a remote (propagated) context");
    assert_eq!(handler.parent_span_id, server.span_context.span_id());
    if std::env::var(estate_test_support::REDIS_ENV).is_ok() {
        let cache = cache.ok_or_else(|| anyhow::anyhow!("no cache span with the view in Redis"))?;
        assert_eq!(cache.parent_span_id, handler.span_context.span_id());
    } else {
        assert!(cache.is_none(), "a span for an in-process map lookup");
    }
    assert_eq!(append.parent_span_id, handler.span_context.span_id());
    assert!(server.attributes.iter().any(|kv| kv.key.as_str() == "rpc.grpc.status_code"));

    // Database and Redis calls are spans of the call that made them. The
    // card's issue: its write transaction (both engines); on PostgreSQL each
    // statement (sqlx runs SQLite's on a worker thread outside any span);
    // with Redis, the change announced on the bus.
    let all = collected.0.lock().map(|s| s.clone()).unwrap_or_default();
    let issue = all
        .iter()
        .find(|s| s.name == "/estate.credentials.v1.CredentialService/IssueCredential")
        .ok_or_else(|| anyhow::anyhow!("no IssueCredential span"))?;
    let in_issue: Vec<&SpanData> =
        all.iter().filter(|s| s.span_context.trace_id() == issue.span_context.trace_id()).collect();
    let tx = in_issue
        .iter()
        .find(|s| s.name == "db.transaction")
        .ok_or_else(|| anyhow::anyhow!("no db.transaction span in the issue's trace"))?;
    assert!(tx.attributes.iter().any(|kv| kv.key.as_str() == "db.system"));
    if mesh.db_url().starts_with("postgres") {
        let statements: Vec<&str> = in_issue
            .iter()
            .filter(|s| s.span_kind == opentelemetry::trace::SpanKind::Client && s.name.contains("credentials"))
            .map(|s| s.name.as_ref())
            .collect();
        assert!(statements.contains(&"INSERT credentials"), "statement spans: {statements:?}");
    }
    if std::env::var(estate_test_support::REDIS_ENV).is_ok() {
        assert!(in_issue.iter().any(|s| s.name == "PUBLISH"), "no Redis span in the issue's trace");
    }
    mesh.stop().await?;
    let _ = provider.shutdown();
    Ok(())
}
