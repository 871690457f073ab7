//! A greedy list scheduler for `auto` schedules: time advances pass by
//! pass; each step runs, on some rank, the pass that can start earliest
//! (its inputs have arrived and the rank is free), preferring input
//! gradients (they are on the critical path), then forwards (deepest stage
//! first), then weight gradients, which fill the time a rank would
//! otherwise wait. A forward runs only while the rank's live activations
//! stay within the memory budget. Passes of a stage run in microbatch
//! order. Other policies look further: on the rank whose next pass can
//! end soonest, they run the pass that the other ranks' remaining work
//! waits for most, even if it starts a little later (Giffler and
//! Thompson's active schedules, with a critical-path priority). Some
//! policies pair the chosen pass with another its rank could
//! start at the same moment (a braid: each pass's TP collective hides
//! behind the other's compute) or fuse an input gradient with its weight
//! gradient (`BW`: the collective hides behind the weight gradient); some
//! of those never braid a pass whose delay would reach the busiest rank
//! (a braid lengthens both its passes). It is
//! the baseline the solver must beat, and its schedule is checked like any
//! other.

use super::random::XorShift;
use crate::diag::{Code, Diagnostic};
use crate::elab::{ComputeSchedule, Origin, ScheduledOp};
use std::cmp::Ordering;
use std::collections::VecDeque;
use stp_ir::{Compute, Microbatch, Pass, PassKind, Stage};

/// How the list scheduler breaks ties and admits microbatches.
#[derive(Debug, Clone, Copy)]
struct Policy {
    /// Rank of B, F and W among passes that could start at the same time
    /// (lower first).
    priority: [u8; 3],
    /// Among forwards, the deepest stage first (else the shallowest).
    deepest_first: bool,
    /// The most microbatches whose first forward ran and whose
    /// first-stage backward has not, if bounded.
    in_flight: Option<usize>,
    /// Which passes may be braided with the chosen one.
    pairing: Pairing,
    /// Run an input gradient and its weight gradient as one `BW` when no
    /// other weight gradient of its stage waits on the rank.
    fuse: bool,
    /// How long the chosen pass may wait for a partner to become ready.
    slack: f64,
    /// Which pass runs next.
    rule: Rule,
    /// A pass whose start plus criticality reaches this runs alone: a
    /// braid lengthens both passes, and on the critical path that delay
    /// reaches the busiest rank.
    spare_above: Option<f64>,
}

/// How the list scheduler picks the next pass.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// The pass that can start earliest (ties by [`Policy::priority`]).
    EarliestStart,
    /// On the rank of the pass that can end earliest, the most critical
    /// ([`criticality`]) of those that can start within `reach` of the
    /// way from the rank's earliest start to that end (1: any that would
    /// otherwise have to wait for it, as Giffler and Thompson's active
    /// schedules do). A rank may then wait for a pass on the critical
    /// path rather than start one that would hold it up.
    Critical { reach: f64 },
}

/// How one policy of the portfolio braids: which pairs it forms, whether
/// it fuses `BW`, and how many `T_AR` the chosen pass may wait for a
/// partner.
#[derive(Debug, Clone, Copy)]
struct Braiding {
    pairing: Pairing,
    fuse: bool,
    wait: u8,
}

const fn braiding(pairing: Pairing, fuse: bool, wait: u8) -> Braiding {
    Braiding { pairing, fuse, wait }
}

/// Which braids a policy refuses ([`Policy::spare_above`]), and what it
/// counts as critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparing {
    /// None: any braid the pairing allows.
    Never,
    /// Those of a pass on the critical path ([`criticality`]).
    OnCriticalPath,
    /// The same, where a backward also holds up the forwards that wait
    /// for the memory it frees.
    MemoryBound,
}

/// The most passes for which the portfolio runs the sparing policies: at
/// p = 16, m = 128, v = 2 (12,288) the whole portfolio takes 1.5 s here;
/// at p = 32, m = 256, v = 2 (49,152) they took it from 3.8 s to 9.4 s
/// (`plan_auto_greedy_braids`).
const SPARING_PASSES: usize = 16_384;

/// The longest wait for a partner (in `T_AR`) of the sparing policies.
/// Those that wait longer found nothing the others did not at p = 4,
/// m = 12 on any standard placement and cost mix of the book's table, and
/// took the portfolio at p = 32, m = 256, v = 2 from 4 s to 11 s (for a
/// 0.4% shorter order).
const SPARING_WAIT: u8 = 1;

impl Sparing {
    const ALL: [Sparing; 3] = [Sparing::Never, Sparing::OnCriticalPath, Sparing::MemoryBound];
}

/// No braids, no fused `BW`: orders of single passes.
const SINGLE_PASSES: Braiding = braiding(Pairing::Never, false, 0);

/// Which braids the list scheduler forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairing {
    /// None: every op is one pass.
    Never,
    /// A forward with an input gradient (STP's braid).
    ForwardBackward,
    /// Any two passes of different kinds.
    Any,
}

/// Orders every pass of `s` (an `auto` schedule) on its rank with a few
/// list-scheduling policies: the fastest order of the safe admission
/// policies, where memory binds the fastest of the bolder ones, the
/// fastest of the near and of the far critical-path rules
/// ([`Rule::Critical`], [`CRITICAL_REACH`]), and the fastest of those
/// that never braid a pass on the critical path ([`Policy::spare_above`]),
/// fastest first
/// (each is worth polishing: the faster one does not always polish to the
/// faster order), each with its makespan.
///
/// Filling memory with early forwards can strand a rank: every unit held
/// by microbatches whose backward waits on a forward that no longer fits.
/// Policies that admit a new microbatch only while each in-flight one can
/// still hold all its activations on every rank always finish when any
/// order does.
pub fn finalists(s: &ComputeSchedule) -> Result<Vec<super::Timed>, Diagnostic> {
    // Braids and fusions only pay when there is a collective to hide.
    let braidings: &[Braiding] = if super::has_collectives(s) {
        &[
            SINGLE_PASSES,
            braiding(Pairing::ForwardBackward, false, 0),
            braiding(Pairing::ForwardBackward, false, 1),
            braiding(Pairing::ForwardBackward, false, 2),
            braiding(Pairing::Any, false, 0),
            braiding(Pairing::Any, true, 0),
            braiding(Pairing::Any, true, 1),
            braiding(Pairing::Any, true, 2),
            // No braids, every backward fused: 1F1B's own answer to the
            // collectives (a `BW` hides its input gradient's behind its
            // weight gradient). Where braids crowd memory it wins: on
            // 1F1B's placement at p = 32, m = 256 under T_B = 2, T_W = 0.5,
            // T_AR = 0.25 it is 1076.25 (1F1B's own makespan), the best
            // braiding policy 1109.25.
            braiding(Pairing::Never, true, 0),
        ]
    } else {
        &[SINGLE_PASSES]
    };
    portfolio(s, braidings)
}

