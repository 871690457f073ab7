//! Measures the rates that convert the solver's work counts into
//! reference seconds (`compiler/src/opt/effort.rs`): greedy passes placed,
//! ops re-timed, pairs of the Z3 model built and Z3's resource units, each
//! per second of this machine. Run on the reference machine (2 cores) when
//! the searches change, and update the constants if they moved:
//!
//! `cargo run --release -p stpc --example effort_rates`
#![allow(clippy::print_stdout)]

use std::time::Instant;
use stp_ir::simulate::CostModel;
use stpc::elab::{ComputeSchedule, ParamArgs};
use stpc::opt::{effort, greedy, late_acceptance, reorder, smt, Solver};
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

const V_SHAPE: &str = "schedule v(p: ranks, m: microbatches) { stages 2 * p; place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 2 * p; } auto; }";
const LOOPED: &str = "schedule l(p: ranks, m: microbatches) { stages p; place s -> s; memory { budget = p; } auto; }";

fn greedy_schedule(source: &str, p: i64, m: i64) -> ComputeSchedule {
    let cost = CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..CostModel::default() };
    let request = Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(m), ..ParamArgs::default() },
        cost: Some(cost),
        solver: Solver::Greedy,
        ..Request::default()
    };
    let build = pipeline::build(&SourceFile::new("rates.sched", source), &request).expect("compiles");
    build.checked.schedule().clone()
}

fn main() {
    for (name, source, p, m) in [("V, p=4 m=12", V_SHAPE, 4, 12), ("1F1B, p=4 m=12", LOOPED, 4, 12)] {
        let s = greedy_schedule(source, p, m);
        let passes = 3 * s.meta.num_stages as usize * s.meta.num_microbatches as usize;
        let ops: usize = s.ranks.iter().map(Vec::len).sum();
        println!("{name}: {passes} passes, {ops} ops");

        let runs = 4000;
        let started = Instant::now();
        greedy::restarts(&s, runs, 8, &mut || false);
        let rate = (runs * passes) as f64 / started.elapsed().as_secs_f64();
        println!("  restarts: {rate:.3e} passes/s (PASSES_PER_SECOND {:.3e})", effort::PASSES_PER_SECOND);

        let mut trial = s.clone();
        let started = Instant::now();
        let done = reorder::polish(&mut trial, 32, 200_000);
        let rate = (done.scored * ops) as f64 / started.elapsed().as_secs_f64();
        println!("  polish: {rate:.3e} re-timings/s (RETIMES_PER_SECOND {:.3e})", effort::RETIMES_PER_SECOND);

        let started = Instant::now();
        let makespan = stpc::opt::order_makespan(&s, &s.ranks);
        let acceptance = late_acceptance::Acceptance::Lexicographic;
        let (_, made) =
            late_acceptance::search(&s, s.ranks.clone(), makespan, (200_000, 0.0), acceptance, &mut || false);
        let rate = (made * ops) as f64 / started.elapsed().as_secs_f64();
        println!("  late acceptance: {rate:.3e} re-timings/s");

        for work in [2.0, 8.0] {
            let mut budget = effort::Budget::new(work, None);
            let started = Instant::now();
            let found = smt::solve(&s, makespan, &mut budget, work, None, None);
            let wall = started.elapsed().as_secs_f64();
            println!(
                "  z3 whole model, effort {work}: spent {:.2} reference s in {wall:.2} s (ratio {:.2}); {}",
                found.spent,
                wall / found.spent.max(1e-9),
                found.stopped.as_deref().unwrap_or("ran")
            );
        }
    }
}
