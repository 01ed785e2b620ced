//! The structure's figures, read from the source (docs/architecture.md, "Measures"): how many
//! files name each action column, the functions over 80 lines, `use super::*` outside tests,
//! import circles between the crate's modules, and imports that point up the layers.
//! `cargo test --test design -- --nocapture` prints them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers of docs/architecture.md, low to high; a module imports only from its own
/// layer or lower ones.
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("secret", 0),
    ("textfile", 0),
    ("schedule", 0),
    ("outbound", 0),
    ("logging", 0),
    ("config", 1),
    ("budget", 1),
    ("metrics", 1),
    ("panics", 2),
    ("mde", 2),
    ("auth", 2),
    ("store", 3),
    ("lock", 3),
    ("poller", 4),
    ("intake", 4),
    ("housekeeping", 4),
    ("notify", 4),
    ("report", 4),
    ("http", 5),
    ("systemd", 5),
    ("runtime", 5),
    ("daemon", 5),
    ("doctor", 6),
    ("demo", 6),
    ("cli", 6),
];

/// The ceilings the structure keeps (issue "Redesign, step two").
const MAX_FILES_PER_COLUMN: usize = 3;
const MAX_LONG_FUNCTIONS: usize = 5;
const LONG_FUNCTION: usize = 80;
/// Columns whose names are also everyday words of other parts (an OAuth scope, a card's
/// title): a count of files naming them says nothing about the column.
const AMBIGUOUS: &[&str] = &["scope", "title"];

fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

