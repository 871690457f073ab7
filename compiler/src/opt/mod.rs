//! Deciding what a schedule leaves open. `reorder { ... }` regions are
//! reordered ([`reorder`]); pairs written `&?` are braided or
//! split ([`braid`]); weight gradients deferred with
//! `defer auto` are placed into idle time ([`place_w`]). An `auto` schedule's passes are
//! ordered by a greedy list scheduler ([`greedy`]) and, when asked for and
//! built in, improved by the Z3 scheduler ([`smt`]); [`bound`] is the lower
//! bound no order can beat. Whatever these produce goes through the
//! checker, lowering and the simulator like a hand-written schedule: their
//! answers are never trusted unchecked.

pub mod bound;
pub mod braid;
pub mod effort;
pub mod greedy;
pub mod late_acceptance;
pub mod place_w;
pub mod random;
pub mod recompute;
pub mod reorder;
#[cfg(feature = "smt")]
pub mod smt;

use crate::diag::Diagnostic;
use crate::elab::{ComputeSchedule, ScheduledOp};
use std::time::Duration;
use stp_ir::{PassKind, Stage};

/// Called with the best makespan found so far and the time spent, each
/// time the solver finds a shorter order.
pub type Progress = fn(best: f64, elapsed: Duration);

/// Which scheduler orders an `auto` schedule.
#[derive(Debug, Clone, Copy, Default)]
pub enum Solver {
    /// The greedy list scheduler: fast, not optimal.
    #[default]
    Greedy,
    /// Greedy first, then randomized restarts, late acceptance and Z3
    /// search for shorter orders with `effort` of deterministic work.
    Smt {
        /// The most work the search may do in all, in reference seconds
        /// ([`effort`]): the same effort gives the same order on any
        /// machine.
        effort: f64,
        /// A wall-clock limit on top, if any: when it cuts the search
        /// short, the order may depend on the machine (the report says so).
        cap: Option<Duration>,
        /// Told of every improvement (the CLI draws a status line).
        progress: Option<Progress>,
    },
}

pub use crate::elab::PlanReport;

/// Per-rank orders and their makespan ([`order_makespan`]).
pub type Timed = (Vec<Vec<ScheduledOp>>, f64);

/// How far the local search after the greedy scheduler moves an op.
const POLISH_WINDOW: usize = 32;

/// How much the local search after the greedy scheduler may do, in ops
/// re-timed (each order it scores re-times every op): about a second
/// here. A count, not a clock, so that the result does not depend on the
/// machine; at p = 4, m = 12, v = 2 (288 passes) it allows a million
/// orders.
const POLISH_WORK: usize = 300_000_000;

/// The order stpc keeps before any solver: the greedy one, or what the
/// local search made of it.
struct Incumbent {
    order: Vec<Vec<ScheduledOp>>,
    makespan: f64,
    /// The greedy order's own makespan.
    greedy: f64,
    /// "greedy", or "local search" when the search improved it.
    kept: &'static str,
    /// The next fastest polished finalist, if another: Z3's windows
    /// sometimes reach a shorter order from it (unused without Z3).
    #[cfg_attr(not(feature = "smt"), allow(dead_code))]
    runner_up: Option<Timed>,
}

impl Incumbent {
    /// The report when this order is kept.
    fn report(&self, lower_bound: f64, optimal: bool, fallback: Option<String>) -> PlanReport {
        PlanReport {
            kept: self.kept,
            greedy_makespan: Some(self.greedy),
            makespan: self.makespan,
            lower_bound,
            bound_by_z3: false,
            optimal,
            fallback,
            effort_spent: 0.0,
            capped: false,
        }
    }
}

