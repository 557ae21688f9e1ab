//! The push benchmark: N simulated proxies, each its own TLS connection
//! and `StreamConfig` stream, ACKing every version; the rounds of policy
//! changes and the memory with all N connected.

use super::*;

/// A namespace-wide policy (it selects every workload of the namespace)
/// named for `round`, written next to its file and renamed over it.
pub(crate) fn write_round(dir: &Path, round: usize) -> Result<()> {
    let policy = mesh::authorization_policy(
        PUSH_NS,
        &format!("{MARKER}{round}"),
        &format!(
            "  rules:\n  - from: [{{source: {{namespaces: [\"{PUSH_NS}\"]}}}}]\n    to: [{{operation: {{paths: [\"/round/{round}/*\"]}}}}]\n"
        ),
    );
    let tmp = dir.join(format!(".{ROUND_FILE}.tmp"));
    std::fs::write(&tmp, policy)?;
    std::fs::rename(&tmp, dir.join(ROUND_FILE))?;
    Ok(())
}

/// What a response carries: documents, mesh settings and roots, in bytes.
pub(crate) fn payload_bytes(resp: &ConfigResponse) -> usize {
    resp.documents
        .iter()
        .map(|d| d.origin.len() + d.content.len())
        .sum::<usize>()
        + resp.mesh_config.len()
        + resp.trust_bundle.iter().map(String::len).sum::<usize>()
}

