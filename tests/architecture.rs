//! The module graph of the core has no import cycle, and no function of the request path is
//! longer than a screen (docs/ARCHITECTURE.md). The graph is read from the
//! source: every `crate::<module>` a file of a top-level module names outside comments and
//! its test module is an edge; the core's induced graph must be acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules the request path is built from (and the seams the schemes plug into).
const CORE: &[&str] = &[
    "layer", "config", "option", "service", "response", "verify", "nonce", "store", "reason",
    "settle",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `module → the crate modules it imports`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in all {
        let rel = path.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name")
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a source file");
        let text = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        for line in text.lines() {
            // Comments and doc attributes (docs.rs link fallbacks) are not imports.
            if line.trim_start().starts_with("doc = ") {
                continue;
            }
            let code = line.split("//").next().unwrap_or_default();
            for part in code.split("crate::").skip(1) {
                let target: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !target.is_empty() && target != top {
                    edges.entry(top.clone()).or_default().insert(target);
                }
            }
        }
    }
    edges
}

/// A cycle through `from` in `edges` restricted to `core`, if any.
fn cycle(
    edges: &BTreeMap<String, BTreeSet<String>>,
    core: &BTreeSet<&str>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last()?.clone();
    for next in edges.get(&last).into_iter().flatten() {
        if !core.contains(next.as_str()) {
            continue;
        }
        if next == &path[0] {
            let mut found = path.clone();
            found.push(next.clone());
            return Some(found);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(c) = cycle(edges, core, path) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn the_core_module_graph_has_no_cycle() {
    let edges = graph();
    // The parser sees the edges it should (one that found none would pass vacuously).
    assert!(edges["layer"].contains("service"), "{edges:?}");
    assert!(edges["service"].contains("config"), "{edges:?}");
    assert!(edges["verify"].contains("nonce"), "{edges:?}");
    let core: BTreeSet<&str> = CORE.iter().copied().collect();
    for module in CORE {
        let found = cycle(&edges, &core, &mut vec![(*module).to_owned()]);
        assert!(
            found.is_none(),
            "import cycle: {}",
            found.unwrap_or_default().join(" → ")
        );
    }
    // The request path never imports the builder, and the stores never the verifiers.
    for (from, to) in [
        ("service", "layer"),
        ("response", "layer"),
        ("nonce", "verify"),
        ("store", "nonce"),
    ] {
        assert!(
            !edges.get(from).is_some_and(|e| e.contains(to)),
            "{from} imports {to}"
        );
    }
}

/// Modules that sit outside the core and use only what a user of the crate can use, so that
/// each can move to a crate of its own unchanged (docs/ARCHITECTURE.md, "One crate with
/// features, or a workspace").
const OUTSIDE: &[&str] = &["mcp"];

#[test]
fn outside_modules_use_only_public_modules_and_the_core_never_imports_them() {
    let edges = graph();
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let public: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    assert!(
        public.contains("proto") && public.contains("mcp"),
        "{public:?}"
    );
    for module in OUTSIDE {
        for target in edges.get(*module).into_iter().flatten() {
            assert!(
                public.contains(target),
                "{module} imports crate::{target}, which is not public"
            );
        }
    }
    for module in CORE {
        for outside in OUTSIDE {
            assert!(
                !edges.get(*module).is_some_and(|e| e.contains(*outside)),
                "core module {module} imports {outside}"
            );
        }
    }
}

/// The longest a function of the request path may be (issue #17: "no function in the request
/// path longer than a screen"). A screen of rustfmt'd code, signature and closing brace included.
const SCREEN: usize = 60;

/// `(file:line name, lines)` of every function in `dir`'s files, test modules left out. The
/// code is rustfmt'd: a function ends at the first line that is its indentation plus `}`.
fn function_lengths(dir: &Path) -> Vec<(String, usize)> {
    let mut paths = Vec::new();
    files(dir, &mut paths);
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("a source file");
        let lines: Vec<&str> = text.lines().collect();
        // The unit tests at the end of a file are not the request path.
        let end = lines
            .iter()
            .position(|l| *l == "#[cfg(test)]")
            .unwrap_or(lines.len());
        for (i, line) in lines[..end].iter().enumerate() {
            let body = line.trim_start();
            let indent = &line[..line.len() - body.len()];
            let name = ["pub(crate) ", "pub(super) ", "pub "]
                .iter()
                .fold(body, |b, p| b.strip_prefix(p).unwrap_or(b));
            let name = name.strip_prefix("async ").unwrap_or(name);
            let Some(name) = name.strip_prefix("fn ") else {
                continue;
            };
            if line.ends_with(';') {
                continue; // a declaration in a trait
            }
            let close = format!("{indent}}}");
            if let Some(len) = lines[i..end].iter().position(|l| *l == close) {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let file = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.push((format!("{file}:{} {name}", i + 1), len + 1));
            }
        }
    }
    out
}

#[test]
fn no_function_in_the_request_path_is_longer_than_a_screen() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/service");
    let lengths = function_lengths(&dir);
    // The scan finds the stages it should (one that found none would pass vacuously).
    assert!(lengths.len() > 40, "{lengths:?}");
    assert!(
        lengths.iter().any(|(f, _)| f.ends_with(" serve")),
        "{lengths:?}"
    );
    let long: Vec<_> = lengths.iter().filter(|(_, n)| *n > SCREEN).collect();
    assert!(long.is_empty(), "longer than {SCREEN} lines: {long:?}");
}
