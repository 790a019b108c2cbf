//! Tidy checks of the source tree, in the manner of rust-analyzer's: the module layering that
//! `ARCHITECTURE.md` documents, and a `//!` doc at the top of every module.
//!
//! The layering: every module of `src/` sits in one layer, and a module may name (`crate::x`)
//! only modules of lower layers, so the dependencies point one way (edge → pipeline → store)
//! and no import cycle can form. A planted import against the rule fails like this (the
//! `a_planted_import_against_the_layering_is_caught` test below plants one):
//!
//! ```text
//! src/store/ingest.rs:3: `store` (layer 3) uses `crate::pipeline` (layer 8): a lower layer may not name a higher one
//! ```

use std::path::{Path, PathBuf};

/// The layers, lowest first. Keep in step with `ARCHITECTURE.md`.
const LAYERS: &[&[&str]] = &[
    &[
        "ids",
        "codec",
        "shutdown",
        "wake",
        "failpoint",
        "config",
        "geoip",
    ],
    &["event", "serve", "telemetry"],
    &["person"],
    &["store"],
    &["sinks", "ingest"],
    &["jobs"],
    &["schedule"],
    &["plugins"],
    &["pipeline"],
    &["ops", "backup"],
    &["capture", "admin"],
    &["sources"],
    &["app"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a source file belongs to (`src/store/jobs/tables.rs` → `store`).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix("src").ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    match name {
        "lib" | "main" | "bin" => None,
        other => Some(other.to_owned()),
    }
}

/// Every `crate::name` a line of code uses (comments are not code).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        // `crate::{a, b}` lists modules in braces.
        if after.starts_with('{') {
            let close = after.find('}').unwrap_or(after.len());
            for part in after[1..close].split(',') {
                let name = part.trim().split("::").next().unwrap_or_default().trim();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else if end > 0 {
            found.push(&after[..end]);
        }
        rest = &after[end.max(1).min(after.len())..];
    }
    found
}

/// The layering violations and unplaced modules in `files` (path, text).
fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, text) in files {
        let Some(module) = module_of(path) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            problems.push(format!(
                "{}: module `{module}` is in no layer; place it in LAYERS and ARCHITECTURE.md",
                path.display()
            ));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for used in crate_paths(line) {
                if used == module {
                    continue;
                }
                match layer_of(used) {
                    Some(theirs) if theirs < own => {}
                    Some(theirs) => problems.push(format!(
                        "{}:{}: `{module}` (layer {own}) uses `crate::{used}` (layer {theirs}): a lower layer may not name a higher one{}",
                        path.display(),
                        n + 1,
                        if theirs == own { " or one beside it" } else { "" }
                    )),
                    None => problems.push(format!(
                        "{}:{}: `crate::{used}` is no module in LAYERS",
                        path.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    problems
}

fn source_files(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read a source file");
            out.push((path, text));
        }
    }
}

/// Every source file under `src/`, with its path relative to the crate.
fn the_tree() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    source_files(&root.join("src"), &mut files);
    let mut files: Vec<_> = files
        .into_iter()
        .map(|(path, text)| (path.strip_prefix(root).unwrap_or(&path).to_owned(), text))
        .collect();
    files.sort();
    files
}

#[test]
fn modules_only_name_lower_layers() {
    let problems = violations(&the_tree());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_planted_import_against_the_layering_is_caught() {
    let planted = vec![
        (
            PathBuf::from("src/store/ingest.rs"),
            "//! Docs.\nuse crate::event::IngestBatch;\nuse crate::pipeline::Pipeline;\n"
                .to_owned(),
        ),
        (
            PathBuf::from("src/jobs/mod.rs"),
            "use crate::{store::Store, schedule::Scheduler};\n// crate::cli in a comment is fine\n"
                .to_owned(),
        ),
        (PathBuf::from("src/newthing.rs"), "//! New.\n".to_owned()),
    ];
    let problems = violations(&planted);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert_eq!(
        problems[0],
        "src/store/ingest.rs:3: `store` (layer 3) uses `crate::pipeline` (layer 8): a lower layer may not name a higher one"
    );
    assert!(
        problems[1].contains("`jobs` (layer 5) uses `crate::schedule`"),
        "{}",
        problems[1]
    );
    assert!(
        problems[2].contains("`newthing` is in no layer"),
        "{}",
        problems[2]
    );
}

#[test]
fn every_module_opens_with_a_doc_saying_what_it_owns() {
    let undocumented: Vec<String> = the_tree()
        .into_iter()
        .filter(|(_, text)| !text.trim().is_empty())
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        undocumented.is_empty(),
        "modules without a //! doc: {undocumented:?}"
    );
}
