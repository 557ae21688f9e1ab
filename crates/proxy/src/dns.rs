//! DNS names of ServiceEntries with `resolution: DNS` or `DNS_ROUND_ROBIN`
//! (their hosts when they list no endpoints, else the endpoint addresses
//! that are names), resolved in the background so that no request waits
//! on DNS.
//!
//! Each name has one shared slot ([`DnsName`]) in the proxy's
//! [`DnsStore`], which every configuration snapshot naming it points to,
//! and one task that looks it up again when the answer's TTL runs out.
//! The outbound path only reads the slot's current addresses. A lookup
//! that fails (time-out, SERVFAIL, NXDOMAIN, no address records) keeps
//! the last good addresses, as Envoy keeps a DNS cluster's hosts when a
//! resolution fails; it is logged at WARN, and `/config_dump` shows the
//! error and its age.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The shortest time an answer is used before it is looked up again. A
/// TTL of 0 ("do not cache") would otherwise have the task query in a
/// loop; one query per second per name bounds the load on the name
/// servers while still following a record that changes every second.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest time an answer is used without looking again, whatever its
/// TTL. Common TTLs (load balancers 60 s, CDNs 300 s) are not shortened;
/// a record given a TTL of a day is still checked every five minutes, so
/// a change made before its TTL ran out is noticed within that time.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// After a failed lookup the next one comes this soon, doubling with each
/// further failure up to [`RETRY_MAX`]: quick recovery for a name that has
/// no address yet, little load on a name server that is down.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two failed lookups (Istio's sidecars retry a
/// failed name every 60 s, `meshConfig.dnsRefreshRate`; meshward keeps
/// the last good answer meanwhile, so looking sooner costs nothing).
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one lookup may take, all name servers and retries included.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the resolver's settings come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DnsConfig {
    /// The system's: `/etc/resolv.conf` (name servers, search domains,
    /// `ndots`, time-out, attempts) and `/etc/hosts`, as Envoy's c-ares
    /// resolver reads them.
    #[default]
    System,
    /// Only these name servers (UDP, then TCP for a truncated answer);
    /// no search domains and no `/etc/hosts`.
    Servers(Vec<SocketAddr>),
}

/// The addresses a name resolved to and how long they may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub addresses: Vec<IpAddr>,
    pub ttl: Duration,
}

/// Answers DNS queries: hickory's resolver, or a stand-in in tests.
pub trait Resolve: Send + Sync + fmt::Debug {
    /// The IPv4 addresses of `name`, or its IPv6 ones when it has no IPv4
    /// address, with the answer's TTL.
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, String>> + Send + 'a>>;
}

/// What the proxy knows about one name.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The last good answer's addresses, in the order the name server
    /// gave them; empty until a lookup succeeds.
    pub addresses: Arc<[IpAddr]>,
    /// When the last good answer came and its TTL.
    pub resolved: Option<(Instant, Duration)>,
    /// When the next lookup is due.
    pub next_lookup: Instant,
    /// The last failed lookup's error and when it happened (kept after a
    /// later success, so the age tells how long ago it was).
    pub last_error: Option<(String, Instant)>,
    /// Failed lookups since the last good one.
    pub failures: u32,
    /// Whether a lookup has been tried at all.
    pub attempted: bool,
}

impl Answer {
    fn new(now: Instant) -> Answer {
        Answer {
            addresses: Arc::from(Vec::new()),
            resolved: None,
            next_lookup: now,
            last_error: None,
            failures: 0,
            attempted: false,
        }
    }