/// The fastest of [`finalists`] restricted to orders of single passes: no braids, no
/// fused `BW` (what the Z3 model covers; the baseline braids are measured
/// against).
pub fn schedule_single_passes(s: &ComputeSchedule) -> Result<super::Timed, Diagnostic> {
    let mut finalists = portfolio(s, &[SINGLE_PASSES])?;
    Ok(finalists.swap_remove(0))
}

/// The fastest order over every tie-break and admission policy, with
/// each of `braidings` — of the safe admission caps and, separately, of
/// the bolder ones — fastest first.
fn portfolio(s: &ComputeSchedule, braidings: &[Braiding]) -> Result<Vec<super::Timed>, Diagnostic> {
    portfolio_on(s, braidings, None)
}

/// [`portfolio`] on `threads` threads if given (else as many as
/// [`run_portfolio`] picks).
fn portfolio_on(
    s: &ComputeSchedule,
    braidings: &[Braiding],
    threads: Option<usize>,
) -> Result<Vec<super::Timed>, Diagnostic> {
    let (safe, bolder) = admission_caps(s);
    // The best order of the safe caps, of the bolder ones, of the
    // critical rules (under either cap) that look near and far, and of
    // the sparing policies: which start polishes best is not known from
    // its own makespan.
    // Some policies refuse braids that would delay the critical path past
    // the lower bound (their own groups: they trade a few exposed
    // collectives for an earlier first backward on the busiest rank);
    // not on the largest instances, nor without braids.
    let may_spare = super::pass_count(s) <= SPARING_PASSES && braidings.iter().any(|b| b.pairing != Pairing::Never);
    let lower_bound = if may_spare { super::bound::lower_bound(s, &s.cost) } else { f64::INFINITY };
    let critical = criticality(s, false);
    let memory_bound = may_spare.then(|| criticality(s, true));
    // The critical rules break ties by start, so one tie-break each.
    let rules = [[0, 1, 2], [1, 0, 2], [0, 2, 1]]
        .into_iter()
        .flat_map(|priority| [true, false].map(|deepest| (Rule::EarliestStart, priority, deepest)))
        .chain(CRITICAL_REACH.map(|reach| (Rule::Critical { reach }, [0, 1, 2], true)));
    let policies = braidings.iter().flat_map(|b| Sparing::ALL.map(|sparing| (*b, sparing)));
    let caps = safe.into_iter().map(|cap| (0, cap)).chain(bolder.into_iter().map(|cap| (1, cap)));
    // Every run of the portfolio, in a fixed order, with the group its
    // order competes in.
    let mut jobs: Vec<(Policy, &Criticality, usize)> = Vec::new();
    for (cap_group, in_flight) in caps {
        for (Braiding { pairing, fuse, wait }, kind) in policies.clone() {
            let spares = may_spare && pairing != Pairing::Never && wait <= SPARING_WAIT;
            let critical = match kind {
                Sparing::Never => &critical,
                Sparing::OnCriticalPath if spares => &critical,
                Sparing::MemoryBound if spares => memory_bound.as_ref().unwrap_or(&critical),
                _ => continue,
            };
            let slack = f64::from(wait) * s.cost.longest_collective();
            let spare_above = (kind != Sparing::Never).then_some(lower_bound);
            for (rule, priority, deepest_first) in rules.clone() {
                let policy = Policy { priority, deepest_first, in_flight, pairing, fuse, slack, rule, spare_above };
                let group = match (kind, rule) {
                    (Sparing::MemoryBound, _) => 5,
                    (Sparing::OnCriticalPath, _) => 4,
                    (Sparing::Never, Rule::EarliestStart) => cap_group,
                    (Sparing::Never, Rule::Critical { reach }) if reach <= 0.5 => 2,
                    (Sparing::Never, Rule::Critical { .. }) => 3,
                };
                jobs.push((policy, critical, group));
            }
        }
    }
    let (best, first_error) = run_portfolio(s, &jobs, threads);
    let mut found: Vec<super::Timed> =
        best.into_iter().flatten().map(|(makespan, _, order)| (order, makespan)).collect();
    found.sort_by(|a, b| a.1.total_cmp(&b.1));
    match (found.is_empty(), first_error) {
        (false, _) => Ok(found),
        (true, Some((_, e))) => Err(e),
        (true, None) => unreachable!("the unbounded policies always run"),
    }
}

/// Per group of the portfolio, the fastest order its jobs found (the
/// earliest job on a tie), and the first job's error if any failed.
type Found = ([Option<(f64, usize, Vec<Vec<ScheduledOp>>)>; 6], Option<(usize, Diagnostic)>);

