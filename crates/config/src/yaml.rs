//! A small YAML document tree that keeps the line and column of every node.
//!
//! Typed decoding (see [`crate::decode`]) walks this tree so that every error
//! can name the exact place it comes from, and so that all errors of a file
//! are found in one pass rather than only the first. Scalars are resolved with
//! the YAML 1.2 core schema, as Kubernetes does.
//!
//! Hostile input is bounded: nesting depth and alias expansion are capped so
//! that neither the parser nor dropping the tree can exhaust the stack or the
//! memory.

use std::collections::HashMap;
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Deepest nesting accepted. Istio resources nest at most ~10 levels.
pub const MAX_DEPTH: usize = 64;
/// Most nodes one stream may produce, counting alias expansions, so that a
/// "billion laughs" document is refused instead of exhausting memory.
pub const MAX_NODES: usize = 1_000_000;

/// A position in a source text, 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    fn from_span(span: &Span) -> Self {
        Pos {
            line: u32::try_from(span.start.line()).unwrap_or(u32::MAX),
            col: u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
        }
    }
}

/// What a scalar resolves to under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    Null,
    Bool,
    Int,
    Float,
    Str,
}

impl fmt::Display for ScalarType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScalarType::Null => "null",
            ScalarType::Bool => "boolean",
            ScalarType::Int => "integer",
            ScalarType::Float => "number",
            ScalarType::Str => "string",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar { text: String, ty: ScalarType },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// One node of a document with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(
            self.value,
            Value::Scalar {
                ty: ScalarType::Null,
                ..
            }
        )
    }

    /// The text of a scalar of any type.
    pub fn scalar_text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The text of a scalar that resolves to a string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar {
                text,
                ty: ScalarType::Str,
            } => Some(text),
            _ => None,
        }
    }

    /// Looks up a key of a mapping whose keys are strings.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar_text() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short description of the node's type for error messages.
    pub fn type_name(&self) -> String {
        match &self.value {
            Value::Scalar { ty, .. } => ty.to_string(),
            Value::Seq(_) => "list".to_string(),
            Value::Map(_) => "mapping".to_string(),
        }
    }

    /// Converts to a JSON value (mapping keys become strings). Used for
    /// free-form data such as JWT claims in test cases.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Scalar { text, ty } => match ty {
                ScalarType::Null => J::Null,
                ScalarType::Bool => J::Bool(text.eq_ignore_ascii_case("true")),
                ScalarType::Int => parse_int(text)
                    .map(|i| J::Number(i.into()))
                    .unwrap_or_else(|| J::String(text.clone())),
                ScalarType::Float => text
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(J::Number)
                    .unwrap_or_else(|| J::String(text.clone())),
                ScalarType::Str => J::String(text.clone()),
            },
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar_text().unwrap_or_default().to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// One document of a multi-document stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Line of the document's first content.
    pub line: u32,
    pub root: Node,
}

/// A syntax error, with the position the parser stopped at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses a multi-document YAML stream. Empty documents are dropped.
pub fn parse_stream(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut documents = Vec::new();
    for_each_document(text, |doc| documents.push(doc))?;
    Ok(documents)
}

/// Parses a multi-document YAML stream, handing each document to `f` as
/// soon as it is complete, so that only one document's tree is in memory
/// at a time (a tree takes several times the bytes of its text). Empty
/// documents are dropped. On a syntax error, the documents before it have
/// been handed over already.
pub fn for_each_document(text: &str, mut f: impl FnMut(Document)) -> Result<(), SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    while let Some(event) = parser.next_event() {
        let (event, span) = event.map_err(|e| SyntaxError {
            pos: Pos {
                line: u32::try_from(e.marker().line()).unwrap_or(u32::MAX),
                col: u32::try_from(e.marker().col() + 1).unwrap_or(u32::MAX),
            },
            message: e.info().to_string(),
        })?;
        builder.event(event, &span)?;
        // At most one: a document is complete at its end event.
        for doc in builder.documents.drain(..) {
            f(doc);
        }
    }
    Ok(())
}