    /// The state after a lookup that ended at `now`: a good answer
    /// replaces the addresses and is looked up again when its TTL runs
    /// out (within [`MIN_REFRESH`]..=[`MAX_REFRESH`]); a failure keeps them
    /// and is retried with a growing delay.
    fn after(&self, result: Result<Resolved, String>, now: Instant) -> Answer {
        let result = result.and_then(|r| {
            if r.addresses.is_empty() {
                Err("no address records".to_string())
            } else {
                Ok(r)
            }
        });
        match result {
            Ok(r) => Answer {
                addresses: Arc::from(r.addresses),
                resolved: Some((now, r.ttl)),
                next_lookup: now + refresh_after(r.ttl),
                last_error: self.last_error.clone(),
                failures: 0,
                attempted: true,
            },
            Err(e) => {
                let failures = self.failures.saturating_add(1);
                Answer {
                    addresses: Arc::clone(&self.addresses),
                    resolved: self.resolved,
                    next_lookup: now + retry_after(failures),
                    last_error: Some((e, now)),
                    failures,
                    attempted: true,
                }
            }
        }
    }

    /// `/config_dump`'s view, times relative to `now` in seconds.
    pub fn describe(&self, name: &str, now: Instant) -> serde_json::Value {
        let secs = |d: Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
        serde_json::json!({
            "name": name,
            "addresses": self.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ttl_s": self.resolved.map(|(_, ttl)| ttl.as_secs()),
            "resolved_s_ago": self.resolved.map(|(at, _)| secs(now.saturating_duration_since(at))),
            // Negative once the answer is used past its TTL (lookups failing).
            "ttl_expires_in_s": self.resolved.map(|(at, ttl)| {
                let expiry = at + ttl;
                if expiry >= now { secs(expiry - now) } else { -secs(now - expiry) }
            }),
            "next_lookup_in_s": secs(self.next_lookup.saturating_duration_since(now)),
            "failures": self.failures,
            "last_error": self.last_error.as_ref().map(|(e, _)| e.clone()),
            "last_error_s_ago": self.last_error.as_ref().map(|(_, at)| secs(now.saturating_duration_since(*at))),
        })
    }
}

/// How long a good answer with `ttl` is used before the next lookup.
pub fn refresh_after(ttl: Duration) -> Duration {
    ttl.clamp(MIN_REFRESH, MAX_REFRESH)
}

/// How long to wait after the `failures`-th failed lookup in a row.
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RETRY_MIN * 2u32.pow(doublings)).min(RETRY_MAX)
}

/// One DNS name, shared by every snapshot that names it.
#[derive(Debug)]
pub struct DnsName {
    name: String,
    answer: ArcSwap<Answer>,
    /// Whether its lookup task has been started.
    following: AtomicBool,
}

impl DnsName {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current addresses (empty until the first good answer); a
    /// lock-free read for the data path.
    pub fn addresses(&self) -> Arc<[IpAddr]> {
        Arc::clone(&self.answer.load().addresses)
    }

    pub fn answer(&self) -> Arc<Answer> {
        self.answer.load_full()
    }
}

#[cfg(test)]
impl DnsName {
    /// Records a good answer (tests of the routing that reads it).
    pub(crate) fn set_addresses(&self, addresses: &[IpAddr], ttl: Duration) {
        let next = self.answer.load().after(
            Ok(Resolved {
                addresses: addresses.to_vec(),
                ttl,
            }),
            Instant::now(),
        );
        self.answer.store(Arc::new(next));
    }
}

/// The DNS names the configuration names, each looked up by its own task
/// (started by [`DnsStore::run`]) when its answer expires.
pub struct DnsStore {
    config: DnsConfig,
    /// Built on first use: a proxy without DNS services never reads
    /// `/etc/resolv.conf`. Built again after a failure (a file that was
    /// missing may appear).
    resolver: Mutex<Option<Arc<dyn Resolve>>>,
    names: Mutex<HashMap<String, Arc<DnsName>>>,
    /// New names to follow, or a reload to prune after.
    wake: Notify,
    /// Fired after every lookup.
    looked_up: Notify,
    /// Changes whenever some name's addresses change, so prepared routes
    /// know to start over.
    generation: AtomicU64,
}

impl fmt::Debug for DnsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsStore")
            .field("config", &self.config)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Default for DnsStore {
    fn default() -> Self {
        DnsStore::new(DnsConfig::System)
    }
}

