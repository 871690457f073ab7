//! `recompute auto`: where a rank's order would hold more activation
//! memory than its budget, recompute forwards. Walking each rank's ops, at
//! the first op that would cross the budget, the live forward whose
//! backward comes last (the activation kept longest, as Belady's eviction
//! picks) becomes recomputed: its `F` keeps only what recomputation does
//! not restore, and an `R` runs just before its backward (as Megatron's
//! recompute runs it). Repeated until the rank fits or nothing live can
//! be recomputed; then the checker reports what is left (E0022).

use crate::elab::{ComputeSchedule, ScheduledOp};
use stp_ir::{Compute, Pass, PassKind};

/// Most op visits one run may make (each recompute chosen rescans its
/// rank): a count, so that the result is the same on every machine.
const MAX_WORK: usize = 200_000_000;

/// Inserts the recomputes `recompute auto` asks for and notes what it did.
pub fn fit(s: &mut ComputeSchedule) {
    if !s.recompute_auto {
        return;
    }
    if !s.memory.is_bounded() {
        s.notes.push("`recompute auto`: no memory budget, so nothing to fit: add `memory { budget = ...; }`".into());
        return;
    }
    let before = super::order_makespan(s, &s.ranks);
    let (mut chosen, mut work) = (0usize, 0usize);
    for r in 0..s.ranks.len() {
        let Some(budget) = s.memory.budget_of(r) else { continue };
        while let Some(at) = first_over(s, r, budget, &mut work) {
            if work > MAX_WORK {
                s.notes.push(format!("`recompute auto`: stopped after {chosen} recompute(s), past its work limit"));
                return;
            }
            let Some((forward, backward_at)) = victim(s, r, at) else { break };
            let origin = s.ranks[r][backward_at].origin.clone();
            let recompute = Pass { kind: PassKind::R, ..forward };
            s.ranks[r].insert(backward_at, ScheduledOp { compute: Compute::single(recompute), origin });
            chosen += 1;
        }
    }
    let forwards: usize =
        s.ranks.iter().flatten().flat_map(|op| &op.compute.passes).filter(|p| p.kind == PassKind::F).count();
    let after = super::order_makespan(s, &s.ranks);
    s.notes.push(format!(
        "`recompute auto`: recomputed {chosen} of {forwards} forwards so that every rank fits its budget (makespan \
         {before:.3} -> {after:.3})"
    ));
}

/// The first op of rank `r` at which live memory would exceed `budget`.
fn first_over(s: &ComputeSchedule, r: usize, budget: i64, work: &mut usize) -> Option<usize> {
    let mut live = 0i64;
    for (i, deltas) in s.memory.pass_deltas(&s.ranks[r]).enumerate() {
        *work += 1;
        let change: i64 = deltas.iter().map(|(_, units)| units).sum();
        if live + change.max(0) > budget {
            return Some(i);
        }
        live += change;
    }
    None
}

/// Of the forwards live at op `at` of rank `r` (run at or before it, their
/// backward after it) that are not yet recomputed and free something when
/// they are, the one whose backward runs last, and where that backward is.
fn victim(s: &ComputeSchedule, r: usize, at: usize) -> Option<(Pass, usize)> {
    let ops = &s.ranks[r];
    let recomputed = crate::elab::recomputed_pairs(ops);
    let live: Vec<Pass> = ops[..=at]
        .iter()
        .flat_map(|op| &op.compute.passes)
        .filter(|p| p.kind == PassKind::F && !recomputed.contains(&(p.stage, p.mb)))
        .filter(|p| s.memory.recomputed_units(p.stage) > 0)
        .copied()
        .collect();
    let backward_of = |f: &Pass| {
        ops.iter().position(|op| {
            op.compute
                .passes
                .iter()
                .any(|p| matches!(p.kind, PassKind::B | PassKind::BW) && (p.stage, p.mb) == (f.stage, f.mb))
        })
    };
    live.iter().filter_map(|f| backward_of(f).filter(|b| *b > at).map(|b| (*f, b))).max_by_key(|(_, b)| *b)
}