/// Orders every pass of `s`, an `auto` schedule, with `solver`: the greedy
/// list scheduler, a local search over its order ([`reorder::polish`]),
/// then, if asked for, Z3.
pub fn plan(s: &ComputeSchedule, solver: Solver) -> Result<(Vec<Vec<ScheduledOp>>, PlanReport), Diagnostic> {
    if let Some(too_little) = too_little_memory(s) {
        return Err(too_little);
    }
    let lower_bound = bound::lower_bound(s, &s.cost);
    // Each finalist polished; the fastest kept (reported against the
    // fastest greedy order).
    let incumbent = greedy::finalists(s).map(|finalists| {
        let greedy = finalists.iter().map(|f| f.1).fold(f64::INFINITY, f64::min);
        let polished = finalists.into_iter().map(|(order, makespan)| polished(s, order, makespan)).collect();
        let best = fastest(polished);
        let kept = if best.makespan < greedy - 1e-9 { "local search" } else { "greedy" };
        Incumbent { greedy, kept, ..best }
    });
    match (solver, incumbent) {
        (_, Ok(i)) if i.makespan <= lower_bound + 1e-9 => {
            // An order that meets the lower bound needs no search.
            let report = i.report(lower_bound, true, None);
            Ok((i.order, report))
        }
        (Solver::Greedy, Ok(i)) => {
            let report = i.report(lower_bound, false, None);
            Ok((i.order, report))
        }
        (Solver::Greedy, Err(stuck)) => Err(stuck),
        (Solver::Smt { effort, cap, progress }, incumbent) => {
            improve(s, incumbent, lower_bound, effort::Budget::new(effort, cap), progress)
        }
    }
}

/// What one microbatch holds at most on rank `r`: the activations of
/// every stage the rank holds on its route (the largest over the
/// pipelines), all live when it runs the forward of the last of them.
fn one_microbatch_on(s: &ComputeSchedule, r: usize) -> i64 {
    activations(s, &heaviest_route_on(s, r))
}

/// The stages rank `r` holds on the route (pipeline copy) whose
/// activations there weigh most; the first such route on a tie.
fn heaviest_route_on(s: &ComputeSchedule, r: usize) -> Vec<usize> {
    let chain = s.meta.chain();
    let on = |j: u32| (j * chain.len..(j + 1) * chain.len).filter(|st| s.meta.placement[*st as usize].index() == r);
    let weight = |j: u32| on(j).map(|st| s.memory.stage(Stage(st)).activation).sum::<i64>();
    let j = (0..s.meta.pipelines.max(1)).max_by_key(|j| (weight(*j), std::cmp::Reverse(*j))).unwrap_or(0);
    on(j).map(|st| st as usize).collect()
}

/// The activations of `stages` together.
fn activations(s: &ComputeSchedule, stages: &[usize]) -> i64 {
    stages.iter().map(|st| s.memory.stage(Stage(*st as u32)).activation).sum()
}

/// E0022 when the budget is below what one microbatch alone needs on a
/// rank: a rank holding `k` stages of a microbatch's route has all `k`
/// of its activations live when it runs the forward of the last of them
/// (each stage's forward is live until its backward, which follows the
/// later stages' forwards), whatever is braided with it. That much
/// suffices: one microbatch at a time through the whole pipeline never
/// holds more.
fn too_little_memory(s: &ComputeSchedule) -> Option<Diagnostic> {
    let owned: Vec<Vec<usize>> = (0..s.meta.num_ranks as usize).map(|r| heaviest_route_on(s, r)).collect();
    // The rank short of the most units (the first of those).
    let (rank, stages, budget, need) = owned
        .iter()
        .enumerate()
        .filter_map(|(r, stages)| Some((r, stages, s.memory.budget_of(r)?, activations(s, stages))))
        .filter(|(_, _, budget, need)| budget < need)
        .max_by_key(|(r, _, budget, need)| (need - budget, std::cmp::Reverse(*r)))?;
    let list: Vec<String> = stages.iter().map(|st| st.to_string()).collect();
    let mut d = Diagnostic::new(
        crate::diag::Code::MemoryBudget,
        format!("no order of the passes fits rank {rank}'s memory budget of {budget}: it needs at least {need}"),
    )
    .with_label(s.body_span, "stpc orders the passes here");
    if let Some(span) = s.memory.budget_span {
        d = d.with_label(span, format!("rank {rank}'s budget: {budget} units"));
    }
    let per_stage: Vec<String> =
        stages.iter().map(|st| s.memory.stage(stp_ir::Stage(*st as u32)).activation.to_string()).collect();
    d.notes.push(format!(
        "rank {rank} holds stages {}: a microbatch's activations of every one of them are live when it runs the \
         forward of the last (each stage's forward is live until its backward, which follows the later stages' \
         forwards): {} units",
        list.join(", "),
        per_stage.join(" + "),
    ));
    Some(d.with_help(format!("raise rank {rank}'s budget to at least {need}: one microbatch at a time then fits")))
}

/// `order` after the local search, if that shortened it.
fn polished(s: &ComputeSchedule, order: Vec<Vec<ScheduledOp>>, makespan: f64) -> Incumbent {
    let ops = order.iter().map(Vec::len).sum::<usize>().max(1);
    polished_with(s, order, makespan, POLISH_WORK / ops).0
}

