//! The Z3 scheduler for `auto` schedules — the only file that knows Z3.
//!
//! One integer start time per pass (times scaled to integers); a pass
//! waits for the passes it consumes (plus the transfer time between
//! ranks); passes of one stage and kind run in microbatch order; two ops
//! on one rank never overlap; an op holding a forward starts only while
//! the rank's live activations fit the budget. With a TP collective to
//! hide, a Boolean per pair of passes of a rank chooses whether they run
//! as one op — a braid, or a `B` fused with its own `W` into `BW` — which
//! then starts them together and lasts the pair's time. The makespan is
//! minimised by asking for ever shorter schedules (each check bounded in
//! time) until Z3 proves that none is shorter or the time runs out. The
//! incumbent (greedy) schedule is the first upper bound. Durations follow
//! the simulator's rules (a standalone F or B exposes its TP collective; a
//! pair hides each collective behind the other's compute), so the
//! simulated makespan of the result equals the claim (a test).

// Passes are addressed as (kind, stage, microbatch) across several parallel
// tables (variables, heads, tails); index loops say that most plainly.
#![allow(clippy::needless_range_loop)]

use super::effort::{self, Budget};
use crate::elab::{ComputeSchedule, Origin, ScheduledOp};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
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
    /// The work it did, in reference seconds.
    pub spent: f64,
    /// Whether the wall-clock cap cut it short.
    pub capped: bool,
}

fn scaled(t: f64) -> i64 {
    (t * SCALE).round() as i64
}

/// A pass of the model: kind (0 F, 1 B, 2 W), stage, microbatch.
type Key = (usize, usize, usize);

/// A pass that may share its op with `other` when `together` holds: a
/// braid of two passes, or a `B` fused with its own `W` into `BW`; the op
/// then lasts `duration` and its outputs are ready `latency` after its
/// start (later with `--tp`: its last all-reduce runs on).
struct Partner {
    other: usize,
    together: Bool,
    duration: i64,
    latency: i64,
}

/// How long past its time limit the search may run before its answer is
/// given up: Z3 heeds neither its timeout nor an interrupt while it
/// preprocesses a large model.
const GRACE: Duration = Duration::from_millis(500);

/// A neighbourhood of an order, for the rolling horizon: the ops that
/// start within `window` (in the order's own timing) are free to be
/// reordered, braided or split; every other op keeps its passes and its
/// place among the other kept ops of its rank.
#[derive(Debug, Clone)]
pub struct Neighbourhood {
    /// Per rank, the order.
    pub order: Vec<Vec<ScheduledOp>>,
    /// Start and end of the window, in the cost model's units.
    pub window: (f64, f64),
}

/// Per pass of the model: the index of its op in its rank's order,
/// whether that op is free, and for a kept op the other passes in it and
/// its duration. A kept op may hold what the model's choices cannot make
/// (a pass braided with a `BW`, two passes of one stage): it is taken as
/// it is.
struct Frozen {
    rank: Vec<usize>,
    op: Vec<usize>,
    free: Vec<bool>,
    mates: Vec<Vec<usize>>,
    duration: Vec<i64>,
    latency: Vec<i64>,
}

