//! A span for every database statement. sqlx reports each statement it ran
//! as an event (target `sqlx::query`: a summary of the SQL, rows, elapsed
//! time) when it finishes; this layer turns each such event into an
//! OpenTelemetry client span that started `elapsed` ago, ended now, and is a
//! child of the span the statement ran in — the RPC's, on PostgreSQL.
//! (sqlx runs SQLite statements on a worker thread that has no span: there
//! the `db.transaction` spans of `estate_store` show the database work.)
//!
//! The span is named by the statement's verb and table (`SELECT credentials`)
//! and keeps sqlx's summary of the SQL (its first words); parameter values
//! are never in either, so no secret reaches a trace.

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer};
use std::time::{Duration, SystemTime};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// The tracing target sqlx reports statements on.
pub const SQLX_TARGET: &str = "sqlx::query";

/// The layer; see the module documentation.
#[derive(Debug)]
pub struct DbQuerySpans<T> {
    tracer: T,
}

impl<T> DbQuerySpans<T> {
    /// Statement spans made with `tracer`.
    pub fn new(tracer: T) -> Self {
        Self { tracer }
    }
}

#[derive(Default)]
struct Statement {
    summary: String,
    sql: String,
    rows_affected: u64,
    rows_returned: u64,
    elapsed_secs: f64,
}

impl Visit for Statement {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => value.clone_into(&mut self.summary),
            "db.statement" => value.trim().clone_into(&mut self.sql),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "rows_affected" => self.rows_affected = value,
            "rows_returned" => self.rows_returned = value,
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" && self.summary.is_empty() {
            self.summary = format!("{value:?}").trim_matches('"').to_owned();
        }
    }
}

/// The statement's verb and first table, e.g. "SELECT outbox_events".
fn span_name(summary: &str) -> String {
    let mut words = summary.split_whitespace();
    let verb = words.next().unwrap_or("SQL").to_ascii_uppercase();
    let table = summary
        .split_whitespace()
        .skip_while(|w| !matches!(w.to_ascii_uppercase().as_str(), "FROM" | "INTO" | "UPDATE"))
        .nth(1);
    match table {
        Some(t) => format!("{verb} {}", t.trim_matches(|c: char| !c.is_alphanumeric() && c != '_')),
        None => verb,
    }
}

impl<S, T> Layer<S> for DbQuerySpans<T>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != SQLX_TARGET {
            return;
        }
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let parent = tracing::Span::current().context();
        if !parent.span().span_context().is_valid() {
            // Background work outside any trace: nothing to attach it to.
            return;
        }
        let mut statement = Statement::default();
        event.record(&mut statement);
        let end = SystemTime::now();
        let elapsed = Duration::try_from_secs_f64(statement.elapsed_secs).unwrap_or_default();
        let start = end.checked_sub(elapsed).unwrap_or(end);
        // sqlx's summary is the first four words; the table is named from
        // the whole text (placeholders only, no values) when it gave one.
        let name = span_name(if statement.sql.is_empty() { &statement.summary } else { &statement.sql });
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(vec![
                KeyValue::new("db.query.summary", statement.summary),
                KeyValue::new("db.response.returned_rows", i64::try_from(statement.rows_returned).unwrap_or(i64::MAX)),
                KeyValue::new("db.response.affected_rows", i64::try_from(statement.rows_affected).unwrap_or(i64::MAX)),
            ])
            .start_with_context(&self.tracer, &parent);
        span.end_with_timestamp(end);
    }
}

#[cfg(test)]
mod tests {
    use super::span_name;

    #[test]
    fn span_names_are_the_verb_and_the_table() {
        assert_eq!(span_name("SELECT seq, payload FROM outbox_events …"), "SELECT outbox_events");
        assert_eq!(span_name("INSERT INTO gate_status (tenant_id …"), "INSERT gate_status");
        assert_eq!(span_name("UPDATE credentials SET status …"), "UPDATE credentials");
        assert_eq!(span_name("BEGIN"), "BEGIN");
        assert_eq!(span_name(""), "SQL");
    }
}
