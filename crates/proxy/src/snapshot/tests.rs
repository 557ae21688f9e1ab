use super::*;

fn snapshot(yaml: &str, workload: &str) -> Result<Snapshot, SnapshotError> {
    let mut loader = meshward_config::Loader::new();
    loader.add_source("test.yaml", yaml);
    let config = loader.finish().unwrap_or_else(|d| panic!("{d}")).config;
    Snapshot::build(
        Arc::new(config),
        workload,
        1,
        &JwksStore::default(),
        &DnsStore::default(),
    )
}

const BASE: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: api
  namespace: prod
  annotations:
    meshward.io/app-ports: "http=127.0.0.1:18080, grpc-api=19090"
    meshward.io/outbound: "127.0.0.1:15001"
    meshward.io/tcp-outbound: "127.0.0.1:15432=DB.prod.svc.cluster.local:5432"
spec:
  address: 127.0.0.1
  labels: {app: api}
  serviceAccount: api-sa
  ports: {http: 8080, grpc-api: 9090, db: 5432, tcp-raw: 7000}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{number: 80, name: db, protocol: HTTP, targetPort: 5432}]
  workloadSelector: {labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: legacy
  namespace: prod
  annotations: {meshward.io/proxy: "false"}
spec: {address: 10.0.0.9, labels: {app: legacy}, ports: {http: 80}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: prod}
spec:
  hosts: [legacy.prod.svc.cluster.local]
  ports: [{number: 80, name: http}]
  workloadSelector: {labels: {app: legacy}}
"#;

#[test]
fn workload_ports_protocols_and_app_addresses() {
    let s = snapshot(BASE, "prod/api").unwrap();
    assert_eq!(s.identity, "spiffe://cluster.local/ns/prod/sa/api-sa");
    let port = |n: u16| s.inbound_port(n).unwrap().clone();
    assert_eq!(port(8080).protocol, Protocol::Http);
    assert_eq!(port(8080).app, "127.0.0.1:18080".parse().unwrap());
    assert_eq!(port(9090).protocol, Protocol::Http, "grpc prefix");
    assert_eq!(
        port(9090).app,
        "127.0.0.1:19090".parse().unwrap(),
        "bare port means 127.0.0.1"
    );
    assert_eq!(
        port(5432).protocol,
        Protocol::Http,
        "the ServiceEntry protocol wins over the name"
    );
    assert_eq!(port(7000).protocol, Protocol::Tcp);
    assert_eq!(
        port(7000).app,
        "127.0.0.1:7000".parse().unwrap(),
        "default: same port on 127.0.0.1"
    );
    assert_eq!(s.outbound, Some("127.0.0.1:15001".parse().unwrap()));
    assert_eq!(s.tcp_outbound[0].host, "db.prod.svc.cluster.local");
    assert_eq!(s.tcp_outbound[0].port, 5432);
}

#[test]
fn services_hosts_and_auto_mtls() {
    let s = snapshot(BASE, "prod/api").unwrap();
    let legacy = s
        .service_for_host("Legacy.Prod.svc.cluster.local:80")
        .unwrap();
    assert_eq!(
        legacy.endpoints[0].identity,
        "spiffe://cluster.local/ns/prod/sa/default"
    );
    assert!(!legacy.endpoints[0].has_proxy);
    assert_eq!(
        s.tls_mode(legacy, 80, &legacy.endpoints[0]),
        TlsMode::Disable
    );
    let api = s.service_for_host("api.prod.svc.cluster.local").unwrap();
    assert_eq!(s.tls_mode(api, 80, &api.endpoints[0]), TlsMode::IstioMutual);
    assert_eq!(api.endpoint_port(&api.ports[0], &api.endpoints[0]), 5432);
    assert!(s.service_for_host("unknown.host").is_none());
}

#[test]
fn destination_rule_port_settings_override_auto_mtls() {
    let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: legacy, namespace: prod}\nspec:\n  host: legacy\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: DISABLE}\n";
    let s = snapshot(&format!("{BASE}{dr}"), "prod/api").unwrap();
    let legacy = s.service_for_host("legacy.prod.svc.cluster.local").unwrap();
    assert_eq!(
        s.tls_mode(legacy, 80, &legacy.endpoints[0]),
        TlsMode::Disable
    );
    assert_eq!(
        s.tls_mode(legacy, 81, &legacy.endpoints[0]),
        TlsMode::IstioMutual
    );
}

