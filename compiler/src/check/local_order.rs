//! Invariant 2: passes that depend on each other and share a rank run in
//! dependency order.

use super::{describe, PassIndex, Position};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use stp_ir::{Microbatch, Pass, PassKind, Stage};

pub(super) fn check(s: &ComputeSchedule, index: &PassIndex) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    for stage in (0..s.num_stages).map(Stage) {
        for mb in (0..s.num_microbatches).map(Microbatch) {
            for (needs, producer) in dependencies(s, stage, mb, index) {
                let (Some(at), Some(dep)) = (index.first(needs), index.first(producer)) else { continue };
                if at.rank == dep.rank && dep.index >= at.index {
                    errors.push(out_of_order(s, needs, at, producer, dep));
                }
            }
        }
    }
    errors
}

/// (pass, pass it needs) pairs for one (stage, microbatch).
fn dependencies(s: &ComputeSchedule, stage: Stage, mb: Microbatch, index: &PassIndex) -> Vec<(Pass, Pass)> {
    let pass = |kind, stage| Pass { kind, stage, mb };
    let backward_of = |st: Stage| {
        if index.first(pass(PassKind::BW, st)).is_some() {
            pass(PassKind::BW, st)
        } else {
            pass(PassKind::B, st)
        }
    };
    let mut deps = Vec::new();
    let backward = backward_of(stage);
    deps.push((backward, pass(PassKind::F, stage)));
    if backward.kind == PassKind::B {
        deps.push((pass(PassKind::W, stage), backward));
    }
    if stage.0 > 0 {
        deps.push((pass(PassKind::F, stage), pass(PassKind::F, Stage(stage.0 - 1))));
    }
    if stage.0 + 1 < s.num_stages {
        deps.push((backward, backward_of(Stage(stage.0 + 1))));
    }
    deps
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
