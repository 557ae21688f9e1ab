//! The YAML loader on arbitrary bytes: it must never panic, and whatever it
//! accepts must compile into a policy engine and answer a request.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meshward_config::Loader;
use meshward_policy::{NoHeaders, PolicyEngine, Request, Workload, HttpAttributes};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut loader = Loader::new();
    loader.add_source("fuzz.yaml", text);
    if let Ok(loaded) = loader.finish() {
        let engine = PolicyEngine::new(Arc::new(loaded.config));
        let workload = Workload {
            namespace: "default".into(),
            service_account: "default".into(),
            labels: [("app".to_string(), "x".to_string())].into(),
        };
        let policy = engine.workload(&workload);
        let req = Request {
            principal: Some("cluster.local/ns/default/sa/client"),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: None,
            destination_ip: None,
            port: 8080,
            sni: None,
            http: Some(HttpAttributes { method: "GET", path: "/a/../b", host: "x", headers: &NoHeaders, auth: None }),
        };
        let _ = policy.decide(&req).to_string();
    }
});
