//! Diagnostics: every problem found while loading names the file, the line,
//! the resource (`Kind namespace/name`) and the field path.

use std::fmt;
use std::sync::Arc;

use crate::yaml::Pos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file (or other source name) the problem is in.
    pub file: Arc<str>,
    pub pos: Pos,
    /// `Kind namespace/name`, when the problem lies inside a resource.
    pub resource: Option<String>,
    /// Field path such as `spec.rules[0].to[0].operation.methods[1]`.
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.pos.line)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        if let Some(field) = self.field.as_deref().filter(|f| !f.is_empty()) {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The diagnostics of a whole load, in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics for one document while it is decoded.
#[derive(Debug)]
pub struct Sink<'a> {
    pub file: Arc<str>,
    pub resource: Option<String>,
    pub out: &'a mut Vec<Diagnostic>,
}

impl Sink<'_> {
    pub fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.push(Severity::Error, pos, field, message.into());
    }

    pub fn warn(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.push(Severity::Warning, pos, field, message.into());
    }

    fn push(&mut self, severity: Severity, pos: Pos, field: &str, message: String) {
        self.out.push(Diagnostic {
            severity,
            file: self.file.clone(),
            pos,
            resource: self.resource.clone(),
            field: (!field.is_empty()).then(|| field.to_string()),
            message,
        });
    }

    /// Errors recorded so far for this sink's output.
    pub fn error_count(&self) -> usize {
        self.out.iter().filter(|d| d.is_error()).count()
    }
}
