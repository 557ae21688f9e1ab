//! Pure policy decisions for meshward.
//!
//! Given a validated [`meshward_config::ConfigSet`], this crate answers
//! these questions exactly as Istio does: which mTLS mode a workload port
//! has (PeerAuthentication), whether a connection or request is allowed
//! (AuthorizationPolicy: CUSTOM, then DENY, then ALLOW; AUDIT and dry-run
//! reported only), and which DestinationRule applies to a client's calls
//! to a host ([`destination`]). Every decision carries its explanation.
//!
//! Policies are compiled once; [`PolicyEngine::workload`] collects the ones
//! that select one workload, so a decision costs what those policies cost.
//! [`analyze`] checks a whole configuration for what cannot work as its
//! author meant (`meshward analyze`).
//!
//! No I/O, no async, no global state.

#![forbid(unsafe_code)]

pub mod analyze;
mod compile;
mod decision;
pub mod destination;
mod engine;
pub mod matcher;
pub mod normalize;
mod peer;
mod request;
pub mod suite;
pub mod what_if;

pub use compile::PolicyRef;
pub use decision::{Decision, DryRunResult, ExtAuthzCheck, Reason, RuleRef, Verdict};
pub use destination::{AppliedDestinationRule, destination_rule, service_visible};
pub use engine::{PolicyEngine, Workload, WorkloadPolicy};
pub use normalize::{PathError, normalize_path};
pub use peer::{ModeSource, PeerDecision, PeerModes};
pub use request::{Headers, HttpAttributes, JwtAuth, NoHeaders, Request, join_values};
