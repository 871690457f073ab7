//! The fixture corpora: every file in sched/ok must compile to IR that
//! verifies (snapshot: the IR text); every file in sched/err must fail with
//! the diagnostics its `// error: CODE` comments announce, on those lines
//! (snapshot: the source and the rendered, colourless diagnostics).

use stp_tests::{expected_errors, request_from_header, run_fixture};
use stpc::diag::render::render;
use stpc::pipeline;
use stpc::syntax::span::SourceFile;

fn load(path: &std::path::Path) -> SourceFile {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = format!("{}", path.file_name().unwrap_or_default().to_string_lossy());
    SourceFile::new(name, text)
}

#[test]
fn ok_fixtures_compile_to_verified_ir() {
    insta::glob!("sched/ok/*.sched", |path| {
        let file = load(path);
        let request = request_from_header(&file.text);
        let program = pipeline::compile(&file, &request)
            .unwrap_or_else(|d| panic!("{} failed:\n{}", file.name, render(&d, &file, false)));
        stp_ir::verify(&program).unwrap_or_else(|e| panic!("{}: IR does not verify: {e:?}", file.name));
        insta::assert_snapshot!(stp_ir::print_text(&program));
    });
}

#[test]
fn err_fixtures_report_the_announced_errors_on_their_lines() {
    insta::glob!("sched/err/*.sched", |path| {
        let file = load(path);
        let diagnostics = match run_fixture(&file) {
            Ok(()) => panic!("{} compiled, but it is an error fixture", file.name),
            Err(d) => d,
        };
        let found: Vec<(usize, String)> = diagnostics
            .iter()
            .map(|d| (d.primary_span().map_or(0, |s| file.line_of(s.start)), d.code.to_string()))
            .collect();
        let mut expected = expected_errors(&file.text);
        let mut found_sorted = found.clone();
        found_sorted.sort();
        found_sorted.dedup();
        expected.sort();
        assert_eq!(
            found_sorted,
            expected,
            "{}: diagnostics (line, code) differ from the `// error:` comments:\n{}",
            file.name,
            render(&diagnostics, &file, false)
        );
        insta::assert_snapshot!(format!("{}\n---\n{}", file.text, render(&diagnostics, &file, false)));
    });
}

#[test]
fn examples_compile_with_their_announced_parameters() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sched") {
            let file = load(&path);
            let request = request_from_header(&file.text);
            let program = pipeline::compile(&file, &request)
                .unwrap_or_else(|d| panic!("{} failed:\n{}", file.name, render(&d, &file, false)));
            stp_ir::verify(&program).unwrap_or_else(|e| panic!("{}: {e:?}", file.name));
            count += 1;
        }
    }
    assert!(count >= 3, "expected the examples in {}", dir.display());
}
