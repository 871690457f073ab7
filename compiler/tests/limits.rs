//! Hostile sources end with a diagnostic, never a stack overflow: the
//! deepest nesting and the longest expressions the syntax limits accept
//! compile on a thread with a 2 MiB stack (the default of a spawned Rust
//! thread, less than a main thread's), and one step past them is refused.

use stpc::diag::Code;
use stpc::elab::ParamArgs;
use stpc::pipeline::{self, Request};
use stpc::syntax::nesting::{MAX_NESTING, MAX_OPERATORS};
use stpc::syntax::span::SourceFile;

fn schedule(place: &str, body_nesting: usize) -> String {
    format!(
        "schedule s(p: ranks, m: microbatches) {{ stages p; place s -> {place}; rank r {{ {}for i in 0..m {{ F(i) }} \
         for i in 0..m {{ BW(i) }}{} }} }}",
        "if true { ".repeat(body_nesting),
        " }".repeat(body_nesting)
    )
}

/// The codes stpc reports for `source`, run on a thread with a 2 MiB stack.
fn codes_on_a_small_stack(source: String) -> Vec<Code> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let file = SourceFile::new("deep.sched", source);
            let request = Request {
                params: ParamArgs { ranks: Some(2), microbatches: Some(2), ..ParamArgs::default() },
                ..Request::default()
            };
            match pipeline::build(&file, &request) {
                Ok(_) => Vec::new(),
                Err(d) => d.iter().map(|d| d.code).collect(),
            }
        })
        .expect("thread starts")
        .join()
        .expect("no stack overflow or panic")
}

#[test]
fn the_deepest_accepted_sources_compile_on_a_small_stack() {
    // Room for `->` and the `+ s` that keeps the value a stage index.
    let ops = MAX_OPERATORS - 10;
    let cases = [
        schedule(&format!("{}s", "-".repeat(ops / 2 * 2)), 0),
        schedule(&format!("s{} - {} * s", " + s".repeat(ops - 3), ops - 3), 0),
        schedule(&format!("{}s{}", "(".repeat(MAX_NESTING - 10), ")".repeat(MAX_NESTING - 10)), 0),
        schedule("s", MAX_NESTING - 10),
    ];
    for source in cases {
        assert_eq!(codes_on_a_small_stack(source), Vec::<Code>::new());
    }
}

#[test]
fn one_step_past_the_limits_is_refused_with_e0016() {
    let cases = [
        schedule(&format!("{}s", "-".repeat(MAX_OPERATORS + 2)), 0),
        schedule(&format!("s{}", " + s".repeat(100_000)), 0),
        schedule("s", MAX_NESTING + 1),
        schedule(&format!("{}s{}", "(".repeat(100_000), ")".repeat(100_000)), 0),
    ];
    for source in cases {
        assert_eq!(codes_on_a_small_stack(source), vec![Code::Limit]);
    }
}
