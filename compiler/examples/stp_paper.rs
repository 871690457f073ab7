//! Reproduces, in simulation, the comparison of the STP paper (NeurIPS
//! 2025): throughput of interleaved 1F1B (1F1B-I), ZB-V and STP for
//! Qwen2-shaped models on A800-like hardware, over TP, PP and sequence
//! length. Prints the book's table (book/src/paper-comparison.md).
//!
//! `cargo run --release -p stpc --example stp_paper`
#![allow(clippy::print_stdout)]

use stp_ir::simulate::simulate;
use stpc::cost::{model::cost_model, Hardware, ModelShape, Parallelism};
use stpc::elab::ParamArgs;
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

/// Microbatches per step: a multiple of every PP size (interleaved 1F1B
/// needs it) and at least 3p - 1 (STP needs it).
const MICROBATCHES: i64 = 32;

fn makespan(schedule: &str, pp: u32, model: &ModelShape, tp: u32) -> f64 {
    let s = stp_stdlib::get(schedule).unwrap_or_else(|| panic!("no {schedule}"));
    let file = SourceFile::new(s.path(), s.source);
    let chunks = if schedule == "interleaved-1f1b" { Some(2) } else { None };
    let request = Request {
        params: ParamArgs {
            ranks: Some(i64::from(pp)),
            microbatches: Some(MICROBATCHES),
            chunks,
            ..ParamArgs::default()
        },
        ..Request::default()
    };
    let build = pipeline::build(&file, &request).unwrap_or_else(|_| panic!("{schedule} p={pp} compiles"));
    let cost = cost_model(model, &Hardware::a800(), &Parallelism { tp, pp, chunks: 2 });
    simulate(&build.program, &cost).unwrap_or_else(|d| panic!("{d}")).makespan
}

fn main() {
    // Qwen2-shaped sizes (hidden, MLP width, layers) giving about 12.1B and
    // 26.3B parameters with Qwen2's 152k vocabulary.
    let models = [("12.1B", 4096.0, 22016.0, 34.0), ("26.3B", 5120.0, 27648.0, 48.0)];
    println!("| model | TP | PP | seq | 1F1B-I (tok/s) | ZB-V (tok/s) | STP (tok/s) | STP vs best other |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, hidden, ffn, layers) in models {
        for (tp, pp) in [(2, 4), (4, 4), (8, 4), (4, 2), (4, 8)] {
            for seq in [2048.0, 4096.0, 8192.0] {
                let model =
                    ModelShape { hidden, ffn, layers: layers * 1.0, seq_len: seq, micro_batch: 1.0, vocab: None };
                let tokens = MICROBATCHES as f64 * seq;
                let rate = |schedule: &str| tokens / makespan(schedule, pp, &model, tp);
                let (il, zbv, stp) = (rate("interleaved-1f1b"), rate("zb-v"), rate("stp"));
                let gain = 100.0 * (stp / il.max(zbv) - 1.0);
                println!("| {name} | {tp} | {pp} | {} | {il:.0} | {zbv:.0} | {stp:.0} | {gain:+.1}% |", seq as u32);
            }
        }
    }
}
