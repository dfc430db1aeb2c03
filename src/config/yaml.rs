//! A YAML document as a tree whose every node knows its line and column.
//!
//! The configuration decoder needs positions for *semantic* problems (an unknown
//! upstream, a weight of 0), not just for syntax errors, and it must report every
//! problem at once. A serde deserializer stops at the first error and forgets
//! where values came from, so the file is first read into this tree with
//! yaml-rust2's event parser, and `config::decode` walks it.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where a node starts in the file: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Clone, Debug)]
pub enum Value {
    /// `~`, `null`, or nothing at all after a key.
    Null,
    /// Any other scalar, as written (quotes removed). Typing is the decoder's job.
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// What kind of node this is, for messages such as "expected a list, found a map".
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing",
            Value::Scalar(_) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

/// A YAML syntax error, with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses the first document of `text`. An empty file gives a `Null` node.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let pos = Pos::from(*e.marker());
        // A `[` or `{` left open shows up where the parser gives up, often lines
        // later and as some other complaint: point at the bracket instead.
        if let Some((open, bracket)) = builder
            .unclosed(text)
            .filter(|(open, _)| open.line < pos.line)
        {
            let close = if bracket == '[' { ']' } else { '}' };
            return Err(SyntaxError {
                pos: open,
                message: format!(
                    "this `{bracket}` is never closed with `{close}` (the parser stopped at {}:{}: {})",
                    pos.line,
                    pos.column,
                    e.info()
                ),
            });
        }
        return Err(SyntaxError {
            pos,
            message: e.info().to_string(),
        });
    }
    if let Some(message) = builder.error {
        return Err(SyntaxError {
            pos: builder.error_pos,
            message,
        });
    }
    Ok(builder.root.unwrap_or(Node {
        value: Value::Null,
        pos: Pos { line: 1, column: 1 },
    }))
}

/// A container under construction; a map remembers a key until its value arrives.
struct Open {
    node: Node,
    anchor: usize,
    key: Option<Node>,
    /// Values in it so far, itself included.
    size: usize,
}

/// The most values a file may hold once its aliases are expanded. A real
/// config holds thousands; a "billion laughs" (aliases of aliases of lists)
/// would hold billions, and is refused at this bound, within milliseconds.
pub const MAX_VALUES: usize = 200_000;

/// Collects parser events into nodes. Containers under construction live on a stack.
#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Open>,
    /// Each anchored value, and how many values it holds.
    anchors: HashMap<usize, (Node, usize)>,
    /// Values built so far, aliases expanded.
    values: usize,
    root: Option<Node>,
    error: Option<String>,
    error_pos: Pos,
}

impl Default for Pos {
    fn default() -> Self {
        Pos { line: 1, column: 1 }
    }
}

impl TreeBuilder {
    /// The innermost container still open that `text` opens with a bracket (a
    /// flow sequence or map), and the bracket.
    fn unclosed(&self, text: &str) -> Option<(Pos, char)> {
        self.stack.iter().rev().find_map(|open| {
            let pos = open.node.pos;
            let line = text.lines().nth(pos.line.checked_sub(1)?)?;
            let c = line.chars().nth(pos.column.checked_sub(1)?)?;
            matches!(c, '[' | '{').then_some((pos, c))
        })
    }

    /// Counts `size` more values; false once past `MAX_VALUES` (and the error set).
    fn count(&mut self, size: usize, pos: Pos) -> bool {
        self.values = self.values.saturating_add(size);
        if self.values <= MAX_VALUES {
            return true;
        }
        if self.error.is_none() {
            self.error = Some(format!(
                "the file holds more than {MAX_VALUES} values once its aliases are expanded"
            ));
            self.error_pos = pos;
        }
        false
    }

    fn push_node(&mut self, node: Node, anchor: usize, size: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let Some(open) = self.stack.last_mut() else {
            self.root.get_or_insert(node);
            return;
        };
        open.size += size;
        match &mut open.node.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match open.key.take() {
                Some(key) => entries.push((key, node)),
                None => open.key = Some(node),
            },
            Value::Null | Value::Scalar(_) => unreachable!("only containers are opened"),
        }
    }

    fn open(&mut self, value: Value, pos: Pos, anchor: usize) {
        self.count(1, pos);
        self.stack.push(Open {
            node: Node { value, pos },
            anchor,
            key: None,
            size: 1,
        });
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                let value = if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL")
                {
                    Value::Null
                } else {
                    Value::Scalar(text)
                };
                self.count(1, pos);
                self.push_node(Node { value, pos }, anchor, 1);
            }
            Event::SequenceStart(anchor, _) => self.open(Value::Seq(Vec::new()), pos, anchor),
            Event::MappingStart(anchor, _) => self.open(Value::Map(Vec::new()), pos, anchor),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(open) = self.stack.pop() {
                    self.push_node(open.node, open.anchor, open.size);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, size)| *size) {
                // Past the bound nothing more is copied: the file is refused.
                Some(size) if !self.count(size, pos) => {}
                Some(size) => {
                    let node = self.anchors[&id].0.clone();
                    self.push_node(Node { pos, ..node }, 0, size);
                }
                None if self.error.is_none() => {
                    self.error = Some("alias to an unknown anchor".into());
                    self.error_pos = pos;
                }
                None => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_billion_laughs_is_refused_at_once() {
        let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let started = std::time::Instant::now();
        let e = parse(&text).unwrap_err();
        assert!(
            e.message.contains("more than 200000 values"),
            "{}",
            e.message
        );
        assert_eq!(e.pos.line, 6, "{:?}", e.pos);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Aliases within the bound are copied as before.
        assert!(parse("a: &x [1, 2]\nb: [*x, *x]\n").is_ok());
    }

    #[test]
    fn positions_are_one_based() {
        let root = parse("a: 1\nb:\n  - x\n  - { c: d }\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, column: 4 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[1].pos.line, 4);
        assert!(matches!(items[1].value, Value::Map(_)));
    }

    #[test]
    fn null_values_and_quoted_nulls() {
        let root = parse("a:\nb: ~\nc: 'null'\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert!(matches!(entries[0].1.value, Value::Null));
        assert!(matches!(entries[1].1.value, Value::Null));
        assert!(matches!(&entries[2].1.value, Value::Scalar(s) if s == "null"));
    }

    #[test]
    fn anchors_are_copied() {
        let root = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert!(matches!(&entries[1].1.value, Value::Seq(v) if v.len() == 2));
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }
}
