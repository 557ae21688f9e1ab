//! Typed decoding of [`Node`] trees with error accumulation.
//!
//! Decoders never stop at the first problem: each reports into a [`Sink`]
//! and returns what it could read, so one pass lists every error. Strings are
//! strict as in Kubernetes' structural schemas: `8080` where a string is
//! expected is an error (quote it), and so is an unknown field.

use std::collections::BTreeMap;

use crate::diag::Sink;
use crate::yaml::{Node, Pos, ScalarType, Value};

/// Joins a field path and a key: `spec` + `rules` = `spec.rules`.
pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A list element's path: `spec.rules` + 0 = `spec.rules[0]`.
pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Reads the fields of one mapping, remembering which were used so that the
/// rest can be reported as unknown.
#[derive(Debug)]
pub struct Fields<'n> {
    path: String,
    pos: Pos,
    entries: &'n [(Node, Node)],
    used: Vec<bool>,
}

impl<'n> Fields<'n> {
    /// Starts reading `node` as a mapping. `null` reads as an empty mapping;
    /// anything else that is not a mapping is reported and read as empty.
    pub fn new(sink: &mut Sink<'_>, node: &'n Node, path: &str) -> Fields<'n> {
        let entries: &[(Node, Node)] = match &node.value {
            Value::Map(entries) => entries,
            _ if node.is_null() => &[],
            _ => {
                sink.error(
                    node.pos,
                    path,
                    format!("expected a mapping, found {}", node.type_name()),
                );
                &[]
            }
        };
        Fields {
            path: path.to_string(),
            pos: node.pos,
            entries,
            used: vec![false; entries.len()],
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn pos(&self) -> Pos {
        self.pos
    }

    pub fn field_path(&self, key: &str) -> String {
        child(&self.path, key)
    }

    /// Takes a field; `key: null` reads as absent.
    pub fn take(&mut self, key: &str) -> Option<&'n Node> {
        let i = self
            .entries
            .iter()
            .position(|(k, _)| k.scalar_text() == Some(key))?;
        self.used[i] = true;
        let value = &self.entries[i].1;
        (!value.is_null()).then_some(value)
    }