/// [`polished`] scoring at most `evaluations` orders; also how many it
/// scored.
fn polished_with(
    s: &ComputeSchedule,
    order: Vec<Vec<ScheduledOp>>,
    makespan: f64,
    evaluations: usize,
) -> (Incumbent, usize) {
    let kept = |order| Incumbent { order, makespan, greedy: makespan, kept: "greedy", runner_up: None };
    if !reorder::can_polish(&order, POLISH_WINDOW) {
        return (kept(order), 0);
    }
    let mut trial = ComputeSchedule { ranks: order, ..s.clone() };
    let unchanged = trial.ranks.clone();
    let done = reorder::polish(&mut trial, POLISH_WINDOW, evaluations);
    if done.kept == 0 {
        return (kept(unchanged), done.scored);
    }
    match op_times(&trial, &trial.ranks).map(|t| last_end(&t)) {
        Some(better) if better < makespan - 1e-9 => {
            let i = Incumbent {
                order: trial.ranks,
                makespan: better,
                greedy: makespan,
                kept: "local search",
                runner_up: None,
            };
            (i, done.scored)
        }
        _ => (kept(unchanged), done.scored),
    }
}

/// How many passes the step holds: an F, a B and a W per stage and
/// microbatch.
fn pass_count(s: &ComputeSchedule) -> usize {
    3 * s.meta.chain().len as usize * s.meta.num_microbatches as usize
}

/// The fastest of `candidates` (at least one), with the next fastest
/// other order as its runner-up.
fn fastest(mut candidates: Vec<Incumbent>) -> Incumbent {
    candidates.sort_by(|a, b| a.makespan.total_cmp(&b.makespan));
    let mut ranked = candidates.into_iter();
    let best = ranked.next().expect("one candidate at least");
    let runner_up = ranked.find(|i| i.order != best.order).map(|i| (i.order, i.makespan));
    Incumbent { runner_up, ..best }
}

/// At most this share of the solver's effort goes to randomized restarts
/// of the greedy scheduler and to polishing what they find, before Z3.
#[cfg(feature = "smt")]
const RESTART_SHARE: f64 = 0.2;

/// The most restarts, in passes scheduled: 20,000 restarts at p = 4,
/// m = 12, v = 2 (288 passes; about 1.1 s here; 100,000 found nothing
/// more under (b) costs), fewer on larger instances.
#[cfg(feature = "smt")]
const RESTART_WORK: usize = 5_760_000;

/// How many of the restarts' fastest distinct orders are polished.
#[cfg(feature = "smt")]
const RESTART_KEEP: usize = 8;

/// Late acceptance ([`late_acceptance`]) may take the effort up to this
/// share, counting the restarts', on instances of more than
/// [`WHOLE_MODEL_PASSES`] passes. Smaller ones are left to the whole
/// model, which given the effort often proves the optimum there (on
/// 1F1B's placement at p = 4, m = 12, 144 passes, late acceptance would
/// have found 53.25 under (b) against 53.50).
#[cfg(feature = "smt")]
const LATE_SHARE: f64 = RESTART_SHARE + 1.0 / 3.0;

/// The most work of each late-acceptance phase, in ops re-timed (each
/// move re-times every op): 1.25 million moves at p = 4, m = 12, v = 2
/// (about 200 ops); far fewer on large instances, whose every move costs
/// more (at p = 8, m = 64, v = 2 under (b), 100,000 moves; more found
/// nothing there).
#[cfg(feature = "smt")]
const LATE_WORK: usize = 250_000_000;

/// Late acceptance from the incumbent with what is left of the effort
/// before [`LATE_SHARE`]: half of it comparing orders by makespan then
/// sum of op ends, half (from the best so far) by makespan plus a
/// fiftieth of the mean op end. At p = 4, m = 12 under (b) costs, each
/// found orders the other did not (interleaved 1F1B: 91.50 and none;
/// ZB-V: none and 94.00 — the windows then 93.75). The order it leaves
/// becomes the runner-up.
#[cfg(feature = "smt")]
fn late_accepted(s: &ComputeSchedule, mut incumbent: Incumbent, floor: f64, budget: &mut effort::Budget) -> Incumbent {
    use late_acceptance::Acceptance;
    for (phase, acceptance) in [Acceptance::Lexicographic, Acceptance::Blended { weight: 0.02 }].into_iter().enumerate()
    {
        let share = budget.left_until(LATE_SHARE) / if phase == 0 { 2.0 } else { 1.0 };
        let ops = incumbent.order.iter().map(Vec::len).sum::<usize>().max(1);
        let moves = (LATE_WORK / ops).min(effort::count(share, effort::RETIMES_PER_SECOND) / ops);
        let mut stop = || budget.past_cap();
        let (found, made) = late_acceptance::search(
            s,
            incumbent.order.clone(),
            incumbent.makespan,
            (moves, floor),
            acceptance,
            &mut stop,
        );
        budget.spend(effort::seconds(made * ops, effort::RETIMES_PER_SECOND));
        if let Some((order, makespan)) = found {
            let replaced = std::mem::replace(&mut incumbent.order, order);
            incumbent.runner_up = Some((replaced, incumbent.makespan));
            incumbent.makespan = makespan;
            incumbent.kept = "late acceptance";
        }
    }
    incumbent
}