/// Runs `jobs` (policy, criticality, group) on `threads` threads, or up
/// to [`PORTFOLIO_THREADS`], each taking every n-th job; the merge keeps,
/// per group, the fastest order and on a tie the earliest job's, as one
/// thread running them in order would: the result does not depend on the
/// threads.
fn run_portfolio(s: &ComputeSchedule, jobs: &[(Policy, &Criticality, usize)], threads: Option<usize>) -> Found {
    let threads = threads.unwrap_or_else(|| worker_threads(s));
    let run = |first: usize| -> Found {
        let mut found: Found = Default::default();
        for (index, (policy, critical, group)) in jobs.iter().enumerate().skip(first).step_by(threads) {
            match schedule_with(s, *policy, critical) {
                Ok(order) => {
                    let makespan = super::order_makespan(s, &order);
                    if found.0[*group].as_ref().is_none_or(|(t, _, _)| makespan < *t) {
                        found.0[*group] = Some((makespan, index, order));
                    }
                }
                Err(e) => {
                    if found.1.as_ref().is_none_or(|(at, _)| index < *at) {
                        found.1 = Some((index, e));
                    }
                }
            }
        }
        found
    };
    let mut merged: Found = Default::default();
    for (best, error) in on_threads(threads, run) {
        for (kept, candidate) in merged.0.iter_mut().zip(best) {
            let Some(c) = candidate else { continue };
            if kept.as_ref().is_none_or(|k| (c.0, c.1) < (k.0, k.1)) {
                *kept = Some(c);
            }
        }
        if let Some(e) = error {
            if merged.1.as_ref().is_none_or(|(at, _)| e.0 < *at) {
                merged.1 = Some(e);
            }
        }
    }
    merged
}

/// The most threads the portfolio runs on (its runs are independent; the
/// merge makes the result the same on any number).
const PORTFOLIO_THREADS: usize = 8;

/// Below this many passes the portfolio runs on one thread: its runs take
/// microseconds, less than starting a thread.
const PARALLEL_PASSES: usize = 2_000;

/// The caps on microbatches in flight ([`Policy::in_flight`]) the
/// portfolio tries: the safe ones (none, and the most microbatches whose
/// activations all fit on the rank holding the most stages), then the
/// bolder ones.
fn admission_caps(s: &ComputeSchedule) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
    let meta = &s.meta;
    // Per rank, the microbatches whose activations on all its stages fit
    // its budget; the safe cap is the smallest.
    let fits = |r: u32| {
        let per_microbatch = super::one_microbatch_on(s, r as usize);
        s.memory.budget_of(r as usize).map(|b| b / per_microbatch.max(1))
    };
    let safe_cap = (0..meta.num_ranks).filter_map(fits).min().filter(|cap| *cap > 0).map(|cap| cap as usize);
    // Where the safe cap keeps fewer microbatches in flight than there are
    // ranks, memory binds, and a microbatch rarely holds its activations
    // on every stage at once: bolder caps, which may strand a rank (their
    // failures are dropped), often fit more in flight.
    let bolder = safe_cap
        .filter(|cap| *cap < meta.num_ranks as usize)
        .map(|cap| vec![Some(cap + 1), Some(cap + 2), Some(2 * cap)])
        .unwrap_or_default();
    (std::iter::once(None).chain(safe_cap.map(Some)).collect(), bolder)
}

/// `4`, or `[4 4 4 6]` by rank.
fn describe_budgets(budgets: &[i64]) -> String {
    if budgets.iter().all(|b| *b == budgets[0]) {
        return budgets[0].to_string();
    }
    let listed: Vec<String> = budgets.iter().map(|b| if *b == i64::MAX { "-".into() } else { b.to_string() }).collect();
    format!("[{}] by rank", listed.join(" "))
}

/// How much a restart's criticalities are jittered: each is scaled by a
/// factor drawn from `[1 − JITTER, 1 + JITTER]`. At p = 4, m = 12 under
/// (b) costs with 20,000 restarts (each kept order polished), 0.1 found
/// shorter orders than 0.3 on two of five placements (DualPipeV's 93.25
/// against 94.00, interleaved 1F1B's 92.25 against 92.50), longer on
/// none.
const JITTER: f64 = 0.1;

/// The braidings restarts draw from: those the sparing policies use
/// (a partner waited for at most [`SPARING_WAIT`]); single passes never
/// hide a collective, and longer waits found nothing the others did not.
const RESTART_BRAIDINGS: [Braiding; 5] = [
    braiding(Pairing::ForwardBackward, false, 0),
    braiding(Pairing::ForwardBackward, false, 1),
    braiding(Pairing::Any, false, 0),
    braiding(Pairing::Any, true, 0),
    braiding(Pairing::Any, true, 1),
];

/// Randomized restarts of the critical-path rules: each run draws a
/// policy (braiding, admission cap, sparing, reach) and scales every
/// pass's criticality by a random factor ([`JITTER`]), so that near-ties
/// the portfolio always breaks one way are broken the other. Runs up to
/// `runs` restarts (fewer if `stop`, asked between batches, says so: the
/// wall-clock cap) and returns the `keep` fastest distinct orders, fastest first. The draws
/// come from a fixed seed: the same runs give the same orders.
pub fn restarts(s: &ComputeSchedule, runs: usize, keep: usize, stop: &mut dyn FnMut() -> bool) -> Vec<super::Timed> {
    restarts_on(s, runs, keep, stop, None)
}

