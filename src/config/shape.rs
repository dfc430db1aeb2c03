//! The file's keys held against the schema: every unknown key and every key
//! given twice, each with its position and path, in one pass over the
//! document read as a plain tree. serde would stop at the first; this way a
//! typo is reported together with every other problem of the file.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::raw::{At, Text};
use super::{join, Problem};

/// A YAML document as nested maps, lists and scalars, with positions.
#[derive(Debug)]
pub enum Tree {
    Null,
    Scalar,
    Seq(Vec<At<Tree>>),
    Map(Vec<(Text, At<Tree>)>),
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("YAML")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_i128<E>(self, _: i128) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_u128<E>(self, _: u128) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<Tree, E> {
                Ok(Tree::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_none<E>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
                Tree::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Tree::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Tree::Map(entries))
            }
        }
        d.deserialize_any(Any)
    }
}

/// Every unknown key and every key given twice in `tree`, as `schema` (the
/// config's JSON Schema) describes the file.
pub fn problems(tree: &At<Tree>, schema: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    walk(tree, schema, schema, "", &mut out);
    out
}

fn walk(node: &At<Tree>, schema: &Value, root: &Value, path: &str, out: &mut Vec<Problem>) {
    let choices = alternatives(schema, root);
    match &node.value {
        Tree::Map(entries) => {
            let fields = choices
                .iter()
                .find_map(|s| s.get("properties").and_then(Value::as_object));
            let values = choices
                .iter()
                .find_map(|s| s.get("additionalProperties").filter(|a| a.is_object()));
            let mut seen = HashSet::new();
            for (key, value) in entries {
                let here = join(path, &key.value);
                if !seen.insert(key.value.as_str()) {
                    out.push(Problem {
                        pos: Some(key.pos),
                        path: here,
                        message: "duplicate key (each key may appear once)".into(),
                    });
                    continue;
                }
                match (fields, values) {
                    (Some(fields), _) => match fields.get(&key.value) {
                        Some(sub) => walk(value, sub, root, &here, out),
                        None => {
                            let mut known: Vec<&str> = fields.keys().map(String::as_str).collect();
                            known.sort_unstable();
                            out.push(Problem {
                                pos: Some(key.pos),
                                path: here,
                                message: format!(
                                    "unknown key (expected one of: {})",
                                    known.join(", ")
                                ),
                            });
                        }
                    },
                    (None, Some(sub)) => walk(value, sub, root, &here, out),
                    // A map where the schema has none: the typed reading says so.
                    (None, None) => {}
                }
            }
        }
        Tree::Seq(items) => {
            if let Some(sub) = choices.iter().find_map(|s| s.get("items")) {
                for (i, item) in items.iter().enumerate() {
                    walk(item, sub, root, &format!("{path}[{i}]"), out);
                }
            }
        }
        Tree::Scalar | Tree::Null => {}
    }
}

/// `schema` and the schemas it may be (its `$ref`, `anyOf` and `oneOf`), resolved.
fn alternatives<'s>(schema: &'s Value, root: &'s Value) -> Vec<&'s Value> {
    let mut out = Vec::new();
    let mut todo = vec![schema];
    while let Some(s) = todo.pop() {
        if let Some(name) = s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
        {
            todo.extend(root.get("$defs").and_then(|d| d.get(name)));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            todo.extend(s.get(key).and_then(Value::as_array).into_iter().flatten());
        }
        out.push(s);
    }
    out
}
