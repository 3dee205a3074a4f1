//! The layering rules of ARCHITECTURE.md, checked on the source tree:
//!
//! - the contract crate (`proto/`) depends on no database, cache, telemetry or metrics crate;
//! - a service's domain names no tonic, prost or sqlx item, nor the server plumbing
//!   (`platform::rpc`) or the storage crate: it owns its ports (store traits, `Authorizer`);
//! - SQL appears only in the services' stores and in the `storage` crate;
//! - no two modules of a crate import each other;
//! - neither the services, the shared crates nor the load generator drive HTTP/2 by hand:
//!   none depends on `h2` or names it (tests may, to send malformed frames).
//!
//! A violation that must stay for a while is listed in [`KNOWN`] with its reason; the test
//! fails on any violation not listed, and on a listed one that is gone, so the list only
//! shrinks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Violations tolerated for now, by the message [`check`] gives them (none today).
const KNOWN: &[&str] = &[];

/// What `proto/` must never depend on.
const NOT_FOR_THE_CONTRACT: &[&str] = &[
    "sqlx",
    "dashmap",
    "tracing-subscriber",
    "metrics",
    "metrics-exporter-prometheus",
];

/// The crates whose `src/` the rules apply to.
const CRATES: &[&str] = &[
    "proto",
    "platform",
    "storage",
    "directory-svc",
    "billing-svc",
];

/// A source tree: file path (relative to the crate root, `src/...`) to contents, per crate.
type Tree = BTreeMap<String, BTreeMap<String, String>>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

fn read_tree(root: &Path) -> Tree {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(base).expect("below the crate");
                let text = std::fs::read_to_string(&path).expect("readable source");
                out.insert(relative.to_string_lossy().replace('\\', "/"), text);
            }
        }
    }
    CRATES
        .iter()
        .map(|name| {
            let krate = root.join(name);
            let mut files = BTreeMap::new();
            walk(&krate.join("src"), &krate, &mut files);
            let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap_or_default();
            files.insert("Cargo.toml".to_owned(), manifest);
            ((*name).to_owned(), files)
        })
        .chain(std::iter::once((
            "loadgen".to_owned(),
            load_generator(root),
        )))
        .collect()
}

/// The load generator's sources (in the tests crate, whose manifest may name `h2` for the
/// raw-frame tests; the load generator's code may not).
fn load_generator(root: &Path) -> BTreeMap<String, String> {
    let tests = root.join("tests");
    let mut files = BTreeMap::new();
    for dir in ["src/loadgen", "src/bin"] {
        let Ok(entries) = std::fs::read_dir(tests.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("readable source");
                let name = path.file_name().expect("a file").to_string_lossy();
                files.insert(format!("{dir}/{name}"), text);
            }
        }
    }
    assert!(
        files.contains_key("src/bin/loadgen.rs"),
        "the load generator is at tests/src/bin/loadgen.rs"
    );
    files
}