impl Frozen {
    fn new(s: &ComputeSchedule, n: &Neighbourhood, id: &dyn Fn(Key) -> usize, passes: usize) -> Option<Frozen> {
        let times = super::op_times(s, &n.order)?;
        let mut frozen = Frozen {
            rank: vec![0; passes],
            op: vec![usize::MAX; passes],
            free: vec![false; passes],
            mates: vec![Vec::new(); passes],
            duration: vec![0; passes],
            latency: vec![0; passes],
        };
        for (r, (ops, times)) in n.order.iter().zip(&times).enumerate() {
            for (at, (op, (start, _))) in ops.iter().zip(times).enumerate() {
                let free = *start >= n.window.0 && *start < n.window.1;
                let (duration, latency) = super::op_span(s, &op.compute.passes);
                let mut members = Vec::new();
                for pass in &op.compute.passes {
                    let (st, i) = (pass.stage.index(), pass.mb.index());
                    let kinds: &[usize] = match pass.kind {
                        PassKind::F => &[0],
                        PassKind::B => &[1],
                        PassKind::W => &[2],
                        PassKind::BW => &[1, 2],
                        // The model orders F, B and W only.
                        PassKind::R => &[],
                    };
                    for &k in kinds {
                        let x = id((k, st, i));
                        frozen.rank[x] = r;
                        frozen.op[x] = at;
                        frozen.free[x] = free;
                        frozen.duration[x] = scaled(duration);
                        frozen.latency[x] = scaled(latency);
                        members.push(x);
                    }
                }
                for &x in &members {
                    frozen.mates[x] = members.iter().copied().filter(|y| *y != x).collect();
                }
            }
        }
        frozen.op.iter().all(|op| *op != usize::MAX).then_some(frozen)
    }

    /// Whether `x` and `y` are both kept, in one op.
    fn kept_together(&self, x: usize, y: usize) -> bool {
        !self.free[x] && !self.free[y] && self.op[x] == self.op[y]
    }

    /// Whether `x` and `y` are in different ops, at least one of them
    /// kept: their order is the order's (a free op stays between the kept
    /// ops around the window).
    fn kept_apart(&self, x: usize, y: usize) -> bool {
        (!self.free[x] || !self.free[y]) && self.op[x] != self.op[y]
    }
}

/// Searches for the shortest order, starting below `upper` (the greedy
/// makespan), with at most `work` reference seconds of `budget` (see
/// [`super::effort`]: building the model is charged by its size, Z3 by its
/// resource counter) — over every order, or with `neighbourhood`, over
/// those that keep everything outside its window. The search runs on a
/// thread of its own; if it overruns the wall-clock cap, its answer is
/// given up (the thread finishes in the background) and the caller keeps
/// its order.
pub fn solve(
    s: &ComputeSchedule,
    upper: f64,
    budget: &mut Budget,
    work: f64,
    progress: Option<super::Progress>,
    neighbourhood: Option<Neighbourhood>,
) -> SmtPlan {
    let schedule = s.clone();
    let (answer, answered) = mpsc::channel();
    // Once given up, the search no longer reports progress.
    let wanted = Arc::new(AtomicBool::new(true));
    let still_wanted = Arc::clone(&wanted);
    let cap = budget.cap_left();
    let work = work.min(budget.left());
    std::thread::spawn(move || {
        let tell = |best: f64, elapsed: Duration| {
            if let Some(tell) = progress.filter(|_| still_wanted.load(Ordering::SeqCst)) {
                tell(best, elapsed);
            }
        };
        let _ = answer.send(search(&schedule, upper, (work, cap), &tell, neighbourhood.as_ref()));
    });
    let found = match cap {
        Some(cap) => answered.recv_timeout(cap + GRACE).ok(),
        None => answered.recv().ok(),
    };
    wanted.store(false, Ordering::SeqCst);
    match found {
        Some(found) => {
            budget.spend(found.spent);
            if found.capped {
                budget.mark_capped();
            }
            found
        }
        None => {
            budget.mark_capped();
            budget.spend(work);
            SmtPlan {
                ranks: None,
                makespan: upper,
                optimal: false,
                stopped: Some("Z3 did not stop within --solver-timeout (it was still preparing the model)".into()),
                spent: work,
                capped: true,
            }
        }
    }
}

