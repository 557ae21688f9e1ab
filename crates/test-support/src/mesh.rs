//! Istio resources as YAML documents, each ending with `---`, so that a
//! test concatenates the ones it needs into one configuration file.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// A `WorkloadEntry` on 127.0.0.1 (or [`WorkloadEntry::address`]),
/// labelled `app: <name>` (and [`WorkloadEntry::label`]s).
#[derive(Debug, Clone)]
pub struct WorkloadEntry {
    namespace: String,
    name: String,
    service_account: String,
    address: String,
    app: String,
    labels: Vec<(String, String)>,
    ports: Vec<(String, u16)>,
    annotations: Vec<(String, String)>,
}

impl WorkloadEntry {
    /// `namespace/name` with service account and `app` label `name`.
    pub fn new(namespace: &str, name: &str) -> WorkloadEntry {
        WorkloadEntry {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service_account: name.to_owned(),
            address: "127.0.0.1".to_owned(),
            app: name.to_owned(),
            labels: Vec::new(),
            ports: Vec::new(),
            annotations: Vec::new(),
        }
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_owned();
        self
    }

    /// `spec.address` (default `127.0.0.1`).
    pub fn address(mut self, address: &str) -> Self {
        self.address = address.to_owned();
        self
    }

    /// A label besides `app`.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The `app` label (default: the name).
    pub fn app(mut self, app: &str) -> Self {
        self.app = app.to_owned();
        self
    }

    /// A named port the workload's proxy listens on.
    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push((name.to_owned(), port));
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `meshward.io/app-ports`: where the proxy reaches the application
    /// for each named port (`name=127.0.0.1:port`).
    pub fn app_ports(self, ports: &[(&str, SocketAddr)]) -> Self {
        let value = ports
            .iter()
            .map(|(name, addr)| format!("{name}=127.0.0.1:{}", addr.port()))
            .collect::<Vec<_>>()
            .join(", ");
        self.annotation("meshward.io/app-ports", &value)
    }

    /// `meshward.io/outbound`: the proxy's outbound listener.
    pub fn outbound(self, port: u16) -> Self {
        self.annotation("meshward.io/outbound", &format!("127.0.0.1:{port}"))
    }

    pub fn yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {}\n  namespace: {}\n",
            self.name, self.namespace
        );
        if !self.annotations.is_empty() {
            let a: Vec<String> = self
                .annotations
                .iter()
                .map(|(k, v)| format!("{k}: \"{v}\""))
                .collect();
            let _ = writeln!(y, "  annotations: {{{}}}", a.join(", "));
        }
        let labels: String = self
            .labels
            .iter()
            .map(|(k, v)| format!(", {k}: \"{v}\""))
            .collect();
        let _ = write!(
            y,
            "spec:\n  address: {}\n  labels: {{app: {}{labels}}}\n  serviceAccount: {}\n",
            self.address, self.app, self.service_account
        );
        if !self.ports.is_empty() {
            let p: Vec<String> = self
                .ports
                .iter()
                .map(|(n, port)| format!("{n}: {port}"))
                .collect();
            let _ = writeln!(y, "  ports: {{{}}}", p.join(", "));
        }
        y + "---\n"
    }
}

/// A `ServiceEntry` for `NAME.NS.svc.cluster.local` whose endpoints are
/// the workloads labelled `app: <app>` (`resolution: STATIC`); `ports` is
/// the inside of its `ports:` list, e.g.
/// `{number: 8080, name: http, protocol: HTTP}`.
pub fn service_entry(ns: &str, name: &str, app: &str, ports: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  hosts: [{name}.{ns}.svc.cluster.local]\n  ports: [{ports}]\n  workloadSelector: {{labels: {{app: {app}}}}}\n  resolution: STATIC\n---\n"
    )
}

/// meshward's `MeshConfig` resource (Istio's `meshConfig` as a document)
/// with `spec` (YAML lines indented by two spaces, e.g.
/// `"  connectTimeout: 1s\n"`).
pub fn mesh_config(spec: &str) -> String {
    format!(
        "apiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh, namespace: istio-system}}\nspec:\n{}\n---\n",
        spec.trim_end_matches('\n')
    )
}

/// A `PeerAuthentication` `name` in `ns` with mTLS `mode` (STRICT,
/// PERMISSIVE, DISABLE); in `istio-system`, mesh-wide.
pub fn peer_authentication(ns: &str, name: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{mtls: {{mode: {mode}}}}}\n---\n"
    )
}

/// The mesh-wide STRICT `PeerAuthentication`.
pub fn mesh_strict() -> String {
    peer_authentication("istio-system", "default", "STRICT")
}

/// An `AuthorizationPolicy` `name` in `ns` whose `spec` is `spec` (YAML
/// lines indented by two spaces, or a flow mapping such as `{}`).
pub fn authorization_policy(ns: &str, name: &str, spec: &str) -> String {
    let spec = if spec.starts_with('{') {
        format!(" {spec}\n")
    } else {
        format!("\n{}", spec.trim_end_matches('\n').to_owned() + "\n")
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:{spec}---\n"
    )
}

/// An ALLOW `AuthorizationPolicy` for the workloads labelled
/// `app: <app>`: requests from `principal` (Istio's form, without
/// `spiffe://`), with `to` (a YAML flow sequence of operations, e.g.
/// `[{operation: {methods: ["GET"]}}]`) when given.
pub fn allow_from(ns: &str, name: &str, app: &str, principal: &str, to: Option<&str>) -> String {
    let mut spec = format!(
        "  selector: {{matchLabels: {{app: {app}}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n"
    );
    if let Some(to) = to {
        let _ = writeln!(spec, "    to: {to}");
    }
    authorization_policy(ns, name, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_entry_renders_as_the_tests_wrote_it() {
        let app: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            WorkloadEntry::new("production", "orders")
                .app_ports(&[("http", app)])
                .port("http", 15006)
                .yaml(),
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: orders\n  namespace: production\n  annotations: {meshward.io/app-ports: \"http=127.0.0.1:8080\"}\nspec:\n  address: 127.0.0.1\n  labels: {app: orders}\n  serviceAccount: orders\n  ports: {http: 15006}\n---\n"
        );
    }

    #[test]
    fn mesh_config_renders_its_spec_block() {
        assert_eq!(
            mesh_config("  connectTimeout: 1s\n"),
            "apiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh, namespace: istio-system}\nspec:\n  connectTimeout: 1s\n---\n"
        );
    }

    #[test]
    fn policies_render_as_flow_or_block_specs() {
        assert_eq!(
            authorization_policy("production", "deny-all", "{}"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: production}\nspec: {}\n---\n"
        );
        assert_eq!(
            allow_from(
                "production",
                "p",
                "orders",
                "cluster.local/ns/production/sa/frontend",
                None
            ),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: production}\nspec:\n  selector: {matchLabels: {app: orders}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/production/sa/frontend\"]}}]\n---\n"
        );
    }
}
