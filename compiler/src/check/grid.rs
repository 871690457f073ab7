//! The ranks × ops grid people debug schedules with (like PyTorch's
//! `_format_pipeline_order`), with the ops an error is about marked.

use crate::elab::ComputeSchedule;
use std::fmt::Write as _;
use stp_ir::{Compute, Rank};

/// Widest grid printed: wider ones would wrap in a terminal and help no one.
const MAX_WIDTH: usize = 160;
/// Ops shown on each side of the marked ones when the schedule is longer.
const CONTEXT: usize = 6;

/// PyTorch's action spelling: `2F0` (stage, kind, microbatch); `I` for the
/// input-gradient pass `B`, `B` for the full backward `BW`; braided pairs
/// joined by `&`.
pub fn cell(compute: &Compute) -> String {
    let parts: Vec<String> = compute
        .passes
        .iter()
        .map(|p| {
            let kind = match p.kind {
                stp_ir::PassKind::F => "F",
                stp_ir::PassKind::B => "I",
                stp_ir::PassKind::W => "W",
                stp_ir::PassKind::BW => "B",
                stp_ir::PassKind::R => "R",
            };
            format!("{}{kind}{}", p.stage.0, p.mb.0)
        })
        .collect();
    parts.join("&")
}

/// The grid around the marked (rank, op index) positions, marked with
/// `>`, or `None` when even the window around them is too wide.
pub fn grid(s: &ComputeSchedule, marks: &[(Rank, usize)]) -> Option<String> {
    let longest = s.ranks.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return None;
    }
    let first_mark = marks.iter().map(|m| m.1).min().unwrap_or(0);
    let last_mark = marks.iter().map(|m| m.1).max().unwrap_or(0);
    let (from, to) = if longest * 6 + 8 <= MAX_WIDTH {
        (0, longest)
    } else {
        (first_mark.saturating_sub(CONTEXT), (last_mark + CONTEXT + 1).min(longest))
    };
    let cells: Vec<Vec<String>> = s
        .ranks
        .iter()
        .enumerate()
        .map(|(r, ops)| {
            (from..to)
                .map(|i| match ops.get(i) {
                    Some(op) if marks.contains(&(Rank(r as u32), i)) => format!(">{}", cell(&op.compute)),
                    Some(op) => cell(&op.compute),
                    None => String::new(),
                })
                .collect()
        })
        .collect();
    let width = cells.iter().flatten().map(String::len).max().unwrap_or(1).max(3);
    let line_width = 8 + (to - from) * (width + 1);
    if line_width > MAX_WIDTH {
        return None;
    }
    let mut out = String::new();
    let _ = write!(out, "{:<7}", "op");
    for i in from..to {
        let _ = write!(out, " {i:>width$}");
    }
    for (r, row) in cells.iter().enumerate() {
        let _ = write!(out, "\nrank {r:<2}");
        for c in row {
            let _ = write!(out, " {c:>width$}");
        }
    }
    if from > 0 || to < longest {
        let _ = write!(out, "\n(ops {from}..{to} of {longest}; `>` marks the ops in question)");
    } else {
        out.push_str("\n(`>` marks the ops in question)");
    }
    Some(out)
}
