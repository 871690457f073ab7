//! Reorders the ops of `reorder { ... }` regions. Local search: move one
//! op of a region to another position of the same region, and keep the
//! move when it brings the rank's peak memory closer to its budget (or,
//! without one, to the peak the written order had), or keeps it as close
//! and shortens the whole schedule's makespan (timed as the simulator
//! times it) or, at equal makespan, the sum of every op's end time. A
//! move after which some op could never run is refused. It stops when a
//! round finds nothing better; the checker then verifies the result like
//! any hand-written order. The same search, with braid changes added,
//! polishes the orders of `auto` schedules ([`polish`]).

use crate::elab::{ComputeSchedule, MemoryModel, ScheduledOp};
use std::cell::Cell;
use stp_ir::{Compute, Pass, PassKind};

/// Tolerance for comparing makespans built from sums of costs.
const EPS: f64 = 1e-9;

/// At most this many rounds over all regions.
const MAX_ROUNDS: usize = 64;

/// Above this many (moves × ops) per round, the written order is kept and
/// a note says so.
const MAX_WORK: usize = 20_000_000;

/// Reorders the regions of `s`; returns, per rank, where each op of the
/// written order went (`moved[r][old] = new`).
pub fn improve(s: &mut ComputeSchedule) -> Vec<Vec<usize>> {
    let regions = std::mem::take(&mut s.regions);
    if regions.iter().all(Vec::is_empty) {
        return s.ranks.iter().map(|ops| (0..ops.len()).collect()).collect();
    }
    let moves: usize = regions.iter().flatten().map(|(a, b)| (b - a) * (b - a)).sum();
    let ops: usize = s.ranks.iter().map(Vec::len).sum();
    if moves.saturating_mul(ops) > MAX_WORK {
        s.notes.push(format!("`reorder`: kept the written order ({moves} candidate moves over {ops} ops)"));
        return s.ranks.iter().map(|ops| (0..ops.len()).collect()).collect();
    }
    let limits = rank_limits(s);
    let written = runnable_makespan(s);
    let budget = Cell::new(usize::MAX);
    let search = Search { regions: &regions, limits: &limits, window: usize::MAX, budget: &budget };
    let (positions, kept) = search.run(s);
    let show = |t: Option<f64>| t.map_or("(cannot run)".to_string(), |t| format!("{t:.3}"));
    let now = runnable_makespan(s);
    s.notes.push(format!("`reorder`: {kept} move(s), makespan {} -> {}", show(written), show(now)));
    // `positions[r][new] = old`; invert it.
    positions
        .into_iter()
        .map(|order| {
            let mut moved = vec![0; order.len()];
            for (new, old) in order.into_iter().enumerate() {
                moved[old] = new;
            }
            moved
        })
        .collect()
}

/// Improves a whole runnable order (an `auto` schedule's) by moving ops
/// at most `window` places and, with a TP collective to hide, changing
/// braids ([`Search::rebraid`]), within the memory budget, until nothing
/// helps or it has scored `evaluations` orders. Returns how many changes
/// it kept and how many orders it scored; skips instances too large to
/// search (none kept, none scored).
pub fn polish(s: &mut ComputeSchedule, window: usize, evaluations: usize) -> Polished {
    if !can_polish(&s.ranks, window) {
        return Polished { kept: 0, scored: 0 };
    }
    let limits = rank_limits(s);
    let mut kept = 0;
    let budget = Cell::new(evaluations);
    for _ in 0..MAX_ROUNDS {
        // Regions change with the number of ops a braid change leaves.
        let regions: Vec<Vec<(usize, usize)>> = s.ranks.iter().map(|ops| vec![(0, ops.len())]).collect();
        let search = Search { regions: &regions, limits: &limits, window, budget: &budget };
        let moved = search.run(s).1;
        let rebraided = if super::has_collectives(s) { search.rebraid(s) } else { 0 };
        kept += moved + rebraided;
        if rebraided == 0 || budget.get() == 0 {
            break;
        }
    }
    Polished { kept, scored: evaluations - budget.get() }
}

/// What [`polish`] did.
#[derive(Debug, Clone, Copy)]
pub struct Polished {
    /// Moves kept.
    pub kept: usize,
    /// Orders scored (each re-times every op): the work done.
    pub scored: usize,
}