#[test]
fn bad_bootstrap_facts_are_errors() {
    assert_eq!(
        snapshot(BASE, "prod/nope").unwrap_err(),
        SnapshotError::UnknownWorkload("prod/nope".into())
    );
    let bad = BASE.replace("http=127.0.0.1:18080, grpc-api=19090", "http=nowhere");
    assert!(matches!(
        snapshot(&bad, "prod/api").unwrap_err(),
        SnapshotError::BadAnnotation {
            annotation: APP_PORTS,
            ..
        }
    ));
    let bad = BASE.replace("http=127.0.0.1:18080, grpc-api=19090", "metrics=9000");
    assert!(
        snapshot(&bad, "prod/api")
            .unwrap_err()
            .to_string()
            .contains("not one of the WorkloadEntry's ports")
    );
    let bad = BASE.replace("\"127.0.0.1:15001\"", "\"localhost\"");
    assert!(matches!(
        snapshot(&bad, "prod/api").unwrap_err(),
        SnapshotError::BadAnnotation {
            annotation: OUTBOUND,
            ..
        }
    ));
    let bad = BASE.replace("=DB.prod.svc.cluster.local:5432", "");
    assert!(matches!(
        snapshot(&bad, "prod/api").unwrap_err(),
        SnapshotError::BadAnnotation {
            annotation: TCP_OUTBOUND,
            ..
        }
    ));
    let bad = BASE.replace("address: 127.0.0.1", "address: api.example.com");
    assert_eq!(
        snapshot(&bad, "prod/api").unwrap_err(),
        SnapshotError::NoAddress("prod/api".into())
    );
}

const EXTERNAL: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: api, namespace: prod}
spec: {address: 127.0.0.1, labels: {app: api}, serviceAccount: api-sa}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: external-api, namespace: prod}
spec:
  hosts: [api.external-service.com, Other.External-Service.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mixed, namespace: prod}