/// Parses text holding exactly one YAML value (for example an embedded block).
pub fn parse_one(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut docs = parse_stream(text)?;
    match docs.len() {
        0 => Ok(None),
        1 => Ok(docs.pop().map(|d| d.root)),
        _ => Err(SyntaxError {
            pos: Pos {
                line: docs[1].line,
                col: 1,
            },
            message: "expected a single YAML document".to_string(),
        }),
    }
}

enum Frame {
    Seq(Pos, Vec<Node>, usize),
    Map(Pos, Vec<(Node, Node)>, Option<Node>, usize),
}

#[derive(Default)]
struct Builder {
    documents: Vec<Document>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    root: Option<Node>,
}

fn count_nodes(node: &Node) -> usize {
    // Iterative to stay safe on deep trees.
    let mut count = 0;
    let mut pending = vec![node];
    while let Some(n) = pending.pop() {
        count += 1;
        match &n.value {
            Value::Scalar { .. } => {}
            Value::Seq(items) => pending.extend(items.iter()),
            Value::Map(entries) => {
                for (k, v) in entries {
                    pending.push(k);
                    pending.push(v);
                }
            }
        }
    }
    count
}

impl Builder {
    fn error(pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos,
            message: message.into(),
        }
    }

    fn event(&mut self, event: Event<'_>, span: &Span) -> Result<(), SyntaxError> {
        let pos = Pos::from_span(span);
        match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd => {}
            Event::DocumentStart(_) => {
                let _ = pos;
                self.anchors.clear();
                self.root = None;
            }
            Event::DocumentEnd => {
                if let Some(root) = self.root.take()
                    && !root.is_null()
                {
                    self.documents.push(Document {
                        line: root.pos.line.max(1),
                        root,
                    });
                }
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Self::error(pos, "alias refers to an unknown anchor"))?;
                self.nodes += count_nodes(&node);
                if self.nodes > MAX_NODES {
                    return Err(Self::error(
                        pos,
                        "alias expansion makes the document too large",
                    ));
                }
                self.complete(node, 0)?;
            }
            Event::Scalar(text, style, anchor, tag) => {
                let ty = match (style, tag.as_deref()) {
                    (_, Some(tag)) if tag.is_yaml_core_schema() => match tag.suffix.as_str() {
                        "str" => ScalarType::Str,
                        "int" => ScalarType::Int,
                        "float" => ScalarType::Float,
                        "bool" => ScalarType::Bool,
                        "null" => ScalarType::Null,
                        other => {
                            return Err(Self::error(pos, format!("unsupported tag !!{other}")));
                        }
                    },
                    (_, Some(tag)) if tag.handle == "!" && tag.suffix.is_empty() => ScalarType::Str,
                    (_, Some(tag)) => {
                        return Err(Self::error(
                            pos,
                            format!("unsupported tag {}{}", tag.handle, tag.suffix),
                        ));
                    }
                    (ScalarStyle::Plain, None) => resolve_plain(&text),
                    _ => ScalarType::Str,
                };
                let node = Node {
                    pos,
                    value: Value::Scalar {
                        text: text.into_owned(),
                        ty,
                    },
                };
                self.nodes += 1;
                if self.nodes > MAX_NODES {
                    return Err(Self::error(pos, "document too large"));
                }
                self.complete(node, anchor)?;
            }
            Event::SequenceStart(anchor, _tag) => {
                self.push(Frame::Seq(pos, Vec::new(), anchor), pos)?;
            }
            Event::MappingStart(anchor, _tag) => {
                self.push(Frame::Map(pos, Vec::new(), None, anchor), pos)?;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let frame = self
                    .stack
                    .pop()
                    .ok_or_else(|| Self::error(pos, "unbalanced collection end"))?;
                let (node, anchor) = match frame {
                    Frame::Seq(start, items, anchor) => (
                        Node {
                            pos: start,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Frame::Map(start, entries, _, anchor) => (
                        Node {
                            pos: start,
                            value: Value::Map(entries),
                        },
                        anchor,
                    ),
                };
                self.complete(node, anchor)?;
            }
        }
        Ok(())
    }

    fn push(&mut self, frame: Frame, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Self::error(
                pos,
                format!("nesting deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Self::error(pos, "document too large"));
        }
        self.stack.push(frame);
        Ok(())
    }

    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(_, items, _)) => items.push(node),
            Some(Frame::Map(_, entries, key, _)) => match key.take() {
                None => {
                    if !matches!(node.value, Value::Scalar { .. }) {
                        return Err(Self::error(node.pos, "mapping keys must be scalars"));
                    }
                    if let Some(text) = node.scalar_text()
                        && entries.iter().any(|(k, _)| k.scalar_text() == Some(text))
                    {
                        return Err(Self::error(
                            node.pos,
                            format!("duplicate mapping key \"{text}\""),
                        ));
                    }
                    *key = Some(node);
                }
                Some(k) => entries.push((k, node)),
            },
        }
        Ok(())
    }
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
pub fn resolve_plain(text: &str) -> ScalarType {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => ScalarType::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => ScalarType::Bool,
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => ScalarType::Float,
        _ if parse_int(text).is_some() => ScalarType::Int,
        _ if is_core_float(text) => ScalarType::Float,
        _ => ScalarType::Str,
    }
}

