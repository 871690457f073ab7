//! Reorders the ops of `reorder { ... }` regions. Local search: move one
//! op of a region to another position of the same region, and keep the
//! move when it brings the rank's peak memory closer to its budget (or,
//! without one, to the peak the written order had), or keeps it as close
//! and shortens the whole schedule's makespan (timed as the simulator
//! times it) or, at equal makespan, the sum of every op's end time. A move after which some op could never run is refused. It
//! stops when a round finds nothing better; the checker then verifies the
//! result like any hand-written order.

use crate::elab::{ComputeSchedule, MemoryModel, ScheduledOp};
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
    let mut positions: Vec<Vec<usize>> = s.ranks.iter().map(|ops| (0..ops.len()).collect()).collect();
    if regions.iter().all(Vec::is_empty) {
        return positions;
    }
    let moves: usize = regions.iter().flatten().map(|(a, b)| (b - a) * (b - a)).sum();
    let ops: usize = s.ranks.iter().map(Vec::len).sum();
    if moves.saturating_mul(ops) > MAX_WORK {
        s.notes.push(format!("`reorder`: kept the written order ({moves} candidate moves over {ops} ops)"));
        return positions;
    }
    // Score: memory over the limit, then ops that can never run (a written
    // order may have some: the search may repair it, else the checker says
    // why), then makespan; lower is better.
    let score = |s: &ComputeSchedule, r: usize, limit: i64| {
        let times = super::partial_op_times(s, &s.ranks);
        let stuck: usize = s.ranks.iter().zip(&times).map(|(ops, t)| ops.len() - t.len()).sum();
        let makespan = super::last_end(&times);
        // The sum of every op's end breaks ties: it rewards a move that
        // lets work finish earlier even before the makespan shows it.
        let flow: f64 = times.iter().flatten().map(|(_, end)| end).sum();
        ((peak(&s.ranks[r], &s.memory) - limit).max(0), stuck, makespan, flow)
    };
    let limits: Vec<i64> = s.ranks.iter().map(|ops| s.memory.budget.unwrap_or_else(|| peak(ops, &s.memory))).collect();
    let runnable_makespan = |s: &ComputeSchedule| super::op_times(s, &s.ranks).map(|t| super::last_end(&t));
    let written = runnable_makespan(s);
    let mut kept = 0;
    for _ in 0..MAX_ROUNDS {
        let mut improved = false;
        for (r, spans) in regions.iter().enumerate() {
            // The score of the order as it stands; a refused move restores it.
            let mut current = score(s, r, limits[r]);
            for &(start, end) in spans {
                for from in start..end {
                    for to in start..end {
                        if from == to {
                            continue;
                        }
                        move_op(&mut s.ranks[r], from, to);
                        let after = score(s, r, limits[r]);
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
