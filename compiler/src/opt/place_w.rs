//! Places the weight gradients a schedule deferred with `B(...) defer
//! auto`. Each goes, oldest first, into the first idle gap of its rank
//! that opens after its `B` ends and is long enough to hold it; those that
//! find none run at the end of the rank. A `W` only fills time its rank
//! would spend waiting and produces nothing another pass waits for, so no
//! other op starts later than it would without it; and running a `W`
//! earlier only frees its stash earlier, so peak memory never grows.

use crate::elab::{ComputeSchedule, Origin, ScheduledOp};
use std::collections::{HashMap, VecDeque};
use stp_ir::{Compute, Pass, PassKind};

/// Tolerance for comparing times built from sums of costs.
const EPS: f64 = 1e-9;

/// Moves every floating `W` of `s` into its rank's program.
pub fn place(s: &mut ComputeSchedule) {
    let floating = std::mem::take(&mut s.floating);
    if floating.iter().all(Vec::is_empty) {
        return;
    }
    let times = super::op_times(s, &s.ranks);
    // A `W` issues no collective: it lasts its stage's compute.
    let cost = s.cost.clone();
    let w_time = |w: &Pass| cost.compute(*w);
    for (r, ws) in floating.into_iter().enumerate() {
        let ops = std::mem::take(&mut s.ranks[r]);
        s.ranks[r] = match &times {
            Some(times) => fill_gaps(ops, &times[r], ws, &w_time),
            None => append(ops, ws),
        };
    }
}

/// `ops` (timed by `times`) with the floating `ws` in the gaps they fit.
fn fill_gaps(
    ops: Vec<ScheduledOp>,
    times: &[(f64, f64)],
    ws: Vec<(Pass, Origin)>,
    w_time: &dyn Fn(&Pass) -> f64,
) -> Vec<ScheduledOp> {
    let b_end: HashMap<(u32, u32), f64> = ops
        .iter()
        .zip(times)
        .flat_map(|(op, (_, end))| {
            op.compute
                .passes
                .iter()
                .filter(|p| matches!(p.kind, PassKind::B | PassKind::BW))
                .map(move |p| ((p.stage.0, p.mb.0), *end))
        })
        .collect();
    let mut pending: VecDeque<(Pass, Origin)> = ws.into();
    let mut out = Vec::with_capacity(ops.len() + pending.len());
    let mut free = 0.0f64;
    for (op, (start, end)) in ops.into_iter().zip(times) {
        while let Some((w, _)) = pending.front() {
            let ready = b_end.get(&(w.stage.0, w.mb.0)).copied().unwrap_or(f64::INFINITY);
            let begin = free.max(ready);
            if begin + w_time(w) > start + EPS {
                break;
            }
            let Some((w, origin)) = pending.pop_front() else { break };
            free = begin + w_time(&w);
            out.push(ScheduledOp { compute: Compute::single(w), origin });
        }
        out.push(op);
        free = *end;
    }
    append(out, pending.into())
}

fn append(mut ops: Vec<ScheduledOp>, ws: Vec<(Pass, Origin)>) -> Vec<ScheduledOp> {
    ops.extend(ws.into_iter().map(|(w, origin)| ScheduledOp { compute: Compute::single(w), origin }));
    ops
}
