//! In-process applications behind the proxies: one server loop
//! ([`serve`], HTTP/1.1 or cleartext HTTP/2) under the echo application
//! [`App`] (which also answers gRPC calls) and a TCP echo ([`Echo`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::http::executor;

/// The protocol an application speaks to its proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Cleartext HTTP/2 with prior knowledge (as gRPC servers speak).
    Http2,
}

/// A server task on 127.0.0.1, aborted on drop.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on an ephemeral port of 127.0.0.1.
pub async fn serve<F, Fut, B>(protocol: Protocol, handler: F) -> Server
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(serve_on(listener, protocol, handler));
    Server { addr, task }
}

/// Serves `handler` on `listener`, one task per connection, until the
/// returned future is dropped.
pub async fn serve_on<F, Fut, B>(listener: TcpListener, protocol: Protocol, handler: F)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors or similar: back off briefly
                // rather than spin; this is not synchronization.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let io = TokioIo::new(stream);
            let _ = match protocol {
                Protocol::Http1 => {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                }
                Protocol::Http2 => {
                    hyper::server::conn::http2::Builder::new(executor())
                        .serve_connection(io, svc)
                        .await
                }
            };
        });
    }
}

/// A request as the echo application saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub method: String,
    /// HTTP/1.1: the request-target as sent; HTTP/2: the path and query
    /// (the URI carries the authority).
    pub path: String,
    /// Repeated fields joined with ", ", in order.
    pub headers: BTreeMap<String, String>,
}

impl Seen {
    fn of<B>(req: &http::Request<B>) -> Seen {
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in req.headers() {
            let v = v.to_str().unwrap_or_default();
            headers
                .entry(k.as_str().to_string())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
        let path = if req.version() == http::Version::HTTP_2 {
            req.uri()
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default()
        } else {
            req.uri().to_string()
        };
        Seen {
            version: req.version(),
            method: req.method().to_string(),
            path,
            headers,
        }
    }
}

/// What the echo application answers.
#[derive(Debug, Clone)]
pub struct AppSpec {
    pub protocol: Protocol,
    /// The body of every (non-gRPC) answer.
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    /// Whether requests are recorded (a benchmark's app records nothing).
    pub record: bool,
}

impl AppSpec {
    /// HTTP/1.1, answering `body`, recording requests.
    pub fn http1(body: impl Into<Bytes>) -> AppSpec {
        AppSpec {
            protocol: Protocol::Http1,
            body: body.into(),
            content_type: None,
            record: true,
        }
    }
}

/// The echo application: answers `200` with a fixed body and records what
/// it received. A gRPC call (`content-type: application/grpc`) gets a
/// gRPC answer: the request is read, then one message (`hi`) and the
/// trailer `grpc-status: 0`.
#[derive(Debug)]
pub struct App {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _server: Server,
}

impl App {
    /// HTTP/1.1, answering `name`.
    pub async fn start(name: &'static str) -> App {
        App::start_with(AppSpec::http1(name)).await
    }

    /// Cleartext HTTP/2, as a gRPC server speaks.
    pub async fn start_grpc() -> App {
        App::start_with(AppSpec {
            protocol: Protocol::Http2,
            ..AppSpec::http1("grpc")
        })
        .await
    }

    pub async fn start_with(spec: AppSpec) -> App {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let server = serve(spec.protocol, answer(spec, Arc::clone(&seen))).await;
        App {
            addr: server.addr,
            seen,
            _server: server,
        }
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// The echo application's answer to one request.
type Answer =
    std::pin::Pin<Box<dyn Future<Output = http::Response<BoxBody<Bytes, Infallible>>> + Send>>;

fn answer(
    spec: AppSpec,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> impl Fn(http::Request<Incoming>) -> Answer + Clone + Send + Sync + 'static {
    move |req: http::Request<Incoming>| {
        if spec.record {
            seen.lock().unwrap().push(Seen::of(&req));
        }
        let spec = spec.clone();
        Box::pin(async move {
            let grpc = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if grpc {
                return grpc_answer(req).await;
            }
            let mut resp = http::Response::new(Full::new(spec.body).boxed());
            if let Some(ct) = spec.content_type {
                resp.headers_mut()
                    .insert("content-type", http::HeaderValue::from_static(ct));
            }
            resp
        })
    }
}

async fn grpc_answer(req: http::Request<Incoming>) -> http::Response<BoxBody<Bytes, Infallible>> {
    // A unary server reads the request message before it answers.
    // Answering first would race the proxy's count of the request's bytes.
    let _ = req.into_body().collect().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = http::Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The echo application on an OS thread of its own with a single-threaded
/// runtime, so that its cost never shares a runtime with the caller's
/// (the benchmark's load generator). Stops its thread on drop.
#[derive(Debug)]
pub struct ThreadedApp {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadedApp {
    pub fn spawn(spec: AppSpec) -> std::io::Result<ThreadedApp> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("test-app".to_owned())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    let serving = serve_on(listener, spec.protocol, answer(spec, Arc::default()));
                    tokio::select! {
                        _ = rx => {}
                        _ = serving => {}
                    }
                });
            })?;
        Ok(ThreadedApp {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for ThreadedApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves raw TCP on an ephemeral port of 127.0.0.1: `handler` gets each
/// accepted connection, on a task of its own.
pub async fn serve_tcp<F, Fut>(handler: F) -> Server
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(handler(s));
        }
    });
    Server { addr, task }
}

/// An in-process TCP echo server.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddr,
    _server: Server,
}

impl Echo {
    pub async fn start() -> Echo {
        let server = serve_tcp(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await;
        Echo {
            addr: server.addr,
            _server: server,
        }
    }
}