/// Up to this many passes the whole model gets a third of the solver's
/// effort, above it a tenth. At p = 4, m = 12 on the V and interleaved
/// placements (288 passes) it never shortened the polished order within
/// 3.3 s under any cost mix of the book's table; the windows did, given
/// the time (ZB-V under (b): 95.25 with a third, 95.00 with a tenth).
#[cfg(feature = "smt")]
const WHOLE_MODEL_PASSES: usize = 200;

/// The incumbent, or a faster order found by randomized restarts of the
/// greedy scheduler ([`greedy::restarts`]) and polished with what is left
/// of the effort before [`RESTART_SHARE`], with the incumbent as its
/// runner-up. The portfolio's policies break near-ties one way; on
/// skewed costs the order that hides collectives without delaying the
/// critical path often needs them broken the other.
#[cfg(feature = "smt")]
fn restarted(s: &ComputeSchedule, incumbent: Incumbent, budget: &mut effort::Budget) -> Incumbent {
    let passes = pass_count(s).max(1);
    let work = RESTART_WORK.min(effort::count(budget.left_until(RESTART_SHARE), effort::PASSES_PER_SECOND));
    let runs = work / passes;
    let found = greedy::restarts(s, runs, RESTART_KEEP, &mut || budget.past_cap());
    budget.spend(effort::seconds(runs * passes, effort::PASSES_PER_SECOND));
    let candidates: Vec<Incumbent> = found
        .into_iter()
        .map(|(order, makespan)| {
            let ops = order.iter().map(Vec::len).sum::<usize>().max(1);
            let left = effort::count(budget.left_until(RESTART_SHARE), effort::RETIMES_PER_SECOND) / ops;
            let candidate = if left > 0 && !budget.past_cap() {
                let (candidate, scored) = polished_with(s, order, makespan, (POLISH_WORK / ops).min(left));
                budget.spend(effort::seconds(scored * ops, effort::RETIMES_PER_SECOND));
                candidate
            } else {
                Incumbent { order, makespan, greedy: makespan, kept: "greedy", runner_up: None }
            };
            Incumbent { kept: "randomized restarts", ..candidate }
        })
        .collect();
    if candidates.iter().all(|c| c.makespan >= incumbent.makespan - 1e-9) {
        return incumbent;
    }
    // The portfolio's best becomes the runner-up: Z3's windows reach
    // different orders from different lineages.
    let runner_up = Some((incumbent.order, incumbent.makespan));
    Incumbent { greedy: incumbent.greedy, runner_up, ..fastest(candidates) }
}

