//! The CPU executor is the semantic reference: every standard schedule,
//! run with real arithmetic on one thread per rank, produces the weight
//! gradients of a sequential run bit for bit; broken programs fail loudly.

use stp_exec::cpu::{self, CpuOptions};
use stp_exec::model::{sequential_gradients, Model};
use stp_exec::ExecError;
use stp_ir::simulate::Semantics;
use stp_ir::{Instr, Program};
use stp_tests::build_std;

fn model_for(program: &Program) -> Model {
    let meta = &program.schedule;
    Model::new(meta.parts() as usize, meta.num_microbatches as usize, 8, 4, meta.tp as usize, 42)
}

/// Runs `program` on the CPU executor and requires the weight gradients
/// of a sequential run of the same model, bit for bit.
fn assert_reproduces_the_sequential_gradients(program: &Program, what: &str) {
    let model = model_for(program);
    let report = cpu::run(program, &model, CpuOptions::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(report.gradients, sequential_gradients(&model), "{what}: gradients differ");
}

fn run(program: &Program) -> Result<cpu::CpuReport, ExecError> {
    cpu::run(program, &model_for(program), CpuOptions::default())
}

#[test]
fn every_standard_schedule_reproduces_the_sequential_gradients_bit_for_bit() {
    let cases: [(&str, i64, i64, Option<i64>); 26] = [
        // Two pipelines: the copies' gradients summed by the reductions.
        ("dualpipe", 2, 4, None),
        ("dualpipe", 4, 10, None),
        ("chimera", 4, 4, None),
        ("chimera", 2, 6, None),
        ("gpipe", 3, 4, None),
        ("interleaved-1f1b-recompute", 2, 4, Some(2)),
        // PyTorch's sizes: ZB-V below 2p - 1, interleaved 1F1B in one round of 6.
        ("zb-v", 3, 2, None),
        ("interleaved-1f1b", 4, 6, Some(2)),
        ("interleaved-zb", 2, 4, Some(2)),
        ("interleaved-zb", 3, 5, Some(3)),
        ("looped-bfs", 2, 3, Some(2)),
        ("1f1b", 2, 3, None),
        ("1f1b", 4, 8, None),
        ("1f1b-recompute", 2, 3, None),
        ("1f1b-recompute", 4, 8, None),
        ("interleaved-1f1b", 2, 4, Some(2)),
        ("interleaved-1f1b", 4, 8, Some(2)),
        ("interleaved-1f1b", 2, 6, Some(3)),
        ("zb-h1", 4, 6, None),
        ("zb-h2", 3, 7, None),
        ("zb-v", 2, 3, None),
        ("zb-v", 4, 9, None),
        ("dualpipe-v", 2, 4, None),
        ("dualpipe-v", 4, 10, None),
        ("stp", 2, 5, None),
        ("stp", 4, 11, None),
    ];
    for (name, p, m, v) in cases {
        let program = build_std(name, p, m, v).program;
        assert_reproduces_the_sequential_gradients(&program, &format!("{name} p={p} m={m}"));
    }
}

/// With tensor parallelism every pipeline rank runs one thread per shard,
/// each with its blocks of the weights, all-reducing partial results; the
/// units run in the order the program lists them (braided pairs
/// interleaved). The gradients still equal the sequential run's.
#[test]
fn tensor_parallel_runs_reproduce_the_sequential_gradients() {
    for (name, p, m, v, tp) in [
        ("1f1b", 2, 3, None, 2),
        ("1f1b-recompute", 3, 5, None, 2),
        ("zb-v", 2, 4, None, 2),
        ("stp", 2, 5, None, 4),
        ("interleaved-1f1b", 2, 4, Some(2), 2),
        ("dualpipe", 4, 8, None, 2),
    ] {
        let program = stp_tests::build_std_tp(name, p, m, v, tp).program;
        assert_eq!(program.schedule.tp, tp);
        assert_reproduces_the_sequential_gradients(&program, &format!("{name} tp={tp}"));
    }
}

#[test]
fn the_gradients_are_not_trivially_equal() {
    // Different data gives different gradients, so the comparison above can fail.
    let program = build_std("1f1b", 2, 3, None).program;
    let a = sequential_gradients(&model_for(&program));
    let b = sequential_gradients(&Model::new(2, 3, 8, 4, 1, 43));
    assert_ne!(a, b);
    assert!(a.iter().flatten().all(|g| g.data.iter().any(|v| *v != 0.0)));
}

/// The stashes the executor holds at once equal the checker's peak. A
/// stash lives until the stage's last backward pass (W, when the backward
/// is split), so the checker is asked for the model in which W frees all
/// of it (`weight_stash = activation`); for schedules without a split
/// backward that is the default model. A recomputed forward's checkpoint
/// is no stash (full recompute frees all of it, `recomputed` defaulting
/// to `activation`) until its `R` restores one: 1 per rank, not p.
#[test]
fn live_stashes_equal_the_checkers_peak() {
    let cases: [(&str, i64, i64, Option<i64>); 8] = [
        ("1f1b", 4, 8, None),
        ("1f1b-recompute", 4, 8, None),
        ("gpipe", 3, 5, None),
        ("interleaved-1f1b", 4, 8, Some(2)),
        ("zb-h1", 4, 6, None),
        ("zb-v", 3, 7, None),
        ("dualpipe-v", 3, 8, None),
        ("stp", 4, 11, None),
    ];
    for (name, p, m, v) in cases {
        let program = build_std(name, p, m, v).program;
        let report = run(&program).unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("{name}"));
        let file = stpc::syntax::span::SourceFile::new(s.path(), s.source);
        let request = stpc::pipeline::Request {
            params: stpc::elab::ParamArgs {
                ranks: Some(p),
                microbatches: Some(m),
                chunks: v,
                memory: vec![("weight_stash".into(), 1), ("budget".into(), 1 << 20)],
                ..Default::default()
            },
            ..Default::default()
        };
        let checked = stpc::pipeline::check(&file, &request).unwrap_or_else(|_| panic!("{name} checks"));
        let peaks: Vec<usize> = checked.peaks().iter().map(|p| p.units as usize).collect();
        assert_eq!(report.peak_stashes, peaks, "{name} p={p} m={m}");
    }
}

