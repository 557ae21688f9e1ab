//! The last access-log entries, kept in memory and served on the admin
//! listener as `GET /access_log` (`meshward proxy --access-log-buffer N`).
//!
//! Each entry is the JSON object the access log writes (the same line), so
//! what the endpoint shows is exactly what the log said. `meshward call`
//! reads the destination's entry of its request from here (by
//! `x-request-id`, or by source address for a caller refused before any
//! request). Memory is bounded twice: at most `capacity` entries, and at
//! most [`MAX_BYTES`] of JSON (the oldest entries go first).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::telemetry::{AccessLog, AccessRecord};

/// The default number of entries kept.
pub const DEFAULT_CAPACITY: usize = 256;

/// The most entries `--access-log-buffer` may ask for.
pub const MAX_CAPACITY: usize = 100_000;

/// The most JSON bytes kept, whatever the capacity (long paths and
/// reasons make large lines).
pub const MAX_BYTES: usize = 8 << 20;

/// One kept entry: its JSON line and the fields the filters read.
#[derive(Debug)]
struct Entry {
    src: Option<SocketAddr>,
    request_id: Option<String>,
    line: Box<str>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
}

/// The ring of recent access-log entries.
#[derive(Debug)]
pub struct RecentLog {
    capacity: usize,
    ring: Mutex<Ring>,
}

/// What `GET /access_log` asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    /// Only entries with this `request_id`.
    pub request_id: Option<String>,
    /// Only entries whose `src.addr` has this IP (and port, when given).
    pub src: Option<(IpAddr, Option<u16>)>,
    /// The newest this many (after filtering).
    pub limit: Option<usize>,
}

impl Query {
    /// Parses a query string (`request_id=ID&src=IP[:PORT]&limit=N`,
    /// percent-encoded). An unknown parameter or a bad value is an error
    /// that says which.
    pub fn parse(query: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)
                .ok_or_else(|| format!("{name}: {value:?} is not valid percent-encoded UTF-8"))?;
            match name {
                "request_id" => q.request_id = Some(value),
                "src" => {
                    q.src = Some(if let Ok(a) = value.parse::<SocketAddr>() {
                        (a.ip(), Some(a.port()))
                    } else if let Ok(ip) = value.parse::<IpAddr>() {
                        (ip, None)
                    } else {
                        return Err(format!("src: {value:?} is not an IP or IP:PORT"));
                    });
                }
                "limit" => {
                    q.limit = Some(
                        value
                            .parse()
                            .map_err(|_| format!("limit: {value:?} is not a number"))?,
                    );
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (known: request_id, src, limit)"
                    ));
                }
            }
        }
        Ok(q)
    }

    fn matches(&self, e: &Entry) -> bool {
        if let Some(id) = &self.request_id
            && e.request_id.as_deref() != Some(id.as_str())
        {
            return false;
        }
        if let Some((ip, port)) = self.src {
            let Some(src) = e.src else {
                return false;
            };
            if src.ip() != ip || port.is_some_and(|p| p != src.port()) {
                return false;
            }
        }
        true
    }
}

impl RecentLog {
    /// A ring of at most `capacity` entries (at most [`MAX_CAPACITY`]).
    pub fn new(capacity: usize) -> RecentLog {
        RecentLog {
            capacity: capacity.min(MAX_CAPACITY),
            ring: Mutex::new(Ring::default()),
        }
    }

    /// Keeps one entry: its `src.addr`, `request_id` and JSON line.
    pub fn push(&self, src_addr: &str, request_id: Option<&str>, line: &str) {
        if self.capacity == 0 || line.len() > MAX_BYTES {
            return;
        }
        let entry = Entry {
            src: src_addr.parse().ok(),
            request_id: request_id.map(str::to_owned),
            line: line.into(),
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.bytes += entry.line.len();
        ring.entries.push_back(entry);
        while ring.entries.len() > self.capacity || ring.bytes > MAX_BYTES {
            match ring.entries.pop_front() {
                Some(old) => ring.bytes -= old.line.len(),
                None => break,
            }
        }
    }

    /// `{"entries":[...]}`: the entries `query` selects, oldest first (the
    /// newest `limit` of them when it is given).
    pub fn render(&self, query: &Query) -> String {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut picked: Vec<&str> = ring
            .entries
            .iter()
            .rev()
            .filter(|e| query.matches(e))
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|e| &*e.line)
            .collect();
        picked.reverse();
        let mut out = String::with_capacity(16 + picked.iter().map(|l| l.len() + 2).sum::<usize>());
        out.push_str("{\"entries\":[");
        for (i, line) in picked.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Each line is one JSON object, as serialized by the access log.
            out.push_str(line);
        }
        out.push_str("]}\n");
        out
    }
}

