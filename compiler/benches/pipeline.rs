//! The whole compile path (parse -> check -> elaborate -> lower ->
//! serialize) for Megatron's interleaved 1F1B at p = 32, v = 2, and each
//! phase on its own. m = 256 gives 32,768 compute ops; m = 2560 gives ten
//! times that, so the ratio of the two shows whether cost grows linearly.
//!
//! `check_1m_ops` times the safety checks alone (coverage, order, cycle,
//! memory, then lowering with the rendezvous deadlock run) at m = 8192:
//! 1,048,576 compute ops.
//!
//! Run with `cargo bench -p stpc --bench pipeline`.

use divan::Bencher;
use stp_ir::simulate::Semantics;
use stpc::elab::ParamArgs;
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

fn main() {
    divan::main();
}

fn source() -> SourceFile {
    let s = stp_stdlib::get("interleaved-1f1b").expect("stdlib has interleaved-1f1b");
    SourceFile::new(s.path(), s.source)
}

fn request(m: i64) -> Request {
    Request {
        params: ParamArgs { ranks: Some(32), microbatches: Some(m), chunks: Some(2), ..ParamArgs::default() },
        ..Request::default()
    }
}

const MICROBATCHES: [i64; 2] = [256, 2560];

#[divan::bench(args = MICROBATCHES, sample_count = 20)]
fn full_path_to_json(bencher: Bencher, m: i64) {
    let file = source();
    let request = request(m);
    bencher.bench(|| {
        let program = pipeline::compile(&file, &request).expect("compiles");
        stp_ir::to_json(&program).len()
    });
}

#[divan::bench(args = MICROBATCHES, sample_count = 20)]
fn full_path_to_text(bencher: Bencher, m: i64) {
    let file = source();
    let request = request(m);
    bencher.bench(|| {
        let program = pipeline::compile(&file, &request).expect("compiles");
        stp_ir::print_text(&program).len()
    });
}

#[divan::bench(args = MICROBATCHES, sample_count = 20)]
fn elaborate_only(bencher: Bencher, m: i64) {
    let file = source();
    let request = request(m);
    bencher.bench(|| pipeline::elaborate(&file, &request).expect("elaborates").num_ops());
}

#[divan::bench(args = MICROBATCHES, sample_count = 20)]
fn check_and_lower(bencher: Bencher, m: i64) {
    let file = source();
    let request = request(m);
    let schedule = pipeline::elaborate(&file, &request).expect("elaborates");
    bencher.with_inputs(|| schedule.clone()).bench_values(|schedule| {
        let checked = stpc::check::check(schedule).expect("checks");
        let lowered = stpc::lower::lower(&checked, Default::default(), Semantics::Rendezvous).expect("lowers");
        lowered.program.ranks.len()
    });
}

#[divan::bench(args = [8192], sample_count = 5)]
fn check_1m_ops(bencher: Bencher, m: i64) {
    let file = source();
    let request = request(m);
    let schedule = pipeline::elaborate(&file, &request).expect("elaborates");
    assert_eq!(schedule.num_ops(), 1 << 20);
    bencher.with_inputs(|| schedule.clone()).bench_values(|schedule| {
        let checked = stpc::check::check(schedule).expect("checks");
        let lowered = stpc::lower::lower(&checked, Default::default(), Semantics::Rendezvous).expect("lowers");
        assert!(lowered.deadlock.is_none());
        lowered.program.ranks.len()
    });
}

/// An `auto` schedule on the same placement and memory as the hand-written
/// interleaved 1F1B, ordered by the greedy scheduler (its portfolio of
/// policies); compare with `elaborate_only`, which produces the
/// hand-written order of the same size.
#[divan::bench(args = [256], sample_count = 5)]
fn plan_auto_greedy(bencher: Bencher, m: i64) {
    plan_auto(bencher, "", m);
}

