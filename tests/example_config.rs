//! `conf/bascule.yaml` is the commented example of every key: it passes
//! `bascule check` as shipped, and with its commented-out keys uncommented it
//! gives every key the decoder knows, in every map.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/bascule.yaml");

/// The example with every commented-out key line (`# key: ...`, `# - ...`) made live.
fn uncommented(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let rest = &line[indent..];
        let live = rest.strip_prefix("# ").filter(|r| {
            let r = r.trim_start();
            r.starts_with("- ")
                || r.split_once(':').is_some_and(|(key, _)| {
                    !key.is_empty()
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                })
        });
        match live {
            Some(live) => out.push_str(&format!("{}{live}\n", &line[..indent])),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

/// `listeners[0].tls` -> `listeners[].tls`; an upstream's name -> `*`.
fn pattern(path: &str) -> String {
    let mut out = String::new();
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '[' {
            while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
                chars.next();
            }
        }
    }
    match out.strip_prefix("upstreams.") {
        Some(rest) => match rest.split_once('.') {
            Some((_, key)) => format!("upstreams.*.{key}"),
            None => "upstreams.*".into(),
        },
        None => out,
    }
}

#[test]
fn the_example_passes_check() {
    let out = Command::new(common::bin())
        .args(["check", "--config", EXAMPLE])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.ends_with(": ok\n"), "{stdout}");
}

#[test]
fn the_example_shows_every_key_the_decoder_knows() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let live = uncommented(&text);
    let keys = bascule::config::keys(&live, Path::new(EXAMPLE).parent().unwrap())
        .unwrap_or_else(|e| panic!("the uncommented example is not YAML: {e:?}\n{live}"));
    let known: BTreeSet<String> = keys.known.iter().map(|k| pattern(k)).collect();
    let given: BTreeSet<String> = keys.given.iter().map(|k| pattern(k)).collect();
    // Some keys are visited under every map of a kind: the example needs each once.
    let missing: Vec<&String> = known.difference(&given).collect();
    assert!(
        missing.is_empty(),
        "conf/bascule.yaml does not show: {missing:?}"
    );
    // And the helper above is not vacuous: it sees the keys the example gives live.
    for key in ["listeners[].bind", "upstreams.*.backends", "admin.bind"] {
        assert!(given.contains(key), "{key} not seen in {given:?}");
    }
}