/// Where access-log entries go: the sink (stdout, or nowhere) and the
/// ring of recent entries, each entry serialized once for both.
#[derive(Debug)]
pub struct AccessLogger {
    sink: AccessLog,
    recent: Option<Arc<RecentLog>>,
}

impl AccessLogger {
    /// Entries to `sink`, and the last `recent` of them kept (0: none).
    pub fn new(sink: AccessLog, recent: usize) -> AccessLogger {
        AccessLogger {
            sink,
            recent: (recent > 0).then(|| Arc::new(RecentLog::new(recent))),
        }
    }

    /// Whether entries go anywhere (callers skip building them if not).
    pub fn enabled(&self) -> bool {
        self.sink.enabled() || self.recent.is_some()
    }

    /// The ring of recent entries, when kept.
    pub fn recent(&self) -> Option<&RecentLog> {
        self.recent.as_deref()
    }

    pub fn write(&self, record: &AccessRecord) {
        if !self.enabled() {
            return;
        }
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        self.sink.write_line(&line);
        if let Some(recent) = &self.recent {
            recent.push(&record.src_addr, record.request_id.as_deref(), &line);
        }
    }
}

/// Decodes `%XX` escapes and `+` (a space, as forms write it); `None` for
/// a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize, src: &str, id: Option<&str>) -> String {
        serde_json::json!({"n": n, "src.addr": src, "request_id": id}).to_string()
    }

    fn ns(log: &RecentLog, q: &str) -> Vec<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&log.render(&Query::parse(q).unwrap())).unwrap();
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["n"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn keeps_the_newest_entries_and_filters_them() {
        let log = RecentLog::new(3);
        for (n, (src, id)) in [
            ("127.0.0.1:1000", Some("a")),
            ("127.0.0.1:1001", Some("b")),
            ("127.0.1.5:2000", None),
            ("127.0.0.1:1000", Some("c")),
        ]
        .into_iter()
        .enumerate()
        {
            log.push(src, id, &line(n, src, id));
        }
        assert_eq!(ns(&log, ""), [1, 2, 3], "the oldest is gone");
        assert_eq!(ns(&log, "request_id=c"), [3]);
        assert_eq!(ns(&log, "request_id=a"), Vec::<u64>::new());
        assert_eq!(ns(&log, "src=127.0.0.1"), [1, 3]);
        assert_eq!(ns(&log, "src=127.0.0.1:1001"), [1]);
        assert_eq!(ns(&log, "src=127.0.1.5&limit=5"), [2]);
        assert_eq!(ns(&log, "limit=2"), [2, 3], "the newest two, oldest first");
        assert_eq!(ns(&log, "limit=0"), Vec::<u64>::new());
    }

    #[test]
    fn a_zero_capacity_keeps_nothing() {
        let log = RecentLog::new(0);
        log.push("127.0.0.1:1", None, &line(0, "127.0.0.1:1", None));
        assert_eq!(ns(&log, ""), Vec::<u64>::new());
    }

    #[test]
    fn bytes_are_bounded_too() {
        let log = RecentLog::new(MAX_CAPACITY);
        let big = "x".repeat(1 << 20);
        for n in 0..20 {
            let l = serde_json::json!({"n": n, "pad": big}).to_string();
            log.push("127.0.0.1:1", None, &l);
        }
        let kept = ns(&log, "");
        assert!(kept.len() < 20 && kept.len() >= 7, "{kept:?}");
        assert_eq!(*kept.last().unwrap(), 19);
    }

    #[test]
    fn queries_are_decoded_and_bad_ones_say_what_is_wrong() {
        let q = Query::parse("request_id=a%2Fb+c&src=%5B::1%5D:80").unwrap();
        assert_eq!(q.request_id.as_deref(), Some("a/b c"));
        assert_eq!(q.src, Some(("::1".parse().unwrap(), Some(80))));
        for (bad, says) in [
            ("src=nowhere", "src: \"nowhere\" is not an IP or IP:PORT"),
            ("limit=-1", "limit: \"-1\" is not a number"),
            ("id=1", "unknown parameter \"id\""),
            ("request_id=%zz", "not valid percent-encoded"),
        ] {
            let e = Query::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