/// Without its gradient reductions a two-pipeline program leaves each
/// copy with half a gradient: `verify` refuses it, and an executor handed
/// it anyway (one that skipped verification) reports the rank that ends
/// with part of a gradient rather than returning it.
#[test]
fn a_two_pipeline_program_without_its_reductions_is_refused() {
    let mut program = build_std("dualpipe", 2, 4, None).program;
    for rank in &mut program.ranks {
        rank.instrs.retain(|i| !matches!(i, Instr::Reduce { .. }));
    }
    let errors = stp_ir::verify(&program).expect_err("refused");
    assert!(
        errors.iter().any(|e| e.message.contains("never runs: the copies' gradients are never summed")),
        "{errors:?}"
    );
    match run(&program) {
        Err(ExecError::Invalid(_)) => {}
        other => panic!("expected the executor to refuse it, got {other:?}"),
    }
}

/// A weight gradient dropped, receives swapped, a buffer freed too early:
/// each is refused before anything runs, with the reason.
#[test]
fn broken_programs_are_refused_before_anything_runs() {
    let base = build_std("zb-h1", 2, 3, None).program;
    let position = |p: &Program, r: usize, want: &dyn Fn(&Instr) -> bool| {
        p.ranks[r].instrs.iter().position(want).unwrap_or_else(|| panic!("instruction not found"))
    };
    let mut dropped_w = base.clone();
    let w = position(&dropped_w, 0, &|i| i.passes().iter().any(|p| p.kind == stp_ir::PassKind::W));
    dropped_w.ranks[0].instrs.remove(w);
    let mut swapped = base.clone();
    let recvs: Vec<usize> = (0..swapped.ranks[1].instrs.len())
        .filter(|&i| swapped.ranks[1].instrs[i].transfers().iter().any(|t| t.dir == stp_ir::Direction::Recv))
        .collect();
    swapped.ranks[1].instrs.swap(recvs[0], recvs[1]);
    let mut early_free = base.clone();
    let free =
        position(&early_free, 0, &|i| matches!(i, Instr::Free { buffer } if buffer.kind == stp_ir::BufferKind::Stash));
    let instr = early_free.ranks[0].instrs.remove(free);
    early_free.ranks[0].instrs.insert(1, instr);
    for (what, program, needle) in [
        ("a dropped W", dropped_w, "W 0 times"),
        ("swapped receives", swapped, "same order"),
        ("an early free", early_free, "already freed"),
    ] {
        match run(&program) {
            Err(ExecError::Invalid(errors)) => {
                assert!(errors.iter().any(|e| e.to_string().contains(needle)), "{what}: {errors:#?}")
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn a_deadlock_names_the_instruction_every_rank_is_stuck_at() {
    // Undo the grouping of 1F1B's steady state: both ranks send and wait.
    let mut program = build_std("1f1b", 2, 2, None).program;
    stp_tests::ungroup_transfers(&mut program);
    stp_ir::verify(&program).expect("still a valid program");
    let options = CpuOptions { timeout: std::time::Duration::from_millis(300), ..CpuOptions::default() };
    match cpu::run(&program, &model_for(&program), options) {
        Err(ExecError::Deadlock { blocked }) => {
            let text: Vec<String> = blocked.iter().map(|(r, _, t)| format!("{r}: {t}")).collect();
            assert_eq!(text, ["r0: send act.s0.mb1 -> r1", "r1: send grad.s1.mb0 -> r0"]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
    // With buffered sends the same program runs, and still gets the gradients right.
    let options = CpuOptions { semantics: Semantics::Buffered, ..CpuOptions::default() };
    let model = model_for(&program);
    let report = cpu::run(&program, &model, options).expect("buffered run");
    assert_eq!(report.gradients, sequential_gradients(&model));
}

/// Calibration recovers the pass times of a run whose ops took exactly
/// their cost and started as early as they could: fed the simulator's own
/// timeline as if measured, it finds T_F, T_B, T_W again, and the
/// simulated makespan equals the "measured" one.
#[test]
fn calibrated_costs_recover_the_pass_times_of_an_ideal_run() {
    use stp_exec::measure::{calibrated_costs, compare};
    use stp_ir::simulate::{simulate, CostModel};
    let truth = CostModel { forward: 1.0, backward_input: 2.0, backward_weight: 0.5, ..CostModel::default() };
    for (name, p, m) in [("zb-h1", 4, 8), ("1f1b", 3, 6), ("zb-v", 2, 4)] {
        let program = build_std(name, p, m, None).program;
        let timeline = simulate(&program, &truth).expect("simulates");
        let measured: Vec<Vec<(usize, f64, f64)>> = timeline
            .ranks
            .iter()
            .map(|r| {
                r.spans
                    .iter()
                    .filter(|s| s.stream == stp_ir::simulate::Stream::Compute)
                    .map(|s| (s.instr, s.start, s.end))
                    .collect()
            })
            .collect();
        let found = calibrated_costs(&program, &measured);
        let total = found.backward_input + found.backward_weight;
        assert!((found.forward - 1.0).abs() < 1e-9, "{name}: {found:?}");
        assert!((total - 2.5).abs() < 1e-9, "{name}: {found:?}");
        let c = compare(&program, &measured, None).expect("compares");
        assert!((c.measured - timeline.makespan).abs() < 1e-9 && (c.ratio() - 1.0).abs() < 1e-9, "{name}: {c:?}");
    }
}

/// Orders stpc chooses itself — an `auto` schedule whose cost model has a
/// TP collective to hide, so the scheduler braids `F & W`, `B & W`, ...
/// and fuses `BW` — run with two TP shards and reproduce the sequential
/// gradients bit for bit.
#[test]
fn braided_auto_orders_reproduce_the_sequential_gradients() {
    let source = "schedule v(p: ranks, m: microbatches) { stages 2 * p; \
                  place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 2 * p; } \
                  cost { forward = 4; backward_input = 8; backward_weight = 2; tp_collective = 1; } auto; }";
    let file = stpc::syntax::span::SourceFile::new("v.sched", source);
    for (p, m) in [(2, 4), (3, 6)] {
        let mut request = stpc::pipeline::Request {
            params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
            ..Default::default()
        };
        request.lower.tp = 2;
        let program = stpc::pipeline::build(&file, &request).unwrap_or_else(|_| panic!("p={p} m={m} builds")).program;
        let braided = program.ranks.iter().flat_map(|r| &r.instrs).filter(|i| i.passes().len() == 2).count();
        assert!(braided > 0, "p={p} m={m}: the scheduler braids");
        assert_reproduces_the_sequential_gradients(&program, &format!("p={p} m={m}"));
    }
}

/// `recompute auto` on 1F1B's order: for every budget from one
/// activation to 1F1B's own peak, stpc recomputes just enough forwards
/// that every rank fits (none at 1F1B's peak), the program passes the
/// checker, and the CPU executor, really recomputing, still produces the
/// sequential run's gradients bit for bit.
#[test]
fn recompute_auto_fits_every_budget_and_keeps_the_gradients() {
    let source = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../stdlib/1f1b.sched"))
        .expect("stdlib/1f1b.sched")
        .replace("memory { budget = p; }", "memory { budget = BUDGET; }\n  recompute auto;");
    assert!(source.contains("recompute auto"), "the 1F1B source changed");
    let (p, m) = (4, 8);
    for budget in 1..=p {
        let file = stpc::syntax::span::SourceFile::new(
            "1f1b_recompute_auto.sched",
            source.replace("BUDGET", &budget.to_string()),
        );
        let request = stpc::pipeline::Request {
            params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
            ..Default::default()
        };
        let b = stpc::pipeline::build(&file, &request).unwrap_or_else(|d| panic!("budget {budget}: {d:?}"));
        assert!(b.checked.peaks().iter().all(|peak| peak.units <= budget), "budget {budget}");
        let recomputes = b
            .program
            .ranks
            .iter()
            .flat_map(|r| &r.instrs)
            .flat_map(|i| i.passes())
            .filter(|p| p.kind == stp_ir::PassKind::R)
            .count();
        assert_eq!(recomputes == 0, budget == p, "budget {budget}: {recomputes} recomputes");
        let note = b.checked.schedule().notes.iter().find(|n| n.contains("recompute auto")).expect("a note");
        assert!(note.contains(&format!("recomputed {recomputes} of {}", p * m)), "{note}");
        assert_reproduces_the_sequential_gradients(&b.program, &format!("budget {budget}"));
    }
}