/// Runs the solver below the incumbent's makespan or, when greedy found
/// no order, below a makespan every feasible order beats (so that "none
/// found" is a proof that the budget admits no order).
#[cfg(feature = "smt")]
fn improve(
    s: &ComputeSchedule,
    incumbent: Result<Incumbent, Diagnostic>,
    lower_bound: f64,
    mut budget: effort::Budget,
    progress: Option<Progress>,
) -> Result<(Vec<Vec<ScheduledOp>>, PlanReport), Diagnostic> {
    let started = std::time::Instant::now();
    // Where the whole model settles the instance, late acceptance would
    // only take its effort.
    let large = pass_count(s) > WHOLE_MODEL_PASSES;
    let tell_if_shorter = |before: f64, after: f64| {
        if let (Some(tell), true) = (progress, after < before - 1e-9) {
            tell(after, started.elapsed());
        }
    };
    let incumbent = incumbent.map(|i| {
        let before = i.makespan;
        let mut i = restarted(s, i, &mut budget);
        tell_if_shorter(before, i.makespan);
        if large {
            let before = i.makespan;
            i = late_accepted(s, i, lower_bound, &mut budget);
            tell_if_shorter(before, i.makespan);
        }
        i
    });
    if s.meta.pipelines > 1 {
        // Z3's model (smt.rs) is of one chain of stages.
        let i = incumbent?;
        let why = format!("Z3 was not run: its model covers one pipeline, not {}", s.meta.pipelines);
        let report =
            PlanReport { effort_spent: budget.total() - budget.left(), ..i.report(lower_bound, false, Some(why)) };
        return Ok((i.order, report));
    }
    let greedy_makespan = incumbent.as_ref().ok().map(|i| i.greedy);
    let upper = incumbent.as_ref().map_or_else(|_| serial_makespan(s) + 1.0, |i| i.makespan);
    // The whole model first, with a third of the effort (a tenth on
    // larger instances): it settles small instances. If it neither proves
    // nor improves, the rest goes to windows of the best order.
    let share = if large { 0.1 } else { 1.0 / 3.0 };
    let whole = if incumbent.is_ok() { budget.total() * share } else { budget.left() };
    let mut found = smt::solve(s, upper, &mut budget, whole, progress, None);
    let mut rolled = false;
    // Windows build the whole model too: not where it was refused as too large.
    let best = found.ranks.as_ref().or(incumbent.as_ref().ok().map(|i| &i.order));
    if let (false, None, Some(order)) = (found.optimal, &found.stopped, best) {
        // The best order so far and, with the effort its windows leave,
        // the runner-up.
        let runner_up = incumbent.as_ref().ok().and_then(|i| i.runner_up.clone());
        let starts: Vec<Timed> = std::iter::once((order.clone(), found.makespan)).chain(runner_up).collect();
        for (n, (start, makespan)) in starts.into_iter().enumerate() {
            // The runner-up's progress is not the best's: it is told only
            // when it ends below it.
            let tell = if n == 0 { progress } else { None };
            let rolled_to = rolling_horizon(s, start, makespan, &mut budget, lower_bound, tell);
            if let Some((order, makespan)) = rolled_to.filter(|(_, m)| *m < found.makespan - 1e-9) {
                found = smt::SmtPlan { ranks: Some(order), makespan, ..found };
                rolled = true;
                if let (Some(tell), true) = (progress, n > 0) {
                    tell(makespan, started.elapsed());
                }
            }
        }
    }
    // Effort left over goes to the bound: Z3 refutes makespans between it
    // and the order's (not under --tp, where its model is not exact).
    let mut lower_bound = lower_bound;
    let mut bound_by_z3 = false;
    let searched = found.ranks.is_some() || incumbent.is_ok();
    if !found.optimal && found.stopped.is_none() && searched && s.tp_units.is_none() {
        let left = budget.left();
        if left >= MIN_REFUTATION && !budget.past_cap() {
            let raised = raise_bound(s, lower_bound, found.makespan, &mut budget, left / 2.0);
            if raised.bound > lower_bound {
                (lower_bound, bound_by_z3) = (raised.bound, true);
            }
            if let Some((order, makespan)) = raised.shorter {
                found = smt::SmtPlan { ranks: Some(order), makespan, optimal: raised.optimal, ..found };
            }
        }
    }
    let (effort_spent, capped) = (budget.total() - budget.left(), budget.capped());
    let report = |kept, makespan, optimal, fallback| PlanReport {
        kept,
        greedy_makespan,
        makespan,
        lower_bound,
        bound_by_z3,
        optimal,
        fallback,
        effort_spent,
        capped,
    };
    let optimal = found.optimal || found.makespan <= lower_bound + 1e-9;
    let kept = if rolled { "smt, rolling horizon" } else { "smt" };
    let with_effort = |r: PlanReport| PlanReport { bound_by_z3, effort_spent, capped, ..r };
    match (found.ranks, incumbent) {
        (Some(order), _) => Ok((order, report(kept, found.makespan, optimal, None))),
        (None, Ok(i)) if found.optimal => {
            let report = with_effort(i.report(lower_bound, true, None));
            Ok((i.order, report))
        }
        (None, Ok(i)) => {
            let why = found.stopped.unwrap_or_else(|| {
                format!("Z3 found no shorter order with an effort of {} (raise --solver-effort)", budget.total())
            });
            let report = with_effort(i.report(lower_bound, false, Some(why)));
            Ok((i.order, report))
        }
        (None, Err(stuck)) if found.optimal => {
            Err(stuck.with_note("Z3 proved that no order of the passes fits this budget"))
        }
        (None, Err(stuck)) if found.stopped.is_some() => {
            Err(stuck.with_note(format!("Z3 was not asked: {}", found.stopped.unwrap_or_default())))
        }
        (None, Err(stuck)) => Err(stuck.with_note(format!(
            "Z3 found no order within the budget with an effort of {} either; raise --solver-effort to let it \
             decide",
            budget.total()
        ))),
    }
}

