//! Deciding what a schedule leaves open. An `auto` schedule's passes are
//! ordered by a greedy list scheduler ([`greedy`]) and, when asked for and
//! built in, improved by the Z3 scheduler ([`smt`]); [`bound`] is the lower
//! bound no order can beat. Whatever these produce goes through the
//! checker, lowering and the simulator like a hand-written schedule: their
//! answers are never trusted unchecked.

pub mod bound;
pub mod greedy;
#[cfg(feature = "smt")]
pub mod smt;

use crate::diag::Diagnostic;
use crate::elab::{ComputeSchedule, ScheduledOp};
use std::time::Duration;
use stp_ir::{PassKind, Stage};

/// Which scheduler orders an `auto` schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Solver {
    /// The greedy list scheduler: fast, not optimal.
    #[default]
    Greedy,
    /// Greedy first, then Z3 searches for shorter orders within `timeout`.
    Smt {
        /// The most time Z3 may take in all.
        timeout: Duration,
    },
}

/// What the scheduler did, for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanReport {
    /// The scheduler whose order was kept.
    pub kept: &'static str,
    /// The greedy order's makespan (per-pass durations: compute plus the
    /// exposed TP collective; transfers take `p2p`).
    pub greedy_makespan: f64,
    /// The kept order's makespan, in the same units.
    pub makespan: f64,
    /// Z3 proved no order is shorter.
    pub optimal: bool,
    /// Why the solver's answer was not used, if it was asked for and not used.
    pub fallback: Option<String>,
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "auto: {} order, makespan {:.3}", self.kept, self.makespan)?;
        if self.kept != "greedy" {
            write!(f, " (greedy: {:.3})", self.greedy_makespan)?;
        }
        if self.optimal {
            write!(f, ", proved optimal")?;
        }
        if let Some(why) = &self.fallback {
            write!(f, "; {why}")?;
        }
        Ok(())
    }
}

/// Orders every pass of `s`, an `auto` schedule, with `solver`.
pub fn plan(s: &ComputeSchedule, solver: Solver) -> Result<(Vec<Vec<ScheduledOp>>, PlanReport), Diagnostic> {
    let greedy = greedy::schedule(s)?;
    let greedy_makespan = order_makespan(s, &greedy);
    let report =
        PlanReport { kept: "greedy", greedy_makespan, makespan: greedy_makespan, optimal: false, fallback: None };
    match solver {
        Solver::Greedy => Ok((greedy, report)),
        Solver::Smt { timeout } => Ok(improve(s, greedy, report, timeout)),
    }
}

#[cfg(feature = "smt")]
fn improve(
    s: &ComputeSchedule,
    greedy: Vec<Vec<ScheduledOp>>,
    report: PlanReport,
    timeout: Duration,
) -> (Vec<Vec<ScheduledOp>>, PlanReport) {
    let found = smt::solve(s, report.greedy_makespan, timeout);
    match found.ranks {
        Some(ranks) => (ranks, PlanReport { kept: "smt", makespan: found.makespan, optimal: found.optimal, ..report }),
        None if found.optimal => (greedy, PlanReport { optimal: true, ..report }),
        None => {
            let why = "Z3 found no shorter order in time (raise --solver-timeout)".to_string();
            (greedy, PlanReport { fallback: Some(why), ..report })
        }
    }
}

#[cfg(not(feature = "smt"))]
fn improve(
    _: &ComputeSchedule,
    greedy: Vec<Vec<ScheduledOp>>,
    report: PlanReport,
    _: Duration,
) -> (Vec<Vec<ScheduledOp>>, PlanReport) {
    let why = "this stpc was built without the `smt` feature; kept the greedy order".to_string();
    (greedy, PlanReport { fallback: Some(why), ..report })
}

/// How long one pass takes when it runs alone: its compute plus its
/// exposed TP collective, as the timed simulator charges it.
pub fn standalone_duration(s: &ComputeSchedule, kind: PassKind) -> f64 {
    let pass = stp_ir::Pass { kind, stage: Stage(0), mb: stp_ir::Microbatch(0) };
    let (compute, exposed) = s.cost.time(&[pass]);
    compute + exposed
}

/// The makespan of per-rank orders of single passes when every pass starts
/// as soon as its rank is free and its inputs have arrived.
pub fn order_makespan(s: &ComputeSchedule, ranks: &[Vec<ScheduledOp>]) -> f64 {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    let owner = |stage: usize| meta.placement[stage].index();
    let hop = |a: usize, b: usize| if owner(a) != owner(b) { s.cost.p2p } else { 0.0 };
    let slot = |stage: usize, mb: usize| stage * mbs + mb;
    let (mut f_end, mut b_end) = (vec![None::<f64>; stages * mbs], vec![None::<f64>; stages * mbs]);
    let mut cursor = vec![0usize; ranks.len()];
    let mut free = vec![0.0f64; ranks.len()];
    let mut progressed = true;
    while progressed {
        progressed = false;
        for (r, ops) in ranks.iter().enumerate() {
            while let Some(op) = ops.get(cursor[r]) {
                let Some(&pass) = op.compute.passes.first() else { break };
                let (st, i) = (pass.stage.index(), pass.mb.index());
                let ready = match pass.kind {
                    PassKind::F if st == 0 => Some(0.0),
                    PassKind::F => f_end[slot(st - 1, i)].map(|t| t + hop(st - 1, st)),
                    PassKind::B | PassKind::BW => {
                        let down = if st + 1 == stages {
                            Some(0.0)
                        } else {
                            b_end[slot(st + 1, i)].map(|t| t + hop(st + 1, st))
                        };
                        down.zip(f_end[slot(st, i)]).map(|(d, f)| d.max(f))
                    }
                    PassKind::W => b_end[slot(st, i)],
                };
                let Some(ready) = ready else { break };
                let end = free[r].max(ready) + standalone_duration(s, pass.kind);
                match pass.kind {
                    PassKind::F => f_end[slot(st, i)] = Some(end),
                    PassKind::B | PassKind::BW => b_end[slot(st, i)] = Some(end),
                    PassKind::W => {}
                }
                free[r] = end;
                cursor[r] += 1;
                progressed = true;
            }
        }
    }
    free.into_iter().fold(0.0, f64::max)
}
