//! The Z3 scheduler for `auto` schedules — the only file that knows Z3.
//!
//! One integer start time per pass (times scaled to integers); a pass
//! waits for the passes it consumes (plus the transfer time between
//! ranks); passes of one stage and kind run in microbatch order; two passes
//! on one rank never overlap; a forward starts only while the rank's live
//! activations fit the budget. The makespan is minimised by asking for
//! ever shorter schedules (each check bounded in time) until Z3 proves
//! that none is shorter or the time runs out. The greedy schedule is the
//! first upper bound. Durations follow the simulator's per-pass rules
//! (a standalone F or B exposes its TP collective), so the simulated
//! makespan of the result equals the claim (a test). The model orders
//! single passes: with a TP collective to hide, a braided or fused order
//! (which the greedy scheduler forms) can be shorter than any it knows,
//! so its "none shorter" is then not reported as a proof.

// Passes are addressed as (kind, stage, microbatch) across several parallel
// tables (variables, heads, tails); index loops say that most plainly.
#![allow(clippy::needless_range_loop)]

use crate::elab::{ComputeSchedule, Origin, ScheduledOp};
use std::time::{Duration, Instant};
use stp_ir::{Compute, Microbatch, Pass, PassKind, Stage};
use z3::ast::{Bool, Int};
use z3::{Params, SatResult, Solver};

/// The most pairs of passes sharing a rank the model takes: each is a
/// disjunction, and building and preprocessing them dominates beyond
/// this (about 150,000 pairs took 90 s here).
const MAX_PAIRS: usize = 40_000;

/// Times are scaled by this to become integers.
const SCALE: f64 = 1000.0;

/// What the solver found.
#[derive(Debug, Clone)]
pub struct SmtPlan {
    /// Per rank, the passes of the shortest order found, if shorter than
    /// the upper bound it was given.
    pub ranks: Option<Vec<Vec<ScheduledOp>>>,
    /// The makespan of that order (or the upper bound), in the cost
    /// model's units.
    pub makespan: f64,
    /// Whether Z3 proved that no order is shorter than `makespan`.
    pub optimal: bool,
    /// Why the search stopped before it began, if it did.
    pub stopped: Option<String>,
    /// Z3 proved no order of single passes shorter (or, without an upper
    /// bound, none within the budget), but braids could be: the model
    /// has no braids, and a TP collective is there to hide.
    pub single_pass_proof: bool,
}

fn scaled(t: f64) -> i64 {
    (t * SCALE).round() as i64
}

