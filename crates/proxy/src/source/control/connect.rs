//! Connections to the control plane: gRPC (HTTP/2, ALPN `h2`) over
//! tokio-rustls, through tonic's `Endpoint::connect_with_connector` (tonic's
//! own TLS cannot take a SPIFFE verifier). The server must present an SVID
//! of the control plane's identity that chains to the trust bundle current
//! at the handshake (the `--root-cert` file until the control plane pushes
//! one); the client presents its current mesh certificate, or none for a
//! first issuance. A connection keeps the TLS session it was made with, so
//! a stream outlives a certificate rotation; new connections use what is
//! current.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshward_identity::verify::TrustDomains;
use meshward_identity::{
    CredentialResolver, SpiffeServerVerifier, SvidVerifier, TrustBundle, WorkloadCredentials,
};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::Shared;

/// One control-plane address, `host:port` as given.
#[derive(Debug, Clone)]
pub(crate) struct Address {
    pub(crate) text: String,
    host: String,
    port: u16,
}

impl Address {
    /// Parses `host:port` (`[v6]:port` for IPv6 literals).
    pub(crate) fn parse(text: &str) -> Result<Address, String> {
        let text = text.trim();
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| "expected HOST:PORT".to_string())?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number"))?;
        if port == 0 {
            return Err("port 0 is not an address to connect to".to_string());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the host is empty".to_string());
        }
        // tonic needs a URI; the connector below does the connecting.
        Endpoint::from_shared(format!("http://{text}")).map_err(|e| e.to_string())?;
        Ok(Address {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
        })
    }
}

/// A gRPC channel to `address`, presenting `credentials` when given.
pub(crate) async fn channel(
    shared: &Shared,
    address: &Address,
    credentials: Option<&WorkloadCredentials>,
) -> Result<Channel, String> {
    let bundle = shared.bundle.borrow().clone();
    let config = client_config(shared, &bundle, credentials).map_err(|e| e.to_string())?;
    let connector = TlsConnector {
        config: Arc::new(config),
        address: address.clone(),
    };
    // Validated in Address::parse.
    let endpoint = Endpoint::from_shared(format!("http://{}", address.text))
        .map_err(|e| e.to_string())?
        .connect_timeout(shared.connect_timeout)
        // A control plane that vanished without closing the connection
        // (a host down, a partition) is noticed within seconds.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| error_chain(&e))
}

/// A rustls client config that accepts only the control plane's identity
/// chained to `bundle`, and presents `credentials` if given.
fn client_config(
    shared: &Shared,
    bundle: &TrustBundle,
    credentials: Option<&WorkloadCredentials>,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(
            bundle.clone(),
            TrustDomains::only([shared.control_id.trust_domain()]),
        ),
        [shared.control_id.clone()],
    );
    let mut config = match credentials {
        Some(c) => {
            meshward_identity::client_config(verifier, CredentialResolver::fixed(c.clone()))?
        }
        None => ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .dangerous()
        // Not a weakening: SpiffeServerVerifier verifies the chain and
        // the control plane's SPIFFE ID; it only replaces DNS-name
        // matching, which SVIDs need not have.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects TCP then TLS to its address (the URI tonic passes is ignored).
#[derive(Clone)]
struct TlsConnector {
    config: Arc<ClientConfig>,
    address: Address,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let config = Arc::clone(&self.config);
        let address = self.address.clone();
        Box::pin(async move {
            let tcp = connect_tcp(&address).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(address.host.clone()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{:?} is not a host name or IP address", address.host),
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Connects to the first of the host's addresses that accepts.
async fn connect_tcp(address: &Address) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((address.host.as_str(), address.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} resolves to no address", address.host),
        )
    }))
}

/// An error with its causes, `a: b: c` (tonic's transport errors say
/// little at the top); a refused control-plane certificate says why in
/// words.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(current) = next {
        if let Some(svid) = svid_error(current) {
            return format!("{}: the control plane's certificate is refused: {svid}", e);
        }
        let text = current.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = current.source();
    }
    out
}

/// The SVID check that refused a handshake, if that is what `e` is (a
/// rustls error, maybe inside an I/O error).
fn svid_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let rustls = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })?;
    meshward_identity::verify::svid_error_of(rustls).map(|s| s.to_string())
}

/// Whether a call that failed with `status` should try the next address:
/// the control plane was not reached, or is going away.
pub(crate) fn is_unavailable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        let a = Address::parse("127.0.0.1:15012").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 15012));
        let a = Address::parse("istiod.istio-system:15012").unwrap();
        assert_eq!(a.host, "istiod.istio-system");
        let a = Address::parse("[::1]:15012").unwrap();
        assert_eq!(a.host, "::1");
        for bad in [
            "",
            "localhost",
            "localhost:",
            "localhost:x",
            ":15012",
            "h:0",
            "h:70000",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