/// The round whose policy a response carries.
pub(crate) fn round_of(resp: &ConfigResponse) -> Option<usize> {
    resp.documents
        .iter()
        .filter_map(|d| {
            let at = d.content.find(MARKER)? + MARKER.len();
            let digits: String = d.content[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .max()
}

/// What the simulated proxies report to the coordinator.
pub(crate) struct PushState {
    /// Per round: proxies that ACKed a version carrying its policy.
    acked: Vec<AtomicUsize>,
    /// Per round: when the last of the N ACKed.
    all_acked_at: Vec<OnceLock<Instant>>,
    /// Responses received and ACKed, over all proxies.
    responses: AtomicUsize,
    /// The largest response's documents, mesh settings and roots, bytes.
    payload_max: AtomicUsize,
    failed: AtomicBool,
    first_error: Mutex<Option<String>>,
    changed: Notify,
    proxies: usize,
}

impl PushState {
    fn fail(&self, error: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Waits until every proxy has ACKed `round`; the instant the last did.
    async fn all_acked(&self, round: usize, limit: Duration) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.failed.load(Ordering::SeqCst) {
                let error = self
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default();
                bail!("a simulated proxy failed: {error}");
            }
            if let Some(at) = self.all_acked_at[round].get() {
                return Ok(*at);
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                bail!(
                    "round {round}: {} of {} proxies ACKed within {limit:?}",
                    self.acked[round].load(Ordering::SeqCst),
                    self.proxies
                );
            }
        }
    }
}

/// One simulated proxy: subscribes as `workload`, ACKs every response,
/// counts the rounds it has seen.
pub(crate) async fn simulated_proxy(
    channel: Channel,
    node_id: String,
    workload: String,
    state: Arc<PushState>,
) {
    let result = async {
        let (tx, rx) = mpsc::channel(4);
        tx.send(ConfigRequest {
            node: Some(Node {
                id: node_id.clone(),
                workload,
                version: "meshward-control-bench".into(),
                admin_address: String::new(),
            }),
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
        let mut inbound = ConfigDiscoveryServiceClient::new(channel)
            .stream_config(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut last_round: Option<usize> = None;
        while let Some(resp) = inbound.message().await? {
            let round = round_of(&resp);
            tx.send(ConfigRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
            state.responses.fetch_add(1, Ordering::Relaxed);
            state
                .payload_max
                .fetch_max(payload_bytes(&resp), Ordering::Relaxed);
            if let Some(r) = round.filter(|r| Some(*r) != last_round && *r < state.acked.len()) {
                last_round = Some(r);
                if state.acked[r].fetch_add(1, Ordering::SeqCst) + 1 == state.proxies {
                    let _ = state.all_acked_at[r].set(Instant::now());
                    state.changed.notify_one();
                }
            }
        }
        Err::<(), _>(anyhow!("the control plane ended the stream"))
    }
    .await;
    if let Err(e) = result {
        state.fail(format!("{node_id}: {e:#}"));
    }
}

pub(crate) async fn push_bench(args: &Args, control: &Control) -> Result<Value> {
    let rss_before = proc_status(control.process.pid(), "VmRSS:");
    // One certificate per workload (its service account), by token.
    eprintln!("push: obtaining {} workload certificates", args.workloads);
    let ca_channel = connect(control, client_config(control, None)?).await?;
    let mut configs = Vec::with_capacity(args.workloads);
    for i in 0..args.workloads {
        let name = workload_name(i);
        let creds =
            obtain_credentials(control, ca_channel.clone(), PUSH_NS, &format!("sa-{name}")).await?;
        configs.push(client_config(control, Some(creds))?);
    }
    drop(ca_channel);

    let state = Arc::new(PushState {
        acked: (0..=args.rounds).map(|_| AtomicUsize::new(0)).collect(),
        all_acked_at: (0..=args.rounds).map(|_| OnceLock::new()).collect(),
        responses: AtomicUsize::new(0),
        payload_max: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
        changed: Notify::new(),
        proxies: args.proxies,
    });
    eprintln!("push: connecting {} proxies", args.proxies);
    let connected_at = Instant::now();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(args.proxies);
    let addr = control.grpc.to_string();
    for p in 0..args.proxies {
        let w = p % args.workloads;
        let (gate, config, addr, state) = (
            gate.clone(),
            configs[w].clone(),
            addr.clone(),
            state.clone(),
        );
        let node_id = format!("bench-proxy-{p:05}");
        tasks.push(tokio::spawn(async move {
            let channel = {
                let _permit = gate.acquire_owned().await;
                meshward_control::tls::connect(&addr, config).await
            };
            match channel {
                Ok(channel) => {
                    let workload = format!("{PUSH_NS}/{}", workload_name(w));
                    simulated_proxy(channel, node_id, workload, state).await;
                }
                Err(e) => state.fail(format!("{node_id}: cannot connect: {e}")),
            }
        }));
    }
    state.all_acked(0, PHASE_LIMIT).await?;
    let subscribe_secs = connected_at.elapsed().as_secs_f64();
    let rss_connected = proc_status(control.process.pid(), "VmRSS:");
    let connected = metric_value(control, "pilot_xds ").await;
    eprintln!(
        "push: {} proxies connected and ACKed in {subscribe_secs:.2} s; control RSS {} KiB",
        args.proxies,
        rss_connected.unwrap_or(0)
    );

    let mut latencies = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let written = Instant::now();
        write_round(&control.config_dir, round)?;
        let last = state.all_acked(round, PHASE_LIMIT).await?;
        let ms = last.duration_since(written).as_secs_f64() * 1000.0;
        eprintln!(
            "push: round {round}: all {} ACKed after {ms:.1} ms",
            args.proxies
        );
        latencies.push(ms);
    }
    // The control plane counts an ACK when it has read it, a little after
    // the proxy sent it: wait (bounded) until it has counted them all.
    let responses = state.responses.load(Ordering::SeqCst) as f64;
    let counted = Instant::now();
    let convergence = loop {
        let h = metric_histogram(control, "pilot_proxy_convergence_time").await;
        if h["count"].as_f64().unwrap_or(0.0) >= responses
            || counted.elapsed() > Duration::from_secs(5)
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Only now: a proxy dropped at once may reset its stream before its last
    // ACK has left.
    for t in &tasks {
        t.abort();
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "proxies": args.proxies,
        "workloads": args.workloads,
        "rounds": args.rounds,
        "subscribe_all_s": round3(subscribe_secs),
        "push_all_acked_ms": latencies.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
        "push_all_acked_median_ms": round3(median(&sorted)),
        "push_all_acked_max_ms": round3(sorted.last().copied().unwrap_or(0.0)),
        "responses_acked": state.responses.load(Ordering::Relaxed),
        "response_payload_max_bytes": state.payload_max.load(Ordering::Relaxed),
        "pilot_xds": connected,
        "pilot_proxy_convergence_time": convergence,
        "control_rss_before_kib": rss_before,
        "control_rss_connected_kib": rss_connected,
        "control_rss_connected_mib": rss_connected.map(|k| round3(k as f64 / 1024.0)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_proto::config::Document;

    fn response(contents: &[&str]) -> ConfigResponse {
        ConfigResponse {
            documents: contents
                .iter()
                .map(|c| Document {
                    origin: "f.yaml:1".into(),
                    content: (*c).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_response_carries_the_round_of_its_newest_policy() {
        assert_eq!(round_of(&response(&["kind: WorkloadEntry"])), None);
        assert_eq!(
            round_of(&response(&[
                "name: bench-round-3, x",
                "name: bench-round-12"
            ])),
            Some(12)
        );
        assert_eq!(round_of(&response(&["bench-round-"])), None);
        assert_eq!(
            payload_bytes(&response(&["abc"])),
            "f.yaml:1".len() + 3,
            "origin and content"
        );
    }

    #[test]
    fn the_policy_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_round(dir.path(), 1).unwrap();
        write_round(dir.path(), 2).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [ROUND_FILE]);
        let policy = std::fs::read_to_string(dir.path().join(ROUND_FILE)).unwrap();
        assert!(policy.contains("bench-round-2") && !policy.contains("bench-round-1"));
    }
}
