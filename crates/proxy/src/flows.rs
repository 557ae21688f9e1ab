//! The inbound flow table (reporter destination), served at
//! `/debug/flows`: per source (workload, principal, address), port,
//! protocol and security, the connections, requests, denials and
//! refusals, with per-minute buckets for the last hour. It is what
//! `meshward mtls report` reads to tell who still calls in plaintext and
//! what a switch to STRICT would refuse.
//!
//! Bounded ([`MAX_FLOWS`] keys; beyond, connections are only counted in
//! `overflow`) and cheap: a connection finds its entry once, under a
//! lock; its requests then only increment atomics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

use serde_json::json;

/// Keys kept at most.
pub const MAX_FLOWS: usize = 4096;
/// Minutes of history kept per flow.
pub const WINDOW_MINUTES: usize = 60;

/// What tells flows apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The source workload, `(namespace, name)`, when known.
    pub workload: Option<(String, String)>,
    /// The source's `spiffe://` identity (mTLS).
    pub principal: Option<String>,
    pub address: IpAddr,
    /// The destination (this workload's) port.
    pub port: u16,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
}

/// What happened on a flow, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A connection accepted (and classified).
    Connection,
    /// An HTTP request.
    Request,
    /// A request or TCP connection denied by policy.
    Denied,
    /// A connection refused by the PeerAuthentication mode (plaintext on a
    /// STRICT port).
    Refused,
}

/// Counters of one bucket: connections, requests, denied, refused.
#[derive(Debug, Default)]
struct Counts([AtomicU64; 4]);

impl Counts {
    fn add(&self, e: Event) {
        self.0[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn load(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.0[i].load(Ordering::Relaxed))
    }

    fn reset(&self) {
        for c in &self.0 {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn json(v: [u64; 4]) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        for (name, n) in ["connections", "requests", "denied", "refused"]
            .into_iter()
            .zip(v)
        {
            m.insert(name.to_string(), json!(n));
        }
        m
    }
}

/// One minute of a flow: its start (Unix seconds) and counts.
#[derive(Debug, Default)]
struct Minute {
    start: AtomicI64,
    counts: Counts,
}

/// One flow's counters.
#[derive(Debug)]
pub struct Flow {
    totals: Counts,
    first_seen: AtomicI64,
    last_seen: AtomicI64,
    /// A ring indexed by minute (`now / 60 % 60`).
    minutes: [Minute; WINDOW_MINUTES],
}

impl Flow {
    fn new(now: i64) -> Flow {
        Flow {
            totals: Counts::default(),
            first_seen: AtomicI64::new(now),
            last_seen: AtomicI64::new(now),
            minutes: std::array::from_fn(|_| Minute::default()),
        }
    }

    /// Counts `e`, now.
    pub fn count(&self, e: Event) {
        self.count_at(e, unix_now());
    }

    fn count_at(&self, e: Event, now: i64) {
        self.totals.add(e);
        self.last_seen.fetch_max(now, Ordering::Relaxed);
        let start = now - now.rem_euclid(60);
        let slot = &self.minutes[(start / 60).rem_euclid(WINDOW_MINUTES as i64) as usize];
        let seen = slot.start.load(Ordering::Acquire);
        if seen != start
            && slot
                .start
                .compare_exchange(seen, start, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The slot held a minute an hour old (or none): it starts over.
            // An event of the new minute counted by another thread between
            // the exchange and the reset may be lost; the totals keep it.
            slot.counts.reset();
        }
        if slot.start.load(Ordering::Acquire) == start {
            slot.counts.add(e);
        }
    }

    fn json(&self, now: i64) -> serde_json::Value {
        let mut m = Counts::json(self.totals.load());
        m.insert(
            "first_seen".into(),
            json!(self.first_seen.load(Ordering::Relaxed)),
        );
        m.insert(
            "last_seen".into(),
            json!(self.last_seen.load(Ordering::Relaxed)),
        );
        let current = now - now.rem_euclid(60);
        let oldest = current - 60 * (WINDOW_MINUTES as i64 - 1);
        let mut minutes: Vec<(i64, [u64; 4])> = self
            .minutes
            .iter()
            .map(|b| (b.start.load(Ordering::Acquire), b.counts.load()))
            .filter(|(start, counts)| {
                (oldest..=current).contains(start) && counts.iter().any(|&n| n > 0)
            })
            .collect();
        minutes.sort_by_key(|(start, _)| *start);
        let minutes: Vec<_> = minutes
            .into_iter()
            .map(|(start, counts)| {
                let mut b = serde_json::Map::new();
                b.insert("start".into(), json!(start));
                b.extend(Counts::json(counts));
                serde_json::Value::Object(b)
            })
            .collect();
        m.insert("minutes".into(), json!(minutes));
        serde_json::Value::Object(m)
    }
}

/// The flow table.
#[derive(Debug)]
pub struct Flows {
    table: Mutex<HashMap<FlowKey, Arc<Flow>>>,
    /// Connections whose flow was not kept (the table was full).
    overflow: AtomicU64,
    /// When the table started (the proxy's start), Unix seconds.
    started: i64,
}

impl Default for Flows {
    fn default() -> Flows {
        Flows {
            table: Mutex::default(),
            overflow: AtomicU64::new(0),
            started: unix_now(),
        }
    }
}

impl Flows {
    /// The entry of `key`, made if new; `None` (counted in `overflow`)
    /// when the table is full. Counts one `first` event on it.
    pub fn open(&self, key: FlowKey, first: Event) -> Option<Arc<Flow>> {
        let now = unix_now();
        let flow = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            match table.get(&key) {
                Some(f) => Some(Arc::clone(f)),
                None if table.len() >= MAX_FLOWS => None,
                None => {
                    let f = Arc::new(Flow::new(now));
                    table.insert(key, Arc::clone(&f));
                    Some(f)
                }
            }
        };
        match &flow {
            Some(f) => f.count_at(first, now),
            None => {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
        flow
    }

    /// `/debug/flows`: this workload's inbound flows, oldest first seen
    /// first.
    pub fn json(&self, workload: &str, identity: &str) -> serde_json::Value {
        let now = unix_now();
        let entries: Vec<(FlowKey, Arc<Flow>)> = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, f)| (k.clone(), Arc::clone(f)))
            .collect();
        let mut flows: Vec<(i64, String, serde_json::Value)> = entries
            .into_iter()
            .map(|(k, f)| {
                let mut v = f.json(now);
                let (namespace, name) = k.workload.clone().unzip();
                v["source"] = json!({
                    "workload": name,
                    "namespace": namespace,
                    "principal": k.principal,
                    "address": k.address.to_string(),
                });
                v["port"] = json!(k.port);
                v["protocol"] = json!(k.protocol);
                v["security"] = json!(k.security);
                let order = format!("{}|{}|{}|{}", k.address, k.port, k.protocol, k.security);
                (f.first_seen.load(Ordering::Relaxed), order, v)
            })
            .collect();
        flows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        json!({
            "workload": workload,
            "identity": identity,
            "now": now,
            "started": self.started,
            "window_minutes": WINDOW_MINUTES,
            "overflow": self.overflow.load(Ordering::Relaxed),
            "flows": flows.into_iter().map(|(.., v)| v).collect::<Vec<_>>(),
        })
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            workload: Some(("legacy".into(), "billing".into())),
            principal: None,
            address: "127.0.4.1".parse().unwrap(),
            port,
            protocol: "http",
            security: "none",
        }
    }

