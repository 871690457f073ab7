//! Invariant 5: under the schedule's memory model, no rank holds more
//! activation memory than its budget. Also computes every rank's peak.

use super::{describe, grid};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use std::collections::BTreeMap;
use stp_ir::Rank;

/// The peak activation memory of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPeak {
    /// Most units live at once.
    pub units: i64,
    /// The op (index in the rank's program) at which the peak is first reached.
    pub at: Option<usize>,
}

/// Every rank's peak, and an error for each rank that exceeds the budget
/// (at the first op that crosses it).
pub(super) fn check(s: &ComputeSchedule) -> (Vec<RankPeak>, Vec<Diagnostic>) {
    let model = &s.memory;
    let mut peaks = Vec::with_capacity(s.ranks.len());
    let mut errors = Vec::new();
    for (r, ops) in s.ranks.iter().enumerate() {
        let mut live_units = 0i64;
        let mut peak = RankPeak { units: 0, at: None };
        let mut crossed = false;
        for (i, deltas) in model.pass_deltas(ops).enumerate() {
            // Live memory is counted between ops, as the papers count it:
            // inside a braided F & B the forward's activations grow while the
            // backward's shrink.
            let change: i64 = deltas.iter().map(|(_, units)| units).sum();
            let high = live_units + change.max(0);
            if high > peak.units {
                peak = RankPeak { units: high, at: Some(i) };
            }
            if let Some(budget) = model.budget_of(r) {
                if high > budget && !crossed {
                    crossed = true;
                    errors.push(over_budget(s, Rank(r as u32), i, high, budget));
                }
            }
            live_units += change;
        }
        peaks.push(peak);
    }
    (peaks, errors)
}

/// What is live on `rank` after op `at`: (stage, microbatch) -> units.
fn live_at(s: &ComputeSchedule, rank: Rank, at: usize) -> BTreeMap<(u32, u32), i64> {
    let mut live: BTreeMap<(u32, u32), i64> = BTreeMap::new();
    for deltas in s.memory.pass_deltas(&s.ranks[rank.index()]).take(at + 1) {
        for (p, units) in deltas {
            *live.entry((p.stage.0, p.mb.0)).or_default() += units;
        }
    }
    live.retain(|_, units| *units > 0);
    live
}

fn over_budget(s: &ComputeSchedule, rank: Rank, at: usize, units: i64, budget: i64) -> Diagnostic {
    let live = live_at(s, rank, at);
    let op = &s.ranks[rank.index()][at];
    let passes: Vec<String> = op.compute.passes.iter().map(|p| describe(*p)).collect();
    let mut d = Diagnostic::new(
        Code::MemoryBudget,
        format!("rank {} needs {units} units of activation memory, over its budget of {budget}", rank.0),
    )
    .with_label(
        op.origin.span,
        format!("{} raises rank {} to {units} units ({})", passes.join(" & "), rank.0, op.origin),
    );
    if let Some(span) = s.memory.budget_span {
        let whose = if s.memory.budgets.is_empty() { "the".to_string() } else { format!("rank {}'s", rank.0) };
        d = d.with_label(span, format!("{whose} budget: {budget} units"));
    }
    d.notes.push(format!("live on rank {} at that moment: {}", rank.0, describe_live(&live)));
    d.notes.push(format!("memory model: {}", s.memory.describe()));
    if let Some(g) = grid::grid(s, &[(rank, at)]) {
        d.notes.push(format!("the ops of every rank:\n{g}"));
    }
    d.with_help("start fewer forwards before the first backward on this rank, or raise the budget")
}

/// `stage 0: mb 0-3 (1 unit each); stage 4: mb 1 (1 unit)`
fn describe_live(live: &BTreeMap<(u32, u32), i64>) -> String {
    let mut by_stage: BTreeMap<u32, Vec<(u32, i64)>> = BTreeMap::new();
    for (&(stage, mb), &units) in live {
        by_stage.entry(stage).or_default().push((mb, units));
    }
    let parts: Vec<String> = by_stage
        .iter()
        .map(|(stage, mbs)| {
            let total: i64 = mbs.iter().map(|m| m.1).sum();
            format!("stage {stage}: mb {} ({total} units)", ranges(mbs.iter().map(|m| m.0)))
        })
        .collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join("; ")
    }
}

/// `0-3, 5, 7-8`
fn ranges(mut values: impl Iterator<Item = u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let Some(mut start) = values.next() else { return String::new() };
    let mut end = start;
    for v in values {
        if v == end + 1 {
            end = v;
        } else {
            out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
            start = v;
            end = v;
        }
    }
    out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    out.join(", ")
}