impl DnsStore {
    pub fn new(config: DnsConfig) -> DnsStore {
        DnsStore {
            config,
            resolver: Mutex::new(None),
            names: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            looked_up: Notify::new(),
            generation: AtomicU64::new(0),
        }
    }

    /// A store that asks `resolver` (tests).
    #[cfg(test)]
    pub fn with_resolver(resolver: Arc<dyn Resolve>) -> DnsStore {
        let store = DnsStore::new(DnsConfig::System);
        *store.resolver.lock().unwrap_or_else(|e| e.into_inner()) = Some(resolver);
        store
    }

    /// The shared slot of `name` (compared without case or a final dot),
    /// registered for lookups if new.
    pub fn get(&self, name: &str) -> Arc<DnsName> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get(&key) {
            return Arc::clone(n);
        }
        let n = Arc::new(DnsName {
            name: key.clone(),
            answer: ArcSwap::from_pointee(Answer::new(Instant::now())),
            following: AtomicBool::new(false),
        });
        names.insert(key, Arc::clone(&n));
        self.wake.notify_one();
        n
    }

    /// Changes when any name's addresses change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every name, sorted.
    pub fn names(&self) -> Vec<Arc<DnsName>> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = names.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// After a reload: forgets the names no snapshot holds any more (their
    /// tasks end).
    pub fn forget_unused(&self) {
        self.wake.notify_one();
    }

    /// Starts a task per name, now and whenever names are added, and
    /// forgets unused ones: run it on the proxy's runtime.
    pub async fn run(self: Arc<Self>) {
        loop {
            let names = {
                let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
                // Only the map holds it: no snapshot names it any more.
                names.retain(|_, n| Arc::strong_count(n) > 1);
                names.values().cloned().collect::<Vec<_>>()
            };
            for n in names {
                if !n.following.swap(true, Ordering::AcqRel) {
                    tokio::spawn(Arc::clone(&self).follow(Arc::downgrade(&n)));
                }
            }
            // `notify_one` leaves a permit when nobody waits, so a name
            // added while this loop ran is not missed.
            self.wake.notified().await;
        }
    }

    /// Returns once every name registered so far has been looked up at
    /// least once (successfully or not); each lookup takes at most
    /// [`LOOKUP_TIMEOUT`]. [`DnsStore::run`] must be running.
    pub async fn first_lookups(&self) {
        loop {
            let notified = self.looked_up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.names().iter().all(|n| n.answer.load().attempted) {
                return;
            }
            notified.await;
        }
    }

    /// Looks `name` up whenever its answer is due, until no snapshot
    /// names it.
    async fn follow(self: Arc<Self>, name: Weak<DnsName>) {
        loop {
            let Some(n) = name.upgrade() else { return };
            let due = n.answer.load().next_lookup;
            drop(n);
            tokio::time::sleep_until(due).await;
            let Some(n) = name.upgrade() else { return };
            self.lookup(&n).await;
        }
    }

    /// Looks `n` up once and records the answer.
    pub async fn lookup(&self, n: &DnsName) {
        let result = match self.resolver() {
            Ok(r) => match tokio::time::timeout(LOOKUP_TIMEOUT, r.resolve(&n.name)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
            },
            Err(e) => Err(e),
        };
        let prev = n.answer.load_full();
        let next = prev.after(result, Instant::now());
        let changed = next.addresses != prev.addresses;
        match &next.last_error {
            Some((e, _)) if next.failures > 0 => {
                tracing::warn!(
                    target: "meshward::dns",
                    name = %n.name,
                    error = %e,
                    failures = next.failures,
                    kept = ?next.addresses,
                    retry_in_s = retry_after(next.failures).as_secs(),
                    "DNS lookup failed; keeping the last good addresses"
                );
            }
            _ if changed => {
                tracing::info!(target: "meshward::dns", name = %n.name, addresses = ?next.addresses, ttl_s = next.resolved.map(|(_, t)| t.as_secs()), "DNS name resolved");
            }
            _ => {
                tracing::debug!(target: "meshward::dns", name = %n.name, ttl_s = next.resolved.map(|(_, t)| t.as_secs()), "DNS answer unchanged");
            }
        }
        n.answer.store(Arc::new(next));
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.looked_up.notify_waiters();
    }

    fn resolver(&self) -> Result<Arc<dyn Resolve>, String> {
        let mut slot = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = slot.as_ref() {
            return Ok(Arc::clone(r));
        }
        let r: Arc<dyn Resolve> = Arc::new(Hickory::build(&self.config)?);
        *slot = Some(Arc::clone(&r));
        Ok(r)
    }
}