    /// Looks at a field without marking it used.
    pub fn peek(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.scalar_text() == Some(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// Takes a field, reporting it when it is absent.
    pub fn require(&mut self, sink: &mut Sink<'_>, key: &str) -> Option<&'n Node> {
        let node = self.take(key);
        if node.is_none() {
            sink.error(
                self.pos,
                &self.path,
                format!("missing required field \"{key}\""),
            );
        }
        node
    }

    pub fn string(&mut self, sink: &mut Sink<'_>, key: &str) -> Option<String> {
        let path = self.field_path(key);
        self.take(key).and_then(|n| string(sink, n, &path))
    }

    pub fn bool(&mut self, sink: &mut Sink<'_>, key: &str) -> Option<bool> {
        let path = self.field_path(key);
        self.take(key).and_then(|n| boolean(sink, n, &path))
    }

    pub fn strings(&mut self, sink: &mut Sink<'_>, key: &str) -> Vec<String> {
        let path = self.field_path(key);
        self.take(key)
            .map(|n| strings(sink, n, &path))
            .unwrap_or_default()
    }

    pub fn string_map(&mut self, sink: &mut Sink<'_>, key: &str) -> BTreeMap<String, String> {
        let path = self.field_path(key);
        self.take(key)
            .map(|n| string_map(sink, n, &path))
            .unwrap_or_default()
    }

    /// Decodes a list field with `item` for each element.
    pub fn list<T>(
        &mut self,
        sink: &mut Sink<'_>,
        key: &str,
        mut item: impl FnMut(&mut Sink<'_>, &'n Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let path = self.field_path(key);
        let node = self.take(key)?;
        Some(list(sink, node, &path, |s, n, p| item(s, n, p)))
    }

    /// Marks a field as known but ignored (for example Kubernetes metadata
    /// that has no meaning here).
    pub fn ignore(&mut self, key: &str) {
        let _ = self.take(key);
    }

    /// Names the fields that were not read, in one warning that ends with
    /// `why`: for inputs Istio reads leniently (its mesh config ignores
    /// fields it does not know).
    pub fn finish_ignoring_unknown(self, sink: &mut Sink<'_>, why: &str) {
        let unknown: Vec<&str> = self
            .entries
            .iter()
            .zip(&self.used)
            .filter(|(_, used)| !**used)
            .map(|((k, _), _)| k.scalar_text().unwrap_or_default())
            .collect();
        let Some(first) = self
            .entries
            .iter()
            .zip(&self.used)
            .find(|(_, used)| !**used)
            .map(|((k, _), _)| k.pos)
        else {
            return;
        };
        let list: Vec<String> = unknown.iter().map(|k| format!("\"{k}\"")).collect();
        sink.warn(
            first,
            &self.path,
            format!(
                "unknown field{} {} ignored: {why}",
                if unknown.len() == 1 { "" } else { "s" },
                list.join(", ")
            ),
        );
    }

    /// Reports every field that was not read.
    pub fn finish(self, sink: &mut Sink<'_>) {
        for ((key, _), used) in self.entries.iter().zip(&self.used) {
            if !used {
                let name = key.scalar_text().unwrap_or_default();
                sink.error(
                    key.pos,
                    &child(&self.path, name),
                    format!("unknown field \"{name}\""),
                );
            }
        }
    }
}

pub fn string(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<String> {
    match &node.value {
        Value::Scalar {
            text,
            ty: ScalarType::Str,
        } => Some(text.clone()),
        Value::Scalar { text, ty } => {
            sink.error(
                node.pos,
                path,
                format!("expected a string, found {ty} {text} (quote it: \"{text}\")"),
            );
            None
        }
        _ => {
            sink.error(
                node.pos,
                path,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

pub fn boolean(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<bool> {
    match &node.value {
        Value::Scalar {
            text,
            ty: ScalarType::Bool,
        } => Some(text.eq_ignore_ascii_case("true")),
        _ => {
            sink.error(
                node.pos,
                path,
                format!("expected true or false, found {}", node.type_name()),
            );
            None
        }
    }
}

/// An integer scalar, or a string holding one (as map keys of `portLevelMtls`
/// arrive after a JSON round trip).
pub fn integer(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<i64> {
    match &node.value {
        Value::Scalar {
            text,
            ty: ScalarType::Int,
        } => crate::yaml::parse_int(text).or_else(|| {
            sink.error(node.pos, path, format!("integer {text} is out of range"));
            None
        }),
        _ => {
            sink.error(
                node.pos,
                path,
                format!("expected an integer, found {}", node.type_name()),
            );
            None
        }
    }
}

pub fn list<'n, T>(
    sink: &mut Sink<'_>,
    node: &'n Node,
    path: &str,
    mut item: impl FnMut(&mut Sink<'_>, &'n Node, &str) -> Option<T>,
) -> Vec<T> {
    match &node.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| item(sink, n, &index(path, i)))
            .collect(),
        _ => {
            sink.error(
                node.pos,
                path,
                format!("expected a list, found {}", node.type_name()),
            );
            Vec::new()
        }
    }
}

pub fn strings(sink: &mut Sink<'_>, node: &Node, path: &str) -> Vec<String> {
    list(sink, node, path, string)
}

pub fn string_map(sink: &mut Sink<'_>, node: &Node, path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                let key = k.scalar_text().unwrap_or_default().to_string();
                if let Some(value) = string(sink, v, &child(path, &key)) {
                    out.insert(key, value);
                }
            }
        }
        _ if node.is_null() => {}
        _ => sink.error(
            node.pos,
            path,
            format!("expected a mapping, found {}", node.type_name()),
        ),
    }
    out
}
