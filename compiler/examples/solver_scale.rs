//! The solver at production scale (book/src/solver.md, "At scale"): `auto`
//! on the 1F1B placement (budget p), the interleaved placement (two chunks,
//! budget 3p) and the V placement (budget 2p), at p = 8, 16, 32 with
//! m = 4p and 8p, under (b) skewed costs (T_B = 2, T_W = 0.5,
//! T_AR = 0.25) and (d) the same on a model whose first stage costs 1.3
//! times a middle one and whose last 2.5 times (cut into p stages, each
//! split in two on the 2p-stage placements). For each row: the greedy
//! order, the `--solver smt` order at the given effort, both simulated
//! from the lowered program, the lower bound, and the wall-clock time of
//! each on this machine (for scale; the orders are the same anywhere).
//!
//! `cargo run --release -p stpc --example solver_scale [-- EFFORT [P,P,..] [PLACEMENT] [COSTS]]`
//! (EFFORT in reference seconds, 60 by default, 0 for the greedy column alone; PLACEMENT one of `1f1b`,
//! `interleaved`, `v`; COSTS `b` or `d`). Rows are printed as they finish.
#![allow(clippy::print_stdout)]

mod common;

use common::simulated;
use std::io::Write;
use std::time::Instant;
use stp_ir::simulate::CostModel;
use stpc::elab::ParamArgs;
use stpc::opt::{self, Solver};
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

/// A placement of the table: its name, its stage count and placement as
/// `.sched` text, and its memory budget.
struct Placement {
    name: &'static str,
    stages: &'static str,
    place: &'static str,
    budget: &'static str,
    chunks: u32,
}

const PLACEMENTS: [Placement; 3] = [
    Placement { name: "1f1b", stages: "p", place: "s", budget: "p", chunks: 1 },
    Placement { name: "interleaved", stages: "2 * p", place: "s % p", budget: "3 * p", chunks: 2 },
    Placement {
        name: "v",
        stages: "2 * p",
        place: "if s < p { s } else { 2 * p - 1 - s }",
        budget: "2 * p",
        chunks: 2,
    },
];

fn main() {
    let mut args = std::env::args().skip(1);
    let effort: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(60.0);
    let ps: Vec<i64> =
        args.next().map(|a| a.split(',').filter_map(|p| p.parse().ok()).collect()).unwrap_or_else(|| vec![8, 16, 32]);
    let only_placement = args.next().filter(|a| a != "all");
    let only_costs = args.next().filter(|a| a != "all");
    let skewed = CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..CostModel::default() };
    println!("solver effort {effort} reference s; times are wall clock on this machine");
    println!();
    println!("| placement | costs | p | m | passes | greedy | greedy time | smt | smt time | lower bound | greedy vs bound | smt vs bound | Z3 |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for placement in &PLACEMENTS {
        if only_placement.as_deref().is_some_and(|o| o != placement.name) {
            continue;
        }
        for costs in ["b", "d"] {
            if only_costs.as_deref().is_some_and(|o| o != costs) {
                continue;
            }
            for &p in &ps {
                for m in [4 * p, 8 * p] {
                    let cost = if costs == "b" {
                        skewed.clone()
                    } else {
                        heavy_ends(&skewed, p as u32, placement.chunks * p as u32)
                    };
                    row(placement, costs, p, m, &cost, effort);
                    std::io::stdout().flush().ok();
                }
            }
        }
    }
}

fn row(placement: &Placement, costs: &str, p: i64, m: i64, cost: &CostModel, effort: f64) {
    let source = format!(
        "schedule a(p: ranks, m: microbatches) {{ stages {}; place s -> {}; memory {{ budget = {}; }} auto; }}",
        placement.stages, placement.place, placement.budget
    );
    let file = SourceFile::new("scale.sched", source.as_str());
    let request = Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(m), ..ParamArgs::default() },
        ..Request::default()
    };
    let mut auto = pipeline::elaborate_unplanned(&file, &request).unwrap_or_else(|d| panic!("{d:?}"));
    auto.cost = cost.clone();
    let passes = 3 * auto.meta.num_stages as i64 * m;
    let bound = opt::bound::lower_bound(&auto, cost);
    let started = Instant::now();
    let greedy = opt::plan(&auto, Solver::Greedy);
    let greedy_time = started.elapsed().as_secs_f64();
    let started = Instant::now();
    // EFFORT 0: the greedy column alone (for profiling it).
    let smt = (effort > 0.0).then(|| opt::plan(&auto, Solver::Smt { effort, cap: None, progress: None }));
    let smt_time = started.elapsed().as_secs_f64();
    let z3 = match &smt {
        Some(Ok((_, report))) => report.fallback.clone().unwrap_or_else(|| report.kept.to_string()),
        Some(Err(d)) => d.message.clone(),
        None => "not run".to_string(),
    };
    let greedy = greedy.ok().map(|(order, _)| simulated(&auto, order, cost));
    let smt = smt.and_then(Result::ok).map(|(order, _)| simulated(&auto, order, cost));
    let show = |r: &Option<f64>| r.map_or("none".to_string(), |t| format!("{t:.2}"));
    let gap = |r: &Option<f64>| r.map_or("-".to_string(), |t| format!("{:+.1}%", 100.0 * (t / bound - 1.0)));
    println!(
        "| {} | ({costs}) | {p} | {m} | {passes} | {} | {greedy_time:.1} s | {} | {smt_time:.1} s | {bound:.2} | {} | {} | {} |",
        placement.name,
        show(&greedy),
        show(&smt),
        gap(&greedy),
        gap(&smt),
        z3.replace('|', "/"),
    );
}

/// `base` on a model cut into `p` stages whose first costs 1.3 times a
/// middle one and whose last 2.5 times, recut into `stages`.
fn heavy_ends(base: &CostModel, p: u32, stages: u32) -> CostModel {
    base.with_heavy_ends(p, 1.3, 2.5)
        .recut(p, stages)
        .unwrap_or_else(|| panic!("{stages} stages is not a multiple of {p}"))
}