/// [`restarts`] on `threads` threads if given. The policies and jitters
/// are drawn in run order from one generator, batches of runs share the
/// threads, and their orders are kept in run order: the kept orders do
/// not depend on the threads (unless `stop` ends the runs early).
fn restarts_on(
    s: &ComputeSchedule,
    runs: usize,
    keep: usize,
    stop: &mut dyn FnMut() -> bool,
    threads: Option<usize>,
) -> Vec<super::Timed> {
    if !super::has_collectives(s) || !s.memory.is_bounded() {
        return Vec::new();
    }
    let lower_bound = super::bound::lower_bound(s, &s.cost);
    let criticalities = [criticality(s, false), criticality(s, true)];
    let (safe, bolder) = admission_caps(s);
    let caps: Vec<Option<usize>> = safe.into_iter().chain(bolder).collect();
    let mut random = XorShift::new(0x05ee_d0f5_c4ed);
    let mut draw = || {
        let braiding = RESTART_BRAIDINGS[random.below(RESTART_BRAIDINGS.len())];
        let sparing = Sparing::ALL[random.below(Sparing::ALL.len())];
        let policy = Policy {
            priority: [0, 1, 2],
            deepest_first: true,
            in_flight: caps[random.below(caps.len())],
            pairing: braiding.pairing,
            fuse: braiding.fuse,
            slack: f64::from(braiding.wait) * s.cost.longest_collective(),
            rule: Rule::Critical { reach: CRITICAL_REACH[random.below(CRITICAL_REACH.len())] },
            spare_above: (sparing != Sparing::Never).then_some(lower_bound),
        };
        (policy, criticalities[usize::from(sparing == Sparing::MemoryBound)].jittered(&mut random))
    };
    let threads = threads.unwrap_or_else(|| worker_threads(s));
    // A batch per round of the threads, a few runs each; `stop` is asked
    // about every 64 runs.
    let batch = if threads == 1 { 1 } else { 4 * threads };
    let mut kept: Vec<super::Timed> = Vec::new();
    let mut run = 0;
    while run < runs {
        let end = (run + batch).min(runs);
        if (run..end).any(|r| r % 64 == 63) && stop() {
            break;
        }
        let drawn: Vec<(Policy, Criticality)> = (run..end).map(|_| draw()).collect();
        let orders = map_on_threads(&drawn, threads, |(policy, jittered)| {
            let order = schedule_with(s, *policy, jittered).ok()?;
            let makespan = super::order_makespan(s, &order);
            Some((order, makespan))
        });
        for (order, makespan) in orders.into_iter().flatten() {
            let slower_than_kept = kept.len() == keep && kept.last().is_some_and(|(_, m)| makespan >= *m);
            if !slower_than_kept && kept.iter().all(|(o, _)| *o != order) {
                kept.push((order, makespan));
                kept.sort_by(|a, b| a.1.total_cmp(&b.1));
                kept.truncate(keep);
            }
        }
        run = end;
    }
    kept
}

/// `f` of every item, in the items' order, on `threads` threads (thread
/// `k` takes items `k`, `k + threads`, ...).
fn map_on_threads<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    let parts = on_threads(threads, |k| items.iter().skip(k).step_by(threads).map(&f).collect::<Vec<R>>());
    let mut parts: Vec<std::vec::IntoIter<R>> = parts.into_iter().map(Vec::into_iter).collect();
    (0..items.len()).filter_map(|i| parts[i % threads].next()).collect()
}

/// `work(k)` for `k` in `0..threads`, each on a thread of its own (on
/// this one when there is one), in `k` order; a panic in one is raised here.
fn on_threads<R: Send>(threads: usize, work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if threads <= 1 {
        return vec![work(0)];
    }
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|k| scope.spawn(move || work(k))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// How many threads the scheduler's independent runs share: the
/// machine's cores, up to [`PORTFOLIO_THREADS`]; one below
/// [`PARALLEL_PASSES`] passes.
fn worker_threads(s: &ComputeSchedule) -> usize {
    if super::pass_count(s) < PARALLEL_PASSES {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, PORTFOLIO_THREADS)
    }
}

