//! Telemetry with Istio's names and labels, so existing dashboards work:
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`,
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`; the
//! workload certificate's remaining lifetime as Istio's agent exports it,
//! `istio_agent_cert_expiry_seconds`; and a JSON access log line per
//! request or TCP connection.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Buf;

use crate::peers::WorkloadLabels;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Envoy's default histogram buckets, which Istio's histograms use unless
/// configured otherwise: milliseconds for durations, bytes for sizes.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The standard Istio labels of a request or connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

impl TrafficLabels {
    /// `mutual_tls` or `none`, Istio's `connection_security_policy`.
    pub fn security(mtls: bool) -> &'static str {
        if mtls { "mutual_tls" } else { "none" }
    }

    /// The labels of a request or connection from `source` to
    /// `destination` (each side's workload labels), with `principals`
    /// (source, destination) and `service`; the response code and flags
    /// are filled in later.
    pub fn new(
        reporter: &'static str,
        source: WorkloadLabels,
        destination: WorkloadLabels,
        (source_principal, destination_principal): (String, String),
        service: [String; 3],
        (request_protocol, mtls): (&'static str, bool),
    ) -> TrafficLabels {
        let [
            destination_service,
            destination_service_name,
            destination_service_namespace,
        ] = service;
        TrafficLabels {
            reporter,
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal,
            source_app: source.app,
            source_version: source.version,
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            destination_workload: destination.workload,
            destination_workload_namespace: destination.namespace,
            destination_principal,
            destination_app: destination.app,
            destination_version: destination.version,
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_service,
            destination_service_name,
            destination_service_namespace,
            request_protocol,
            response_code: String::new(),
            // Envoy's "no flag" (`outcome::Flag::None`, which imports this
            // module's access record).
            response_flags: "-".to_string(),
            connection_security_policy: TrafficLabels::security(mtls),
        }
    }
}

/// Splits `spiffe://td/ns/NS/sa/SA` into (namespace, service account).
pub fn principal_parts(principal: &str) -> (String, String) {
    let p = principal.strip_prefix("spiffe://").unwrap_or(principal);
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [_, "ns", ns, "sa", sa] => (ns.to_string(), sa.to_string()),
        _ => ("unknown".to_string(), "unknown".to_string()),
    }
}

