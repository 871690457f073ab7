//! Invariant 1: every (stage, microbatch) runs each pass it needs exactly once.

use super::{describe, PassIndex, Position};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use stp_ir::{Microbatch, Pass, PassKind, Stage};

pub(super) fn check(s: &ComputeSchedule, index: &PassIndex) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    // Passes run nowhere at all: reported together, by rank, when there
    // are several (a forgotten drain leaves dozens).
    let mut absent: Vec<Absent> = Vec::new();
    for stage in (0..s.meta.num_stages).map(Stage) {
        for mb in (0..s.meta.num_microbatches).map(Microbatch) {
            let pass = |kind| Pass { kind, stage, mb };
            if !s.meta.on_route(stage, mb) {
                if let Some((kind, at)) = PassKind::ALL.into_iter().find_map(|k| Some((k, index.first(pass(k))?))) {
                    errors.push(off_route(s, pass(kind), at));
                }
                continue;
            }
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
                absent.push(Absent { rank: owner.0, stage: stage.0, mb: mb.0, forward: true });
            }
            match (has(PassKind::BW), has(PassKind::B), has(PassKind::W)) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                (None, None, None) => absent.push(Absent { rank: owner.0, stage: stage.0, mb: mb.0, forward: false }),
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
    match absent.as_slice() {
        [] => {}
        [one] => errors.push(one.alone(s)),
        all => errors.push(summary(s, all)),
    }
    errors
}

/// A forward or a whole backward that runs nowhere.
struct Absent {
    rank: u32,
    stage: u32,
    mb: u32,
    forward: bool,
}

impl Absent {
    fn what(&self) -> String {
        let pass = Pass { kind: PassKind::F, stage: Stage(self.stage), mb: Microbatch(self.mb) };
        if self.forward {
            describe(pass)
        } else {
            format!("the backward of (mb {}, stage {})", self.mb, self.stage)
        }
    }

    fn alone(&self, s: &ComputeSchedule) -> Diagnostic {
        let what = self.what();
        let why = if self.forward {
            "every microbatch runs forward through every stage"
        } else {
            "every forward needs a backward: either BW, or B and W"
        };
        Diagnostic::new(Code::Coverage, format!("{what} never runs"))
            .with_label(s.body_span, format!("rank {} owns stage {} but never runs {what}", self.rank, self.stage))
            .with_note(why.to_string())
    }
}

/// One diagnostic for many absent passes: how many each rank misses, and
/// which, with microbatches in runs (`mb 5-7`).
fn summary(s: &ComputeSchedule, all: &[Absent]) -> Diagnostic {
    let count = |forward: bool| all.iter().filter(|a| a.forward == forward).count();
    let (forwards, backwards) = (count(true), count(false));
    let plural = |n: usize, word: &str| if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") };
    let kinds: Vec<String> = [(forwards, "forward"), (backwards, "backward")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, word)| plural(n, word))
        .collect();
    let mut ranks: Vec<u32> = all.iter().map(|a| a.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let per_rank: Vec<String> =
        ranks.iter().map(|r| format!("rank {r}: {}", all.iter().filter(|a| a.rank == *r).count())).collect();
    let mut d = Diagnostic::new(Code::Coverage, format!("{} passes never run: {}", all.len(), kinds.join(" and ")))
        .with_label(s.body_span, format!("missing by rank: {}", per_rank.join(", ")));
    for r in &ranks {
        let mut lines = Vec::new();
        for forward in [true, false] {
            let mut stages: Vec<u32> =
                all.iter().filter(|a| a.rank == *r && a.forward == forward).map(|a| a.stage).collect();
            stages.sort_unstable();
            stages.dedup();
            for st in stages {
                let mbs: Vec<u32> = all
                    .iter()
                    .filter(|a| a.rank == *r && a.forward == forward && a.stage == st)
                    .map(|a| a.mb)
                    .collect();
                let kind = if forward { "forward" } else { "backward" };
                lines.push(format!("{kind} of stage {st} for mb {}", runs(&mbs)));
            }
        }
        d.notes.push(format!("rank {r} never runs the {}", lines.join("; the ")));
    }
    // A forgotten drain: each stage misses the backwards of its last
    // microbatches, and how many differs by rank (those of 1F1B-like
    // schedules, deeper in the pipeline, have fewer in flight).
    let m = s.meta.num_microbatches;
    let suffix = |st: u32| {
        let mbs: Vec<u32> = all.iter().filter(|a| a.stage == st).map(|a| a.mb).collect();
        mbs.iter().all(|mb| *mb + mbs.len() as u32 >= m)
    };
    let counts: Vec<usize> = ranks.iter().map(|r| all.iter().filter(|a| a.rank == *r).count()).collect();
    let drain = forwards == 0 && all.iter().all(|a| suffix(a.stage)) && counts.iter().any(|c| *c != counts[0]);
    let help = if drain {
        "the missing backwards are of the last microbatches: the ranks stop before their drain; after the \
         steady state, run the backwards of the microbatches still in flight (1F1B: `for i in m - warmup..m { BW(i) }`)"
    } else {
        "every microbatch runs forward through every stage, and a backward (BW, or B and W) for each forward"
    };
    d.with_help(help)
}

/// `0-3, 5, 7-8` for sorted microbatch numbers.
fn runs(mbs: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < mbs.len() {
        let mut j = i;
        while j + 1 < mbs.len() && mbs[j + 1] == mbs[j] + 1 {
            j += 1;
        }
        out.push(if i == j { mbs[i].to_string() } else { format!("{}-{}", mbs[i], mbs[j]) });
        i = j + 1;
    }
    out.join(", ")
}

fn origin(s: &ComputeSchedule, at: Position) -> &crate::elab::Origin {
    &s.ranks[at.rank.index()][at.index].origin
}

/// A pass on a stage its microbatch's route does not pass through.
fn off_route(s: &ComputeSchedule, pass: Pass, at: Position) -> Diagnostic {
    let stages: Vec<Stage> = s.meta.stages_of(pass.mb).collect();
    let (first, last) = (stages[0].0, stages[stages.len() - 1].0);
    let here = origin(s, at);
    Diagnostic::new(Code::Coverage, format!("{} is off its microbatch's route", describe(pass)))
        .with_label(here.span, format!("this runs stage {} for mb {} ({here})", pass.stage.0, pass.mb.0))
        .with_note(format!(
            "`route` sends mb {} through pipeline {}: stages {first}..={last}; stage {} is in pipeline {}",
            pass.mb.0,
            s.meta.route(pass.mb),
            pass.stage.0,
            pass.stage.0 / s.meta.chain().len
        ))
        .with_help("run each microbatch's passes on the stages of its own pipeline")
}

fn repeated(s: &ComputeSchedule, pass: Pass, first: Position, second: Position) -> Diagnostic {
    let (a, b) = (origin(s, first), origin(s, second));
    Diagnostic::new(Code::Coverage, format!("{} runs twice", describe(pass)))
        .with_label(b.span, format!("again here ({b})"))
        .with_label(a.span, format!("first here ({a})"))
        .with_note(format!("on rank {}: ops {} and {}", first.rank.0, first.index, second.index))
}
