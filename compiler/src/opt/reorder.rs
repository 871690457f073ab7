//! Reorders the ops of `reorder { ... }` regions. Local search: move one
//! op of a region to another position of the same region, and keep the
//! move when it brings the rank's peak memory closer to its budget (or,
//! without one, to the peak the written order had), or keeps it as close
//! and shortens the whole schedule's makespan (timed as the simulator
//! times it) or, at equal makespan, the sum of every op's end time. A move after which some op could never run is refused. It
//! stops when a round finds nothing better; the checker then verifies the
//! result like any hand-written order.

use crate::elab::{ComputeSchedule, MemoryModel, ScheduledOp};
use std::time::Instant;
use stp_ir::PassKind;

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
    let limits: Vec<i64> = s.ranks.iter().map(|ops| s.memory.budget.unwrap_or_else(|| peak(ops, &s.memory))).collect();
    let written = runnable_makespan(s);
    let search = Search { regions: &regions, limits: &limits, window: usize::MAX, deadline: None };
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
/// at most `window` places, within the memory budget, until no move helps
/// or `deadline` passes. Returns how many moves it kept; skips instances
/// too large to search (returns 0).
pub fn polish(s: &mut ComputeSchedule, window: usize, deadline: Instant) -> usize {
    if !can_polish(&s.ranks, window) {
        return 0;
    }
    let regions: Vec<Vec<(usize, usize)>> = s.ranks.iter().map(|ops| vec![(0, ops.len())]).collect();
    let limits: Vec<i64> = s.ranks.iter().map(|ops| s.memory.budget.unwrap_or_else(|| peak(ops, &s.memory))).collect();
    let search = Search { regions: &regions, limits: &limits, window, deadline: Some(deadline) };
    search.run(s).1
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
/// memory limit, how far an op may move, and until when.
struct Search<'a> {
    regions: &'a [Vec<(usize, usize)>],
    limits: &'a [i64],
    window: usize,
    deadline: Option<Instant>,
}

impl Search<'_> {
    /// Score: memory (and deferred weight gradients) over the limit, then
    /// ops that can never run (a written order may have some: the search
    /// may repair it, else the checker says why), then makespan; lower is
    /// better. The sum of every op's end breaks ties: it rewards a move
    /// that lets work finish earlier even before the makespan shows it.
    fn score(&self, s: &ComputeSchedule, r: usize) -> (i64, usize, f64, f64) {
        let times = super::partial_op_times(s, &s.ranks);
        let stuck: usize = s.ranks.iter().zip(&times).map(|(ops, t)| ops.len() - t.len()).sum();
        let makespan = super::last_end(&times);
        let flow: f64 = times.iter().flatten().map(|(_, end)| end).sum();
        let excess = (peak(&s.ranks[r], &s.memory) - self.limits[r]).max(0) + deferred_excess(&s.ranks[r], &s.memory);
        (excess, stuck, makespan, flow)
    }

    /// Returns, per rank, which op of the original order is now where
    /// (`positions[r][new] = old`), and how many moves were kept.
    fn run(&self, s: &mut ComputeSchedule) -> (Vec<Vec<usize>>, usize) {
        let mut positions: Vec<Vec<usize>> = s.ranks.iter().map(|ops| (0..ops.len()).collect()).collect();
        let mut kept = 0;
        let out_of_time = || self.deadline.is_some_and(|d| Instant::now() >= d);
        for _ in 0..MAX_ROUNDS {
            let mut improved = false;
            for (r, spans) in self.regions.iter().enumerate() {
                // The score of the order as it stands; a refused move restores it.
                let mut current = self.score(s, r);
                for &(start, end) in spans {
                    for from in start..end {
                        if out_of_time() {
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
                            let better = (after.0, after.1) < (current.0, current.1)
                                || ((after.0, after.1) == (current.0, current.1)
                                    && (after.2 < current.2 - EPS
                                        || (after.2 < current.2 + EPS && after.3 < current.3 - EPS)));
                            if better {
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

/// How far the rank's deferred weight gradients go over `max_deferred`
/// (checked before each input gradient, as the checker does).
fn deferred_excess(ops: &[ScheduledOp], model: &MemoryModel) -> i64 {
    let Some(cap) = model.max_deferred else { return 0 };
    let mut deferred = 0i64;
    let mut excess = 0i64;
    for op in ops {
        for pass in &op.compute.passes {
            match pass.kind {
                PassKind::B => {
                    excess = excess.max(deferred + 1 - cap);
                    deferred += 1;
                }
                PassKind::W => deferred -= 1,
                _ => {}
            }
        }
    }
    excess.max(0)
}

fn move_op<T>(items: &mut [T], from: usize, to: usize) {
    if from < to {
        items[from..=to].rotate_left(1);
    } else {
        items[to..=from].rotate_right(1);
    }
}

/// The rank's most live activation units at any op boundary.
fn peak(ops: &[ScheduledOp], model: &MemoryModel) -> i64 {
    let mut live = 0i64;
    let mut most = 0i64;
    for op in ops {
        for pass in &op.compute.passes {
            live += match pass.kind {
                PassKind::F => model.activation,
                PassKind::B => -(model.activation - model.weight_stash),
                PassKind::W => -model.weight_stash,
                PassKind::BW => -model.activation,
            };
        }
        most = most.max(live);
    }
    most
}