    #[test]
    fn minutes_are_kept_for_an_hour_and_shown_oldest_first() {
        let t0 = 1_765_000_040; // 20 s into a minute
        let f = Flow::new(t0);
        f.count_at(Event::Connection, t0);
        f.count_at(Event::Request, t0 + 10);
        f.count_at(Event::Request, t0 + 60);
        f.count_at(Event::Denied, t0 + 61);
        let v = f.json(t0 + 61);
        assert_eq!(v["connections"], 1);
        assert_eq!(v["requests"], 2);
        assert_eq!(v["denied"], 1);
        assert_eq!(v["last_seen"], t0 + 61);
        let m = v["minutes"].as_array().unwrap();
        assert_eq!(m.len(), 2, "{v}");
        assert_eq!(m[0]["start"], t0 - 20);
        assert_eq!(
            (m[0]["connections"].clone(), m[0]["requests"].clone()),
            (json!(1), json!(1))
        );
        assert_eq!(
            (m[1]["requests"].clone(), m[1]["denied"].clone()),
            (json!(1), json!(1))
        );
        // An hour later, the first minute's slot is reused and starts over;
        // minutes older than the window are not shown.
        let later = t0 + 3600;
        f.count_at(Event::Refused, later);
        let v = f.json(later);
        let m = v["minutes"].as_array().unwrap();
        assert_eq!(m.len(), 2, "{v}");
        assert_eq!(m[0]["start"], t0 + 40);
        assert_eq!(m[1]["start"], later - 20);
        assert_eq!(m[1]["refused"], 1);
        assert_eq!(m[1]["connections"], 0);
        assert_eq!(v["refused"], 1);
        assert_eq!(v["connections"], 1);
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_it_does_not_keep() {
        let flows = Flows::default();
        let a = flows.open(key(1), Event::Connection).unwrap();
        let again = flows.open(key(1), Event::Connection).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        for port in 2..=MAX_FLOWS as u16 {
            assert!(flows.open(key(port), Event::Connection).is_some());
        }
        assert!(flows.open(key(0), Event::Connection).is_none());
        assert!(flows.open(key(1), Event::Connection).is_some());
        let v = flows.json(
            "production/orders",
            "spiffe://cluster.local/ns/production/sa/orders",
        );
        assert_eq!(v["overflow"], 1);
        assert_eq!(v["flows"].as_array().unwrap().len(), MAX_FLOWS);
        let first = v["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["port"] == 1)
            .unwrap();
        assert_eq!(first["connections"], 3);
        assert_eq!(
            first["source"],
            json!({"workload": "billing", "namespace": "legacy", "principal": null, "address": "127.0.4.1"})
        );
        assert_eq!(v["window_minutes"], 60);
    }
}
