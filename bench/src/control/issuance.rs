//! The issuance benchmark: C callers calling `CreateCertificate` for D
//! seconds with CSRs generated beforehand, by token or by mTLS renewal.

use super::*;

/// Counts of a phase's outcomes, by gRPC code.
pub(crate) type Outcomes = BTreeMap<String, u64>;

pub(crate) async fn issuance_bench(args: &Args, control: &Control) -> Result<Value> {
    let pool = args.csr_pool();
    eprintln!(
        "issuance: minting {} tokens and generating {pool} P-256 CSRs",
        args.identities
    );
    let ca = control.authority.ca();
    let mut ids = Vec::with_capacity(args.identities);
    let mut tokens = Vec::with_capacity(args.identities);
    for i in 0..args.identities {
        let sa = format!("sa-{i:05}");
        ids.push(
            SpiffeId::workload(&control.trust_domain, CA_NS, &sa)
                .map_err(|e| anyhow!("{CA_NS}/{sa}: {e}"))?,
        );
        tokens.push(meshward_control::token::mint(
            &ca,
            CA_NS,
            &sa,
            Some(Duration::from_secs(3600)),
        )?);
    }
    let generated = Instant::now();
    let csrs = Arc::new(generate_csrs(&ids, pool)?);
    eprintln!(
        "issuance: {pool} CSRs in {:.1} s",
        generated.elapsed().as_secs_f64()
    );
    let tokens = Arc::new(tokens);

    // Token: each caller its own connection. Renewal: each identity its own
    // mTLS connection, which any caller uses for that identity's requests.
    let mut channels = Vec::with_capacity(args.callers);
    let renewal = match args.proof {
        Proof::Token => {
            let config = client_config(control, None)?;
            for _ in 0..args.callers {
                channels.push(connect(control, config.clone()).await?);
            }
            None
        }
        Proof::Renewal => {
            eprintln!(
                "issuance: obtaining {} certificates and opening their mTLS connections",
                args.identities
            );
            Some(Arc::new(renewal_channels(control, args.identities).await?))
        }
    };
    let issued_before = metric_value(control, "citadel_server_success_cert_issuance_count").await;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = proc_cpu_seconds(control.process.pid());
    let self_before = proc_cpu_seconds(std::process::id());
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::with_capacity(args.callers);
    for c in 0..args.callers {
        let (csrs, tokens, next) = (csrs.clone(), tokens.clone(), next.clone());
        let own = channels.get(c).cloned();
        let renewal = renewal.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| anyhow!("histogram: {e}"))?;
            let mut outcomes = Outcomes::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= csrs.len() || Instant::now() >= end {
                    break;
                }
                let identity = i % tokens.len();
                let (channel, req) = match (&renewal, &own) {
                    (Some(by_identity), _) => (
                        by_identity[identity].clone(),
                        tonic::Request::new(IstioCertificateRequest {
                            csr: csrs[i].clone(),
                            validity_duration: 0,
                            metadata: None,
                        }),
                    ),
                    (None, Some(own)) => (
                        own.clone(),
                        token_request(csrs[i].clone(), &tokens[identity])?,
                    ),
                    (None, None) => bail!("caller {c} has no connection"),
                };
                let mut client = IstioCertificateServiceClient::new(channel);
                let t0 = Instant::now();
                let result = client.create_certificate(req).await;
                let us = t0.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
                let key = match result {
                    Ok(resp) if !resp.get_ref().cert_chain.is_empty() => {
                        hist.saturating_record(us);
                        "ok".to_string()
                    }
                    Ok(_) => "empty_chain".to_string(),
                    Err(status) => format!("{:?}", status.code()),
                };
                *outcomes.entry(key).or_default() += 1;
            }
            Ok::<_, anyhow::Error>((hist, outcomes, Instant::now()))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut outcomes = Outcomes::new();
    let mut finished = started;
    for t in tasks {
        let (h, o, at) = t.await??;
        hist.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
        finished = finished.max(at);
    }
    let elapsed = finished.duration_since(started).as_secs_f64();
    let cpu_after = proc_cpu_seconds(control.process.pid());
    let self_after = proc_cpu_seconds(std::process::id());
    let issued_after = metric_value(control, "citadel_server_success_cert_issuance_count").await;
    let ok = outcomes.get("ok").copied().unwrap_or(0);
    let attempted: u64 = outcomes.values().sum();
    let control_cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    let harness_cpu = self_before.zip(self_after).map(|(b, a)| a - b);
    Ok(json!({
        "callers": args.callers,
        "identities": args.identities,
        "proof": format!("{:?}", args.proof).to_lowercase(),
        "connections": renewal.as_ref().map_or(args.callers, |r| r.len()),
        "duration_s": round3(elapsed),
        "csr_pool": pool,
        "csr_pool_exhausted": attempted as usize >= pool,
        "requests": attempted,
        "outcomes": outcomes,
        "certificates": ok,
        "certificates_per_s": round3(ok as f64 / elapsed.max(f64::EPSILON)),
        "latency_p50_ms": round3(hist.value_at_quantile(0.50) as f64 / 1000.0),
        "latency_p99_ms": round3(hist.value_at_quantile(0.99) as f64 / 1000.0),
        "latency_max_ms": round3(hist.max() as f64 / 1000.0),
        "control_cpu_s": control_cpu.map(round3),
        "control_cpu_ms_per_certificate": control_cpu
            .filter(|_| ok > 0)
            .map(|c| round3(c * 1000.0 / ok as f64)),
        "harness_cpu_s": harness_cpu.map(round3),
        "citadel_server_success_cert_issuance_count_delta": issued_before
            .zip(issued_after)
            .map(|(b, a)| a - b),
    }))
}

/// One mTLS connection per identity of the issuance benchmark, each
/// presenting a certificate obtained with a token (before the timed part).
pub(crate) async fn renewal_channels(control: &Control, identities: usize) -> Result<Vec<Channel>> {
    let ca_channel = connect(control, client_config(control, None)?).await?;
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(identities);
    for i in 0..identities {
        let (gate, ca_channel) = (gate.clone(), ca_channel.clone());
        let sa = format!("sa-{i:05}");
        let creds = async move {
            let _permit = gate.acquire_owned().await;
            obtain_credentials(control, ca_channel, CA_NS, &sa).await
        };
        tasks.push(creds);
    }
    let mut channels = Vec::with_capacity(identities);
    for creds in futures_util::future::join_all(tasks).await {
        let config = client_config(control, Some(creds?))?;
        channels.push(config);
    }
    let channels = futures_util::future::join_all(channels.into_iter().map(|config| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire_owned().await;
            connect(control, config).await
        }
    }))
    .await;
    channels.into_iter().collect()
}

/// `pool` CSRs with fresh P-256 keys, CSR `i` for identity `i % ids.len()`,
/// generated on every core.
pub(crate) fn generate_csrs(ids: &[SpiffeId], pool: usize) -> Result<Vec<String>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = pool.div_ceil(threads);
    let parts: Vec<Result<Vec<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(pool))
                        .map(|i| {
                            let key = WorkloadKey::generate(KeyType::EcP256)
                                .map_err(|e| anyhow!("key: {e}"))?;
                            csr_pem(&key, &ids[i % ids.len()])
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("CSR thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(pool);
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}