/// About how many ops a rolling-horizon window frees, sweep after sweep:
/// the next size once a sweep finds nothing shorter. Measured on V
/// placements at p = 3-4 under (b) costs with 10 s: windows of 12 ops
/// settle in about 0.05 s each, of 36 or more often not within the time.
#[cfg(feature = "smt")]
const WINDOW_OPS: [f64; 3] = [12.0, 18.0, 24.0];

/// The least effort a window is given, and the least left worth starting
/// one with, in reference seconds.
#[cfg(feature = "smt")]
const WINDOW_EFFORT: (f64, f64) = (0.3, 0.05);

/// Z3 over windows of `order` (makespan `makespan`): each window's ops
/// are reordered, braided or split freely between the kept ops around it,
/// while every other op keeps its place — a rolling horizon over the
/// step. Windows of [`WINDOW_OPS`] ops, half overlapping, are swept (then
/// again, shifted by a quarter window) until sweeps of every size find
/// nothing or the effort is spent. The shorter order found, if any.
#[cfg(feature = "smt")]
fn rolling_horizon(
    s: &ComputeSchedule,
    mut order: Vec<Vec<ScheduledOp>>,
    mut makespan: f64,
    budget: &mut effort::Budget,
    lower_bound: f64,
    progress: Option<Progress>,
) -> Option<Timed> {
    let started = std::time::Instant::now();
    let per_window = (budget.left() / 8.0).max(WINDOW_EFFORT.0);
    let mut improved = false;
    // Each size, then each again with windows shifted by a quarter.
    let sweeps: Vec<(f64, f64)> =
        [0.0, 0.25].into_iter().flat_map(|shift| WINDOW_OPS.map(|free| (free, shift))).collect();
    let mut size = 0;
    while let Some(&(free, shift)) = sweeps.get(size) {
        let ops: usize = order.iter().map(Vec::len).sum();
        let width = makespan * (free / ops.max(1) as f64).min(0.5);
        let mut swept_better = false;
        let mut from = -shift * width;
        while from < makespan {
            if budget.left() < WINDOW_EFFORT.1 || budget.past_cap() || makespan <= lower_bound + 1e-9 {
                return improved.then_some((order, makespan));
            }
            let window = smt::Neighbourhood { order: order.clone(), window: (from, from + width) };
            let found = smt::solve(s, makespan, budget, per_window, None, Some(window));
            if let Some(better) = found.ranks.filter(|_| found.makespan < makespan - 1e-9) {
                order = better;
                makespan = found.makespan;
                improved = true;
                swept_better = true;
                if let Some(tell) = progress {
                    tell(makespan, started.elapsed());
                }
            }
            from += width / 2.0;
        }
        if !swept_better {
            size += 1;
        }
    }
    improved.then_some((order, makespan))
}

/// The least effort (reference seconds) worth giving Z3 to refute
/// makespans below the order's.
#[cfg(feature = "smt")]
const MIN_REFUTATION: f64 = 0.5;

/// What [`raise_bound`] proved and found.
#[cfg(feature = "smt")]
pub struct Raised {
    /// No order is shorter than this.
    pub bound: f64,
    /// An order shorter than the one given, if Z3 found one on the way,
    /// with its makespan.
    pub shorter: Option<Timed>,
    /// Whether Z3 proved that order optimal.
    pub optimal: bool,
}

