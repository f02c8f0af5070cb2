//! The book (`docs/`) and the README cannot drift from each other or from the code: every chapter is
//! in the book's summary, every relative link and anchor resolves (as mdBook makes anchors), and the
//! HTTP API's route table lists exactly the routes the router serves. (The metric table is checked
//! against a live `/metrics` in `cli_run.rs`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn book() -> PathBuf {
    repo().join("docs/src")
}

fn chapters(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            chapters(&path, found);
        } else if path.extension().is_some_and(|e| e == "md") {
            found.push(path);
        }
    }
}

/// Markdown links `[text](target)` outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = strip_code_spans(line);
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push(after[..end].to_string());
            rest = after[end..].to_string();
        }
    }
    found
}

fn strip_code_spans(line: &str) -> String {
    line.split('`').enumerate().filter(|(i, _)| i % 2 == 0).map(|(_, part)| part).collect::<Vec<_>>().join("")
}

/// The anchors mdBook gives a chapter's headings: the heading's text, lower case, spaces as `-`,
/// anything but letters, digits, `-` and `_` dropped; a repeated one gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim().replace('`', "");
        let title = drop_link_targets(&title);
        let id: String = title
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c.to_lowercase().next().unwrap()),
                c if c.is_whitespace() => Some('-'),
                _ => None,
            })
            .collect();
        let mut unique = id.clone();
        let mut n = 1;
        while !seen.insert(unique.clone()) {
            unique = format!("{id}-{n}");
            n += 1;
        }
    }
    seen
}

fn drop_link_targets(title: &str) -> String {
    let mut out = String::new();
    let mut rest = title;
    while let Some(at) = rest.find("](") {
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find(')') else { break };
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    out.replace('[', "")
}

fn check_links(file: &Path, text: &str, problems: &mut Vec<String>) {
    for target in links(text) {
        if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() { file.to_path_buf() } else { file.parent().unwrap().join(path) };
        let Ok(resolved) = resolved.canonicalize() else {
            problems.push(format!("{}: link to {target}: no such file", file.display()));
            continue;
        };
        if file.starts_with(book()) && !resolved.starts_with(book().canonicalize().unwrap()) {
            problems.push(format!("{}: link to {target} leaves the book (link to a page of it)", file.display()));
            continue;
        }
        if let Some(anchor) = anchor {
            let Ok(linked) = std::fs::read_to_string(&resolved) else {
                problems.push(format!("{}: link to {target}: not a readable page", file.display()));
                continue;
            };
            if !anchors(&linked).contains(anchor) {
                problems.push(format!("{}: link to {target}: no heading with that anchor", file.display()));
            }
        }
    }
}

#[test]
fn every_chapter_is_in_the_summary_and_every_link_resolves() {
    let summary_path = book().join("SUMMARY.md");
    let summary = std::fs::read_to_string(&summary_path).unwrap();
    let listed: BTreeSet<PathBuf> = links(&summary).iter().map(|l| book().join(l)).collect();
    let mut found = Vec::new();
    chapters(&book(), &mut found);
    let mut problems = Vec::new();
    for chapter in &found {
        if chapter != &summary_path && !listed.contains(chapter) {
            problems.push(format!("{} is not in SUMMARY.md", chapter.display()));
        }
        check_links(chapter, &std::fs::read_to_string(chapter).unwrap(), &mut problems);
    }
    for entry in &listed {
        if !entry.is_file() {
            problems.push(format!("SUMMARY.md lists {}, which does not exist", entry.display()));
        }
    }
    let readme = repo().join("README.md");
    check_links(&readme, &std::fs::read_to_string(&readme).unwrap(), &mut problems);
    assert!(found.len() >= 15, "the book has only {} pages", found.len());
    assert!(problems.is_empty(), "the book's links:\n{}", problems.join("\n"));
}

#[test]
fn the_link_check_sees_broken_links_and_anchors() {
    let page = book().join("operating/api.md");
    let mut problems = Vec::new();
    check_links(&page, "[a](metrics.md) [b](metrics.md#no-such-heading) [c](nowhere.md) `[d](x.md)`", &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(anchors("# Faults: what `sluice` does\n## A\n## A\n").contains("a-1"));
    assert!(anchors("## Faults: what `sluice` does").contains("faults-what-sluice-does"));
}

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` the API's router is built from.
fn served_routes() -> BTreeSet<(String, String)> {
    let source = std::fs::read_to_string(repo().join("host/src/api/mod.rs")).unwrap();
    let mut routes = BTreeSet::new();
    for call in source.split(".route(\"").skip(1) {
        let (path, rest) = call.split_once('"').unwrap();
        let handlers = &rest[..rest.find("\n").unwrap_or(rest.len())];
        for method in ["get", "put", "post", "delete", "patch"] {
            let called = format!("{method}(");
            if handlers.starts_with(&format!(", {called}")) || handlers.contains(&format!(".{called}")) {
                routes.insert((method.to_uppercase(), path.to_string()));
            }
        }
    }
    routes
}

/// `(METHOD, path)` named in the first column of the API chapter's route tables.
fn documented_routes() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for page in ["operating/api.md", "plugins/upload-and-swap.md"] {
        let text = std::fs::read_to_string(book().join(page)).unwrap();
        for line in text.lines().filter(|l| l.starts_with("| `")) {
            let first = line.split(" | ").next().unwrap();
            for span in first.split('`').skip(1).step_by(2) {
                let Some((method, path)) = span.split_once(' ') else { continue };
                if method.chars().all(|c| c.is_ascii_uppercase()) {
                    let path = path.split(['?', '[', ' ']).next().unwrap();
                    routes.insert((method.to_string(), path.to_string()));
                }
            }
        }
    }
    routes
}

#[test]
fn the_route_tables_list_exactly_the_routes_served() {
    let served = served_routes();
    let documented = documented_routes();
    assert!(served.len() >= 15, "found only {} routes in the router: {served:?}", served.len());
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not in the book's route tables: {missing:?}\nin the book but not served: {extra:?}"
    );
}