/// Plans the interleaved-placement `auto` schedule with `cost` (a `cost`
/// block, or nothing for unit costs).
fn plan_auto(bencher: Bencher, cost: &str, m: i64) {
    let source = format!(
        "schedule i(p: ranks, m: microbatches, v: chunks) {{ stages v * p; place s -> s % p; memory {{ budget = 3 * p; }} {cost} auto; }}"
    );
    let file = SourceFile::new("auto.sched", source.as_str());
    let request = request(m);
    bencher.bench(|| pipeline::elaborate(&file, &request).expect("plans").num_ops());
}

/// The same with a TP collective to hide (`T_B = 2`, `T_W = 0.5`,
/// `T_AR = 0.25`): the portfolio then also runs its braiding and fusing
/// policies (48 in all).
#[divan::bench(args = [256], sample_count = 5)]
fn plan_auto_greedy_braids(bencher: Bencher, m: i64) {
    plan_auto(bencher, "cost { forward = 4; backward_input = 8; backward_weight = 2; tp_collective = 1; }", m);
}

/// The lower bound alone (critical path, per-rank preemptive bound with
/// the memory budget's floors on forwards, and each rank's window floor)
/// for the hand-written interleaved schedule, under skewed costs with a
/// TP collective.
#[divan::bench(args = [256], sample_count = 10)]
fn lower_bound(bencher: Bencher, m: i64) {
    bound_with(bencher, m, true);
}

/// The same without a memory budget: the baseline of the floors' cost.
#[divan::bench(args = [256], sample_count = 10)]
fn lower_bound_without_memory(bencher: Bencher, m: i64) {
    bound_with(bencher, m, false);
}

fn bound_with(bencher: Bencher, m: i64, memory: bool) {
    let mut s = pipeline::elaborate(&source(), &request(m)).expect("elaborates");
    if !memory {
        s.memory.budget = None;
    }
    let cost = stp_ir::simulate::CostModel {
        backward_input: 2.0,
        backward_weight: 0.5,
        tp_collective: 0.25,
        ..stp_ir::simulate::CostModel::default()
    };
    bencher.bench(|| stpc::opt::bound::lower_bound(&s, &cost));
}

/// The solver at production scale (issue 21; the book's "At scale"
/// table): `auto` on the V placement (budget 2p) at p = 8 and 16,
/// m = 4p, under `T_B = 2`, `T_W = 0.5`, `T_AR = 0.25`, ordered by the
/// greedy portfolio and its local search.
#[divan::bench(args = [8, 16], sample_count = 3)]
fn solver_greedy_at_scale(bencher: Bencher, p: i64) {
    let auto = v_placement(p);
    bencher.bench(|| stpc::opt::plan(&auto, stpc::opt::Solver::Greedy).expect("plans").1.makespan);
}

/// The same with `--solver smt --solver-effort 2` (restarts and late
/// acceptance: the exact model is too large here): compare with
/// `solver_greedy_at_scale` in the same run.
#[divan::bench(args = [8, 16], sample_count = 3)]
fn solver_smt_at_scale(bencher: Bencher, p: i64) {
    let auto = v_placement(p);
    let smt = stpc::opt::Solver::Smt { effort: 2.0, cap: None, progress: None };
    bencher.bench(|| stpc::opt::plan(&auto, smt).expect("plans").1.makespan);
}

fn v_placement(p: i64) -> stpc::elab::ComputeSchedule {
    let source =
        "schedule v(p: ranks, m: microbatches) { stages 2 * p; place s -> if s < p { s } else { 2 * p - 1 - s }; \
                  memory { budget = 2 * p; } cost { forward = 1; backward_input = 2; backward_weight = 0.5; \
                  tp_collective = 0.25; } auto; }";
    let file = SourceFile::new("v.sched", source);
    let request = Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(4 * p), ..ParamArgs::default() },
        ..Request::default()
    };
    pipeline::elaborate_unplanned(&file, &request).expect("elaborates")
}
