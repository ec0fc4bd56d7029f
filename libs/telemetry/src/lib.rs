//! Logs and traces of a mesh process.
//!
//! Logs go to stderr as text or JSON, filtered by `telemetry.log_filter`.
//! When `telemetry.otlp_endpoint` is set, spans are also exported over
//! OTLP/gRPC. Log fields never carry secrets, PINs, phone numbers, templates or
//! images: services record ids and pseudonyms only.

pub mod db;

use estate_config::TelemetrySettings;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Errors while setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("telemetry.log_filter is not a valid filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("cannot set up the OTLP exporter: {0}")]
    Otlp(String),
}

/// Flushes and stops trace export when dropped.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber for `service_name`. A second call in the
/// same process (tests starting several servers) keeps the first subscriber.
pub fn init(settings: &TelemetrySettings, service_name: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&settings.log_filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt_layer = if settings.log_format == "json" {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        // Colours only on a terminal: escape codes are noise in a log file
        // or a pod's log, and the layer writes the fields of every span it
        // enables as it opens (each call's span included), so colouring
        // them cost every call (BENCHMARKS.md, session 22).
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).boxed()
    };

    let mut guard = TelemetryGuard::default();
    // Spans go to OTLP at the log filter's levels; statement events of sqlx
    // (debug) reach only the layer that turns them into spans.
    let (otel_layer, db_layer) = match &settings.otlp_endpoint {
        Some(endpoint) => {
            let provider = otlp_provider(endpoint, service_name)?;
            let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, service_name);
            guard.provider = Some(provider);
            let span_filter =
                EnvFilter::try_new(&settings.log_filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer.clone()).with_filter(span_filter)),
                Some(db_query_spans(tracer)),
            )
        }
        None => (None, None),
    };

    set_propagator();
    let _already_set =
        tracing_subscriber::registry().with(fmt_layer.with_filter(filter)).with(otel_layer).with(db_layer).try_init();
    Ok(guard)
}

#[cfg(feature = "otlp")]
fn otlp_provider(endpoint: &str, service_name: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.to_owned())
        .build()
        .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service_name).build())
        .build())
}

#[cfg(not(feature = "otlp"))]
fn otlp_provider(_endpoint: &str, _service_name: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    Err(TelemetryError::Otlp("this binary was built without OTLP export (feature `otlp`)".into()))
}

/// The layer making a span of every database statement (see [`db`]), with
/// its filter: sqlx's statement events only.
pub fn db_query_spans<S, T>(tracer: T) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    db::DbQuerySpans::new(tracer)
        .with_filter(tracing_subscriber::filter::Targets::new().with_target(db::SQLX_TARGET, tracing::Level::DEBUG))
}

/// Installs the W3C trace-context propagator (`traceparent`) process-wide.
pub fn set_propagator() {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
}

/// The W3C `traceparent` of the current span, if it belongs to a sampled
/// trace (what the outbox stores, so the audit relay's span joins the trace
/// of the change it relays).
pub fn current_traceparent() -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// The context a `traceparent` names, to parent a span on (`set_parent`).
pub fn context_of(traceparent: &str) -> opentelemetry::Context {
    let carrier: std::collections::HashMap<String, String> =
        [("traceparent".to_owned(), traceparent.to_owned())].into_iter().collect();
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// Makes `span` a child of the trace named by `traceparent` (no-op when it
/// does not parse or tracing to OpenTelemetry is off).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let _ = span.set_parent(context_of(traceparent));
}
