//! The scheduler comparison of the book (book/src/solver.md): for each
//! hand-written standard schedule, the makespan of its own order, of the
//! greedy and the Z3 order on the same placement within the same memory
//! (the hand order's peak per rank), and the lower bound, under unit and
//! skewed costs. The hand order is simulated from its compiled program;
//! the `auto` orders are checked, lowered and simulated the same way. Costs: (a) unit, (b) skewed, (c) a
//! Qwen2-shaped 12.1B model on A800-like GPUs at TP 4, PP 4, two chunks,
//! 4096-token sequences (the simulator's model formulas), in units of its
//! T_F. Every makespan is the simulator's, of the checked and lowered
//! program (where transfers take time, lowering places receives so that
//! it runs as planned; see `place_receives`).
//!
//! `cargo run --release -p stpc --example solver_table [-- EFFORT [SCHEDULE [P]]]`
//! (the solver's effort in reference seconds, `--solver-effort`; one
//! schedule's rows only, when named, `all` for every one; p ranks, 4 by
//! default, m = 3p). With `STP_UNEVEN=1`, the rows are (d): costs (b) on
//! a model whose first stage (embedding) costs 1.3 times a middle one and
//! whose last (LM head and loss) 2.5 times, cut into p stages; schedules
//! with 2p stages split each of those in two ([`CostModel::recut`]), so
//! every row runs the same model. With `STP_PROVE=EFFORT` in the
//! environment, each row not proved optimal also gets the bound Z3 proves
//! in five steps of EFFORT ([`opt::raise_bound`]: bisection
//! between the bound and the solver's order; no `auto` order is shorter
//! as planned, and simulated makespans are never shorter than planned
//! ones).
#![allow(clippy::print_stdout)]

mod common;