/// Whether `line` names the `h2` crate (`h2::`, not `sha2::` or `http2::`).
fn names_h2(line: &str) -> bool {
    line.match_indices("h2::").any(|(i, _)| {
        !line[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The code of a file without its comments (line comments and doc comments), so a doc link
/// to a module is not an import of it.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .filter(|line| !line.trim().is_empty())
}

/// The top-level module a file of `src/` belongs to (`src/domain/mod.rs` -> `domain`,
/// `src/rpc.rs` -> `rpc`); `None` for the crate root.
fn module_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("src/")?;
    let first = rest.split('/').next()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The `[dependencies]` names of a manifest.
fn dependencies(manifest: &str) -> BTreeSet<String> {
    let mut in_section = false;
    let mut names = BTreeSet::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[dependencies]";
        } else if in_section && let Some((name, _)) = line.split_once(['=', '.']) {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

const SQL: &[&str] = &[
    "SELECT ",
    "INSERT INTO",
    "UPDATE ",
    "DELETE FROM",
    "CREATE TABLE",
    "CREATE INDEX",
];

/// Every violation of the rules in `tree`, one message each.
fn check(tree: &Tree) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (krate, files) in tree {
        if krate == "proto" {
            let deps = dependencies(files.get("Cargo.toml").map_or("", String::as_str));
            for banned in NOT_FOR_THE_CONTRACT {
                if deps.contains(*banned) {
                    found.insert(format!("proto: depends on {banned}"));
                }
            }
        }
        let manifest = files.get("Cargo.toml").map_or("", String::as_str);
        if dependencies(manifest).contains("h2") {
            found.insert(format!("{krate}: depends on h2"));
        }
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, text) in files.iter().filter(|(p, _)| p.ends_with(".rs")) {
            let module = module_of(path);
            let in_domain = module.as_deref() == Some("domain");
            // The load generator's fixtures bulk-load rows: bench tooling, not a service.
            let may_hold_sql = matches!(krate.as_str(), "storage" | "loadgen")
                || module.as_deref() == Some("store");
            for line in code_lines(text) {
                if names_h2(line) {
                    found.insert(format!("{krate}: drives h2 in {path}"));
                }
                if in_domain {
                    for banned in ["tonic", "prost", "sqlx", "storage", "platform::rpc"] {
                        if line.contains(&format!("{banned}::")) {
                            found.insert(format!("{krate}: domain names {banned} in {path}"));
                        }
                    }
                }
                if !may_hold_sql && SQL.iter().any(|sql| line.contains(&format!("\"{sql}"))) {
                    found.insert(format!("{krate}: SQL outside the store in {path}"));
                }
                if let Some(module) = &module {
                    for (_, rest) in line.match_indices("crate::").map(|(i, _)| line.split_at(i)) {
                        let target: String = rest["crate::".len()..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !target.is_empty() && &target != module {
                            imports.entry(module.clone()).or_default().insert(target);
                        }
                    }
                }
            }
        }
        for (a, targets) in &imports {
            for b in targets.iter().filter(|b| a < *b) {
                if imports.get(b).is_some_and(|back| back.contains(a)) {
                    found.insert(format!("{krate}: modules {a} and {b} import each other"));
                }
            }
        }
    }
    found
}

#[test]
fn the_tree_keeps_the_layering_rules() {
    let found = check(&read_tree(&workspace()));
    let known: BTreeSet<String> = KNOWN.iter().map(|s| (*s).to_owned()).collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(new.is_empty(), "layering rules broken: {new:#?}");
    assert!(
        gone.is_empty(),
        "fixed, so remove from KNOWN (the list only shrinks): {gone:#?}"
    );
}

/// The checker itself: a small tree with one violation of each rule is caught on each, and
/// the same tree without them passes.
#[test]
fn the_checker_catches_each_kind_of_violation() {
    let file = |path: &str, text: &str| (path.to_owned(), text.to_owned());
    let clean: Tree = [
        (
            "proto".to_owned(),
            [
                file("Cargo.toml", "[dependencies]\ntonic.workspace = true\n"),
                file("src/lib.rs", "pub mod fields;\n"),
            ]
            .into(),
        ),
        (
            "svc".to_owned(),
            [
                file("Cargo.toml", ""),
                file(
                    "src/domain/mod.rs",
                    "// sqlx::Error is mentioned in a comment only\nuse crate::model::X;\n",
                ),
                file(
                    "src/store/sql.rs",
                    "use crate::domain::Y;\nuse sha2::Sha256;\nconst Q: &str = \"SELECT 1\";\n",
                ),
                file("src/model.rs", "/// see [`crate::domain`]\npub struct X;\n"),
            ]
            .into(),
        ),
    ]
    .into();
    assert!(check(&clean).is_empty(), "{:#?}", check(&clean));

    let mut broken = clean.clone();
    let proto = broken.get_mut("proto").expect("proto");
    proto.insert(
        "Cargo.toml".into(),
        "[dependencies]\nsqlx = { workspace = true }\ndashmap.workspace = true\n".into(),
    );
    let svc = broken.get_mut("svc").expect("svc");
    svc.insert(
        "src/domain/error.rs".into(),
        "impl From<sqlx::Error> for Error {}\nfn f(s: tonic::Status) {}\n".into(),
    );
    svc.insert(
        "src/transport/mod.rs".into(),
        "const Q: &str = \"DELETE FROM users\";\n".into(),
    );
    svc.insert("src/model.rs".into(), "use crate::domain::Z;\n".into());
    svc.insert(
        "Cargo.toml".into(),
        "[dependencies]\nh2.workspace = true\n".into(),
    );
    svc.insert(
        "src/client.rs".into(),
        "let (c, conn) = h2::client::handshake(io).await?;\n".into(),
    );
    let found = check(&broken);
    let expected: BTreeSet<String> = [
        "proto: depends on sqlx",
        "proto: depends on dashmap",
        "svc: domain names sqlx in src/domain/error.rs",
        "svc: domain names tonic in src/domain/error.rs",
        "svc: SQL outside the store in src/transport/mod.rs",
        "svc: modules domain and model import each other",
        "svc: depends on h2",
        "svc: drives h2 in src/client.rs",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(found, expected);
}