/// Raises `bound` towards `upper` (the makespan of an order in hand) by
/// bisection: Z3 is asked, with at most `step` of effort (and what is
/// left of `budget`), for an order shorter than the midpoint; "none"
/// raises the bound to it, an order found lowers the top (and is kept),
/// and a step Z3 cannot settle is retried halfway down. Refuting a
/// makespan below the optimum is often much easier for Z3 than finding an
/// order near it (at p = 4, m = 12 on 1F1B's placement under skewed
/// costs, seconds to tens of seconds against more than a minute).
#[cfg(feature = "smt")]
pub fn raise_bound(s: &ComputeSchedule, mut bound: f64, upper: f64, budget: &mut effort::Budget, step: f64) -> Raised {
    let (mut shorter, mut optimal) = (None, false);
    // Bisection's top: `upper`, then the shortest order found.
    let mut reach = upper;
    loop {
        let mid = bound + (reach - bound) / 2.0;
        if budget.left() < MIN_REFUTATION / 2.0 || budget.past_cap() || mid - bound < 1e-3 * bound.max(1.0) {
            break;
        }
        let found = smt::solve(s, mid, budget, step, None, None);
        match found.ranks {
            None if found.optimal => bound = mid,
            Some(order) => {
                (reach, optimal) = (found.makespan, found.optimal);
                shorter = Some((order, found.makespan));
                if optimal {
                    bound = reach;
                    break;
                }
            }
            None => reach = mid,
        }
    }
    Raised { bound, shorter, optimal }
}

#[cfg(not(feature = "smt"))]
fn improve(
    _: &ComputeSchedule,
    incumbent: Result<Incumbent, Diagnostic>,
    lower_bound: f64,
    _: effort::Budget,
    _: Option<Progress>,
) -> Result<(Vec<Vec<ScheduledOp>>, PlanReport), Diagnostic> {
    let i = incumbent?;
    let why = "this stpc was built without the `smt` feature; kept the greedy order".to_string();
    let report = i.report(lower_bound, false, Some(why));
    Ok((i.order, report))
}

/// Every pass of every rank one after another, with every transfer: no
/// feasible order takes longer.
#[cfg(feature = "smt")]
fn serial_makespan(s: &ComputeSchedule) -> f64 {
    let per_microbatch: f64 = (0..s.meta.num_stages)
        .flat_map(|st| [PassKind::F, PassKind::B, PassKind::W].map(|k| standalone_duration(s, k, Stage(st))))
        .map(|t| t + 2.0 * s.cost.p2p)
        .sum();
    f64::from(s.meta.num_microbatches) * per_microbatch
}

/// How long one pass of `stage` takes when it runs alone: its compute
/// plus its exposed TP collective, as the timed simulator charges it.
pub fn standalone_duration(s: &ComputeSchedule, kind: PassKind, stage: Stage) -> f64 {
    op_span(s, &[stp_ir::Pass { kind, stage, mb: stp_ir::Microbatch(0) }]).0
}

/// Whether some stage has a TP collective to hide: only then do braids
/// and `BW` pay.
pub fn has_collectives(s: &ComputeSchedule) -> bool {
    s.cost.longest_collective() > 0.0
}

/// For an op holding `passes` that starts on an idle rank: how long it
/// keeps the rank's compute stream busy, and when its outputs are ready,
/// as the timed simulator charges it — with `--tp` unit by unit, the op's
/// last all-reduce running on after its compute.
pub fn op_span(s: &ComputeSchedule, passes: &[stp_ir::Pass]) -> (f64, f64) {
    op_timing(s, passes, 0.0, &mut 0.0)
}

/// When an op holding `passes` that starts at `start` frees its rank's
/// compute stream, and when its outputs are ready; with `--tp` its
/// all-reduces queue on the rank's tensor-parallel stream, free from
/// `tp_free` (moved on).
fn op_timing(s: &ComputeSchedule, passes: &[stp_ir::Pass], start: f64, tp_free: &mut f64) -> (f64, f64) {
    match s.tp_units {
        Some(collective) => {
            let mut c = stp_ir::Compute { passes: passes.to_vec(), units: Vec::new() };
            c.units = c.canonical_units_with(collective);
            stp_ir::simulate::time_units(&c, &s.cost, start, tp_free)
        }
        None => {
            let (compute, exposed) = s.cost.time(passes);
            (start + compute + exposed, start + compute + exposed)
        }
    }
}

/// The makespan of per-rank orders when every op starts as soon as its
/// rank is free and its inputs have arrived (0 when the orders cannot all
/// run: a cycle the checker reports).
pub fn order_makespan(s: &ComputeSchedule, ranks: &[Vec<ScheduledOp>]) -> f64 {
    op_times(s, ranks).map_or(0.0, |times| last_end(&times))
}

/// When the last of some timed ops ends.
pub fn last_end(times: &[Vec<(f64, f64)>]) -> f64 {
    times.iter().filter_map(|r| r.last().map(|(_, end)| *end)).fold(0.0, f64::max)
}

