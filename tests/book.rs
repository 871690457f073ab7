//! The book's error pages are generated from the error fixtures, so every
//! code has a page with a real failing example and the diagnostic stpc
//! prints for it. This test fails when a page is missing or stale; run
//! `UPDATE_BOOK=1 cargo test -p stp-tests --test book` to regenerate.

use std::path::{Path, PathBuf};
use stp_tests::{expected_errors, run_fixture};
use stpc::diag::{render::render, Code};
use stpc::syntax::span::SourceFile;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first error fixture (by name) that announces `code`.
fn example_for(code: Code) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/sched/err"))
        .expect("fixture dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sched"))
        .collect();
    files.sort();
    files.into_iter().find(|p| {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        expected_errors(&text).iter().any(|(_, c)| c == code.as_str())
    })
}

fn page(code: Code) -> String {
    let info = code.describe();
    let mut out = format!("# {code}: {}\n\n{}\n", info.title, info.explanation);
    if let Some(path) = example_for(code) {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("fixture readable");
        let file = SourceFile::new(name.clone(), text.clone());
        let args = text.lines().next().unwrap_or_default().trim_start_matches("// args:").trim().to_string();
        let diagnostics = run_fixture(&file).err().unwrap_or_default();
        out.push_str(&format!(
            "\n## Example\n\n`tests/sched/err/{name}`, checked with `stpc check {name} {args}`:\n\n```\n{text}```\n\n```text\n{}```\n",
            render(&diagnostics, &file, false)
        ));
    }
    out
}

fn index() -> String {
    let mut out = String::from(
        "# Errors\n\nEvery diagnostic has a stable code. `stpc explain CODE` prints the explanation; each page\nhere adds a schedule that triggers it and the diagnostic stpc prints.\n\n| code | meaning |\n|---|---|\n",
    );
    for code in Code::ALL {
        out.push_str(&format!("| [{code}](errors/{code}.md) | {} |\n", code.describe().title));
    }
    out
}

#[test]
fn error_pages_match_the_fixtures() {
    let update = std::env::var_os("UPDATE_BOOK").is_some();
    let mut pages: Vec<(PathBuf, String)> = vec![(root().join("book/src/errors.md"), index())];
    for code in Code::ALL {
        pages.push((root().join(format!("book/src/errors/{code}.md")), page(code)));
    }
    let mut stale = Vec::new();
    for (path, want) in pages {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            if update {
                std::fs::write(&path, want).expect("write book page");
            } else {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(stale.is_empty(), "stale book pages (run UPDATE_BOOK=1 cargo test -p stp-tests --test book): {stale:#?}");
}

#[test]
fn every_code_has_a_failing_example_except_internal_errors() {
    for code in Code::ALL {
        if code != Code::Internal {
            assert!(example_for(code).is_some(), "{code} has no error fixture in tests/sched/err");
        }
    }
}

#[test]
fn summary_links_every_page_and_every_link_exists() {
    let src = root().join("book/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).expect("SUMMARY.md");
    for code in Code::ALL {
        assert!(summary.contains(&format!("(errors/{code}.md)")), "SUMMARY.md does not list {code}");
    }
    for link in summary.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
        assert!(src.join(link).exists(), "SUMMARY.md links to missing {link}");
    }
}
