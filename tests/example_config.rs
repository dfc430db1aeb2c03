//! `conf/bascule.yaml` is the commented example of every key: it passes
//! `bascule check` as shipped, and with its commented-out keys uncommented it
//! gives every key of the config's schema (the types it is read into), in every map.

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
fn the_example_shows_every_key_the_schema_knows() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let live = uncommented(&text);
    let mut given = BTreeSet::new();
    given_keys(&as_json(&live), "", &mut given);
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SCHEMA).unwrap()).unwrap();
    // Some keys are known under every map of a kind: the example needs each once.
    let missing: Vec<String> = schema_keys(&schema).difference(&given).cloned().collect();
    assert!(
        missing.is_empty(),
        "conf/bascule.yaml does not show: {missing:?}"
    );
    // And the helper above is not vacuous: it sees the keys the example gives live.
    for key in [
        "listeners[].bind",
        "upstreams.*.backends",
        "admin.bind",
        "caches.*.memory",
    ] {
        assert!(given.contains(key), "{key} not seen in {given:?}");
    }
}

/// The key paths of a document, with list indexes as `[]` and the names of
/// upstreams and caches as `*`.
fn given_keys(value: &serde_json::Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, sub) in map {
                let named = matches!(path, "upstreams" | "caches");
                let here = match (path.is_empty(), named) {
                    (true, _) => key.clone(),
                    (false, true) => format!("{path}.*"),
                    (false, false) => format!("{path}.{key}"),
                };
                if !named {
                    out.insert(here.clone());
                }
                given_keys(sub, &here, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                given_keys(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

/// The ready-made configs in `conf/examples/`, each with the files it names
/// (certificates, a sticky secret file, an admin token file) made beside it.
fn ready_made() -> Vec<(String, tempfile::TempDir)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let place = tempfile::tempdir().unwrap();
        std::fs::create_dir(place.path().join("certs")).unwrap();
        for name in ["www.example.com", "api.example.com"] {
            let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
            let certs = place.path().join("certs");
            std::fs::write(certs.join(format!("{name}.pem")), cert.cert.pem()).unwrap();
            let key = cert.signing_key.serialize_pem();
            std::fs::write(certs.join(format!("{name}.key")), key).unwrap();
        }
        std::fs::write(place.path().join("sticky.keys"), "a long random secret\n").unwrap();
        std::fs::write(place.path().join("admin.token"), "a-long-random-token\n").unwrap();
        std::fs::copy(&path, place.path().join("bascule.yaml")).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, place));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_ready_made_config_passes_check() {
    let configs = ready_made();
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fast-failover.yaml",
            "read-write-split.yaml",
            "sharded-cache.yaml",
            "tls-termination.yaml"
        ]
    );
    for (name, place) in &configs {
        let config = place.path().join("bascule.yaml");
        let out = Command::new(common::bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.ends_with(": ok\n"),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_systemd_unit_runs_commands_the_binary_takes() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/examples/bascule.service"
    ))
    .unwrap();
    let command = |key: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"));
        line.split_whitespace().map(String::from).collect()
    };
    let (pre, start) = (command("ExecStartPre="), command("ExecStart="));
    assert_eq!(pre[0], "/usr/local/bin/bascule");
    // The check before the start is of the file the start runs.
    assert_eq!(pre[1..], ["check", "--config", "/etc/bascule/bascule.yaml"]);
    assert_eq!(start[1..], ["--config", "/etc/bascule/bascule.yaml"]);
    assert_eq!(command("ExecReload="), ["/bin/kill", "-HUP", "$MAINPID"]);
    // The check's command line, on a ready-made config instead of /etc's.
    let (_, place) = &ready_made()[0];
    let out = Command::new(common::bin())
        .args(&pre[1..3])
        .arg(place.path().join("bascule.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/bascule.schema.json");

/// A YAML document as the JSON a YAML language server validates.
fn as_json(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).unwrap()
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SCHEMA).unwrap()).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
}

fn problems(v: &jsonschema::Validator, text: &str) -> Vec<String> {
    v.iter_errors(&as_json(text))
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_schema_file_is_what_bascule_schema_prints() {
    let out = Command::new(common::bin()).arg("schema").output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("\"$schema\": \"https://json-schema.org/draft/2020-12/schema\""),
        "{printed}"
    );
    assert_eq!(
        printed,
        std::fs::read_to_string(SCHEMA).unwrap(),
        "conf/bascule.schema.json is stale: bascule schema > conf/bascule.schema.json"
    );
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    assert!(example.starts_with("# yaml-language-server: $schema=bascule.schema.json\n"));
}

#[test]
fn every_config_under_conf_validates_against_the_schema() {
    let v = validator();
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    assert_eq!(
        problems(&v, &example),
        Vec::<String>::new(),
        "conf/bascule.yaml"
    );
    // Every key the example shows, live.
    let live = uncommented(&example);
    assert_eq!(problems(&v, &live), Vec::<String>::new(), "{live}");
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml");
    let text = std::fs::read_to_string(demo).unwrap();
    assert_eq!(problems(&v, &text), Vec::<String>::new(), "conf/demo.yaml");
    for (name, place) in ready_made() {
        let text = std::fs::read_to_string(place.path().join("bascule.yaml")).unwrap();
        assert_eq!(problems(&v, &text), Vec::<String>::new(), "{name}");
    }
    // And it is not vacuous: an unknown key, a weight out of range, a bad duration.
    for (mistake, at) in [
        ("    colour: blue\n", "/upstreams/app"),
        ("    slow_start: 30\n", "/upstreams/app/slow_start"),
    ] {
        let text = example.replace(
            "    balance: round_robin",
            &format!("{mistake}    balance: round_robin"),
        );
        let found = problems(&v, &text);
        assert!(
            found.iter().any(|p| p.starts_with(at)),
            "{mistake}: {found:?}"
        );
    }
    let text = example.replace("weight: 3 }", "weight: 0 }");
    assert!(!problems(&v, &text).is_empty());
}

/// Every key path the schema describes, in `pattern`'s form.
fn schema_keys(schema: &serde_json::Value) -> BTreeSet<String> {
    fn walk(
        node: &serde_json::Value,
        root: &serde_json::Value,
        path: &str,
        out: &mut BTreeSet<String>,
    ) {
        if let Some(r) = node.get("$ref").and_then(|r| r.as_str()) {
            let name = r.trim_start_matches("#/$defs/");
            return walk(&root["$defs"][name], root, path, out);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for sub in node
                .get(key)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                walk(sub, root, path, out);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, root, &format!("{path}[]"), out);
        }
        if let Some(map) = node.get("additionalProperties").filter(|a| a.is_object()) {
            walk(map, root, &format!("{path}.*"), out);
        }
        for (key, sub) in node
            .get("properties")
            .and_then(|p| p.as_object())
            .into_iter()
            .flatten()
        {
            let here = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            out.insert(here.clone());
            walk(sub, root, &here, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(schema, schema, "", &mut out);
    out
}
