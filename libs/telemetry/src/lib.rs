//! Logs and traces of a mesh process.
//!
//! Logs go to stderr as text or JSON, filtered by `telemetry.log_filter`.
//! When `telemetry.otlp_endpoint` is set, spans are also exported over
//! OTLP/gRPC. Log fields never carry secrets, PINs, phone numbers, templates or
//! images: services record ids and pseudonyms only.

pub mod db;

use estate_config::TelemetrySettings;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Metadata, span};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
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
    let _already_set = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(LogFilter(filter)))
        .with(otel_layer)
        .with(db_layer)
        .try_init();
    Ok(guard)
}

/// The name of the span `estate_auth::unary_rpcs!` opens around each RPC's
/// handler, inside the server's per-call span (`grpc.server`, which names
/// the method). It is there for the trace's shape (the handler's own spans
/// and the audit append hang from it).
pub const HANDLER_SPAN: &str = "rpc.handler";

/// The log layer's filter: the configured `log_filter`, less the handler
/// span ([`HANDLER_SPAN`]).
///
/// The log layer formats the fields of every span it enables as the span
/// opens, to prefix the lines logged inside it. For the handler span that
/// repeated what the server's span already shows (service and method) and
/// cost each call about 1.7 µs of CPU, 3% of a card decision (BENCHMARKS.md,
/// session 30). Lines logged in a handler keep the server span's prefix, and
/// traces keep the handler span: the OpenTelemetry layer has its own filter.
///
/// The level hint is the configured filter's: a filter without one leaves
/// the process's maximum level at TRACE, and sqlx then prepares its
/// statement log for every query (it checks that level): a combined filter
/// that lost the hint made card decisions 70% dearer.
struct LogFilter(EnvFilter);

fn is_handler_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.name() == HANDLER_SPAN
}

impl<S: tracing::Subscriber> Filter<S> for LogFilter {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        !is_handler_span(meta) && Filter::<S>::enabled(&self.0, meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_handler_span(meta) { Interest::never() } else { Filter::<S>::callsite_enabled(&self.0, meta) }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Filter::<S>::max_level_hint(&self.0)
    }

    // The configured filter follows spans for its span-scoped directives.
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        Filter::<S>::on_new_span(&self.0, attrs, id, cx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        Filter::<S>::on_record(&self.0, id, values, cx);
    }

    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        Filter::<S>::on_enter(&self.0, id, cx);
    }

    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        Filter::<S>::on_exit(&self.0, id, cx);
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        Filter::<S>::on_close(&self.0, id, cx);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A log destination the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(log_filter: &str) -> Result<String, Box<dyn std::error::Error>> {
        let out = Captured::default();
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || sink.clone());
        let subscriber =
            tracing_subscriber::registry().with(layer.with_filter(LogFilter(EnvFilter::try_new(log_filter)?)));
        tracing::subscriber::with_default(subscriber, || {
            let server = tracing::info_span!("grpc.server", rpc.method = "/estate.gate.v1.GateService/Decide");
            let _s = server.enter();
            let handler = tracing::info_span!(HANDLER_SPAN, service = "gate", method = "decide");
            let _h = handler.enter();
            tracing::info!(code = "NotFound", "call refused");
        });
        let bytes = out.0.lock().map_err(|_| "poisoned")?.clone();
        Ok(String::from_utf8(bytes)?)
    }

    #[test]
    fn lines_logged_in_a_handler_carry_the_server_span_but_not_the_handler_span()
    -> Result<(), Box<dyn std::error::Error>> {
        for filter in ["info", "debug", "trace"] {
            let out = logged(filter)?;
            assert!(out.contains("call refused"), "{filter}: the line is logged: {out}");
            assert!(out.contains("grpc.server{"), "{filter}: with the server span: {out}");
            assert!(out.contains("GateService/Decide"), "{filter}: naming the method: {out}");
            assert!(!out.contains(HANDLER_SPAN), "{filter}: without the handler span: {out}");
        }
        Ok(())
    }

    #[test]
    fn the_log_filter_keeps_the_configured_level_hint() -> Result<(), Box<dyn std::error::Error>> {
        // Without it the process's maximum level is TRACE, and sqlx prepares
        // a statement log line for every query.
        let hint = |f: &str| -> Result<Option<LevelFilter>, Box<dyn std::error::Error>> {
            Ok(Filter::<tracing_subscriber::Registry>::max_level_hint(&LogFilter(EnvFilter::try_new(f)?)))
        };
        assert_eq!(hint("info")?, Some(LevelFilter::INFO));
        assert_eq!(hint("warn,estate_gate=debug")?, Some(LevelFilter::DEBUG));
        Ok(())
    }
}