/// Whether [`polish`] searches orders of this size (each of its moves
/// re-times every op).
pub fn can_polish(ranks: &[Vec<ScheduledOp>], window: usize) -> bool {
    let ops: usize = ranks.iter().map(Vec::len).sum();
    let moves: usize = ranks.iter().map(|r| r.len() * (2 * window).min(r.len())).sum();
    moves.saturating_mul(ops) <= MAX_WORK
}

fn runnable_makespan(s: &ComputeSchedule) -> Option<f64> {
    super::op_times(s, &s.ranks).map(|t| super::last_end(&t))
}

/// One local search: which spans of which ranks may change, each rank's
/// memory limit, how far an op may move, and how many orders it may
/// still score.
struct Search<'a> {
    regions: &'a [Vec<(usize, usize)>],
    limits: &'a [i64],
    window: usize,
    /// How many more orders it may score (a count, not a clock, so that
    /// the result does not depend on the machine).
    budget: &'a Cell<usize>,
}

impl Search<'_> {
    /// Whether the evaluation budget is used up.
    fn spent(&self) -> bool {
        self.budget.get() == 0
    }

    /// Score: memory (and deferred weight gradients) over the limit, then
    /// ops that can never run (a written order may have some: the search
    /// may repair it, else the checker says why), then makespan; lower is
    /// better. The sum of every op's end breaks ties: it rewards a move
    /// that lets work finish earlier even before the makespan shows it.
    fn score(&self, s: &ComputeSchedule, r: usize) -> Score {
        self.budget.set(self.budget.get().saturating_sub(1));
        let times = super::partial_op_times(s, &s.ranks);
        let stuck: usize = s.ranks.iter().zip(&times).map(|(ops, t)| ops.len() - t.len()).sum();
        let makespan = super::last_end(&times);
        let flow: f64 = times.iter().flatten().map(|(_, end)| end).sum();
        let excess = (peak(&s.ranks[r], &s.memory) - self.limits[r]).max(0) + deferred_excess(&s.ranks[r], &s.memory);
        (excess, stuck, makespan, flow)
    }

    /// Splits braided (and `BW`) ops and braids neighbouring single ops
    /// (a `B` and its own `W` into `BW`), keeping each change that scores
    /// better. Only for orders stpc chose itself: a written `&` stays.
    fn rebraid(&self, s: &mut ComputeSchedule) -> usize {
        let mut kept = 0;
        for r in 0..s.ranks.len() {
            let mut current = self.score(s, r);
            let mut i = 0;
            while i < s.ranks[r].len() {
                if self.spent() {
                    return kept;
                }
                let mut improved = false;
                for (replaced, with) in alternatives(&s.ranks[r], i) {
                    let inserted = with.len();
                    let old: Vec<ScheduledOp> = s.ranks[r].splice(i..i + replaced, with).collect();
                    let after = self.score(s, r);
                    if better(after, current) {
                        current = after;
                        kept += 1;
                        improved = true;
                        break;
                    }
                    s.ranks[r].splice(i..i + inserted, old);
                }
                if !improved {
                    i += 1;
                }
            }
        }
        kept
    }

    /// Returns, per rank, which op of the original order is now where
    /// (`positions[r][new] = old`), and how many moves were kept.
    fn run(&self, s: &mut ComputeSchedule) -> (Vec<Vec<usize>>, usize) {
        let mut positions: Vec<Vec<usize>> = s.ranks.iter().map(|ops| (0..ops.len()).collect()).collect();
        let mut kept = 0;

        for _ in 0..MAX_ROUNDS {
            let mut improved = false;
            for (r, spans) in self.regions.iter().enumerate() {
                // The score of the order as it stands; a refused move restores it.
                let mut current = self.score(s, r);
                for &(start, end) in spans {
                    for from in start..end {
                        if self.spent() {
                            return (positions, kept);
                        }
                        let (lo, hi) = (
                            from.saturating_sub(self.window).max(start),
                            from.saturating_add(self.window).saturating_add(1).min(end),
                        );
                        for to in lo..hi {
                            if from == to {
                                continue;
                            }
                            move_op(&mut s.ranks[r], from, to);
                            let after = self.score(s, r);
                            if better(after, current) {
                                current = after;
                                move_op(&mut positions[r], from, to);
                                kept += 1;
                                improved = true;
                            } else {
                                move_op(&mut s.ranks[r], to, from);
                            }
                        }
                    }
                }
            }
            if !improved {
                break;
            }
        }
        (positions, kept)
    }
}