/// Searches for the shortest order, starting below `upper` (the greedy
/// makespan), for at most `budget`.
pub fn solve(s: &ComputeSchedule, upper: f64, budget: Duration, progress: Option<super::Progress>) -> SmtPlan {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    let kinds = [PassKind::F, PassKind::B, PassKind::W];
    let duration = |kind: PassKind| scaled(super::standalone_duration(s, kind));
    let owner = |stage: usize| meta.placement[stage].index();
    let hop = |a: usize, b: usize| if owner(a) != owner(b) { scaled(s.cost.p2p) } else { 0 };
    let started = Instant::now();
    let dur = [duration(kinds[0]), duration(kinds[1]), duration(kinds[2])];
    let (heads, tails) = super::bound::heads_and_tails(stages, mbs, dur, &hop);
    let owned_by = |r: usize| -> Vec<usize> { (0..stages).filter(|st| owner(*st) == r).collect() };
    let ranks = meta.num_ranks as usize;
    let floor = super::bound::window_floor(&meta.placement, &heads, &tails, dur);
    // With a TP collective to hide, braids and fused BW ops can beat every
    // order of single passes: a proof in this model is then no proof.
    let exact = s.cost.tp_collective <= 0.0;
    if scaled(upper) <= floor {
        // The order in hand already meets a bound no order of single passes can beat.
        return SmtPlan { ranks: None, makespan: upper, optimal: exact, stopped: None, single_pass_proof: !exact };
    }
    let pairs: usize = (0..ranks).map(|r| 3 * mbs * owned_by(r).len()).map(|n| n * n.saturating_sub(1) / 2).sum();
    if pairs > MAX_PAIRS {
        return SmtPlan {
            ranks: None,
            makespan: upper,
            optimal: false,
            stopped: Some(format!(
                "too large for the exact model ({pairs} pairs of passes sharing a rank; it takes at most {MAX_PAIRS})"
            )),
            single_pass_proof: false,
        };
    }
    let var = |kind: usize, stage: usize, mb: usize| Int::new_const(format!("t{kind}_{stage}_{mb}"));
    let starts: Vec<Vec<Vec<Int>>> =
        (0..3).map(|k| (0..stages).map(|st| (0..mbs).map(|i| var(k, st, i)).collect()).collect()).collect();
    let solver = Solver::new();
    let int = Int::from_i64;
    let end = |k: usize, st: usize, i: usize| &starts[k][st][i] + int(duration(kinds[k]));
    let makespan = Int::new_const("makespan");
    for st in 0..stages {
        for i in 0..mbs {
            let (f, b, w) = (&starts[0][st][i], &starts[1][st][i], &starts[2][st][i]);
            solver.assert(f.ge(int(0)));
            if st > 0 {
                solver.assert(f.ge(end(0, st - 1, i) + int(hop(st - 1, st))));
            }
            solver.assert(b.ge(end(0, st, i)));
            if st + 1 < stages {
                solver.assert(b.ge(end(1, st + 1, i) + int(hop(st + 1, st))));
            }
            solver.assert(w.ge(end(1, st, i)));
            solver.assert(makespan.ge(end(2, st, i)));
            if i + 1 < mbs {
                for k in 0..3 {
                    solver.assert(starts[k][st][i + 1].ge(end(k, st, i)));
                }
            }
        }
    }
    // Passes of one rank never overlap; forwards respect the memory budget.
    let budget_units = s.memory.budget;
    for r in 0..ranks {
        if started.elapsed() >= budget {
            let why = format!(
                "building the Z3 model took all of the {:.1} s allowed (raise --solver-timeout)",
                budget.as_secs_f64()
            );
            return SmtPlan {
                ranks: None,
                makespan: upper,
                optimal: false,
                stopped: Some(why),
                single_pass_proof: false,
            };
        }
        let owned = owned_by(r);
        let ops: Vec<(usize, usize, usize)> =
            owned.iter().flat_map(|&st| (0..3).flat_map(move |k| (0..mbs).map(move |i| (k, st, i)))).collect();
        for (x, &(ka, sa, ia)) in ops.iter().enumerate() {
            for &(kb, sb, ib) in &ops[x + 1..] {
                if ka == kb && sa == sb {
                    continue; // ordered by microbatch above
                }
                let a_first = end(ka, sa, ia).le(&starts[kb][sb][ib]);
                let b_first = end(kb, sb, ib).le(&starts[ka][sa][ia]);
                solver.assert(Bool::or(&[&a_first, &b_first]));
            }
        }
        let model = &s.memory;
        // Live units just before a forward starts, plus its own.
        if let Some(budget) = budget_units {
            for &(k, st, i) in ops.iter().filter(|o| o.0 == 0) {
                let mut live = vec![int(model.activation)];
                for &(ko, so, io) in &ops {
                    let units = match ko {
                        0 => model.activation,
                        1 => -(model.activation - model.weight_stash),
                        _ => -model.weight_stash,
                    };
                    if (ko, so, io) != (k, st, i) && units != 0 {
                        let before = starts[ko][so][io].lt(&starts[k][st][i]);
                        live.push(before.ite(&int(units), &int(0)));
                    }
                }
                solver.assert(Int::add(&live).le(int(budget)));
            }
        }
        // Weight gradients deferred just before an input gradient starts.
        if let Some(cap) = model.max_deferred {
            for &(k, st, i) in ops.iter().filter(|o| o.0 == 1) {
                let mut deferred = vec![int(0)];
                for &(ko, so, io) in ops.iter().filter(|o| o.0 != 0 && **o != (k, st, i)) {
                    let before = starts[ko][so][io].lt(&starts[k][st][i]);
                    deferred.push(before.ite(&int(if ko == 1 { 1 } else { -1 }), &int(0)));
                }
                solver.assert(Int::add(&deferred).lt(int(cap)));
            }
        }
    }
    // Redundant bounds that let Z3 refute short makespans quickly: no pass
    // starts before its dependencies allow (head) or ends later than the
    // passes after it allow (tail), and a rank works at least from its
    // earliest head to its latest tail.
    for k in 0..3 {
        for st in 0..stages {
            for i in 0..mbs {
                let t = &starts[k][st][i];
                solver.assert(t.ge(int(heads[k][st][i])));
                solver.assert(makespan.ge(t + int(dur[k] + tails[k][st][i])));
            }
        }
    }
    solver.assert(makespan.ge(int(floor)));
    let mut best: Option<(i64, Vec<Vec<ScheduledOp>>)> = None;
    let mut bound = scaled(upper) - 1;
    let mut optimal = false;
    loop {
        let left = budget.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let mut params = Params::new();
        params.set_u32("timeout", left.as_millis().min(u128::from(u32::MAX)) as u32);
        solver.set_params(&params);
        solver.push();
        solver.assert(makespan.le(int(bound)));
        let verdict = solver.check();
        if verdict == SatResult::Sat {
            let Some(model) = solver.get_model() else { break };
            let value = |t: &Int| model.eval(t, true).and_then(|v| v.as_i64()).unwrap_or(0);
            let order = extract(s, &starts, &value);
            solver.pop(1);
            // The model's `makespan` may exceed its passes' ends, and
            // its starts may leave gaps: re-time the order as early as
            // possible, as the simulator will.
            let found = scaled(super::order_makespan(s, &order));
            if let Some(tell) = progress {
                tell(found as f64 / SCALE, started.elapsed());
            }
            best = Some((found, order));
            bound = found - 1;
        } else {
            optimal = verdict == SatResult::Unsat;
            solver.pop(1);
            break;
        }
    }
    let single_pass_proof = optimal && !exact;
    let optimal = optimal && exact;
    match best {
        Some((found, ranks)) => {
            SmtPlan { ranks: Some(ranks), makespan: found as f64 / SCALE, optimal, stopped: None, single_pass_proof }
        }
        None => SmtPlan { ranks: None, makespan: upper, optimal, stopped: None, single_pass_proof },
    }
}

/// Per rank, the passes sorted by their start times.
fn extract(s: &ComputeSchedule, starts: &[Vec<Vec<Int>>], value: &dyn Fn(&Int) -> i64) -> Vec<Vec<ScheduledOp>> {
    let meta = &s.meta;
    let kinds = [PassKind::F, PassKind::B, PassKind::W];
    let mut timed: Vec<Vec<(i64, usize, Pass)>> = vec![Vec::new(); meta.num_ranks as usize];
    for (k, per_stage) in starts.iter().enumerate() {
        for (st, per_mb) in per_stage.iter().enumerate() {
            for (i, t) in per_mb.iter().enumerate() {
                let pass = Pass { kind: kinds[k], stage: Stage(st as u32), mb: Microbatch(i as u32) };
                timed[meta.placement[st].index()].push((value(t), k, pass));
            }
        }
    }
    let origin = Origin { span: s.body_span, iteration: Vec::new() };
    timed
        .into_iter()
        .map(|mut ops| {
            ops.sort_by_key(|(t, k, p)| (*t, *k, p.stage, p.mb));
            ops.into_iter()
                .map(|(_, _, pass)| ScheduledOp { compute: Compute::single(pass), origin: origin.clone() })
                .collect()
        })
        .collect()
}
