//! Test support shared by the end-to-end tests (`crates/cli/tests`), the
//! benchmark harness (`bench`) and the identity tests
//! (`crates/identity/tests`): one of each helper they all need, so that a
//! fix to a readiness wait, a certificate layout or an Envoy bootstrap
//! lands everywhere at once.
//!
//! - [`ca`]: a test mesh CA writing workload certificates in Istio's
//!   layout, a PKI of its own for services outside the mesh, and a builder
//!   of odd certificates;
//! - [`app`]: in-process applications (HTTP/1.1, HTTP/2, gRPC, TCP echo);
//! - [`envoy`]: the Envoy binary and Istio-style sidecar bootstraps;
//! - [`mesh`]: Istio resources as YAML documents;
//! - [`wait`]: bounded waits (eventual consistency, ports, admin readiness)
//!   and free ports;
//! - [`process`]: child processes stopped on drop, their output printed when
//!   a test fails;
//! - [`http`]: small HTTP clients;
//! - [`jwt`]: signing keys for RequestAuthentication tests;
//! - [`tls`]: a mesh peer's mTLS client.
//!
//! Helpers panic on set-up errors (they run inside tests) except where the
//! benchmark needs an error it can report: those return `Result`.

// Everything here is test code: a failed set-up step is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod app;
pub mod ca;
pub mod envoy;
pub mod http;
pub mod jwt;
pub mod mesh;
pub mod netns;
pub mod process;
pub mod tls;
pub mod wait;

pub use app::{App, Echo, Seen};
pub use process::{Process, stop};
pub use wait::{eventually, free_port, free_ports, patience};
