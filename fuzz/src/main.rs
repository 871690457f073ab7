//! `stp-fuzz`: runs a campaign and prints its table; exits 1 on any panic
//! or disagreement. `cargo run --release -p stp-fuzz -- --cases N`.
#![allow(clippy::print_stdout)] // a command-line tool: its report goes to standard output

use std::process::ExitCode;
use std::time::Duration;
use stp_fuzz::campaign::{run_case, Tally};

const USAGE: &str = "usage: stp-fuzz [--cases N] [--seed S] [--from I] [--slow SECONDS]

Runs N cases (default 10000) of campaign S (default 1), from case I
(default 0): random valid schedules and mutants of .sched sources, of
compiled programs (structure, JSON, text) and of torch CSVs, each judged
by the oracles. Prints a table; exits 1 if any case panicked or stp
accepted something that then failed. Cases slower than --slow (default
2 s) are counted, never failed: machines differ.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut cases, mut seed, mut from, mut slow) = (10_000u64, 1u64, 0u64, 2.0f64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().map(String::as_str);
        let parsed = match (flag.as_str(), value) {
            ("--cases", Some(v)) => v.parse().map(|v| cases = v).is_ok(),
            ("--seed", Some(v)) => v.parse().map(|v| seed = v).is_ok(),
            ("--from", Some(v)) => v.parse().map(|v| from = v).is_ok(),
            ("--slow", Some(v)) => v.parse().map(|v| slow = v).is_ok(),
            _ => false,
        };
        if !parsed {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    // Panics are caught and counted; their default report would flood the output.
    std::panic::set_hook(Box::new(|_| {}));
    let mut tally = Tally::default();
    for index in from..from + cases {
        if (index - from) % 10_000 == 0 {
            eprintln!("case {index}");
        }
        tally.add(index, run_case(seed, index), Duration::from_secs_f64(slow));
    }
    let mut report = format!("campaign seed {seed}, cases {from}..{}\n\n{}", from + cases, tally.table());
    report.push_str(&format!("\nslowest case: {} ({:.3} s)\n", tally.slowest.0, tally.slowest.1));
    for (index, family, what) in &tally.failures {
        report.push_str(&format!("case {index} ({}): {what}\n", family.name()));
    }
    let broken = tally.broken();
    let accepted_or_refused: u64 = tally.rows.values().map(|r| r[0] + r[1]).sum();
    report.push_str(&format!("{accepted_or_refused} passed, {broken} failed\n"));
    print!("{report}");
    if broken == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