/// The list scheduler under one policy.
fn schedule_with(
    s: &ComputeSchedule,
    policy: Policy,
    critical: &Criticality,
) -> Result<Vec<Vec<ScheduledOp>>, Diagnostic> {
    let w_rank = policy.priority[2];
    let meta = &s.meta;
    let (stages, mbs, ranks) = (meta.num_stages as usize, meta.num_microbatches as usize, meta.num_ranks as usize);
    if !s.memory.is_bounded() {
        return Err(Diagnostic::new(Code::ScheduleShape, "an `auto` schedule needs a memory budget")
            .with_label(s.body_span, "stpc orders the passes here, trading memory for time")
            .with_help("add `memory { budget = ...; }`: without one, running every forward first is \"fastest\""));
    }
    let budgets: Vec<i64> = (0..ranks).map(|r| s.memory.budget_of(r).unwrap_or(i64::MAX)).collect();
    let cost = &s.cost;
    let model = &s.memory;
    // Per stage, the microbatches on its pipeline's route, in order; the
    // counters below are positions in these lists.
    let routes = &Routes::of(s);
    let heads: Vec<usize> = (0..stages).filter(|st| routes.first(*st)).collect();
    let mut state = Progress {
        f_end: vec![None; stages * mbs],
        b_end: vec![None; stages * mbs],
        next_f: vec![0; stages],
        next_b: vec![0; stages],
        deferred: vec![VecDeque::new(); ranks],
        free: vec![0.0; ranks],
        live: vec![0; ranks],
        flying: 0,
    };
    let mut out: Vec<Vec<ScheduledOp>> = vec![Vec::new(); ranks];
    let origin = Origin { span: s.body_span, iteration: Vec::new() };
    let mut remaining = super::pass_count(s);
    // Per rank, the passes it could run next, (start, priority, tie-break,
    // rank, pass) in stage order (each stage's `B` before its `F`) and its
    // deferred `W` last; rebuilt only where the last op changed what they
    // read. Candidates of one rank compete only with each other: a rule
    // first picks the rank, then the pass on it.
    let mut on_rank: Vec<RankCandidates> = (0..ranks).map(|_| RankCandidates::default()).collect();
    let mut stale = vec![true; ranks];
    let rebuild = |state: &Progress, r: usize, into: &mut RankCandidates| {
        into.list.clear();
        for &stage in &routes.stages_on[r] {
            into.list.extend(state.stage_candidates(stage, &policy, routes, s, &budgets).into_iter().flatten());
        }
        into.list.extend(state.weight_candidate(r, w_rank));
        into.summarize(critical);
    };
    while remaining > 0 {
        let flying: usize = heads.iter().map(|h| state.next_f[*h] - state.next_b[*h]).sum();
        if flying != state.flying {
            state.flying = flying;
            heads.iter().for_each(|h| stale[routes.owner(*h)] = true);
        }
        for r in (0..ranks).filter(|r| std::mem::take(&mut stale[*r])) {
            rebuild(&state, r, &mut on_rank[r]);
        }
        // The unit tests check the incremental lists against fresh ones at
        // every step (here, not in every debug build: it costs as much as
        // the scheduler did before it kept them).
        if cfg!(test) {
            for (r, cached) in on_rank.iter().enumerate() {
                let mut fresh = RankCandidates::default();
                rebuild(&state, r, &mut fresh);
                assert_eq!(cached.list, fresh.list, "rank {r}'s cached candidates are stale");
            }
        }
        let best = match policy.rule {
            Rule::EarliestStart => on_rank
                .iter()
                .filter_map(|c| c.best)
                .min_by(|a, b| (a.0, a.1, a.2, a.3).partial_cmp(&(b.0, b.1, b.2, b.3)).unwrap_or(Ordering::Equal)),
            Rule::Critical { reach } => {
                // The rank whose candidate can end soonest (the lowest such rank).
                let soonest = on_rank
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.list.is_empty())
                    .min_by(|(_, a), (_, b)| a.soonest_end.total_cmp(&b.soonest_end));
                soonest.and_then(|(_, c)| most_critical_on(&c.list, c.soonest_end, reach, critical))
            }
        };
        let Some((start, _, _, r, chosen)) = best else {
            return Err(Diagnostic::new(
                Code::MemoryBudget,
                format!("no order of the passes fits the memory budget of {}", describe_budgets(&budgets)),
            )
            .with_label(s.body_span, "the scheduler ran out of passes it could start")
            .with_note(format!(
                "live activation units per rank when it stopped: {}",
                state.live.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
            ))
            .with_help(
                "raise the budget: every rank must hold at least one forward's activations until its backward",
            ));
        };
        let window = start + policy.slack;
        let mut partner = partner_of(chosen, policy.pairing, on_rank[r].list.iter().filter(|c| c.0 <= window));
        // A sparing policy runs a pass on the critical path alone (the
        // bound's own argument often is that path: equal is on it).
        let on_critical_path = |p: Pass| policy.spare_above.is_some_and(|limit| start + critical.of(p) >= limit - 1e-6);
        if on_critical_path(chosen) || partner.is_some_and(on_critical_path) {
            partner = None;
        }
        // With the queue of deferred weight gradients full, a `B` runs
        // only fused with its `W`, alone.
        let full = s.memory.max_deferred.is_some_and(|cap| state.deferred[r].len() as i64 >= cap);
        if full && (chosen.kind == PassKind::B || partner.is_some_and(|p| p.kind == PassKind::B)) {
            partner = None;
        }
        // Waiting for a partner delays the chosen pass to when both can start.
        let start = partner.and_then(|p| on_rank[r].list.iter().find(|c| c.4 == p)).map_or(start, |c| start.max(c.0));
        let mut passes: Vec<Pass> = std::iter::once(chosen).chain(partner).collect();
        passes.sort_by_key(|p| p.kind as u8);
        for pass in &mut passes {
            let stage = pass.stage.index();
            match pass.kind {
                PassKind::F => {
                    state.next_f[stage] += 1;
                    state.live[r] += model.delta(PassKind::F, pass.stage);
                }
                PassKind::B => {
                    state.next_b[stage] += 1;
                    // Fused, it runs its `W` ahead of any still queued: only
                    // where none of its stage waits (they run in microbatch order).
                    let fusable = state.deferred[r].iter().all(|&(st, _, _)| st != stage);
                    if policy.fuse && partner.is_none() && fusable {
                        pass.kind = PassKind::BW;
                        remaining -= 1;
                    }
                    state.live[r] += model.delta(pass.kind, pass.stage);
                }
                PassKind::W | PassKind::BW => {
                    state.deferred[r].pop_front();
                    state.live[r] += model.delta(PassKind::W, pass.stage);
                }
                // The scheduler orders F, B and W only.
                PassKind::R => state.live[r] += model.delta(PassKind::R, pass.stage),
            }
        }
        let (compute, exposed) = cost.time(&passes);
        let end = start + compute + exposed;
        for pass in &passes {
            let (stage, mb) = (pass.stage.index(), pass.mb.index());
            match pass.kind {
                PassKind::F => state.f_end[stage * mbs + mb] = Some(end),
                PassKind::B => {
                    state.b_end[stage * mbs + mb] = Some(end);
                    state.deferred[r].push_back((stage, mb, end));
                }
                PassKind::BW => state.b_end[stage * mbs + mb] = Some(end),
                PassKind::W | PassKind::R => {}
            }
        }
        state.free[r] = end;
        // The op changed its rank's time, memory and queue, and what the
        // stages next to its passes wait for.
        stale[r] = true;
        for pass in &passes {
            let st = pass.stage.index();
            stale[routes.owner(st.saturating_sub(1))] = true;
            stale[routes.owner((st + 1).min(stages - 1))] = true;
        }
        remaining -= passes.len();
        out[r].push(ScheduledOp { compute: Compute { passes, units: Vec::new() }, origin: origin.clone() });
    }
    Ok(out)
}

/// Where the list scheduler stands: per pass (`stage * mbs + mb`) when
/// its forward and input gradient end, per stage how many of its
/// microbatches' forwards and input gradients ran, per rank its queue of
/// deferred weight gradients (stage, microbatch, ready), when it is free
/// and its live activation units; and the microbatches in flight.
struct Progress {
    f_end: Vec<Option<f64>>,
    b_end: Vec<Option<f64>>,
    next_f: Vec<usize>,
    next_b: Vec<usize>,
    deferred: Vec<VecDeque<(usize, usize, f64)>>,
    free: Vec<f64>,
    live: Vec<i64>,
    flying: usize,
}