/// hickory-resolver on the proxy's tokio runtime.
struct Hickory(hickory_resolver::TokioResolver);

impl fmt::Debug for Hickory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hickory").finish_non_exhaustive()
    }
}

impl Hickory {
    fn build(config: &DnsConfig) -> Result<Hickory, String> {
        use hickory_resolver::config::{
            ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
            ResolverOpts,
        };
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let provider = TokioRuntimeProvider::default();
        let mut builder = match config {
            DnsConfig::System => hickory_resolver::Resolver::builder(provider)
                .map_err(|e| format!("reading the system's DNS settings: {e}"))?,
            DnsConfig::Servers(servers) => {
                let servers = servers
                    .iter()
                    .map(|s| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = s.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = s.port();
                        NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                let mut opts = ResolverOpts::default();
                opts.use_hosts_file = ResolveHosts::Never;
                hickory_resolver::Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    provider,
                )
                .with_options(opts)
            }
        };
        // A records, and AAAA only for a name without any (Envoy's
        // V4_PREFERRED), so an IPv4-only host never gets an IPv6 address
        // first (hickory's default asks both and puts IPv6 first).
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        builder
            .build()
            .map(Hickory)
            .map_err(|e| format!("building the DNS resolver: {e}"))
    }
}

impl Resolve for Hickory {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, String>> + Send + 'a>> {
        Box::pin(async move {
            let lookup = self.0.lookup_ip(name).await.map_err(|e| e.to_string())?;
            // What is left of the TTL, in the whole seconds DNS counts
            // in (hickory keeps a deadline, a moment old by now).
            let left = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let ttl = Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0));
            Ok(Resolved {
                addresses: lookup.iter().collect(),
                ttl,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers from a script, one per lookup (the last one repeats), and
    /// counts lookups.
    #[derive(Debug, Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<Resolved, String>>>,
        asked: AtomicU64,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Resolved, String>>) -> Arc<Scripted> {
            Arc::new(Scripted {
                answers: Mutex::new(answers.into()),
                asked: AtomicU64::new(0),
            })
        }

        fn asked(&self) -> u64 {
            self.asked.load(Ordering::SeqCst)
        }
    }

