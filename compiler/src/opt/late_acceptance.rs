//! Late acceptance hill climbing (Burke and Bykov, "The late acceptance
//! hill-climbing heuristic", EJOR 2017) over a whole `auto` order: the
//! local search's moves ([`super::reorder`]: an op moved within its rank,
//! a braid split, two neighbouring single ops braided or fused), drawn at
//! random; a move is kept when the order still fits the memory budget,
//! every op can still run, and it compares ([`Acceptance`]) no worse than
//! the current order or than the order [`HISTORY`] moves ago. Accepting
//! sideways and briefly worse orders lets it leave the local optima the
//! polishing search stops at.

use super::random::XorShift;
use super::reorder::{alternatives, deferred_excess, move_op, peak};
use crate::elab::{ComputeSchedule, ScheduledOp};

/// How many moves back an order is compared with. At p = 4, m = 12 under
/// (b) costs, 500 and 5,000 left interleaved 1F1B's order where it was
/// (92.25); 20,000 found 91.50.
const HISTORY: usize = 20_000;

/// How far a move carries an op within its rank (the polishing search's
/// window).
const REACH: usize = 32;

/// One move in this many changes braids rather than an op's place.
const REBRAID_EVERY: u64 = 4;

/// What a move is compared by.
#[derive(Debug, Clone, Copy)]
pub enum Acceptance {
    /// The makespan, then the sum of op ends: only moves that keep work
    /// ending as early are taken sideways.
    Lexicographic,
    /// The makespan plus `weight` times the mean op end: a move may
    /// lengthen the step a little if work ends earlier on average, and
    /// the other way round.
    Blended { weight: f64 },
}

/// An order's (compared value, tie-break) under an [`Acceptance`], and
/// its (makespan, sum of op ends).
#[derive(Debug, Clone, Copy)]
struct Cost {
    key: (f64, f64),
    makespan: f64,
    flow: f64,
}

/// Searches from `order` (makespan `makespan`) for `moves` moves, until
/// an order at `floor` (the lower bound), or until `stop` (asked every
/// 1024 moves: the wall-clock cap) says so; returns the shortest
/// order found (ties: the smaller sum of op ends) if shorter, and the
/// moves made. The draws come from a fixed seed: the search is the same on
/// every machine.
pub fn search(
    s: &ComputeSchedule,
    order: Vec<Vec<ScheduledOp>>,
    makespan: f64,
    (moves, floor): (usize, f64),
    acceptance: Acceptance,
    stop: &mut dyn FnMut() -> bool,
) -> (Option<super::Timed>, usize) {
    let mut trial = ComputeSchedule { ranks: order, ..s.clone() };
    let limits = super::reorder::rank_limits(&trial);
    let Some(mut current) = cost(&trial, acceptance) else { return (None, 0) };
    let mut history = vec![current.key; HISTORY];
    let mut best: Option<super::Timed> = None;
    let mut best_cost = current;
    let mut random = XorShift::new(0x1a7e_acce_0097);
    let mut made = 0;
    for step in 0..moves {
        if best_cost.makespan <= floor + 1e-9 || (step % 1024 == 1023 && stop()) {
            break;
        }
        made += 1;
        let Some(undo) = random_move(&mut trial, &mut random) else { continue };
        let r = undo.rank();
        let fits = peak(&trial.ranks[r], &s.memory) <= limits[r] && deferred_excess(&trial.ranks[r], &s.memory) == 0;
        let after = if fits { cost(&trial, acceptance) } else { None };
        let slot = step % HISTORY;
        match after {
            Some(after) if no_worse(after.key, history[slot]) || no_worse(after.key, current.key) => {
                current = after;
                if better((current.makespan, current.flow), (best_cost.makespan, best_cost.flow)) {
                    best_cost = current;
                    best = Some((trial.ranks.clone(), current.makespan));
                }
            }
            _ => undo.apply(&mut trial.ranks),
        }
        history[slot] = current.key;
    }
    (best.filter(|(_, m)| *m < makespan - 1e-9), made)
}

/// The order's cost, or `None` when some op can never run.
fn cost(s: &ComputeSchedule, acceptance: Acceptance) -> Option<Cost> {
    let times = super::op_times(s, &s.ranks)?;
    let makespan = super::last_end(&times);
    let flow: f64 = times.iter().flatten().map(|(_, end)| end).sum();
    let key = match acceptance {
        Acceptance::Lexicographic => (makespan, flow),
        Acceptance::Blended { weight } => {
            let ops = times.iter().map(Vec::len).sum::<usize>().max(1) as f64;
            (makespan + weight * flow / ops, 0.0)
        }
    };
    Some(Cost { key, makespan, flow })
}

/// `a` below `b`, compared in order (up to rounding).
fn better(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 < b.0 - 1e-9 || (a.0 < b.0 + 1e-9 && a.1 < b.1 - 1e-9)
}

/// `a` no worse than `b`, compared in order (up to rounding).
fn no_worse(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 < b.0 - 1e-9 || (a.0 < b.0 + 1e-9 && a.1 <= b.1 + 1e-9)
}

/// How to take a move back.
enum Undo {
    Moved { rank: usize, from: usize, to: usize },
    Spliced { rank: usize, at: usize, inserted: usize, old: Vec<ScheduledOp> },
}

impl Undo {
    fn rank(&self) -> usize {
        match self {
            Undo::Moved { rank, .. } | Undo::Spliced { rank, .. } => *rank,
        }
    }

    fn apply(self, ranks: &mut [Vec<ScheduledOp>]) {
        match self {
            Undo::Moved { rank, from, to } => move_op(&mut ranks[rank], to, from),
            Undo::Spliced { rank, at, inserted, old } => {
                ranks[rank].splice(at..at + inserted, old);
            }
        }
    }
}

/// One random move on `s`'s order, if the drawn one exists.
fn random_move(s: &mut ComputeSchedule, random: &mut XorShift) -> Option<Undo> {
    // A rank drawn in proportion to its ops, then one of its ops.
    let ops: usize = s.ranks.iter().map(Vec::len).sum();
    let mut pick = random.below(ops.max(1));
    let rank = s.ranks.iter().position(|r| {
        if pick < r.len() {
            true
        } else {
            pick -= r.len();
            false
        }
    })?;
    let len = s.ranks[rank].len();
    let from = pick.min(len.checked_sub(1)?);
    if random.draw().is_multiple_of(REBRAID_EVERY) && super::has_collectives(s) {
        let mut choices = alternatives(&s.ranks[rank], from);
        if choices.is_empty() {
            return None;
        }
        let (replaced, with) = choices.swap_remove(random.below(choices.len()));
        let inserted = with.len();
        let old: Vec<ScheduledOp> = s.ranks[rank].splice(from..from + replaced, with).collect();
        return Some(Undo::Spliced { rank, at: from, inserted, old });
    }
    let lo = from.saturating_sub(REACH);
    let hi = (from + REACH).min(len - 1);
    let to = lo + random.below(hi - lo + 1);
    if to == from {
        return None;
    }
    move_op(&mut s.ranks[rank], from, to);
    Some(Undo::Moved { rank, from, to })
}