/// Which source of the proxy's files: `config` (the configuration paths
/// and the mesh config file) or `certs` (the workload's certificates).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<TrafficLabels, Counter>,
    durations: Family<TrafficLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<TrafficLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<TrafficLabels, Histogram, fn() -> Histogram>,
    request_messages: Family<TrafficLabels, Counter>,
    response_messages: Family<TrafficLabels, Counter>,
    tcp_opened: Family<TrafficLabels, Counter>,
    tcp_closed: Family<TrafficLabels, Counter>,
    tcp_sent: Family<TrafficLabels, Counter>,
    tcp_received: Family<TrafficLabels, Counter>,
    config_rejected: Counter,
    dns_requests: Counter,
    dns_upstream_requests: Counter,
    dns_upstream_failures: Counter,
    source_up: Family<SourceLabels, Gauge>,
    source_lost: Family<SourceLabels, Counter>,
    /// Seconds left before the workload certificate expires, computed at
    /// each scrape from `cert_not_after`.
    cert_expiry: Gauge<f64, AtomicU64>,
    /// The certificate in use's `notAfter`, Unix seconds.
    cert_not_after: AtomicI64,
    access: crate::recent::AccessLogger,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    /// The metrics, with a `meshward_config_source_up` series for each of
    /// `sources` (up at start).
    pub fn new(access: crate::recent::AccessLogger, sources: &[&'static str]) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<TrafficLabels, Counter>::default();
        let histograms = || {
            Family::<TrafficLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            )
        };
        let (durations, request_bytes, response_bytes) = (histograms(), histograms(), histograms());
        let request_messages = Family::<TrafficLabels, Counter>::default();
        let response_messages = Family::<TrafficLabels, Counter>::default();
        let tcp_opened = Family::<TrafficLabels, Counter>::default();
        let tcp_closed = Family::<TrafficLabels, Counter>::default();
        let tcp_sent = Family::<TrafficLabels, Counter>::default();
        let tcp_received = Family::<TrafficLabels, Counter>::default();
        let config_rejected = Counter::default();
        let (dns_requests, dns_upstream_requests, dns_upstream_failures) =
            (Counter::default(), Counter::default(), Counter::default());
        let source_up = Family::<SourceLabels, Gauge>::default();
        let source_lost = Family::<SourceLabels, Counter>::default();
        let cert_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            durations.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "HTTP request body sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "HTTP response body sizes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages from the client",
            request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages from the server",
            response_messages.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream peer on TCP connections",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream peer on TCP connections",
            tcp_received.clone(),
        );
        registry.register(
            "meshward_config_rejected",
            "Configuration or certificate changes refused",
            config_rejected.clone(),
        );
        // The DNS proxy's, named as Istio's agent names them.
        registry.register(
            "istio_agent_dns_requests",
            "DNS queries the DNS proxy received",
            dns_requests.clone(),
        );
        registry.register(
            "istio_agent_dns_upstream_requests",
            "DNS queries the DNS proxy forwarded to an upstream name server (one per server tried)",
            dns_upstream_requests.clone(),
        );
        registry.register(
            "istio_agent_dns_upstream_failures",
            "Forwarded DNS queries an upstream name server did not answer",
            dns_upstream_failures.clone(),
        );
        registry.register(
            "meshward_config_source_up",
            "1 while the source's files can be read, 0 while it is lost (missing or unreadable; the last good state is kept)",
            source_up.clone(),
        );
        registry.register(
            "meshward_config_source_lost",
            "Times the source was lost",
            source_lost.clone(),
        );
        registry.register(
            "istio_agent_cert_expiry_seconds",
            "The time remaining, in seconds, before the workload certificate expires (negative once expired)",
            cert_expiry.clone(),
        );
        for &source in sources {
            let labels = SourceLabels { source };
            source_up.get_or_create(&labels).set(1);
            let _ = source_lost.get_or_create(&labels);
        }
        Metrics {
            registry,
            requests,
            durations,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            config_rejected,
            dns_requests,
            dns_upstream_requests,
            dns_upstream_failures,
            source_up,
            source_lost,
            cert_expiry,
            cert_not_after: AtomicI64::new(0),
            access,
        }
    }

    /// The counter and histogram of one label set, to keep and reuse (a
    /// connection records many requests with the same labels).
    /// gRPC requests (`request_protocol` `grpc`) also count their messages.
    pub fn request_handles(&self, labels: &TrafficLabels) -> RequestHandles {
        RequestHandles {
            count: self.requests.get_or_create_owned(labels),
            duration: self.durations.get_or_create_owned(labels),
            request_bytes: self.request_bytes.get_or_create_owned(labels),
            response_bytes: self.response_bytes.get_or_create_owned(labels),
            messages: (labels.request_protocol == GRPC).then(|| {
                (
                    self.request_messages.get_or_create_owned(labels),
                    self.response_messages.get_or_create_owned(labels),
                )
            }),
        }
    }

    /// A query reached the DNS proxy.
    pub fn dns_request(&self) {
        self.dns_requests.inc();
    }

    /// A query was sent to an upstream name server.
    pub fn dns_upstream_request(&self) {
        self.dns_upstream_requests.inc();
    }

    /// An upstream name server did not answer a query.
    pub fn dns_upstream_failure(&self) {
        self.dns_upstream_failures.inc();
    }

    pub fn tcp_opened(&self, labels: &TrafficLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    pub fn tcp_closed(&self, labels: &TrafficLabels, sent: u64, received: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_received.get_or_create(labels).inc_by(received);
    }

    pub fn config_rejected(&self) {
        self.config_rejected.inc();
    }

    /// Whether `source` can be read (`meshward_config_source_up`); a loss
    /// is counted in `meshward_config_source_lost_total`.
    pub fn source_up(&self, source: &'static str, up: bool) {
        let labels = SourceLabels { source };
        let gauge = self.source_up.get_or_create(&labels);
        if gauge.set(i64::from(up)) == 1 && !up {
            self.source_lost.get_or_create(&labels).inc();
        }
    }

    /// Records the `notAfter` of the certificate now in use.
    pub fn cert_in_use(&self, not_after: SystemTime) {
        self.cert_not_after
            .store(unix_seconds(not_after), Ordering::Relaxed);
    }

    pub fn access(&self) -> &crate::recent::AccessLogger {
        &self.access
    }

    /// Prometheus text format.
    pub fn encode(&self) -> String {
        let left = self
            .cert_not_after
            .load(Ordering::Relaxed)
            .saturating_sub(unix_seconds(SystemTime::now()));
        self.cert_expiry.set(left as f64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `t` as (signed) seconds since the Unix epoch.
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Istio's `request_protocol` of a gRPC request.
pub const GRPC: &str = "grpc";

/// Metric handles for one label set.
#[derive(Debug, Clone)]
pub struct RequestHandles {
    count: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    /// gRPC messages each way, for a gRPC label set.
    messages: Option<(Counter, Counter)>,
}

impl RequestHandles {
    /// Records a request: its count, its duration, the body bytes of the
    /// request and of the response, and for gRPC their messages.
    pub fn record(&self, duration: Duration, counts: Counts) {
        let (request, response) = counts.bytes;
        self.count.inc();
        self.duration.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request as f64);
        self.response_bytes.observe(response as f64);
        if let (Some((to, from)), Some((sent, received))) = (&self.messages, counts.grpc_messages) {
            to.inc_by(sent);
            from.inc_by(received);
        }
    }
}

/// What the bodies of a request and its response carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Body bytes of the request and of the response.
    pub bytes: (u64, u64),
    /// For a gRPC request, the messages of each.
    pub grpc_messages: Option<(u64, u64)>,
}

impl Counts {
    /// Body bytes only (not gRPC).
    pub fn bytes(request: u64, response: u64) -> Counts {
        Counts {
            bytes: (request, response),
            grpc_messages: None,
        }
    }

    /// Istio's `request_protocol` of the request.
    pub fn protocol(&self) -> &'static str {
        if self.grpc_messages.is_some() {
            GRPC
        } else {
            "http"
        }
    }
}