    impl Resolve for Scripted {
        fn resolve<'a>(
            &'a self,
            _name: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<Resolved, String>> + Send + 'a>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let mut answers = self.answers.lock().unwrap();
            let answer = if answers.len() > 1 {
                answers.pop_front().unwrap()
            } else {
                answers.front().cloned().unwrap()
            };
            Box::pin(async move { answer })
        }
    }

    fn ok(ips: &[[u8; 4]], ttl: u64) -> Result<Resolved, String> {
        Ok(Resolved {
            addresses: ips.iter().map(|ip| IpAddr::from(*ip)).collect(),
            ttl: Duration::from_secs(ttl),
        })
    }

    fn ips(n: &DnsName) -> Vec<String> {
        n.addresses().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_ttl_is_honoured_within_a_floor_and_a_ceiling() {
        assert_eq!(refresh_after(Duration::ZERO), MIN_REFRESH);
        assert_eq!(
            refresh_after(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(refresh_after(Duration::from_secs(86_400)), MAX_REFRESH);
        let delays: Vec<u64> = (1..=7).map(|f| retry_after(f).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_after(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn an_empty_answer_is_a_failure() {
        let now = Instant::now();
        let good = Answer::new(now).after(ok(&[[10, 0, 0, 1]], 60), now);
        let empty = good.after(ok(&[], 60), now);
        assert_eq!(&*empty.addresses, &[IpAddr::from([10, 0, 0, 1])]);
        assert_eq!(empty.last_error.unwrap().0, "no address records");
    }

    #[tokio::test(start_paused = true)]
    async fn names_are_looked_up_when_their_ttl_runs_out_and_keep_the_last_good_answer() {
        let script = Scripted::new(vec![
            ok(&[[10, 0, 0, 1], [10, 0, 0, 2]], 30),
            ok(&[[10, 0, 0, 1], [10, 0, 0, 2]], 30),
            Err("SERVFAIL".into()),
            Err("timed out".into()),
            ok(&[[10, 0, 0, 3]], 0),
        ]);
        let store = Arc::new(DnsStore::with_resolver(script.clone()));
        let name = store.get("API.Example.com.");
        assert!(
            Arc::ptr_eq(&name, &store.get("api.example.com")),
            "one slot per name"
        );
        tokio::spawn(Arc::clone(&store).run());
        store.first_lookups().await;
        let start = Instant::now();
        assert_eq!(ips(&name), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(script.asked(), 1);
        let generation = store.generation();

        // Nothing more until the TTL runs out; then the same answer
        // changes nothing for the routes.
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(script.asked(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(script.asked(), 2);
        assert_eq!(store.generation(), generation);

        // Two failures: the addresses stay, the error is shown, retries
        // come after 1 s then 2 s.
        tokio::time::sleep_until(start + Duration::from_millis(60_500)).await;
        assert_eq!(script.asked(), 3);
        let a = name.answer();
        assert_eq!(ips(&name), ["10.0.0.1", "10.0.0.2"]);
        let (error, failed_at) = a.last_error.clone().unwrap();
        assert_eq!(error, "SERVFAIL");
        assert_eq!(a.next_lookup - failed_at, RETRY_MIN);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(script.asked(), 4);
        assert_eq!(name.answer().failures, 2);
        let dump = name.answer().describe(name.name(), Instant::now());
        assert_eq!(dump["last_error"], "timed out");
        assert_eq!(
            dump["addresses"],
            serde_json::json!(["10.0.0.1", "10.0.0.2"])
        );
        assert!(dump["ttl_expires_in_s"].as_f64().unwrap() < 0.0, "{dump}");

        // Recovery with a new address and a TTL of 0: used at once, looked
        // up again after the floor.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(script.asked(), 5);
        assert_eq!(ips(&name), ["10.0.0.3"]);
        assert!(store.generation() > generation);
        assert_eq!(name.answer().failures, 0);
        tokio::time::sleep(MIN_REFRESH).await;
        assert_eq!(script.asked(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_no_snapshot_holds_is_forgotten() {
        let script = Scripted::new(vec![ok(&[[10, 0, 0, 1]], 5)]);
        let store = Arc::new(DnsStore::with_resolver(script.clone()));
        let name = store.get("a.example.com");
        tokio::spawn(Arc::clone(&store).run());
        store.first_lookups().await;
        assert_eq!(script.asked(), 1);
        drop(name);
        store.forget_unused();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(script.asked(), 1, "a forgotten name is not looked up");
        assert!(store.names().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn first_lookups_waits_for_names_that_fail_too() {
        let script = Scripted::new(vec![Err("NXDOMAIN".into())]);
        let store = Arc::new(DnsStore::with_resolver(script.clone()));
        let name = store.get("gone.example.com");
        tokio::spawn(Arc::clone(&store).run());
        store.first_lookups().await;
        assert!(name.addresses().is_empty());
        assert_eq!(name.answer().last_error.as_ref().unwrap().0, "NXDOMAIN");
    }
}