impl Progress {
    /// The input gradient and the forward `stage` could run next, if any.
    fn stage_candidates(
        &self,
        stage: usize,
        policy: &Policy,
        routes: &Routes,
        s: &ComputeSchedule,
        budgets: &[i64],
    ) -> [Option<Candidate>; 2] {
        let mbs = s.meta.num_microbatches as usize;
        let [b_rank, f_rank, _] = policy.priority;
        let r = routes.owner(stage);
        let pass = |kind, mb: usize| Pass { kind, stage: Stage(stage as u32), mb: Microbatch(mb as u32) };
        let mut found = [None; 2];
        let k = self.next_b[stage];
        // A `B` that will be fused with its `W` defers nothing, so it may
        // run when the queue is full.
        let fusable = policy.fuse && self.deferred[r].iter().all(|&(st, _, _)| st != stage);
        let room = s.memory.max_deferred.is_none_or(|cap| (self.deferred[r].len() as i64) < cap);
        if k < self.next_f[stage] && (room || fusable) {
            let i = routes.routed[stage][k];
            let downstream = if routes.last(stage) {
                self.f_end[stage * mbs + i]
            } else {
                self.b_end[(stage + 1) * mbs + i].map(|t| t + routes.hop(stage + 1, stage))
            };
            if let (Some(ready), Some(forward)) = (downstream, self.f_end[stage * mbs + i]) {
                found[0] = Some((self.free[r].max(ready).max(forward), b_rank, 0, r, pass(PassKind::B, i)));
            }
        }
        let k = self.next_f[stage];
        let admitted = !routes.first(stage) || policy.in_flight.is_none_or(|cap| self.flying < cap);
        if k < routes.routed[stage].len()
            && admitted
            && self.live[r] + s.memory.delta(PassKind::F, Stage(stage as u32)) <= budgets[r]
        {
            let i = routes.routed[stage][k];
            let ready = if routes.first(stage) {
                Some(0.0)
            } else {
                self.f_end[(stage - 1) * mbs + i].map(|t| t + routes.hop(stage - 1, stage))
            };
            if let Some(ready) = ready {
                let depth = if policy.deepest_first { -(stage as i64) } else { stage as i64 };
                found[1] = Some((self.free[r].max(ready), f_rank, depth, r, pass(PassKind::F, i)));
            }
        }
        found
    }

    /// Rank `r`'s oldest deferred weight gradient, if any.
    fn weight_candidate(&self, r: usize, w_rank: u8) -> Option<Candidate> {
        let &(stage, mb, ready) = self.deferred[r].front()?;
        let w = Pass { kind: PassKind::W, stage: Stage(stage as u32), mb: Microbatch(mb as u32) };
        Some((self.free[r].max(ready), w_rank, 0, r, w))
    }
}

/// What the scheduler and the criticality table read of the pipelines'
/// shape, per stage: its rank, whether it opens or closes its
/// pipeline's chain, and the microbatches on its route, ascending
/// (every microbatch with one pipeline); per rank, its stages ascending.
struct Routes {
    owner: Vec<usize>,
    stages_on: Vec<Vec<usize>>,
    first: Vec<bool>,
    last: Vec<bool>,
    routed: Vec<Vec<usize>>,
    p2p: f64,
}

impl Routes {
    fn of(s: &ComputeSchedule) -> Routes {
        let (meta, chain) = (&s.meta, s.meta.chain());
        let stages = || (0..meta.num_stages).map(Stage);
        let owner: Vec<usize> = meta.placement.iter().map(|r| r.index()).collect();
        Routes {
            stages_on: (0..meta.num_ranks as usize)
                .map(|r| (0..owner.len()).filter(|st| owner[*st] == r).collect())
                .collect(),
            owner,
            first: stages().map(|st| chain.is_first(st)).collect(),
            last: stages().map(|st| chain.is_last(st)).collect(),
            routed: stages().map(|st| meta.pairs_of(st).map(|i| i.index()).collect()).collect(),
            p2p: s.cost.p2p,
        }
    }

    fn owner(&self, stage: usize) -> usize {
        self.owner[stage]
    }

    fn first(&self, stage: usize) -> bool {
        self.first[stage]
    }

    fn last(&self, stage: usize) -> bool {
        self.last[stage]
    }

    /// The transfer time from `from`'s rank to `to`'s (none on one rank).
    fn hop(&self, from: usize, to: usize) -> f64 {
        if self.owner[from] != self.owner[to] {
            self.p2p
        } else {
            0.0
        }
    }
}

/// A pass that could run next: (start, priority, tie-break, rank, pass).
type Candidate = (f64, u8, i64, usize, Pass);

/// How far (as a share of the way from a rank's earliest start to the
/// earliest end) the critical rules look for a more critical pass: the
/// best order of the near ones (up to half-way) and of the far ones are
/// each polished.
const CRITICAL_REACH: [f64; 4] = [0.25, 0.5, 0.75, 1.0];