/// What a body has carried so far: bytes, and gRPC messages begun.
#[derive(Debug, Default)]
pub struct BodyCount {
    bytes: AtomicU64,
    messages: AtomicU64,
}

/// Whether a request with this `content-type` is gRPC.
pub fn is_grpc(content_type: Option<&http::HeaderValue>) -> bool {
    content_type.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Finds gRPC's length-prefixed messages (a flag byte, a 4-byte
/// big-endian length, the message) in a body's bytes as they come, in
/// data frames of any size.
#[derive(Debug, Default)]
struct GrpcFrames {
    /// Prefix bytes of the next message seen so far (0 to 4).
    prefix_seen: u8,
    /// Its length bytes, as they come.
    length: [u8; 4],
    /// Bytes of the current message still to come.
    left: u64,
}

impl GrpcFrames {
    /// Takes `data`; returns how many messages began in it.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut began = 0;
        while !data.is_empty() {
            if self.left > 0 {
                let skip = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                data = &data[skip..];
                self.left -= skip as u64;
                continue;
            }
            if self.prefix_seen > 0 {
                self.length[usize::from(self.prefix_seen) - 1] = data[0];
            }
            data = &data[1..];
            self.prefix_seen += 1;
            if self.prefix_seen == 5 {
                began += 1;
                self.prefix_seen = 0;
                self.left = u64::from(u32::from_be_bytes(self.length));
            }
        }
        began
    }
}