/// Parses a core-schema integer: decimal with optional sign, `0o` octal, `0x` hex.
pub fn parse_int(text: &str) -> Option<i64> {
    if let Some(hex) = text.strip_prefix("0x") {
        return (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| i64::from_str_radix(hex, 16).ok())
            .flatten();
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return (!oct.is_empty() && oct.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .then(|| i64::from_str_radix(oct, 8).ok())
            .flatten();
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn is_core_float(text: &str) -> bool {
    // [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
    let s = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            int.bytes().all(|b| b.is_ascii_digit())
                && frac.bytes().all(|b| b.is_ascii_digit())
                && !(int.is_empty() && frac.is_empty())
        }
        None => !mantissa.is_empty() && mantissa.bytes().all(|b| b.is_ascii_digit()),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_types() {
        let docs = parse_stream("a: 1\nb: \"2\"\nc: [x, true, ~]\n---\n---\nd: {}\n").unwrap();
        assert_eq!(docs.len(), 2);
        let root = &docs[0].root;
        assert_eq!(
            root.get("a").unwrap().value,
            Value::Scalar {
                text: "1".into(),
                ty: ScalarType::Int
            }
        );
        assert_eq!(root.get("b").unwrap().as_str(), Some("2"));
        let c = root.get("c").unwrap();
        assert_eq!(c.pos, Pos { line: 3, col: 4 });
        assert_eq!(docs[1].line, 6);
    }

    #[test]
    fn core_schema_resolution() {
        for (text, ty) in [
            ("8080", ScalarType::Int),
            ("-3", ScalarType::Int),
            ("0x1F", ScalarType::Int),
            ("1.5", ScalarType::Float),
            ("1e3", ScalarType::Float),
            ("yes", ScalarType::Str),
            ("on", ScalarType::Str),
            ("TRUE", ScalarType::Bool),
            ("~", ScalarType::Null),
            ("10.0.0.1", ScalarType::Str),
            ("1.2.3", ScalarType::Str),
            ("/path", ScalarType::Str),
        ] {
            assert_eq!(resolve_plain(text), ty, "{text}");
        }
    }

    #[test]
    fn duplicate_keys_rejected() {
        let err = parse_stream("a: 1\na: 2\n").unwrap_err();
        assert!(err.message.contains("duplicate"), "{err:?}");
        assert_eq!(err.pos.line, 2);
    }

    #[test]
    fn deep_nesting_rejected() {
        let text = "[".repeat(10_000);
        assert!(parse_stream(&text).is_err());
    }

    #[test]
    fn alias_bomb_rejected() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse_stream(&text).unwrap_err();
        assert!(err.message.contains("too large"), "{err:?}");
    }

    #[test]
    fn aliases_resolve() {
        let docs = parse_stream("base: &b {app: x}\nsel: *b\n").unwrap();
        assert_eq!(
            docs[0]
                .root
                .get("sel")
                .unwrap()
                .get("app")
                .unwrap()
                .as_str(),
            Some("x")
        );
    }
}