use common::simulated;
use std::time::Instant;
use stp_ir::simulate::{simulate, CostModel};
use stpc::cost::{model::cost_model, Hardware, ModelShape, Parallelism};
use stpc::elab::ParamArgs;
use stpc::opt::{self, Solver};
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let only = std::env::args().nth(2).filter(|o| o != "all");
    let p: i64 = std::env::args().nth(3).and_then(|a| a.parse().ok()).unwrap_or(4);
    let uneven = std::env::var_os("STP_UNEVEN").is_some();
    let prove: Option<f64> = std::env::var("STP_PROVE").ok().and_then(|v| v.parse().ok());
    let unit = CostModel::default();
    let skewed = CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit.clone() };
    let qwen =
        ModelShape { hidden: 4096.0, ffn: 22016.0, layers: 34.0, seq_len: 4096.0, micro_batch: 1.0, vocab: None };
    let paper = normalised(cost_model(&qwen, &Hardware::a800(), &Parallelism { tp: 4, pp: 4, chunks: 2 }));
    let m = 3 * p;
    // A model copy cut into `parts` stages, repeated for each pipeline.
    let heavy_ends = |parts: u32, pipelines: u32| {
        let model = skewed.with_heavy_ends(p as u32, 1.3, 2.5);
        let cut = model.recut(p as u32, parts).unwrap_or_else(|| panic!("{parts} stages is not a multiple of {p}"));
        cut.per_copy(parts, pipelines)
    };
    println!("p={p}, m={m}; solver effort {seconds} reference s; memory budget = the hand order's peak on each rank");
    println!(
        "(c) = 12.1B Qwen2 shape, A800, TP 4: T_F 1, T_B {:.2}, T_W {:.2}, T_AR {:.2}, p2p {:.3}",
        paper.backward_input, paper.backward_weight, paper.tp_collective, paper.p2p
    );
    println!();
    let proved_column = if prove.is_some() { " Z3-proved bound | smt vs proved bound |" } else { "" };
    let proved_rule = if prove.is_some() { "---|---|" } else { "" };
    println!("| schedule | costs | hand | greedy, single passes | greedy | smt | lower bound | smt vs hand | smt vs bound | smt time | proved |{proved_column}");
    println!("|---|---|---|---|---|---|---|---|---|---|---|{proved_rule}");
    for (name, chunks) in [
        ("1f1b", None),
        ("zb-h1", None),
        ("zb-v", None),
        ("dualpipe-v", None),
        ("stp", None),
        ("interleaved-1f1b", Some(2)),
        ("dualpipe", None),
        ("chimera", None),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let rows: Vec<(&str, Option<CostModel>)> = if uneven {
            vec![("(d) (b), ends 1.3x / 2.5x", None)]
        } else {
            vec![
                ("(a) unit", Some(unit.clone())),
                ("(b) T_B=2 T_W=0.5 T_AR=0.25", Some(skewed.clone())),
                ("(c) 12.1B model", Some(paper.clone())),
            ]
        };
        for (label, cost) in rows {
            let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("no {name}"));
            let file = SourceFile::new(s.path(), s.source);
            let request = Request {
                params: ParamArgs { ranks: Some(p), microbatches: Some(m), chunks, ..ParamArgs::default() },
                ..Request::default()
            };
            let build = pipeline::build(&file, &request).unwrap_or_else(|_| panic!("{name} compiles"));
            let meta = &build.checked.schedule().meta;
            let cost = cost.unwrap_or_else(|| heavy_ends(meta.parts(), meta.pipelines.max(1)));
            let hand = simulate(&build.program, &cost).unwrap_or_else(|d| panic!("{d}")).makespan;
            let mut auto = build.checked.schedule().clone();
            auto.auto = true;
            auto.cost = cost.clone();
            auto.memory.budget = build.checked.peaks().iter().map(|peak| peak.units).max();
            let bound = opt::bound::lower_bound(&auto, &cost);
            let run = |order| simulated(&auto, order, &cost);
            let single = opt::greedy::schedule_single_passes(&auto).map(|(order, _)| run(order));
            let greedy = opt::plan(&auto, Solver::Greedy).map(|(order, _)| run(order));
            let started = Instant::now();
            let smt = opt::plan(&auto, Solver::Smt { effort: seconds, cap: None, progress: None });
            let took = started.elapsed().as_secs_f64();
            let smt = smt.map(|(order, report)| (run(order), report));
            let show = |r: &Result<f64, _>| r.as_ref().map_or("none".to_string(), |t| format!("{t:.2}"));
            let (smt_time, proved) = match &smt {
                Ok((makespan, r)) => (Ok(*makespan), r.optimal),
                Err(_) => (Err(()), false),
            };
            // Planning cannot see that transfers with one peer share a
            // stream; lowering places receives so that the step runs as
            // planned, and says here where it could not.
            if let Ok((simulated, r)) = &smt {
                if (simulated - r.makespan).abs() > 1e-9 {
                    eprintln!("{name} {label}: planned {:.3}, simulated {simulated:.3}", r.makespan);
                }
            }
            let proved_bound = match (prove, &smt) {
                (Some(limit), Ok((simulated, r))) => {
                    let raised = if r.optimal {
                        r.makespan
                    } else {
                        let mut budget = opt::effort::Budget::new(5.0 * limit, None);
                        opt::raise_bound(&auto, r.lower_bound, r.makespan, &mut budget, limit).bound
                    };
                    format!(" {raised:.2} | {:+.1}% |", 100.0 * (simulated / raised - 1.0))
                }
                _ => String::new(),
            };
            let versus = smt_time.as_ref().map_or("-".to_string(), |t| format!("{:+.1}%", 100.0 * (t / hand - 1.0)));
            let gap = smt_time.as_ref().map_or("-".to_string(), |t| format!("{:+.1}%", 100.0 * (t / bound - 1.0)));
            println!(
                "| {name} | {label} | {hand:.2} | {} | {} | {} | {bound:.2} | {versus} | {gap} | {took:.1} s | {} |{proved_bound}",
                show(&single.map_err(|_| ())),
                show(&greedy.map_err(|_| ())),
                show(&smt_time),
                if proved { "yes" } else { "no" }
            );
        }
    }
}

/// `cost` in units of its forward time.
fn normalised(cost: CostModel) -> CostModel {
    let f = cost.forward;
    CostModel {
        forward: 1.0,
        backward_input: cost.backward_input / f,
        backward_weight: cost.backward_weight / f,
        tp_collective: cost.tp_collective / f,
        p2p: cost.p2p / f,
        stages: Vec::new(),
        recompute: 1.0,
        reduce: 0.0,
    }
}