/// What a response body runs once it has gone: the rest of its request's
/// accounting (count, duration, sizes, access log line), given what the
/// request and the response carried.
pub type Finish = Box<dyn FnOnce(Counts) + Send + Sync>;

/// A body that counts the bytes of its data frames: a request body on its
/// way upstream into a count its response shares ([`CountedBody::new`]),
/// a response body into its own, finishing its request's accounting when
/// it has gone or is dropped half-way ([`CountedBody::recording`]), as
/// Envoy records a request at the end of its stream.
pub struct CountedBody<B> {
    body: B,
    count: Arc<BodyCount>,
    /// For a gRPC body, where its messages are.
    frames: Option<GrpcFrames>,
    /// For a response: its request's count, and what to run at the end.
    finish: Option<(Arc<BodyCount>, Finish)>,
}

impl<B> std::fmt::Debug for CountedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedBody")
            .field("count", &self.count)
            .field("response", &self.finish.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> CountedBody<B> {
    /// A request body counted into `count`; `grpc` counts its messages
    /// too.
    pub fn new(body: B, count: Arc<BodyCount>, grpc: bool) -> CountedBody<B> {
        CountedBody {
            body,
            count,
            frames: grpc.then(GrpcFrames::default),
            finish: None,
        }
    }

    /// A response body that, once it has gone, runs `finish` with
    /// `request`'s count and its own (with their messages for `grpc`).
    pub fn recording(
        body: B,
        request: Arc<BodyCount>,
        grpc: bool,
        finish: Finish,
    ) -> CountedBody<B> {
        CountedBody {
            body,
            count: Arc::default(),
            frames: grpc.then(GrpcFrames::default),
            finish: Some((request, finish)),
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let this = &mut *self;
            this.count
                .bytes
                .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            if let Some(frames) = &mut this.frames {
                // Data frames here are `Bytes`, one chunk each; 16 slices
                // leave room for any `Buf` hyper hands over.
                let mut slices = [std::io::IoSlice::new(&[]); 16];
                let n = data.chunks_vectored(&mut slices);
                let began: u64 = slices[..n].iter().map(|s| frames.feed(s)).sum();
                this.count.messages.fetch_add(began, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some((request, finish)) = self.finish.take() {
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            finish(Counts {
                bytes: (load(&request.bytes), load(&self.count.bytes)),
                grpc_messages: self
                    .frames
                    .is_some()
                    .then(|| (load(&request.messages), load(&self.count.messages))),
            });
        }
    }
}

/// Per-connection cache of request metric handles by response code and
/// flags, so the hot path builds no label set after the first request.
#[derive(Debug, Default)]
pub struct HandleCache(Mutex<Vec<(Tag, u16, &'static str, RequestHandles)>>);

/// What tells apart label sets beyond code and flags: the destination
/// service (outbound; 0 elsewhere) and the request protocol.
pub type Tag = (usize, &'static str);

impl HandleCache {
    pub fn get_or_insert(
        &self,
        tag: Tag,
        code: u16,
        flags: &'static str,
        make: impl FnOnce() -> RequestHandles,
    ) -> RequestHandles {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((.., h)) = entries
            .iter()
            .find(|(t, c, f, _)| *t == tag && *c == code && *f == flags)
        {
            return h.clone();
        }
        let h = make();
        // Bounded: a connection sees few distinct outcomes; start over if not.
        if entries.len() >= 64 {
            entries.clear();
        }
        entries.push((tag, code, flags, h.clone()));
        h
    }
}

/// One access log entry, written as one JSON line. Field names follow the
/// project's vocabulary (`src.*`, `dst.*`, `tls.mode`, `policy`, `decision`,
/// `reason`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccessRecord {
    pub time: String,
    pub kind: &'static str,
    pub reporter: &'static str,
    #[serde(rename = "src.addr")]
    pub src_addr: String,
    #[serde(rename = "src.identity")]
    pub src_identity: Option<String>,
    #[serde(rename = "dst.addr")]
    pub dst_addr: String,
    #[serde(rename = "dst.service")]
    pub dst_service: Option<String>,
    #[serde(rename = "dst.identity")]
    pub dst_identity: Option<String>,
    #[serde(rename = "tls.mode")]
    pub tls_mode: &'static str,
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    /// The request's `x-request-id` (HTTP; `null` when it has none).
    pub request_id: Option<String>,
    pub response_code: Option<u16>,
    /// Envoy's response flags (`-` for none), as in the metrics' label.
    pub response_flags: &'static str,
    pub decision: &'static str,
    pub reason: String,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub explanation: String,
    pub duration_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Where access log lines go.
#[derive(Debug)]
pub enum AccessLog {
    Off,
    Stdout(Mutex<std::io::Stdout>),
    /// Kept in memory, for the in-process tests (feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    Memory(std::sync::Arc<Mutex<Vec<String>>>),
}

impl AccessLog {
    pub fn stdout() -> AccessLog {
        AccessLog::Stdout(Mutex::new(std::io::stdout()))
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Writes one serialized [`AccessRecord`].
    pub fn write_line(&self, line: &str) {
        match self {
            AccessLog::Off => {}
            AccessLog::Stdout(out) => {
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            #[cfg(any(test, feature = "test-util"))]
            AccessLog::Memory(lines) => {
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.to_string());
            }
        }
    }
}

/// The current span, when it is enabled. `Span::current` asks the
/// subscriber; the level check before it is a static comparison, so a
/// proxy that logs at `info` (the default) pays nothing more.
pub(crate) fn current_span() -> Option<tracing::Span> {
    if !tracing::level_enabled!(tracing::Level::DEBUG) {
        return None;
    }
    let span = tracing::Span::current();
    (!span.is_disabled()).then_some(span)
}

/// RFC 3339 UTC time with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::from(SystemTime::now());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC messages of `lens` payload bytes, framed.
    fn framed(lens: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &n in lens {
            out.push(0);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, n as usize));
        }
        out
    }

    #[test]
    fn grpc_messages_are_counted_however_the_bytes_are_split() {
        let body = framed(&[0, 3, 300, 1]);
        // Whole, byte by byte, and in every two-piece split.
        assert_eq!(GrpcFrames::default().feed(&body), 4);
        let mut f = GrpcFrames::default();
        assert_eq!(body.iter().map(|b| f.feed(&[*b])).sum::<u64>(), 4);
        for cut in 0..=body.len() {
            let mut f = GrpcFrames::default();
            let (a, b) = body.split_at(cut);
            assert_eq!(f.feed(a) + f.feed(b), 4, "cut at {cut}");
        }
        // A message is counted when its prefix is complete.
        let mut f = GrpcFrames::default();
        assert_eq!(f.feed(&body[..4]), 0);
        assert_eq!(f.feed(&body[4..5]), 1);
    }

    #[tokio::test]
    async fn a_grpc_exchange_reports_its_messages_and_bytes() {
        use http_body_util::BodyExt;
        let request = Arc::new(BodyCount::default());
        let sent = framed(&[2, 2]);
        let req = CountedBody::new(
            http_body_util::Full::new(bytes::Bytes::from(sent.clone())),
            Arc::clone(&request),
            true,
        );
        assert_eq!(req.collect().await.unwrap().to_bytes().len(), sent.len());
        let seen: Arc<Mutex<Option<Counts>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        let resp = CountedBody::recording(
            http_body_util::Full::new(bytes::Bytes::from(framed(&[5]))),
            request,
            true,
            Box::new(move |c| *seen2.lock().unwrap() = Some(c)),
        );
        resp.collect().await.unwrap();
        let counts = seen.lock().unwrap().unwrap();
        assert_eq!(counts.bytes, (14, 10));
        assert_eq!(counts.grpc_messages, Some((2, 1)));
        assert_eq!(counts.protocol(), GRPC);
        assert_eq!(Counts::bytes(1, 2).protocol(), "http");
    }
}