/// A search score: (memory excess, ops that cannot run, makespan, flow).
type Score = (i64, usize, f64, f64);

/// Less excess, then fewer stuck ops, then a shorter makespan, then (at
/// equal makespan) a smaller sum of ends.
fn better(after: Score, current: Score) -> bool {
    (after.0, after.1) < (current.0, current.1)
        || ((after.0, after.1) == (current.0, current.1)
            && (after.2 < current.2 - EPS || (after.2 < current.2 + EPS && after.3 < current.3 - EPS)))
}

/// Other ways to run the op at `i` (and its successor): a braid or `BW`
/// split into its passes (both orders), or two single passes that may
/// share an op braided (a `B` and its own `W` fused into `BW`). Each is
/// (how many ops it replaces, the ops replacing them).
pub(super) fn alternatives(ops: &[ScheduledOp], i: usize) -> Vec<(usize, Vec<ScheduledOp>)> {
    let with = |passes: Vec<Pass>| ScheduledOp {
        compute: Compute { passes, units: Vec::new() },
        origin: ops[i].origin.clone(),
    };
    let passes = &ops[i].compute.passes;
    match passes.as_slice() {
        [a, b] => vec![(1, vec![with(vec![*a]), with(vec![*b])]), (1, vec![with(vec![*b]), with(vec![*a])])],
        [bw] if bw.kind == PassKind::BW => {
            let (b, w) = (Pass { kind: PassKind::B, ..*bw }, Pass { kind: PassKind::W, ..*bw });
            vec![(1, vec![with(vec![b]), with(vec![w])])]
        }
        [a] => match ops.get(i + 1).map(|next| next.compute.passes.as_slice()) {
            Some([b]) if (a.stage, a.mb) == (b.stage, b.mb) && (a.kind, b.kind) == (PassKind::B, PassKind::W) => {
                vec![(2, vec![with(vec![Pass { kind: PassKind::BW, ..*a }])])]
            }
            Some([b]) if (a.stage, a.mb) != (b.stage, b.mb) && (a.stage, a.kind) != (b.stage, b.kind) => {
                let mut pair = vec![*a, *b];
                pair.sort_by_key(|p| p.kind as u8);
                vec![(2, vec![with(pair)])]
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// How far the rank's deferred weight gradients go over `max_deferred`.
pub(super) fn deferred_excess(ops: &[ScheduledOp], model: &MemoryModel) -> i64 {
    let Some(cap) = model.max_deferred else { return 0 };
    let mut deferred = 0i64;
    let mut excess = 0i64;
    for op in ops {
        // Counted between ops, as memory is: a `B` braided with a
        // deferred `W` leaves the count as it was.
        for pass in &op.compute.passes {
            match pass.kind {
                PassKind::B => deferred += 1,
                PassKind::W => deferred -= 1,
                _ => {}
            }
        }
        excess = excess.max(deferred - cap);
    }
    excess.max(0)
}

pub(super) fn move_op<T>(items: &mut [T], from: usize, to: usize) {
    if from < to {
        items[from..=to].rotate_left(1);
    } else {
        items[to..=from].rotate_right(1);
    }
}

/// Each rank's memory limit for a search: its budget, or where it has
/// none, the peak of its current order (a search never raises it).
pub(super) fn rank_limits(s: &ComputeSchedule) -> Vec<i64> {
    s.ranks.iter().enumerate().map(|(r, ops)| s.memory.budget_of(r).unwrap_or_else(|| peak(ops, &s.memory))).collect()
}

/// The rank's most live activation units at any op boundary.
pub(super) fn peak(ops: &[ScheduledOp], model: &MemoryModel) -> i64 {
    let mut live = 0i64;
    let mut most = 0i64;
    for deltas in model.pass_deltas(ops) {
        live += deltas.iter().map(|(_, units)| units).sum::<i64>();
        most = most.max(live);
    }
    most
}