spec:
  hosts: [mixed.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints: [{address: 10.0.0.1}, {address: a.backend.example.com, ports: {http: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: logical, namespace: prod}
spec:
  hosts: [logical.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS_ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: prod}
spec:
  hosts: [passthrough.example.com]
  addresses: [192.0.2.0/24]
  ports: [{number: 8080, name: http, targetPort: 9090}]
  resolution: NONE
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addresses(svc: &Service, host: &str) -> Vec<String> {
    svc.endpoints_for(host)
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

#[test]
fn dns_services_route_to_the_current_answer_of_their_names() {
    let mut loader = meshward_config::Loader::new();
    loader.add_source("test.yaml", EXTERNAL);
    let config = loader.finish().unwrap_or_else(|d| panic!("{d}")).config;
    let dns = DnsStore::default();
    let s = Snapshot::build(Arc::new(config), "prod/api", 1, &JwksStore::default(), &dns).unwrap();
    let ttl = std::time::Duration::from_secs(30);

    // Without endpoints, each host is resolved for its own requests;
    // nothing is routed before an answer.
    let ext = s.service_for_host("api.external-service.com:443").unwrap();
    assert_eq!(ext.resolution, Resolution::Dns);
    assert!(ext.endpoints_for("api.external-service.com").is_empty());
    dns.get("api.external-service.com")
        .set_addresses(&[ip("10.1.0.1"), ip("10.1.0.2")], ttl);
    dns.get("other.external-service.com")
        .set_addresses(&[ip("10.2.0.1")], ttl);
    assert_eq!(
        addresses(ext, "API.external-service.com.:443"),
        ["10.1.0.1", "10.1.0.2"],
        "DNS uses every address"
    );
    // Each host is a service of its own, with its own name.
    let other = s.service_for_host("other.external-service.com").unwrap();
    assert_eq!(addresses(other, "other.external-service.com"), ["10.2.0.1"]);
    assert!(
        ext.dns_names_for("other.external-service.com")
            .next()
            .is_none()
    );
    let e = &ext.endpoints_for("api.external-service.com")[0];
    assert_eq!(ext.endpoint_port(&ext.ports[0], e), 443);
    assert!(!e.has_proxy, "an external host has no sidecar");
    assert_eq!(s.tls_mode(ext, 443, e), TlsMode::Disable);

    // Endpoints: IPs as they are, names by their answer, with the
    // endpoint's own ports.
    let mixed = s.service_for_host("mixed.example.com").unwrap();
    assert_eq!(addresses(mixed, "mixed.example.com"), ["10.0.0.1"]);
    dns.get("a.backend.example.com")
        .set_addresses(&[ip("10.3.0.1"), ip("10.3.0.2")], ttl);
    let eps = mixed.endpoints_for("mixed.example.com");
    assert_eq!(
        addresses(mixed, "mixed.example.com"),
        ["10.0.0.1", "10.3.0.1", "10.3.0.2"]
    );
    assert_eq!(mixed.endpoint_port(&mixed.ports[0], &eps[1]), 8080);

    // DNS_ROUND_ROBIN: only the first address of the answer.
    let logical = s.service_for_host("logical.example.com").unwrap();
    dns.get("logical.example.com")
        .set_addresses(&[ip("10.4.0.1"), ip("10.4.0.2")], ttl);
    assert_eq!(addresses(logical, "logical.example.com"), ["10.4.0.1"]);

    // The snapshot points to the store's slots: a later answer is seen
    // without a new snapshot.
    dns.get("api.external-service.com")
        .set_addresses(&[ip("10.1.0.9")], ttl);
    assert_eq!(addresses(ext, "api.external-service.com"), ["10.1.0.9"]);
}

#[test]
fn a_none_service_has_an_original_destination_only_for_its_addresses() {
    let s = snapshot(EXTERNAL, "prod/api").unwrap();
    let by_name = s.service_for_host("passthrough.example.com").unwrap();
    assert_eq!(by_name.resolution, Resolution::None);
    assert!(by_name.endpoints_for("passthrough.example.com").is_empty());
    let (svc, dst) = s.original_destination("192.0.2.7:8080").unwrap();
    assert_eq!(svc.name, "passthrough");
    assert_eq!(dst, ip("192.0.2.7"));
    let ep = svc.implicit.at(dst);
    assert_eq!(
        svc.endpoint_port(&svc.ports[0], &ep),
        9090,
        "targetPort applies"
    );
    assert!(s.original_destination("198.51.100.1:8080").is_none());
    assert!(s.original_destination("passthrough.example.com").is_none());
}

#[test]
fn hosts_without_ports() {
    assert_eq!(strip_port("a.b:8080"), "a.b");
    assert_eq!(strip_port("a.b"), "a.b");
    assert_eq!(strip_port("[::1]:80"), "::1");
    assert_eq!(inbound_protocol("http-web", None).0, Protocol::Http);
    assert_eq!(
        inbound_protocol("web", Some("grpc")),
        (Protocol::Http, true)
    );
    assert_eq!(inbound_protocol("https", None).0, Protocol::Tcp);
}

#[test]
fn ports_know_their_service_and_endpoints_their_workload() {
    let s = snapshot(BASE, "prod/api").unwrap();
    let service = |n: u16| s.inbound_port(n).unwrap().service.clone();
    let db = service(5432).expect("the ServiceEntry's port targets 5432");
    assert_eq!(
        (db.host.as_str(), db.name.as_str(), db.namespace.as_str()),
        ("api.prod.svc.cluster.local", "api", "prod")
    );
    assert_eq!(service(7000), None, "no ServiceEntry has the port");
    assert_eq!((s.own.name.as_str(), s.own.app.as_str()), ("api", "api"));
    let legacy = s.service_for_host("legacy.prod.svc.cluster.local").unwrap();
    let w = legacy.endpoints[0].workload.as_ref().unwrap();
    assert_eq!((w.namespace.as_str(), w.name.as_str()), ("prod", "legacy"));
    let dumped = serde_json::to_value(&legacy.endpoints[0]).unwrap();
    assert_eq!(dumped["workload"], "prod/legacy");
}

#[test]
fn outbound_connections_come_from_the_workload_address_only_when_the_host_has_it() {
    // BASE's workload is on 127.0.0.1.
    let s = snapshot(BASE, "prod/api").unwrap();
    assert_eq!(s.source_address, Some(ip("127.0.0.1")));
    // 192.0.2.1 (TEST-NET-1) is no host's.
    let elsewhere = BASE.replacen("address: 127.0.0.1", "address: 192.0.2.1", 1);
    let s = snapshot(&elsewhere, "prod/api").unwrap();
    assert_eq!(s.address, ip("192.0.2.1"));
    assert_eq!(s.source_address, None);
}

/// Under capture a connection is known by its original destination: a
/// service address (VIP), an endpoint's address (its endpoint port,
/// reached as the service port that maps to it), or an address range of
/// a ServiceEntry; anything else is nobody's.
#[test]
fn original_destinations_have_owners() {
    let yaml = format!(
        "{BASE}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: vip, namespace: prod}}
spec:
  hosts: [vip.prod.svc.cluster.local]
  addresses: [10.96.0.7]
  ports: [{{number: 8080, name: tcp-x}}]
  workloadSelector: {{labels: {{app: legacy}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: range, namespace: prod}}
spec:
  hosts: [range.example.com]
  addresses: [192.0.2.0/24]
  resolution: NONE
  ports: [{{number: 443, name: tls}}]
"
    );
    let s = snapshot(&yaml, "prod/api").unwrap();
    let ip = |a: &str| a.parse::<IpAddr>().unwrap();
    let name = |o: Option<Owner<'_>>| o.map(|o| (o.service().host.clone(), o.port()));
    // The VIP, on a port the service has.
    let vip = s.owner_of(ip("10.96.0.7"), 8080);
    assert!(matches!(vip, Some(Owner::Service { .. })));
    assert_eq!(name(vip), Some(("vip.prod.svc.cluster.local".into(), 8080)));
    assert!(!vip.unwrap().is_http());
    assert!(s.owner_of(ip("10.96.0.7"), 9999).is_none());
    // An endpoint's address: legacy's port 80 is an HTTP service port.
    let ep = s.owner_of(ip("10.0.0.9"), 80);
    assert!(
        matches!(ep, Some(Owner::Endpoint { endpoint, .. }) if endpoint.address == ip("10.0.0.9"))
    );
    assert_eq!(name(ep), Some(("legacy.prod.svc.cluster.local".into(), 80)));
    assert!(ep.unwrap().is_http());
    // The endpoint port is what was dialed: api's service port 80 maps to
    // its port 5432.
    let target = s.owner_of(ip("127.0.0.1"), 5432);
    assert_eq!(
        name(target),
        Some(("api.prod.svc.cluster.local".into(), 80))
    );
    assert!(s.owner_of(ip("127.0.0.1"), 80).is_none());
    // A range of addresses.
    let ranged = s.owner_of(ip("192.0.2.55"), 443);
    assert_eq!(name(ranged), Some(("range.example.com".into(), 443)));
    // Nobody's.
    assert!(s.owner_of(ip("203.0.113.1"), 443).is_none());
}

/// Under capture the application is reached at the workload's address
/// (not loopback) unless an annotation or flag says where it listens.
#[test]
fn under_capture_the_application_is_at_the_workload_address() {
    let mut loader = meshward_config::Loader::new();
    loader.add_source("test.yaml", BASE);
    let config = Arc::new(loader.finish().unwrap().config);
    let build = |capture| {
        let overrides = crate::Overrides {
            capture,
            ..Default::default()
        };
        Snapshot::build_with(
            Arc::clone(&config),
            "prod/legacy",
            1,
            (&JwksStore::default(), &DnsStore::default()),
            &overrides,
        )
        .unwrap()
    };
    let app = |s: &Snapshot| s.inbound.iter().find(|p| p.name == "http").unwrap().app;
    assert_eq!(app(&build(None)), "127.0.0.1:80".parse().unwrap());
    let s = build(Some(crate::capture::CaptureListen::default_ports()));
    assert_eq!(app(&s), "10.0.0.9:80".parse().unwrap());
    assert!(s.capture.is_some());
}

const NAMES: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: prod}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: prod}
spec:
  hosts: ["*.wild.example.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.3.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: prod}
spec:
  hosts: [fixed.example.com]
  addresses: [192.0.2.10, "2001:db8::10", 198.51.100.0/24]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: blocks, namespace: prod}
spec:
  hosts: [blocks.example.com]
  addresses: [198.51.100.0/24]
  ports: [{number: 80, name: http}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: headless, namespace: prod}
spec:
  hosts: [headless.example.com]
  ports: [{number: 80, name: http}]
  resolution: NONE
  workloadSelector: {labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: billing}
spec:
  hosts: [pay.billing.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hidden, namespace: billing}
spec:
  hosts: [hidden.billing.svc.cluster.local]
  exportTo: ["."]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.2}]
"#;

fn allocated(host: &str) -> Vec<IpAddr> {
    let (v4, v6) = crate::vip::addresses_of(crate::vip::home_slot(host));
    vec![IpAddr::V4(v4), IpAddr::V6(v6)]
}

#[test]
fn entries_without_addresses_get_allocated_ones_explicit_ones_win() {
    let s = snapshot(&format!("{BASE}{NAMES}"), "prod/api").unwrap();
    let svc = |h: &str| s.service_for_host(h).unwrap();
    // Selected workloads, resolution NONE by default: no allocation.
    assert!(svc("api.prod.svc.cluster.local").allocated.is_empty());
    // STATIC and DNS without addresses: allocated from the host.
    assert_eq!(
        svc("api.example.com").allocated,
        allocated("api.example.com")
    );
    assert_eq!(
        svc("api.example.com").dns_addresses(),
        allocated("api.example.com")
    );
    assert!(svc("*.wild.example.com").allocated.is_empty(), "wildcard");
    assert_eq!(
        svc("pay.billing.svc.cluster.local").allocated,
        allocated("pay.billing.svc.cluster.local")
    );
    // Explicit single addresses are the DNS addresses; blocks are not.
    assert!(svc("fixed.example.com").allocated.is_empty());
    assert_eq!(
        svc("fixed.example.com").dns_addresses(),
        [ip("192.0.2.10"), ip("2001:db8::10")]
    );
    assert!(svc("blocks.example.com").dns_addresses().is_empty());
    // The same host gets the same address in another workload's proxy
    // (one that does not even see some of the services).
    let other = snapshot(&format!("{BASE}{NAMES}"), "prod/legacy").unwrap();
    assert_eq!(
        other.service_for_host("api.example.com").unwrap().allocated,
        allocated("api.example.com")
    );
}

#[test]
fn service_addresses_and_allocated_ones_have_owners() {
    let s = snapshot(&format!("{BASE}{NAMES}"), "prod/api").unwrap();
    // The service whose address it is, on a port of the service.
    let at = |a: &str, port: u16| match s.owner_of(ip(a), port) {
        Some(Owner::Service { svc, .. }) => Some(svc.host.as_str()),
        _ => None,
    };
    assert_eq!(at("192.0.2.10", 80), Some("fixed.example.com"));
    assert_eq!(at("2001:db8::10", 80), Some("fixed.example.com"));
    for a in allocated("api.example.com") {
        let owner = s.owner_of(a, 443).unwrap();
        assert!(matches!(owner, Owner::Service { .. }));
        assert_eq!(owner.service().host, "api.example.com");
    }
    // An explicit range of a NONE service is its; an endpoint's address
    // is the endpoint's, not the service's.
    assert_eq!(at("198.51.100.7", 80), Some("fixed.example.com"));
    assert!(matches!(
        s.owner_of(ip("10.1.0.1"), 80),
        Some(Owner::Endpoint { .. })
    ));
    assert_eq!(at("240.240.255.254", 443).is_some(), {
        let (v4, _) = crate::vip::addresses_of(crate::vip::SLOTS - 1);
        s.services
            .iter()
            .any(|x| x.allocated.contains(&IpAddr::V4(v4)))
    });
}

#[test]
fn the_name_table_has_hosts_short_names_and_headless_endpoints() {
    let s = snapshot(&format!("{BASE}{NAMES}"), "prod/api").unwrap();
    let v4 = |n: &str| s.names.lookup(n).map(|e| e.v4.clone());
    let v6 = |n: &str| s.names.lookup(n).map(|e| e.v6.clone());
    // Explicit addresses, v4 and v6 kept apart; any case, final dot.
    assert_eq!(
        v4("Fixed.Example.com."),
        Some(vec!["192.0.2.10".parse().unwrap()])
    );
    assert_eq!(
        v6("fixed.example.com"),
        Some(vec!["2001:db8::10".parse().unwrap()])
    );
    // Allocated.
    let a = allocated("api.example.com");
    assert_eq!(v4("api.example.com").unwrap().len(), 1);
    assert_eq!(IpAddr::V4(v4("api.example.com").unwrap()[0]), a[0]);
    // NONE without addresses: the endpoints (Istio's headless answer).
    assert_eq!(
        v4("headless.example.com"),
        Some(vec!["10.0.0.9".parse().unwrap()])
    );
    assert_eq!(v6("headless.example.com"), Some(vec![]));
    // NONE with only CIDR blocks and wildcards: not answered.
    assert!(s.names.lookup("blocks.example.com").is_none());
    assert!(s.names.lookup("x.wild.example.com").is_none());
    // Kubernetes-style short names: the bare name only in the namespace.
    let legacy = v4("legacy.prod.svc.cluster.local");
    assert_eq!(legacy, Some(vec!["10.0.0.9".parse().unwrap()]));
    for n in ["legacy.prod.svc", "legacy.prod", "legacy"] {
        assert_eq!(v4(n), legacy, "{n}");
    }
    let pay = v4("pay.billing.svc.cluster.local");
    assert!(pay.is_some());
    assert_eq!(v4("pay.billing.svc"), pay);
    assert_eq!(v4("pay.billing"), pay);
    assert_eq!(v4("pay"), None, "another namespace's service");
    // Not exported to this namespace: not there at all.
    assert!(s.names.lookup("hidden.billing.svc.cluster.local").is_none());
    assert!(s.names.lookup("hidden.billing").is_none());
    assert!(s.names.lookup("unknown.example.com").is_none());
}

/// A request may name a Kubernetes-style host by the short names the DNS
/// proxy answers: `name.ns.svc`, `name.ns`, and `name` from the same
/// namespace only.
#[test]
fn requests_may_name_kubernetes_hosts_by_their_short_names() {
    let yaml = format!(
        "{BASE}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cart, namespace: prod}}
spec:
  hosts: [cart.prod.svc.cluster.local]
  ports: [{{number: 8080, name: http}}]
  resolution: STATIC
  endpoints: [{{address: 10.4.0.1}}]
"
    );
    let from_prod = snapshot(&yaml, "prod/api").unwrap();
    let host = |s: &Snapshot, h: &str| s.service_for_host(h).map(|svc| svc.host.clone());
    for name in [
        "cart",
        "cart:8080",
        "CART.prod",
        "cart.prod.svc",
        "cart.prod.svc.cluster.local",
    ] {
        assert_eq!(
            host(&from_prod, name).as_deref(),
            Some("cart.prod.svc.cluster.local"),
            "{name}"
        );
    }
    let from_other = snapshot(
        &format!(
            "{yaml}---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: other}}
spec: {{address: 10.5.0.1}}
"
        ),
        "other/client",
    )
    .unwrap();
    assert!(host(&from_other, "cart.prod").is_some());
    assert_eq!(host(&from_other, "cart"), None);
    assert_eq!(host(&from_prod, "cart.other"), None);
}
