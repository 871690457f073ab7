//! Invariant 2: passes that depend on each other and share a rank run in
//! dependency order, and a braided op pairs passes of different microbatches.

use super::{describe, producers, PassIndex, Position};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use stp_ir::Pass;

pub(super) fn check(s: &ComputeSchedule, index: &PassIndex) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    for (r, ops) in s.ranks.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            let at = Position { rank: stp_ir::Rank(r as u32), index: i };
            if let [a, b] = op.compute.passes.as_slice() {
                if a.mb == b.mb && a.stage == b.stage {
                    errors.push(same_microbatch_braided(s, *a, *b, at));
                    continue;
                }
            }
            for &pass in &op.compute.passes {
                for producer in producers(pass, s.meta.chain(), index) {
                    let Some(dep) = index.first(producer) else { continue };
                    if dep.rank == at.rank && dep.index >= at.index {
                        errors.push(out_of_order(s, pass, at, producer, dep));
                    }
                }
            }
        }
    }
    errors
}

fn same_microbatch_braided(s: &ComputeSchedule, a: Pass, b: Pass, at: Position) -> Diagnostic {
    let origin = &s.ranks[at.rank.index()][at.index].origin;
    Diagnostic::new(Code::LocalOrder, format!("{} is braided with {} of the same microbatch", describe(a), describe(b)))
        .with_label(origin.span, format!("both passes are (mb {}, stage {}) ({origin})", a.mb.0, a.stage.0))
        .with_note("a braided pair overlaps two independent passes; passes of one microbatch depend on each other")
}

fn out_of_order(s: &ComputeSchedule, needs: Pass, at: Position, producer: Pass, dep: Position) -> Diagnostic {
    let a = &s.ranks[at.rank.index()][at.index].origin;
    let b = &s.ranks[dep.rank.index()][dep.index].origin;
    let when = if dep.index == at.index { "in the same op" } else { "only later" };
    Diagnostic::new(Code::LocalOrder, format!("{} runs before {}, which it needs", describe(needs), describe(producer)))
        .with_label(a.span, format!("{} runs here ({a})", describe(needs)))
        .with_label(b.span, format!("{} runs {when} ({b})", describe(producer)))
        .with_note(format!("both are on rank {}: ops {} and {}", at.rank.0, at.index, dep.index))
}