/// Per pass, what it holds up on other ranks: the longest way from its
/// start through the passes that depend on it to a pass on another rank
/// that must still be followed by all the work of that rank depending on
/// it (later microbatches' included). Candidates on one rank compete for
/// the same remaining work of their own rank, so only other ranks' count:
/// the first backward on its way up the pipeline, say, comes before a
/// forward the rank could start a little earlier, because the busiest
/// rank's remaining work waits for it. With `memory_bound`, what a
/// backward holds up on its rank also counts the forwards that wait for
/// memory: no more than the budget's worth run before its first backward.
fn criticality(s: &ComputeSchedule, memory_bound: bool) -> Criticality {
    let meta = &s.meta;
    let (stages, mbs, ranks) = (meta.num_stages as usize, meta.num_microbatches as usize, meta.num_ranks as usize);
    let kinds = [PassKind::F, PassKind::B, PassKind::W];
    // Compute (what holds the rank) and latency (compute and collective:
    // when its output is ready) of each kind on each stage.
    let times: Vec<[(f64, f64); 3]> = (0..stages)
        .map(|st| {
            kinds.map(|kind| {
                let (compute, exposed) = s.cost.time(&[Pass { kind, stage: Stage(st as u32), mb: Microbatch(0) }]);
                (compute, compute + exposed)
            })
        })
        .collect();
    let compute = |k: usize, st: usize| times[st][k].0;
    let latency = |k: usize, st: usize| times[st][k].1;
    let chain_len = meta.chain().len;
    let pipeline = |st: usize| st as u32 / chain_len;
    // Per stage its microbatches in order, and each one's position there.
    let routes = &Routes::of(s);
    let mut position = vec![usize::MAX; stages * mbs];
    for (st, list) in routes.routed.iter().enumerate() {
        for (k, i) in list.iter().enumerate() {
            position[st * mbs + i] = k;
        }
    }
    // The work on a stage's rank that one microbatch's pass of kind k
    // leads to: a forward, the rank's later forwards and every backward
    // and weight gradient; an input gradient, those of the rank's earlier
    // stages and their weight gradients.
    let load: Vec<[f64; 3]> = (0..stages)
        .map(|stage| {
            let mine = || {
                (0..stages)
                    .filter(move |st| routes.owner(*st) == routes.owner(stage) && pipeline(*st) == pipeline(stage))
            };
            [
                mine().map(|st| if st >= stage { compute(0, st) } else { 0.0 } + compute(1, st) + compute(2, st)).sum(),
                mine().filter(|st| *st <= stage).map(|st| compute(1, st) + compute(2, st)).sum(),
                compute(2, stage),
            ]
        })
        .collect();
    let at = |stage: usize, mb: usize| stage * mbs + mb;
    // With a memory budget, a rank runs at most so many forwards before
    // its first backward frees memory; the rest wait for backwards, so an
    // early backward holds up forwards too.
    let activation = s.memory.smallest_activation().max(1);
    let room = |r: usize| s.memory.budget_of(r).filter(|_| memory_bound).map(|b| (b / activation).max(1) as usize);
    let stages_of_rank: Vec<usize> = routes.stages_on.iter().map(Vec::len).collect();
    let forwards_of_rank: Vec<usize> =
        routes.stages_on.iter().map(|owned| owned.iter().map(|st| routes.routed[*st].len()).sum()).collect();
    let held_back_forwards = |stage: usize, k: usize| {
        room(routes.owner(stage)).map_or(0.0, |room| {
            let owned = stages_of_rank[routes.owner(stage)];
            forwards_of_rank[routes.owner(stage)].saturating_sub(room + k * owned) as f64 * compute(0, stage)
        })
    };
    // Each rank's view of every pass, one rank at a time; a pass keeps
    // its own rank's.
    let mut of = vec![vec![0.0f64; stages * mbs]; 3];
    let mut crit = vec![vec![0.0f64; stages * mbs]; 3];
    for rank in 0..ranks {
        for i in (0..mbs).rev() {
            let route: Vec<usize> = meta.stages_of(Microbatch(i as u32)).map(|st| st.index()).collect();
            let own = |k: usize, st: usize| {
                let at_stage = position[at(st, i)];
                let held_back = if k == 1 { held_back_forwards(st, at_stage) } else { 0.0 };
                if routes.owner(st) == rank {
                    0.0
                } else {
                    (routes.routed[st].len() - at_stage) as f64 * load[st][k] + held_back
                }
            };
            // The same pass of the stage's next microbatch.
            let next = |crit: &[Vec<f64>], k: usize, st: usize| match routes.routed[st].get(position[at(st, i)] + 1) {
                Some(&later) => compute(k, st) + crit[k][at(st, later)],
                None => 0.0,
            };
            for &st in &route {
                crit[2][at(st, i)] = own(2, st).max(next(&crit, 2, st));
            }
            for &st in &route {
                let mut c = own(1, st).max(next(&crit, 1, st)).max(compute(1, st) + crit[2][at(st, i)]);
                if !routes.first(st) {
                    c = c.max(latency(1, st) + routes.hop(st, st - 1) + crit[1][at(st - 1, i)]);
                }
                crit[1][at(st, i)] = c;
            }
            for &st in route.iter().rev() {
                let down = if !routes.last(st) {
                    latency(0, st) + routes.hop(st, st + 1) + crit[0][at(st + 1, i)]
                } else {
                    latency(0, st) + crit[1][at(st, i)]
                };
                crit[0][at(st, i)] = own(0, st).max(next(&crit, 0, st)).max(down);
            }
        }
        for st in (0..stages).filter(|st| routes.owner(*st) == rank) {
            for (mine, theirs) in of.iter_mut().zip(&crit) {
                mine[at(st, 0)..at(st, mbs)].copy_from_slice(&theirs[at(st, 0)..at(st, mbs)]);
            }
        }
    }
    let length = times.iter().map(|kinds| kinds.map(|(_, latency)| latency)).collect();
    Criticality { mbs, length, of }
}

/// Per pass ([`criticality`]), as seen from its own rank.
struct Criticality {
    mbs: usize,
    /// Per stage and kind (F, B, W), how long one pass alone holds its rank.
    length: Vec<[f64; 3]>,
    /// `[kind][stage * mbs + mb]`, kinds F, B, W.
    of: Vec<Vec<f64>>,
}

impl Criticality {
    fn of(&self, pass: Pass) -> f64 {
        self.of[kind_index(pass.kind)][pass.stage.index() * self.mbs + pass.mb.index()]
    }

    fn length(&self, pass: Pass) -> f64 {
        self.length[pass.stage.index()][kind_index(pass.kind)]
    }

    /// Every criticality scaled by its own random factor in
    /// `[1 − JITTER, 1 + JITTER]`.
    fn jittered(&self, random: &mut XorShift) -> Criticality {
        let of = self
            .of
            .iter()
            .map(|kind| kind.iter().map(|c| c * (1.0 + JITTER * (2.0 * random.unit() - 1.0))).collect())
            .collect();
        Criticality { mbs: self.mbs, length: self.length.clone(), of }
    }
}

/// F (or `R`), B (or `BW`), W: 0, 1, 2.
fn kind_index(kind: PassKind) -> usize {
    match kind {
        PassKind::F | PassKind::R => 0,
        PassKind::B | PassKind::BW => 1,
        PassKind::W => 2,
    }
}

/// Under [`Rule::Critical`], on the rank whose candidate can end
/// earliest (at `soonest_end`): the most critical of its candidates `all`
/// that can start within `reach` of the way from its earliest start to
/// that end (ties: the earlier start, then the later listed).
fn most_critical_on(all: &[Candidate], soonest_end: f64, reach: f64, critical: &Criticality) -> Option<Candidate> {
    let earliest = all.iter().map(|c| c.0).fold(f64::INFINITY, f64::min);
    let horizon = earliest + reach * (soonest_end - earliest);
    all.iter()
        .filter(|c| c.0 <= horizon + 1e-12)
        .max_by(|a, b| critical.of(a.4).total_cmp(&critical.of(b.4)).then(b.0.total_cmp(&a.0)))
        .copied()
}

