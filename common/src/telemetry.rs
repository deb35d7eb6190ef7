//! Logs and traces.
//!
//! * Logs: JSON lines on stdout through `tracing`, filtered by `RUST_LOG` (any
//!   `tracing-subscriber` directive) or, failing that, the legacy `LOG_LEVEL` (`INFO`, `debug`…).
//! * Traces: exported with OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//!   (`OTEL_SERVICE_NAME` defaults to the component name).
//! * Trace context crosses NATS as a W3C `traceparent` header: [`inject_context`] when
//!   publishing, [`extract_context`] when consuming, so one trace spans fetch → enrich; the
//!   writer's batch span is linked ([`link_from`]) to every message it writes.
//!
//! [`init`] returns a [`TelemetryGuard`]; dropping it flushes the spans still buffered.
//! Call [`init`] before starting the Tokio runtime and drop the guard after it has stopped.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use url::Url;

use crate::config::Reader;

/// `RUST_LOG`/`LOG_LEVEL`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// An `EnvFilter` directive, validated.
    pub filter: String,
    /// The OTLP/HTTP base URL (`/v1/traces` is appended).
    pub otlp_endpoint: Option<Url>,
    pub service_name: String,
}

impl TelemetrySettings {
    pub fn read(r: &mut Reader<'_>, component: &str) -> Self {
        let (key, filter) = match (r.string("RUST_LOG"), r.string("LOG_LEVEL")) {
            (Some(f), _) => ("RUST_LOG", f),
            (None, Some(level)) => ("LOG_LEVEL", level.to_ascii_lowercase()),
            (None, None) => ("RUST_LOG", "info".to_string()),
        };
        let filter = match EnvFilter::try_new(&filter) {
            Ok(_) => filter,
            Err(e) => {
                r.problem(
                    key,
                    format!("is not a log level or filter ({e}): {filter:?}"),
                    format!("for example {key}=info or RUST_LOG=info,{component}=debug"),
                );
                "info".to_string()
            }
        };
        let otlp_endpoint = r.http_url("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4318");
        let service_name = r
            .string("OTEL_SERVICE_NAME")
            .unwrap_or_else(|| format!("tardis-{component}"));
        Self {
            filter,
            otlp_endpoint,
            service_name,
        }
    }
}

/// Flushes and shuts down the trace exporter when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("tardis: flushing traces failed: {e}");
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global tracing subscriber is already installed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// The URL spans are posted to: `<endpoint>/v1/traces`.
pub fn traces_url(endpoint: &Url) -> String {
    format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'))
}

/// Installs the global subscriber: JSON logs, and OTLP traces when configured.
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    crate::install_crypto_provider();
    let filter = EnvFilter::try_new(with_quiet_libraries(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true)
        .with_writer(std::io::stdout);
    let registry = tracing_subscriber::registry().with(filter).with(logs);
    let Some(endpoint) = &settings.otlp_endpoint else {
        registry.try_init()?;
        return Ok(TelemetryGuard { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .with_headers(Default::default())
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("tardis");
    registry
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// `filter` plus `async_nats=error`, which keeps the NATS client from logging each connection
/// event a second time (Tardis logs them itself as `nats connection` / `nats event`) — only
/// when `filter` does not name `async_nats` and has a default level (`info`, `warn`, ...) the
/// directive can only lower; `off`, or a filter of targets only, is left as it is.
pub fn with_quiet_libraries(filter: &str) -> String {
    let has_default_level = filter.split(',').map(str::trim).any(|d| {
        ["trace", "debug", "info", "warn", "error"].contains(&d.to_ascii_lowercase().as_str())
    });
    if filter.contains("async_nats") || !has_default_level {
        return filter.to_string();
    }
    format!("{filter},async_nats=error")
}

/// Writes the W3C trace context of `cx` (`traceparent`, `tracestate`) into NATS headers.
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut async_nats::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Writes the trace context of the current `tracing` span into NATS headers.
pub fn inject_current(headers: &mut async_nats::HeaderMap) {
    inject_context(&tracing::Span::current().context(), headers);
}

/// Reads the W3C trace context from NATS headers (an empty context when there is none).
pub fn extract_context(headers: Option<&async_nats::HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace context carried in `headers`.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    let cx = extract_context(headers);
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "span parent not set");
    }
}

/// Links `span` to the trace context carried in `headers`, when there is one: for a span
/// with many parents (a writer batch of many messages).
pub fn link_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = extract_context(headers);
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, Tracer};

    #[test]
    fn the_libraries_that_repeat_tardis_logs_are_quiet_unless_named() {
        assert_eq!(with_quiet_libraries("info"), "info,async_nats=error");
        assert_eq!(
            with_quiet_libraries("warn,writer=debug"),
            "warn,writer=debug,async_nats=error"
        );
        // Named, off, or no default level: untouched (never louder than asked).
        for filter in ["debug,async_nats=debug", "off", "writer=debug"] {
            assert_eq!(with_quiet_libraries(filter), filter);
        }
        assert!(EnvFilter::try_new(with_quiet_libraries("warn,writer=debug")).is_ok());
    }

    #[test]
    fn trace_context_round_trips_through_nats_headers() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let span = tracer.start("publish");
        let cx = opentelemetry::Context::current_with_span(span);
        let sent = cx.span().span_context().clone();
        assert!(sent.is_valid());

        let mut headers = async_nats::HeaderMap::new();
        inject_context(&cx, &mut headers);
        let traceparent = headers
            .get("traceparent")
            .expect("traceparent set")
            .as_str()
            .to_string();
        assert!(traceparent.starts_with("00-"), "{traceparent}");
        assert!(
            traceparent.contains(&sent.trace_id().to_string()),
            "{traceparent}"
        );

        let received = extract_context(Some(&headers));
        let got = received.span().span_context().clone();
        assert_eq!(got.trace_id(), sent.trace_id());
        assert_eq!(got.span_id(), sent.span_id());
        assert!(got.is_remote());
    }

    #[test]
    fn no_headers_means_no_parent() {
        let cx = extract_context(None);
        assert!(!cx.span().span_context().is_valid());
        let cx = extract_context(Some(&async_nats::HeaderMap::new()));
        assert!(!cx.span().span_context().is_valid());
    }

    #[test]
    fn log_level_falls_back_to_the_legacy_key_and_is_validated() {
        let env: std::collections::HashMap<String, String> =
            [("LOG_LEVEL".to_string(), "INFO".to_string())].into();
        let mut r = Reader::new(&env);
        let s = TelemetrySettings::read(&mut r, "writer");
        assert_eq!(s.filter, "info");
        assert_eq!(s.service_name, "tardis-writer");
        r.finish().unwrap();

        let env: std::collections::HashMap<String, String> =
            [("RUST_LOG".to_string(), "info,[=".to_string())].into();
        let mut r = Reader::new(&env);
        TelemetrySettings::read(&mut r, "writer");
        let err = r.finish().unwrap_err().to_string();
        assert!(
            err.contains("RUST_LOG: is not a log level or filter"),
            "{err}"
        );
    }

    #[test]
    fn traces_url_appends_the_signal_path() {
        let u = Url::parse("http://collector:4318/").unwrap();
        assert_eq!(traces_url(&u), "http://collector:4318/v1/traces");
    }
}
