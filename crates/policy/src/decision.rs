//! Decisions and their explanations.

use std::fmt;
use std::sync::Arc;

use crate::compile::{CompiledPolicy, PolicyRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy and the index of its rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: Arc<PolicyRef>,
    /// `usize::MAX` when no rule matched (dry-run ALLOW that would deny).
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rule == usize::MAX {
            write!(f, "{} policy {}", self.policy.action, self.policy)
        } else {
            write!(
                f,
                "rule {} of {} policy {}",
                self.rule, self.policy.action, self.policy
            )
        }
    }
}

/// Why the verdict is what it is. The same value feeds logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No enforced ALLOW policy applies (and no DENY matched): allowed.
    NoAllowPolicies,
    AllowMatched,
    DenyMatched,
    /// ALLOW policies apply but none matched.
    NoAllowMatched {
        policies: Vec<String>,
    },
    /// STRICT mTLS on the port and the peer sent plaintext.
    PlaintextRejected {
        source: String,
    },
    /// A rule of a CUSTOM policy matched, and the workload's CUSTOM
    /// policies cannot be enforced (several providers, or one that is not
    /// a defined ext-authz provider): denied, as Istio's stand-in deny
    /// rules do. [`Decision::decided_by`] names the policy and rule.
    CustomUnusable {
        problem: String,
    },
    /// The request path cannot be normalized safely.
    InvalidPath(String),
}

impl Reason {
    /// A short stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NoAllowPolicies => "no_allow_policies",
            Reason::AllowMatched => "allow_matched",
            Reason::DenyMatched => "deny_matched",
            Reason::NoAllowMatched { .. } => "no_allow_matched",
            Reason::PlaintextRejected { .. } => "plaintext_rejected",
            Reason::CustomUnusable { .. } => "custom_unusable",
            Reason::InvalidPath(_) => "invalid_path",
        }
    }
}

/// An external authorization check that must also allow the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzCheck {
    pub provider: String,
    pub policy: RuleRef,
}

/// What a dry-run policy would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunResult {
    pub rule: RuleRef,
    pub would: Verdict,
}

/// An authorization decision with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict of meshward's own policies. When [`Decision::ext_authz`]
    /// is set, an `Allow` also needs the external authorizer's consent.
    pub verdict: Verdict,
    pub reason: Reason,
    /// The deciding policy and rule, when one decided.
    pub decided_by: Option<RuleRef>,
    pub ext_authz: Option<ExtAuthzCheck>,
    pub audit: Vec<RuleRef>,
    pub dry_run: Vec<DryRunResult>,
}

impl Decision {
    pub(crate) fn new(verdict: Verdict, reason: Reason) -> Decision {
        Decision {
            verdict,
            reason,
            decided_by: None,
            ext_authz: None,
            audit: Vec::new(),
            dry_run: Vec::new(),
        }
    }

    pub(crate) fn with_policy(mut self, p: &CompiledPolicy, rule: usize) -> Decision {
        self.decided_by = Some(RuleRef {
            policy: Arc::clone(&p.id),
            rule,
        });
        self
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The verdict once the external authorizer (if any) has answered.
    pub fn with_ext_authz_result(&self, ext_allowed: bool) -> Verdict {
        if self.ext_authz.is_some() && !ext_allowed {
            Verdict::Deny
        } else {
            self.verdict
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.verdict)?;
        match (&self.reason, &self.decided_by) {
            (Reason::AllowMatched | Reason::DenyMatched, Some(r)) => write!(f, "matched {r}")?,
            (Reason::NoAllowPolicies, _) => {
                f.write_str("no ALLOW policy applies to this workload and no DENY policy matched")?
            }
            (Reason::NoAllowMatched { policies }, _) => write!(
                f,
                "no rule of the ALLOW policies that apply matched ({})",
                policies.join(", ")
            )?,
            (Reason::PlaintextRejected { source }, _) => write!(
                f,
                "plaintext connection refused: mTLS mode STRICT from {source}"
            )?,
            (Reason::CustomUnusable { problem }, Some(r)) => {
                write!(f, "matched {r}, whose provider cannot be used ({problem})")?
            }
            (Reason::CustomUnusable { problem }, None) => write!(
                f,
                "a CUSTOM policy matched whose provider cannot be used ({problem})"
            )?,
            (Reason::InvalidPath(e), _) => write!(f, "invalid request path: {e}")?,
            (reason, _) => write!(f, "{}", reason.code())?,
        }
        if let Some(ext) = &self.ext_authz {
            write!(
                f,
                "; also requires external authorization by \"{}\" ({})",
                ext.provider, ext.policy
            )?;
        }
        for a in &self.audit {
            write!(f, "; audited by {a}")?;
        }
        for d in &self.dry_run {
            write!(f, "; dry-run: {} would {}", d.rule, d.would)?;
        }
        Ok(())
    }
}