/// [`solve`] on the calling thread.
fn search(
    s: &ComputeSchedule,
    upper: f64,
    (work, cap): (f64, Option<Duration>),
    progress: &dyn Fn(f64, Duration),
    neighbourhood: Option<&Neighbourhood>,
) -> SmtPlan {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    let kinds = [PassKind::F, PassKind::B, PassKind::W];
    let owner = |stage: usize| meta.placement[stage].index();
    let hop = |a: usize, b: usize| if owner(a) != owner(b) { scaled(s.cost.p2p) } else { 0 };
    let started = Instant::now();
    // Braids and fused BW only pay when a TP collective can hide; without
    // one, orders of single passes are all there is to search.
    let braids = super::has_collectives(s);
    // Compute alone bounds any op holding a pass from below, whatever it
    // is braided with: the head/tail bounds use it.
    let (compute, collective) = super::bound::stage_times(&s.cost, stages, scaled);
    let latency = super::bound::latencies(&compute, &collective);
    // (The memory floors of the bound hold here too, but as constraints
    // they slowed Z3's windows down on the V placements more than they
    // pruned.)
    let apart = neighbourhood.is_none();
    let (mut heads, tails, _) = super::bound::heads_and_tails(stages, mbs, &compute, &latency, apart, &hop, None);
    if braids {
        // A `W` fused with its `B` starts with it.
        let input_heads = heads[1].clone();
        heads[2] = input_heads;
    }
    let ranks = meta.num_ranks as usize;
    let floor = super::bound::preemptive_floor(&meta.placement, &heads, &tails, &compute, &vec![0; stages]);
    if scaled(upper) <= floor {
        // The order in hand already meets a bound no order can beat.
        return SmtPlan { ranks: None, makespan: upper, optimal: true, stopped: None, spent: 0.0, capped: false };
    }
    let id = |(k, st, i): Key| (k * stages + st) * mbs + i;
    let keys: Vec<Key> =
        (0..3).flat_map(|k| (0..stages).flat_map(move |st| (0..mbs).map(move |i| (k, st, i)))).collect();
    let on_rank: Vec<Vec<usize>> =
        (0..ranks).map(|r| keys.iter().filter(|key| owner(key.1) == r).map(|key| id(*key)).collect()).collect();
    let frozen = match neighbourhood {
        Some(n) => match Frozen::new(s, n, &id, keys.len()) {
            Some(frozen) => Some(frozen),
            None => {
                let why = "the order to search around does not run".to_string();
                return SmtPlan {
                    ranks: None,
                    makespan: upper,
                    optimal: false,
                    stopped: Some(why),
                    spent: 0.0,
                    capped: false,
                };
            }
        },
        None => None,
    };
    // Kept ops keep their order: only pairs with a free pass are choices.
    let kept_apart = |x: usize, y: usize| frozen.as_ref().is_some_and(|f| f.kept_apart(x, y));
    let kept_together = |x: usize, y: usize| frozen.as_ref().is_some_and(|f| f.kept_together(x, y));
    let free_pair = |x: usize, y: usize| frozen.as_ref().is_none_or(|f| f.free[x] && f.free[y]);
    // Whether `y` runs before `x` (in an earlier op) when at least one is
    // kept (a free op stays inside its window); `None` when both are
    // free, so the model decides.
    let kept_before =
        |x: usize, y: usize| frozen.as_ref().filter(|f| !f.free[x] || !f.free[y]).map(|f| f.op[y] < f.op[x]);
    // Every order searched is shorter than `upper`, so a pass starts
    // within [head, upper - its compute - its tail]. Two passes whose
    // windows do not meet cannot share an op, and one whose whole op ends
    // before the other can start needs no disjunction.
    let window = |x: usize| {
        let (k, st, i) = keys[x];
        (heads[k][st][i], scaled(upper) - 1 - compute[k][st] - tails[k][st][i])
    };
    let longest_op = 2
        * (0..stages)
            .flat_map(|st| [PassKind::F, PassKind::B, PassKind::W].map(|kind| (kind, st)))
            .map(|(kind, st)| scaled(super::standalone_duration(s, kind, Stage(st as u32))))
            .max()
            .unwrap_or(0);
    let ordered = |x: usize, y: usize| {
        let ((ex, lx), (ey, ly)) = (window(x), window(y));
        ly + longest_op <= ex || lx + longest_op <= ey
    };
    let may_share = |x: usize, y: usize| {
        let ((ex, lx), (ey, ly)) = (window(x), window(y));
        ex.max(ey) <= lx.min(ly)
    };
    // Pairs of passes of one stage and kind run in microbatch order, and
    // two of one microbatch and stage depend on each other: no
    // disjunction for those either.
    let tied = |x: usize, y: usize| {
        let (a, b) = (keys[x], keys[y]);
        a.1 == b.1 && (a.0 == b.0 || a.2 == b.2)
    };
    let pairs: usize = on_rank
        .iter()
        .map(|ids| {
            ids.iter()
                .enumerate()
                .flat_map(|(n, &x)| ids[n + 1..].iter().map(move |&y| (x, y)))
                .filter(|&(x, y)| {
                    let by_microbatch = tied(x, y) && (keys[x].2 == keys[y].2 || free_pair(x, y));
                    !by_microbatch && !ordered(x, y) && !kept_apart(x, y) && !kept_together(x, y)
                })
                .count()
        })
        .sum();
    if pairs > MAX_PAIRS {
        return SmtPlan {
            ranks: None,
            makespan: upper,
            optimal: false,
            stopped: Some(format!(
                "too large for the exact model ({pairs} pairs of passes sharing a rank; it takes at most {MAX_PAIRS})"
            )),
            spent: 0.0,
            capped: false,
        };
    }
    // Building the model is charged by its size, before it is built.
    let building = effort::seconds(pairs + keys.len(), effort::PAIRS_PER_SECOND);
    if building >= work {
        let why = format!(
            "the exact model ({pairs} pairs of passes sharing a rank) needs about {building:.1} of the {work:.1} \
             reference seconds of effort left to build (raise --solver-effort)"
        );
        return SmtPlan { ranks: None, makespan: upper, optimal: false, stopped: Some(why), spent: 0.0, capped: false };
    }
    let starts: Vec<Int> = keys.iter().map(|(k, st, i)| Int::new_const(format!("t{k}_{st}_{i}"))).collect();
    let int = Int::from_i64;
    // Which passes may share an op: not two of one stage and kind (they
    // run in microbatch order), not two of one microbatch and stage
    // (they depend on each other) except a `B` with its own `W` (`BW`).
    let mut partners: Vec<Vec<Partner>> = (0..keys.len()).map(|_| Vec::new()).collect();
    let mut fused: Vec<Option<Bool>> = vec![None; keys.len()];
    // The same Booleans by pair (lower index first), for the disjunctions.
    let mut together_of: HashMap<(usize, usize), Bool> = HashMap::new();
    let past_cap = || cap.is_some_and(|cap| started.elapsed() >= cap);
    let out_of_time = || {
        let why = "building the Z3 model took all of --solver-timeout".to_string();
        SmtPlan { ranks: None, makespan: upper, optimal: false, stopped: Some(why), spent: building, capped: true }
    };
    if braids {
        for ids in &on_rank {
            if past_cap() {
                return out_of_time();
            }
            for (n, &x) in ids.iter().enumerate() {
                for &y in &ids[n + 1..] {
                    let (a, b) = (keys[x], keys[y]);
                    let bw = a.1 == b.1 && a.2 == b.2 && (a.0, b.0) == (1, 2);
                    if (!bw && tied(x, y)) || !may_share(x, y) {
                        continue;
                    }
                    // A kept op keeps its passes; free passes pair among themselves.
                    if frozen.as_ref().is_some_and(|f| !(f.free[x] && f.free[y])) {
                        continue;
                    }
                    let passes = if bw {
                        vec![Pass { kind: PassKind::BW, ..pass_of(kinds, a) }]
                    } else {
                        vec![pass_of(kinds, a), pass_of(kinds, b)]
                    };
                    let (duration, latency) = super::op_span(s, &passes);
                    let together = Bool::new_const(format!("with_{x}_{y}"));
                    if bw {
                        fused[x] = Some(together.clone());
                    }
                    let (duration, latency) = (scaled(duration), scaled(latency));
                    together_of.insert((x, y), together.clone());
                    partners[x].push(Partner { other: y, together: together.clone(), duration, latency });
                    partners[y].push(Partner { other: x, together, duration, latency });
                }
            }
        }
    }
    let solver = Solver::new();
    // A pass's op lasts the pair's time when it shares one, else its own;
    // so do its outputs take.
    let span_of = |x: usize, pick: &dyn Fn((i64, i64)) -> i64| -> Int {
        if let Some(f) = frozen.as_ref().filter(|f| !f.free[x]) {
            return int(pick((f.duration[x], f.latency[x])));
        }
        let pass = pass_of(kinds, keys[x]);
        let (duration, latency) = super::op_span(s, &[pass]);
        let alone = int(pick((scaled(duration), scaled(latency))));
        partners[x].iter().fold(alone, |rest, p| p.together.ite(&int(pick((p.duration, p.latency))), &rest))
    };
    let ends: Vec<Int> = (0..keys.len()).map(|x| &starts[x] + span_of(x, &|(d, _)| d)).collect();
    let outs: Vec<Int> = match s.tp_units {
        Some(_) => (0..keys.len()).map(|x| &starts[x] + span_of(x, &|(_, l)| l)).collect(),
        // Per pass, outputs are ready when the op ends.
        None => ends.clone(),
    };
    for (x, ps) in partners.iter().enumerate() {
        if ps.is_empty() {
            continue;
        }
        let flags: Vec<(&Bool, i32)> = ps.iter().map(|p| (&p.together, 1)).collect();
        solver.assert(Bool::pb_le(&flags, 1));
        for p in ps.iter().filter(|p| p.other > x) {
            solver.assert(p.together.implies(starts[x].eq(&starts[p.other])));
        }
    }
    if let Some(f) = &frozen {
        // The passes of a kept op start together.
        for x in (0..keys.len()).filter(|x| !f.free[*x]) {
            for &y in f.mates[x].iter().filter(|y| **y > x) {
                solver.assert(starts[x].eq(&starts[y]));
            }
        }
        // Consecutive kept ops of a rank stay in order (the rest follows),
        // and the free ops stay between the kept ops around the window.
        for ids in &on_rank {
            let mut kept: Vec<usize> = ids.iter().copied().filter(|x| !f.free[*x]).collect();
            kept.sort_by_key(|x| f.op[*x]);
            for pair in kept.windows(2) {
                if f.op[pair[0]] != f.op[pair[1]] {
                    solver.assert(ends[pair[0]].le(&starts[pair[1]]));
                }
            }
            let free: Vec<usize> = ids.iter().copied().filter(|x| f.free[*x]).collect();
            let (Some(first), Some(last)) = (free.iter().map(|x| f.op[*x]).min(), free.iter().map(|x| f.op[*x]).max())
            else {
                continue;
            };
            let before = kept.iter().rev().find(|x| f.op[**x] < first);
            let after = kept.iter().find(|x| f.op[**x] > last);
            for &x in &free {
                if let Some(&b) = before {
                    solver.assert(starts[x].ge(&ends[b]));
                }
                if let Some(&a) = after {
                    solver.assert(ends[x].le(&starts[a]));
                }
            }
        }
    }
    let makespan = Int::new_const("makespan");
    for st in 0..stages {
        for i in 0..mbs {
            let [f, b, w] = [0, 1, 2].map(|k| id((k, st, i)));
            solver.assert(starts[f].ge(int(0)));
            // Consumers wait for outputs; a `W` only for its `B`'s compute.
            if st > 0 {
                solver.assert(starts[f].ge(&outs[id((0, st - 1, i))] + int(hop(st - 1, st))));
            }
            solver.assert(starts[b].ge(&outs[f]));
            if st + 1 < stages {
                solver.assert(starts[b].ge(&outs[id((1, st + 1, i))] + int(hop(st + 1, st))));
            }
            let after_b = starts[w].ge(&ends[b]);
            match &fused[b] {
                Some(bw) => solver.assert(Bool::or(&[bw, &after_b])),
                None if kept_together(b, w) => {} // a kept `BW`
                None => solver.assert(after_b),
            }
            solver.assert(makespan.ge(&ends[w]));
            if i + 1 < mbs {
                for k in 0..3 {
                    // Microbatch order breaks symmetry in the whole model;
                    // a kept op stays where the order has it.
                    let (now, next) = (id((k, st, i)), id((k, st, i + 1)));
                    if free_pair(now, next) {
                        solver.assert(starts[next].ge(&ends[now]));
                    }
                }
            }
        }
    }
    // Ops of one rank never overlap; forwards respect the memory budget.
    let model = &s.memory;
    let delta = |(k, st, _): Key| {
        let kind = [PassKind::F, PassKind::B, PassKind::W][k];
        model.delta(kind, stp_ir::Stage(st as u32))
    };
    // Over the other passes of `x`'s rank, the sum of `value` (0: not
    // counted) for those that run before `x` or share its op: a constant
    // where the order is kept, a term where the model decides.
    let counted = |x: usize, ids: &[usize], value: &dyn Fn(usize) -> i64| -> Vec<Int> {
        let mut terms = Vec::new();
        let mut known = 0;
        for &y in ids.iter().filter(|y| **y != x && value(**y) != 0) {
            match kept_before(x, y) {
                Some(true) => known += value(y),
                Some(false) => {}
                None => terms.push(starts[y].lt(&starts[x]).ite(&int(value(y)), &int(0))),
            }
        }
        for p in partners[x].iter().filter(|p| value(p.other) != 0) {
            terms.push(p.together.ite(&int(value(p.other)), &int(0)));
        }
        if let Some(f) = frozen.as_ref().filter(|f| !f.free[x]) {
            known += f.mates[x].iter().map(|y| value(*y)).sum::<i64>();
        }
        terms.push(int(known));
        terms
    };
    for (r, ids) in on_rank.iter().enumerate() {
        if past_cap() {
            return out_of_time();
        }
        for (n, &x) in ids.iter().enumerate() {
            for &y in &ids[n + 1..] {
                // Ordered by dependency, by microbatch (both free), by their
                // windows, or as kept.
                let by_microbatch = tied(x, y) && (keys[x].2 == keys[y].2 || free_pair(x, y));
                if by_microbatch || ordered(x, y) || kept_apart(x, y) {
                    continue;
                }
                if frozen.as_ref().is_some_and(|f| f.kept_together(x, y)) {
                    continue; // one op
                }
                let x_first = ends[x].le(&starts[y]);
                let y_first = ends[y].le(&starts[x]);
                match together_of.get(&(x, y)) {
                    Some(together) => solver.assert(Bool::or(&[together, &x_first, &y_first])),
                    None => solver.assert(Bool::or(&[&x_first, &y_first])),
                }
            }
        }
        // Live units just before an op holding a forward, plus what the
        // op adds (the forward's, and its partner's change).
        if let Some(cap) = model.budget_of(r) {
            for &x in ids.iter().filter(|x| keys[**x].0 == 0) {
                let mut live = vec![int(delta(keys[x]))];
                live.extend(counted(x, ids, &|y| delta(keys[y])));
                solver.assert(Int::add(&live).le(int(cap)));
            }
        }
        // Weight gradients deferred after an op holding an input gradient,
        // counted between ops (none is deferred by a `B` fused with its
        // `W`; a `B` braided with a deferred `W` leaves the count as is).
        if let Some(cap) = model.max_deferred {
            let pending = |y: usize| match keys[y].0 {
                0 => 0,
                1 => 1,
                _ => -1,
            };
            for &x in ids.iter().filter(|x| keys[**x].0 == 1) {
                let own_w = id((2, keys[x].1, keys[x].2));
                if frozen.as_ref().is_some_and(|f| !f.free[x] && f.mates[x].contains(&own_w)) {
                    continue; // a kept `BW` defers nothing
                }
                let mut deferred = vec![int(1)];
                deferred.extend(counted(x, ids, &pending));
                let within = Int::add(&deferred).le(int(cap));
                match &fused[x] {
                    Some(bw) => solver.assert(Bool::or(&[bw, &within])),
                    None => solver.assert(within),
                }
            }
        }
    }
    // Redundant bounds that let Z3 refute short makespans quickly: no pass
    // starts before its dependencies allow (head) or ends later than the
    // passes after it allow (tail), and a rank works at least from its
    // earliest head to its latest tail.
    for &(k, st, i) in &keys {
        let t = &starts[id((k, st, i))];
        solver.assert(t.ge(int(heads[k][st][i])));
        solver.assert(makespan.ge(t + int(compute[k][st] + tails[k][st][i])));
    }
    solver.assert(makespan.ge(int(floor)));
    let mut best: Option<(i64, Vec<Vec<ScheduledOp>>)> = None;
    let mut bound = scaled(upper) - 1;
    let mut optimal = false;
    let mut capped = false;
    let mut units_left = effort::count(work - building, effort::Z3_UNITS_PER_SECOND) as u64;
    let mut used = 0u64;
    loop {
        let cap_left = cap.map(|cap| cap.saturating_sub(started.elapsed()));
        if units_left == 0 || cap_left.is_some_and(|c| c.is_zero()) {
            capped |= units_left > 0;
            break;
        }
        let mut params = Params::new();
        // Z3 stops at its resource limit: a count of its own steps, the
        // same on every machine.
        params.set_u32("rlimit", units_left.min(u64::from(u32::MAX)) as u32);
        if let Some(left) = cap_left {
            params.set_u32("timeout", left.as_millis().min(u128::from(u32::MAX)) as u32);
        }
        solver.set_params(&params);
        // The bound as an assumption, not a pushed scope: pushing made Z3
        // preprocess the whole model first, beyond any time limit.
        let verdict = check_until(&solver, &[makespan.le(int(bound))], cap_left);
        let counted = resource_count(&solver);
        units_left = units_left.saturating_sub(counted.saturating_sub(used));
        used = used.max(counted);
        if verdict == SatResult::Sat {
            let Some(model) = solver.get_model() else { break };
            let value = |t: &Int| model.eval(t, true).and_then(|v| v.as_i64()).unwrap_or(0);
            let chosen = |b: &Bool| model.eval(b, true).and_then(|v| v.as_bool()).unwrap_or(false);
            let kept = frozen.as_ref().zip(neighbourhood);
            let order = extract(s, &keys, &starts, &partners, &value, &chosen, kept);
            // The model's `makespan` may exceed its passes' ends, and
            // its starts may leave gaps: re-time the order as early as
            // possible, as the simulator will.
            let found = scaled(super::order_makespan(s, &order));
            // With `--tp` the order runs unit by unit, which this model
            // only approximates: keep it only if it is shorter so timed,
            // and go on below what the model claimed.
            let claimed = value(&makespan);
            if found < best.as_ref().map_or(scaled(upper), |(t, _)| *t) {
                progress(found as f64 / SCALE, started.elapsed());
                best = Some((found, order));
            }
            bound = found.min(claimed) - 1;
        } else {
            // A proof about this model's timing, which `--tp` does not
            // follow. The model lets messages on one link overlap, which
            // the order's own timing does not: "none below `bound`" proves
            // the order found optimal only if it is just above.
            let found = best.as_ref().map_or(scaled(upper), |(t, _)| *t);
            optimal = verdict == SatResult::Unsat && s.tp_units.is_none() && found <= bound + 1;
            // Unknown with resource units left: the cap stopped it.
            capped |= verdict == SatResult::Unknown && units_left > 0 && cap.is_some();
            break;
        }
    }
    let spent = building + used as f64 / effort::Z3_UNITS_PER_SECOND;
    match best {
        // The order's own makespan, not the model's rounding of it: the
        // claim must be what the simulator times.
        Some((_, ranks)) => {
            let makespan = super::order_makespan(s, &ranks);
            SmtPlan { ranks: Some(ranks), makespan, optimal, stopped: None, spent, capped }
        }
        None => SmtPlan { ranks: None, makespan: upper, optimal, stopped: None, spent, capped },
    }
}

