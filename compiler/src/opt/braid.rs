//! Decides the pairs written `X &? Y`: braided (one op, each pass's TP
//! collective hidden behind the other's compute) or split into two ops.
//! Braiding makes both passes wait for the later one's inputs; splitting
//! exposes both collectives. Each pair, last first, is split when that
//! shortens the whole schedule's makespan (timed as the simulator times
//! it), else kept braided.
//!
//! A split runs the passes that release memory (`B`, `W`, `BW`) before the
//! forwards, so no rank's live memory at an op boundary exceeds what the
//! braided op had; and a split op waits for no input the braid did not, so
//! it adds no dependency.

use crate::elab::{ComputeSchedule, ScheduledOp};
use stp_ir::{Compute, PassKind};

/// Tolerance for comparing makespans built from sums of costs.
const EPS: f64 = 1e-9;

/// Above this many (pairs × ops), deciding every pair would take seconds:
/// the pairs stay braided, and a note says so.
const MAX_WORK: usize = 20_000_000;

/// Braids or splits every `&?` pair of `s`.
pub fn decide(s: &mut ComputeSchedule) {
    let candidates: Vec<Vec<usize>> = std::mem::take(&mut s.maybe_braided);
    let pairs: usize = candidates.iter().map(Vec::len).sum();
    if pairs == 0 {
        return;
    }
    let ops: usize = s.ranks.iter().map(Vec::len).sum();
    if pairs.saturating_mul(ops) > MAX_WORK {
        s.notes.push(format!(
            "kept all {pairs} `&?` pairs braided: deciding them one by one over {ops} ops would take too long"
        ));
        return;
    }
    let mut best = super::order_makespan(s, &s.ranks);
    let mut split = 0;
    for (r, indices) in candidates.iter().enumerate() {
        // Last first, so that splitting one leaves the earlier indices valid.
        for &at in indices.iter().rev() {
            let braided = s.ranks[r][at].clone();
            let (first, second) = split_pair(&braided);
            s.ranks[r].splice(at..=at, [first, second]);
            let makespan = super::order_makespan(s, &s.ranks);
            if makespan > 0.0 && makespan < best - EPS {
                best = makespan;
                split += 1;
            } else {
                s.ranks[r].splice(at..at + 2, [braided]);
            }
        }
    }
    s.notes.push(format!("`&?`: kept {} of {pairs} pairs braided, split {split} (makespan {best:.3})", pairs - split));
}

/// The two ops of a split pair: memory-releasing passes first.
fn split_pair(op: &ScheduledOp) -> (ScheduledOp, ScheduledOp) {
    let mut passes = op.compute.passes.clone();
    passes.sort_by_key(|p| p.kind == PassKind::F);
    let single = |i: usize| ScheduledOp { compute: Compute::single(passes[i]), origin: op.origin.clone() };
    (single(0), single(1))
}