/// The passes one rank could run next, and what the rules compare across
/// ranks: the best by earliest start (then priority, tie-break; the first
/// listed on a tie) and the soonest any can end.
#[derive(Default)]
struct RankCandidates {
    list: Vec<Candidate>,
    best: Option<Candidate>,
    soonest_end: f64,
}

impl RankCandidates {
    fn summarize(&mut self, critical: &Criticality) {
        let key = |c: &Candidate| (c.0, c.1, c.2);
        self.best = None;
        for c in &self.list {
            if self.best.is_none_or(|b| key(c).partial_cmp(&key(&b)) == Some(Ordering::Less)) {
                self.best = Some(*c);
            }
        }
        self.soonest_end = self.list.iter().map(|c| c.0 + critical.length(c.4)).fold(f64::INFINITY, f64::min);
    }
}

/// The pass to braid with `chosen` among `others` (candidates on its rank
/// that can start when it does): a forward with an input gradient first;
/// with [`Pairing::Any`], else any pass of another kind.
fn partner_of<'a>(chosen: Pass, pairing: Pairing, others: impl Iterator<Item = &'a Candidate> + Clone) -> Option<Pass> {
    let fits = |kind: PassKind| {
        others.clone().map(|c| c.4).find(|p| p.kind == kind && (p.stage, p.mb) != (chosen.stage, chosen.mb))
    };
    let complement = match chosen.kind {
        PassKind::F | PassKind::R => PassKind::B,
        PassKind::B => PassKind::F,
        PassKind::W | PassKind::BW => PassKind::F,
    };
    match pairing {
        Pairing::Never => None,
        Pairing::ForwardBackward if chosen.kind == PassKind::W => None,
        Pairing::ForwardBackward => fits(complement),
        Pairing::Any => fits(complement).or_else(|| {
            let third = match chosen.kind {
                PassKind::F | PassKind::B | PassKind::R => PassKind::W,
                PassKind::W | PassKind::BW => PassKind::B,
            };
            fits(third)
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::elab::ParamArgs;
    use crate::pipeline::{self, Request};
    use crate::syntax::span::SourceFile;
    use stp_ir::simulate::CostModel;

    /// Every policy of the portfolio, on placements with one and two
    /// stages per rank and with two pipelines, under costs with
    /// collectives and heavy ends: the candidate lists the scheduler keeps
    /// between steps equal fresh ones at every step (checked inside
    /// `schedule_with` under `cfg(test)`), every order it returns runs
    /// each pass once, and the portfolio and the restarts give the same
    /// orders on one thread as on three.
    #[test]
    fn kept_candidates_and_threads_change_no_order() {
        let v = "if s < p { s } else { 2 * p - 1 - s }";
        let placements = [
            ("p", "s".to_string(), "p"),
            ("2 * p", "s % p".to_string(), "3 * p"),
            ("2 * p", v.to_string(), "2 * p"),
            ("2 * p; pipelines 2; route i -> if i < m / 2 { 0 } else { 1 }", v.to_string(), "p + 1"),
        ];
        let skewed =
            CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..CostModel::default() };
        for (stages, place, budget) in placements {
            let source = format!(
                "schedule a(p: ranks, m: microbatches) {{ stages {stages}; place s -> {place}; memory {{ budget = {budget}; }} auto; }}"
            );
            let file = SourceFile::new("t.sched", source.as_str());
            let request = Request {
                params: ParamArgs { ranks: Some(4), microbatches: Some(10), ..ParamArgs::default() },
                ..Request::default()
            };
            let mut auto = pipeline::elaborate_unplanned(&file, &request).expect("elaborates");
            let parts = auto.meta.num_stages / auto.meta.pipelines.max(1);
            for cost in [skewed.clone(), skewed.with_heavy_ends(4, 1.3, 2.5).recut(4, parts).expect("recuts")] {
                auto.cost = cost;
                let found = super::finalists(&auto).expect("some policy finishes");
                // The same orders on one thread as on three.
                let braidings = [super::braiding(super::Pairing::Any, true, 1), super::SINGLE_PASSES];
                let alone = super::portfolio_on(&auto, &braidings, Some(1)).expect("finishes");
                let shared = super::portfolio_on(&auto, &braidings, Some(3)).expect("finishes");
                assert_eq!(alone.len(), shared.len(), "{source}");
                for ((a, ta), (b, tb)) in alone.iter().zip(&shared) {
                    assert_eq!(ta, tb, "{source}");
                    let passes = |o: &Vec<Vec<crate::elab::ScheduledOp>>| -> Vec<Vec<Vec<stp_ir::Pass>>> {
                        o.iter().map(|r| r.iter().map(|op| op.compute.passes.clone()).collect()).collect()
                    };
                    assert_eq!(passes(a), passes(b), "{source}: one thread and three give the same orders");
                }
                let alone = super::restarts_on(&auto, 40, 3, &mut || false, Some(1));
                let shared = super::restarts_on(&auto, 40, 3, &mut || false, Some(3));
                let makespans = |k: &[super::super::Timed]| k.iter().map(|(_, t)| *t).collect::<Vec<f64>>();
                assert_eq!(makespans(&alone), makespans(&shared), "{source}: restarts on one thread and three");
                let passes = super::super::pass_count(&auto);
                for (order, _) in found {
                    let ran: usize = order.iter().flatten().map(|op| op.compute.passes.len()).sum();
                    let fused = order
                        .iter()
                        .flatten()
                        .flat_map(|op| &op.compute.passes)
                        .filter(|p| p.kind == stp_ir::PassKind::BW)
                        .count();
                    assert_eq!(ran + fused, passes, "{source}: every pass once");
                }
            }
        }
    }
}