/// Z3's resource counter ("rlimit count"): the work it has done in this
/// thread's context.
fn resource_count(solver: &Solver) -> u64 {
    let statistics = solver.get_statistics();
    match statistics.value("rlimit count") {
        Some(z3::StatisticsValue::UInt(n)) => u64::from(n),
        Some(z3::StatisticsValue::Double(x)) => x as u64,
        None => 0,
    }
}

/// `solver.check_assumptions()`, interrupted if it runs past the
/// wall-clock cap `limit`: Z3's own `timeout` parameter is not heeded
/// while it preprocesses a large model (it overran a 3 s limit by 6 s at
/// p = 8, m = 16 here). Without a cap only its resource limit stops it.
fn check_until(solver: &Solver, assumptions: &[Bool], limit: Option<Duration>) -> SatResult {
    let Some(limit) = limit else { return solver.check_assumptions(assumptions) };
    let context = z3::Context::thread_local();
    let handle = context.handle();
    std::thread::scope(|scope| {
        let (done, finished) = mpsc::channel::<()>();
        scope.spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
                handle.interrupt();
            }
        });
        let verdict = solver.check_assumptions(assumptions);
        let _ = done.send(());
        verdict
    })
}

fn pass_of(kinds: [PassKind; 3], (k, st, i): Key) -> Pass {
    Pass { kind: kinds[k], stage: Stage(st as u32), mb: Microbatch(i as u32) }
}

