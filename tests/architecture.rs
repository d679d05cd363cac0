//! The module graph of the core has no import cycle (docs/ARCHITECTURE.md). Read from the
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