fn relative(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The top-level module a file belongs to (`src/store/queue.rs` -> `store`).
fn module_of(p: &str) -> Option<String> {
    let rest = p.strip_prefix("src/")?;
    let first = rest.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The source with comments, string and char literals blanked (same length, newlines kept),
/// so braces and names are counted only in code.
fn code_only(text: &str) -> String {
    blank_out(text, false)
}

/// The source with comments blanked: code and literals (SQL names columns in strings).
fn without_comments(text: &str) -> String {
    blank_out(text, true)
}

fn blank_out(text: &str, keep_strings: bool) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let literal = |out: &mut Vec<u8>, c: u8| {
        if keep_strings {
            out.push(c)
        } else {
            blank(out, c)
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    blank(&mut out, b[i]);
                    blank(&mut out, b[i + 1]);
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    blank(&mut out, b[i]);
                    blank(&mut out, b[i + 1]);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            out.push(b'r');
            out.resize(out.len() + (j - i), b' ');
            i = j + 1;
            while i < b.len() {
                if b[i] == b'"' && (0..hashes).all(|k| b.get(i + 1 + k) == Some(&b'#')) {
                    out.resize(out.len() + hashes + 1, b' ');
                    i += 1 + hashes;
                    break;
                }
                literal(&mut out, b[i]);
                i += 1;
            }
        } else if c == b'"' {
            // Kept quotes let a measure tell a JSON key from a word of a query.
            let quote = if keep_strings { b'"' } else { b' ' };
            out.push(quote);
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    literal(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    literal(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(quote);
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{1F}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == b'\'')
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                // Multi-byte chars: up to 4 bytes before the closing quote.
                (i + 2..b.len().min(i + 6))
                    .find(|&j| b[j] == b'\'')
                    .filter(|_| b.get(i + 1).is_some_and(|x| *x >= 0x80))
            };
            match end {
                Some(e) => {
                    out.resize(out.len() + (e - i + 1), b' ');
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Line ranges (0-based, inclusive) of `#[cfg(test)]` modules.
fn test_regions(code: &str) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut regions = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" {
            let start = i;
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim().starts_with("#[") {
                j += 1;
            }
            if j < lines.len() && lines[j].contains("mod ") && lines[j].contains('{') {
                let end = block_end(&lines, j);
                regions.push((start, end));
                i = end + 1;
                continue;
            }
        }
        i += 1;
    }
    regions
}

/// The line on which the block opened on line `from` closes.
fn block_end(lines: &[&str], from: usize) -> usize {
    let mut depth = 0i32;
    let mut opened = false;
    for (k, line) in lines.iter().enumerate().skip(from) {
        for ch in line.chars() {
            match ch {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                ';' if !opened && depth == 0 => return k,
                _ => {}
            }
        }
        if opened && depth == 0 {
            return k;
        }
    }
    lines.len() - 1
}

fn in_regions(regions: &[(usize, usize)], line: usize) -> bool {
    regions.iter().any(|&(a, b)| (a..=b).contains(&line))
}

struct Source {
    path: String,
    code: String,
    /// `code` with its literals: where SQL names columns.
    text: String,
    tests: Vec<(usize, usize)>,
}

fn read_sources() -> Vec<Source> {
    sources()
        .into_iter()
        .map(|p| {
            let raw = fs::read_to_string(&p).unwrap();
            let code = code_only(&raw);
            let tests = test_regions(&code);
            Source {
                path: relative(&p),
                code,
                text: without_comments(&raw),
                tests,
            }
        })
        .collect()
}

fn outside_sim(s: &Source) -> bool {
    !s.path.starts_with("src/sim")
}

/// The code of a file outside its test modules.
fn non_test_code(s: &Source) -> String {
    outside_tests(s, &s.code)
}

fn outside_tests(s: &Source, code: &str) -> String {
    code.lines()
        .enumerate()
        .filter(|(i, _)| !in_regions(&s.tests, *i))
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every function with a body: (file, name, lines).
fn functions(s: &Source) -> Vec<(String, usize)> {
    let lines: Vec<&str> = s.code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if in_regions(&s.tests, i) {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        let Some(name) = words.get(at + 1) else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        let end = block_end(&lines, i);
        let has_body = lines[i..=end].iter().any(|l| l.contains('{'));
        if has_body {
            out.push((name, end - i + 1));
        }
    }
    out
}

/// The crate's top-level modules a file imports (`crate::x`, `super::x` from a nested file).
fn imports(s: &Source) -> BTreeSet<String> {
    let code = non_test_code(s);
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let name: String = code[at + 7..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    // `use crate::{a, b::c}` names several at once.
    for (at, _) in code.match_indices("crate::{") {
        let rest = &code[at + 8..];
        let mut depth = 0;
        let mut token = String::new();
        let mut expecting = true;
        for ch in rest.chars() {
            match ch {
                '{' => {
                    depth += 1;
                    expecting = false;
                }
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expecting = true;
                    token.clear();
                }
                c if expecting && (c.is_alphanumeric() || c == '_') => token.push(c),
                _ => {
                    if expecting && !token.is_empty() {
                        out.insert(token.clone());
                        expecting = false;
                    }
                }
            }
        }
    }
    out
}

/// The columns of `actions`, from the migrations.
fn action_columns() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut columns = Vec::new();
    for f in files {
        let text = fs::read_to_string(f).unwrap();
        if let Some(start) = text.find("CREATE TABLE actions (") {
            for line in text[start..].lines().skip(1) {
                if line.starts_with(')') {
                    break;
                }
                let first = line.split_whitespace().next().unwrap_or("");
                if !first.is_empty()
                    && first.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    && line.starts_with("    ")
                    && !line.starts_with("     ")
                {
                    columns.push(first.to_string());
                }
            }
        }
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("ALTER TABLE actions ADD COLUMN ") {
                columns.push(rest.split_whitespace().next().unwrap().to_string());
            }
        }
    }
    columns
}

/// Columns a poll copies from a MachineAction: what adding a field of MDE's touches.
/// The columns whose wire name (their declaration in `domain`'s `action_fields!`) is the
/// column's own name.
fn wire_named_like_columns() -> Vec<String> {
    let domain =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain.rs")).unwrap();
    let found: Vec<String> = domain
        .lines()
        .filter_map(|l| {
            let (column, rest) = l.trim().split_once(':')?;
            let wire = rest.split_once("= \"")?.1.split_once('"')?.0;
            (rest.contains(" via ") && wire == column).then(|| column.to_string())
        })
        .collect();
    assert!(
        found.contains(&"requestor".to_string()),
        "read action_fields!: {found:?}"
    );
    found
}

fn copied_columns(columns: &[String]) -> Vec<String> {
    // Columns of the daemon's own bookkeeping, which every part reads by design.
    const OWN: &[&str] = &[
        "action_id",
        "tracking",
        "status",
        "enqueued_at",
        "last_polled_at",
        "next_poll_at",
        "poll_count",
        "error_count",
        "last_error",
        "last_error_at",
        "finished_at",
        "last_response",
        "revived_at",
        "source",
        "correlation",
        "stuck_events",
        // With `status`, what the poll compares and every transition records: the change
        // detector, not a field copied for reports.
        "mde_updated_at",
    ];
    columns
        .iter()
        .filter(|c| !OWN.contains(&c.as_str()))
        .cloned()
        .collect()
}

fn names_word(code: &str, word: &str) -> usize {
    code.match_indices(word)
        .filter(|(at, _)| {
            let before = code[..*at].chars().next_back();
            let after = code[at + word.len()..].chars().next();
            let edge = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            edge(before) && edge(after)
        })
        .count()
}

#[test]
fn structure_figures() {
    let sources = read_sources();
    let mut report = String::new();
    let mut failures = Vec::new();

    // Action columns: the files (outside sim/ and tests) whose code names each.
    let columns = action_columns();
    assert!(
        columns.len() > 20,
        "read the columns of actions: {columns:?}"
    );
    report.push_str("files naming each copied action column (outside sim/ and tests):\n");
    let mut worst = 0;
    let same_on_wire = wire_named_like_columns();
    for c in copied_columns(&columns) {
        // `"requestor"` as a JSON key is MDE's (and the events') name for the field, which
        // happens to be the column's: not a copy of the column.
        let wire_key = same_on_wire.contains(&c).then(|| format!("\"{c}\""));
        let files: Vec<&str> = sources
            .iter()
            .filter(|s| outside_sim(s))
            .filter(|s| {
                let mut text = outside_tests(s, &s.text);
                if let Some(k) = &wire_key {
                    text = text.replace(k.as_str(), "");
                }
                names_word(&text, &c) > 0
            })
            .map(|s| s.path.as_str())
            .collect();
        let common = AMBIGUOUS.contains(&c.as_str());
        if !common {
            worst = worst.max(files.len());
        }
        let note = if common {
            " (a common word: not counted)"
        } else {
            ""
        };
        report.push_str(&format!(
            "  {c:24} {}{note} {}\n",
            files.len(),
            files.join(" ")
        ));
    }
    report.push_str(&format!(
        "  most: {worst} (ceiling {MAX_FILES_PER_COLUMN})\n"
    ));
    if worst > MAX_FILES_PER_COLUMN {
        failures.push(format!("an action column is named in {worst} files"));
    }

    // Long functions.
    let mut long: Vec<(String, String, usize)> = sources
        .iter()
        .filter(|s| outside_sim(s))
        .flat_map(|s| {
            functions(s)
                .into_iter()
                .filter(|(_, n)| *n > LONG_FUNCTION)
                .map(|(f, n)| (s.path.clone(), f, n))
        })
        .collect();
    long.sort_by_key(|l| std::cmp::Reverse(l.2));
    report.push_str(&format!(
        "functions over {LONG_FUNCTION} lines (outside sim/ and tests): {}\n",
        long.len()
    ));
    for (p, f, n) in &long {
        report.push_str(&format!("  {n:4} {p} {f}\n"));
    }
    if long.len() > MAX_LONG_FUNCTIONS {
        failures.push(format!(
            "{} functions over {LONG_FUNCTION} lines",
            long.len()
        ));
    }

    // `use super::*` outside test modules.
    let globs: Vec<&str> = sources
        .iter()
        .filter(|s| non_test_code(s).contains("use super::*"))
        .map(|s| s.path.as_str())
        .collect();
    report.push_str(&format!("use super::* outside tests: {globs:?}\n"));
    if !globs.is_empty() {
        failures.push(format!("use super::* in {globs:?}"));
    }

    // The module graph.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &sources {
        let Some(m) = module_of(&s.path) else {
            continue;
        };
        let entry = graph.entry(m.clone()).or_default();
        for i in imports(s) {
            if i != m && (LAYERS.iter().any(|(l, _)| *l == i) || i == "sim") {
                entry.insert(i);
            }
        }
    }
    let layer = |m: &str| LAYERS.iter().find(|(l, _)| *l == m).map(|(_, n)| *n);
    let mut upward = Vec::new();
    for (m, deps) in &graph {
        let Some(lm) = layer(m) else { continue };
        for d in deps {
            if d == "sim" && !matches!(m.as_str(), "demo" | "doctor" | "cli") {
                upward.push(format!("{m} -> sim"));
            }
            if let Some(ld) = layer(d)
                && ld > lm
            {
                upward.push(format!("{m} (layer {lm}) -> {d} (layer {ld})"));
            }
        }
    }
    for m in graph.keys() {
        if m != "sim" && layer(m).is_none() {
            failures.push(format!(
                "module {m} has no layer in this test and docs/architecture.md"
            ));
        }
    }
    report.push_str(&format!("imports pointing up the layers: {upward:?}\n"));
    if !upward.is_empty() {
        failures.push(format!("upward imports {upward:?}"));
    }
    let cycles = cycles(&graph);
    report.push_str(&format!("import circles: {cycles:?}\n"));
    if !cycles.is_empty() {
        failures.push(format!("import circles {cycles:?}"));
    }

    println!("{report}");
    assert!(failures.is_empty(), "{failures:#?}\n{report}");
}

/// Modules that reach themselves through imports.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = graph[start].iter().cloned().collect();
        while let Some(m) = stack.pop() {
            if &m == start {
                found.push(start.clone());
                break;
            }
            if seen.insert(m.clone())
                && let Some(next) = graph.get(&m)
            {
                stack.extend(next.iter().cloned());
            }
        }
    }
    found
}

#[test]
fn the_scanner_skips_literals_and_comments() {
    let code = code_only("let a = \"{ fn x\"; // fn y {\nlet c = '{'; /* { */ fn z() {}\n");
    assert!(!code.contains("fn x") && !code.contains("fn y"));
    assert!(code.contains("fn z() {}"));
    assert_eq!(code.matches('{').count(), 1);
    assert_eq!(code.lines().count(), 2);
    let kept = without_comments("let q = \"SELECT a.machine_id\"; // machine_id\n");
    assert_eq!(names_word(&kept, "machine_id"), 1);
    let s = Source {
        path: "src/x.rs".into(),
        text: String::new(),
        code: code_only("fn a() {\n    1\n}\n#[cfg(test)]\nmod tests {\n    fn b() {}\n}\n"),
        tests: Vec::new(),
    };
    let s = Source {
        tests: test_regions(&s.code),
        ..s
    };
    assert_eq!(functions(&s), vec![("a".to_string(), 3)]);
}