/// Per rank, the ops sorted by their start times: a pass alone, a braided
/// pair, or a `B` fused with its `W`.
fn extract(
    s: &ComputeSchedule,
    keys: &[Key],
    starts: &[Int],
    partners: &[Vec<Partner>],
    value: &dyn Fn(&Int) -> i64,
    chosen: &dyn Fn(&Bool) -> bool,
    kept: Option<(&Frozen, &Neighbourhood)>,
) -> Vec<Vec<ScheduledOp>> {
    let meta = &s.meta;
    let kinds = [PassKind::F, PassKind::B, PassKind::W];
    let mut timed: Vec<Vec<(i64, usize, usize)>> = vec![Vec::new(); meta.num_ranks as usize];
    for (x, key) in keys.iter().enumerate() {
        timed[meta.placement[key.1].index()].push((value(&starts[x]), key.0, x));
    }
    let origin = Origin { span: s.body_span, iteration: Vec::new() };
    let mut placed = vec![false; keys.len()];
    timed
        .into_iter()
        .map(|mut ops| {
            ops.sort_by_key(|&(t, k, x)| (t, k, keys[x].1, keys[x].2));
            let mut out = Vec::new();
            for (_, _, x) in ops {
                if placed[x] {
                    continue;
                }
                placed[x] = true;
                if let Some((f, n)) = kept.filter(|(f, _)| !f.free[x]) {
                    for &y in &f.mates[x] {
                        placed[y] = true;
                    }
                    out.push(n.order[f.rank[x]][f.op[x]].clone());
                    continue;
                }
                let partner = partners[x].iter().find(|p| chosen(&p.together)).map(|p| p.other);
                let passes = match partner {
                    Some(y) if keys[x].1 == keys[y].1 && keys[x].2 == keys[y].2 => {
                        placed[y] = true;
                        vec![Pass { kind: PassKind::BW, ..pass_of(kinds, keys[x]) }]
                    }
                    Some(y) => {
                        placed[y] = true;
                        let mut pair = vec![pass_of(kinds, keys[x]), pass_of(kinds, keys[y])];
                        pair.sort_by_key(|p| p.kind as u8);
                        pair
                    }
                    None => vec![pass_of(kinds, keys[x])],
                };
                out.push(ScheduledOp { compute: Compute { passes, units: Vec::new() }, origin: origin.clone() });
            }
            out
        })
        .collect()
}
