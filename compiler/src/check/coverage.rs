//! Invariant 1: every (stage, microbatch) runs each pass it needs exactly once.

use super::{describe, PassIndex, Position};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use stp_ir::{Microbatch, Pass, PassKind, Stage};

pub(super) fn check(s: &ComputeSchedule, index: &PassIndex) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    for stage in (0..s.meta.num_stages).map(Stage) {
        for mb in (0..s.meta.num_microbatches).map(Microbatch) {
            let pass = |kind| Pass { kind, stage, mb };
            for kind in PassKind::ALL {
                if let (Some(first), Some(second)) = (index.first(pass(kind)), index.second(pass(kind))) {
                    errors.push(repeated(s, pass(kind), first, second));
                }
            }
            let has = |kind| index.first(pass(kind));
            let owner = s.meta.placement[stage.index()];
            let missing = |what: String, why: &str| {
                Diagnostic::new(Code::Coverage, format!("{what} never runs"))
                    .with_label(s.body_span, format!("rank {} owns stage {} but never runs {what}", owner.0, stage.0))
                    .with_note(why.to_string())
            };
            if has(PassKind::F).is_none() {
                errors.push(missing(describe(pass(PassKind::F)), "every microbatch runs forward through every stage"));
            }
            match (has(PassKind::BW), has(PassKind::B), has(PassKind::W)) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                (None, None, None) => errors.push(missing(
                    format!("the backward of (mb {}, stage {})", mb.0, stage.0),
                    "every forward needs a backward: either BW, or B and W",
                )),
                (None, Some(b), None) => errors.push(
                    missing(describe(pass(PassKind::W)), "a B computes only the input gradient; its W must run too")
                        .with_label(origin(s, b).span, "its B runs here"),
                ),
                (None, None, Some(w)) => errors.push(
                    missing(describe(pass(PassKind::B)), "a W needs the B that precedes it")
                        .with_label(origin(s, w).span, "its W runs here"),
                ),
                (Some(bw), b, w) => {
                    let other = b.or(w).map_or(bw, |p| p);
                    errors.push(
                        Diagnostic::new(
                            Code::Coverage,
                            format!("(mb {}, stage {}) runs both BW and a split backward", mb.0, stage.0),
                        )
                        .with_label(origin(s, bw).span, "BW runs here")
                        .with_label(origin(s, other).span, "B or W runs here")
                        .with_help("use either BW, or B and W"),
                    );
                }
            }
        }
    }
    errors
}

fn origin(s: &ComputeSchedule, at: Position) -> &crate::elab::Origin {
    &s.ranks[at.rank.index()][at.index].origin
}

fn repeated(s: &ComputeSchedule, pass: Pass, first: Position, second: Position) -> Diagnostic {
    let (a, b) = (origin(s, first), origin(s, second));
    Diagnostic::new(Code::Coverage, format!("{} runs twice", describe(pass)))
        .with_label(b.span, format!("again here ({b})"))
        .with_label(a.span, format!("first here ({a})"))
        .with_note(format!("on rank {}: ops {} and {}", first.rank.0, first.index, second.index))
}
