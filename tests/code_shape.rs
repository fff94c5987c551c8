//! The shape the code keeps (issue "one transaction, one straight path"): no source file over
//! 600 lines, no import circles between modules, and `config` depending on nothing above it.
//! Read from the source text: `crate::` and `super::` paths outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_source_file_is_over_600_lines() {
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches", "examples"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 50);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these by responsibility: {long:?}");
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `lib.rs` and `main.rs` the root.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] || parts == ["main"] {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its test module.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> Option<(&str, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

/// The module paths `code` (of module `module`) names with `crate::` or `super::`: lower-case
/// segments, and the first segment of each entry of a `{...}` group.
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (at, _) in code.match_indices("::") {
        // The start of the word before `::`.
        let start = code[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        if start > 0 && bytes[start - 1] == b'$' {
            continue;
        }
        let head = &code[start..at];
        let base: Vec<String> = if head == "crate" {
            Vec::new()
        } else if head.split("::").all(|s| s == "super") {
            let n = head.split("::").count();
            module[..module.len().saturating_sub(n)].to_vec()
        } else {
            continue;
        };
        let mut path = base.clone();
        let mut rest = &code[at + 2..];
        loop {
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for entry in group.split(',') {
                    if let Some((seg, _)) = ident_at(entry.trim())
                        && seg.starts_with(|c: char| c.is_ascii_lowercase())
                        && seg != "self"
                    {
                        let mut p = path.clone();
                        p.push(seg.to_owned());
                        out.push(p);
                    }
                }
                break;
            }
            match ident_at(rest) {
                Some((seg, tail)) if seg.starts_with(|c: char| c.is_ascii_lowercase()) => {
                    path.push(seg.to_owned());
                    match tail.strip_prefix("::") {
                        Some(t) => rest = t,
                        None => break,
                    }
                }
                _ => break,
            }
        }
        out.push(path);
    }
    out
}

/// Every module's references to other modules, both as module paths.
fn module_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let code = code_of(&std::fs::read_to_string(file).unwrap_or_default());
        let targets: BTreeSet<Vec<String>> = references(&module, &code)
            .into_iter()
            .filter_map(|path| {
                // The longest prefix that is a module.
                (1..=path.len())
                    .rev()
                    .map(|k| path[..k].to_vec())
                    .find(|p| modules.contains(p))
            })
            .collect();
        graph
            .entry(module)
            .or_insert_with(BTreeSet::new)
            .extend(targets);
    }
    graph
}

/// Modules (cut to `depth` segments) that reach each other through references, ancestors
/// and descendants aside.
fn circles(depth: usize) -> Vec<BTreeSet<Vec<String>>> {
    let cut = |m: &Vec<String>| m[..m.len().min(depth)].to_vec();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, targets) in module_graph() {
        let a = cut(&from);
        for to in targets {
            let b = cut(&to);
            if !a.starts_with(&b) && !b.starts_with(&a) {
                edges.entry(a.clone()).or_default().insert(b);
            }
        }
    }
    let reach = |start: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start.clone()];
        while let Some(m) = todo.pop() {
            for n in edges.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let mut found: Vec<BTreeSet<Vec<String>>> = Vec::new();
    for m in edges.keys() {
        let from_m = reach(m);
        if !from_m.contains(m) {
            continue;
        }
        let circle: BTreeSet<Vec<String>> = from_m
            .into_iter()
            .filter(|n| reach(n).contains(m))
            .collect();
        if !found.contains(&circle) {
            found.push(circle);
        }
    }
    found
}

#[test]
fn modules_import_no_circles() {
    let graph = module_graph();
    assert!(graph.len() > 40, "modules found: {}", graph.len());
    // The reader sees what it should: these references exist.
    let has = |from: &str, to: &str| {
        let f: Vec<String> = from.split("::").map(str::to_owned).collect();
        let t: Vec<String> = to.split("::").map(str::to_owned).collect();
        graph.get(&f).is_some_and(|ts| ts.contains(&t))
    };
    assert!(has("telemetry::metrics", "quota::histogram"));
    assert!(has("tenant::guard::policy", "tenant::guard::roles"));
    for depth in 1..=3 {
        let found = circles(depth);
        assert!(
            found.is_empty(),
            "import circles between modules (depth {depth}): {found:?}"
        );
    }
}

#[test]
fn config_depends_on_nothing_above_it() {
    let graph = module_graph();
    let allowed = ["config", "domain"];
    for (from, targets) in &graph {
        let top = from.first().map(String::as_str);
        let may: &[&str] = match top {
            Some("config") => &allowed,
            Some("domain") => &["domain"],
            _ => continue,
        };
        for to in targets {
            assert!(
                to.first().is_some_and(|t| may.contains(&t.as_str())),
                "{} uses {}",
                from.join("::"),
                to.join("::")
            );
        }
    }
}
