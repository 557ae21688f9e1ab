//! The proxy's tracing spans, observed through a log subscriber of the
//! test's own. In a test binary of its own: a subscriber set for one
//! thread shares tracing's per-callsite interest cache with every test of
//! the process, and tests running beside it could leave a callsite
//! disabled for it.

mod support;

use std::sync::{Arc, Mutex};

use support::*;

/// A `std::io::Write` into a shared buffer, for a test's log subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The spans closed so far (`FmtSpan::CLOSE` events): each one's
    /// fields, with its `name`, and the spans it was in (`parents`,
    /// outermost first).
    fn closed_spans(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["fields"]["message"] == "close")
            .map(|e| {
                let mut span = e["span"].clone();
                // The spans it was in (the closed one is not listed).
                span["parents"] = e["spans"].clone();
                span
            })
            .collect()
    }
}

/// Each connection and each request runs in a span with STYLE.md's
/// fields: inbound (`src.addr`, `src.identity`, `dst.addr`,
/// `dst.identity`, `tls.mode`, and per request `decision`, `policy`,
/// `reason`) and outbound (the destination a request was routed to).
/// A current-thread runtime: every task of the proxy runs on this thread,
/// under this test's subscriber.
#[tokio::test]
async fn connections_and_requests_run_in_spans_with_the_style_fields() {
    use tracing_subscriber::fmt::format::FmtSpan;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let h = Harness::start(&format!(
        "{}{}",
        mesh::authorization_policy(
            NS,
            "no-admin",
            "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
        ),
        mesh::service_entry(
            NS,
            "orders",
            "orders",
            "{number: 8080, name: http, protocol: HTTP}"
        ),
    ))
    .await;
    let host = "orders.production.svc.cluster.local:8080";
    // Through the outbound listener to the orders service (this same
    // proxy's inbound port, over mesh mTLS): one allowed, one denied.
    let (ok, _) = get(h.outbound, host, "/api", &[]).await.unwrap();
    let (denied, _) = get(h.outbound, host, "/admin", &[]).await.unwrap();
    assert_eq!((ok, denied), (200, 403));

    let orders = format!("spiffe://cluster.local/ns/{NS}/sa/orders");
    // The requests' spans close with their requests; the inbound
    // connection (pooled by the outbound side) stays open, so its fields
    // are read as a request span's parent.
    let spans = eventually("the requests' spans closed", || async {
        let spans = captured.closed_spans();
        let requests = spans.iter().filter(|s| s["name"] == "request").count();
        let outbound = spans.iter().filter(|s| s["name"] == "outbound").count();
        (requests >= 4 && outbound >= 2).then_some(spans)
    })
    .await;
    let request = |path: &str, side: &str| {
        spans
            .iter()
            .find(|s| s["name"] == "request" && s["path"] == path && s.get(side).is_some())
            .unwrap_or_else(|| panic!("no request span for {path} with {side}: {spans:?}"))
            .clone()
    };
    let refused = request("/admin", "decision");
    let inbound = refused["parents"]
        .as_array()
        .and_then(|p| p.iter().find(|s| s["name"] == "inbound"))
        .unwrap_or_else(|| panic!("the request span is not in an inbound span: {refused}"))
        .clone();
    assert_eq!(inbound["src.identity"], orders.as_str(), "{inbound}");
    assert_eq!(inbound["dst.identity"], orders.as_str(), "{inbound}");
    assert_eq!(inbound["tls.mode"], "mutual_tls", "{inbound}");
    assert_eq!(inbound["dst.addr"], h.inbound_http.to_string(), "{inbound}");
    assert!(inbound["src.addr"].is_string(), "{inbound}");
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(refused["policy"], "production/no-admin", "{refused}");
    assert_eq!(refused["reason"], "deny_matched", "{refused}");
    let admitted = request("/api", "decision");
    assert_eq!(admitted["decision"], "allow", "{admitted}");

    let routed = request("/api", "dst.service");
    assert_eq!(
        routed["dst.service"], "orders.production.svc.cluster.local",
        "{routed}"
    );
    assert_eq!(routed["dst.identity"], orders.as_str(), "{routed}");
    assert_eq!(routed["tls.mode"], "mutual_tls", "{routed}");
    assert_eq!(routed["dst.addr"], h.inbound_http.to_string(), "{routed}");
    let outbound = spans.iter().find(|s| s["name"] == "outbound").unwrap();
    assert_eq!(outbound["src.identity"], orders.as_str(), "{outbound}");
}