/// Per rank, each op's (start, end) when every op starts as soon as its
/// rank is free and its inputs have arrived (a transfer takes `p2p`, one
/// at a time on each link, in the order they are sent); an op lasts its passes'
/// compute plus their exposed TP collective, as the timed simulator
/// charges it (with `--tp`, unit by unit, each collective on the rank's
/// tensor-parallel stream: the op ends when its rank's compute stream is
/// free, its outputs once their collectives are done). `None` when the
/// orders cannot all run.
pub fn op_times(s: &ComputeSchedule, ranks: &[Vec<ScheduledOp>]) -> Option<Vec<Vec<(f64, f64)>>> {
    let times = partial_op_times(s, ranks);
    times.iter().zip(ranks).all(|(t, ops)| t.len() == ops.len()).then_some(times)
}

/// [`op_times`] for the ops that can run: each rank's list stops at its
/// first op that waits forever.
pub fn partial_op_times(s: &ComputeSchedule, ranks: &[Vec<ScheduledOp>]) -> Vec<Vec<(f64, f64)>> {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    let owner = |stage: usize| meta.placement[stage].index();
    let slot = |stage: usize, mb: usize| stage * mbs + mb;
    let chain = meta.chain();
    let first = |st: usize| chain.is_first(Stage(st as u32));
    let last = |st: usize| chain.is_last(Stage(st as u32));
    // When each pass's output is ready on its own rank (`f_end`, for its
    // backward) and has arrived where the neighbouring stage runs.
    let mut f_end = vec![None::<f64>; stages * mbs];
    let (mut f_sent, mut b_sent) = (vec![None::<f64>; stages * mbs], vec![None::<f64>; stages * mbs]);
    let ready = |pass: &stp_ir::Pass, f_end: &[Option<f64>], f_sent: &[Option<f64>], b_sent: &[Option<f64>]| {
        let (st, i) = (pass.stage.index(), pass.mb.index());
        match pass.kind {
            PassKind::F if first(st) => Some(0.0),
            PassKind::F => f_sent[slot(st - 1, i)],
            PassKind::B | PassKind::BW => {
                let down = if last(st) { Some(0.0) } else { b_sent[slot(st + 1, i)] };
                down.zip(f_end[slot(st, i)]).map(|(d, f)| d.max(f))
            }
            // The stash its `B` leaves, not the gradient `B` all-reduces.
            PassKind::W => b_sent[slot(st, i)].map(|_| 0.0),
            // Its forward's stash, on its own rank.
            PassKind::R => f_end[slot(st, i)],
        }
    };
    let n = ranks.len();
    // A link carries one message at a time, in the order they are sent
    // (as the simulator's point-to-point streams do).
    let mut link_free = vec![0.0f64; n * n];
    let mut send = |from: usize, to: usize, at: f64| {
        if from == to {
            return at;
        }
        let arrives = at.max(link_free[from * n + to]) + s.cost.p2p;
        link_free[from * n + to] = arrives;
        arrives
    };
    let mut times: Vec<Vec<(f64, f64)>> = ranks.iter().map(|ops| Vec::with_capacity(ops.len())).collect();
    let mut free = vec![0.0f64; n];
    let mut tp_free = vec![0.0f64; n];
    let mut progressed = true;
    while progressed {
        progressed = false;
        for (r, ops) in ranks.iter().enumerate() {
            while let Some(op) = ops.get(times[r].len()) {
                let passes = &op.compute.passes;
                let Some(inputs) = passes
                    .iter()
                    .map(|p| ready(p, &f_end, &f_sent, &b_sent))
                    .try_fold(0.0f64, |acc, t| t.map(|t| acc.max(t)))
                else {
                    break;
                };
                let start = free[r].max(inputs);
                let (end, outputs) = op_timing(s, passes, start, &mut tp_free[r]);
                for pass in passes {
                    let (st, i) = (pass.stage.index(), pass.mb.index());
                    match pass.kind {
                        PassKind::F => {
                            f_end[slot(st, i)] = Some(outputs);
                            let to = if last(st) { r } else { owner(st + 1) };
                            f_sent[slot(st, i)] = Some(send(r, to, outputs));
                        }
                        PassKind::B | PassKind::BW => {
                            let to = if first(st) { r } else { owner(st - 1) };
                            b_sent[slot(st, i)] = Some(send(r, to, outputs));
                        }
                        PassKind::W | PassKind::R => {}
                    }
                }
                times[r].push((start, end));
                free[r] = end;
                progressed = true;
            }
        }
    }
    times
}
