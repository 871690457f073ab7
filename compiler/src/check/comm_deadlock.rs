//! Invariant 4, checked on the lowered program: it runs to completion
//! under the runtime's send semantics (rendezvous by default, as NCCL).

use super::grid;
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use stp_ir::simulate::{find_deadlock, Blocked, Deadlock, Semantics, Wait};
use stp_ir::{Direction, Instr, Program, Rank};

/// Reports `deadlock`, found running `program` (lowered from `schedule`),
/// at the ops where every rank is stuck.
pub fn report_deadlock(
    program: &Program,
    schedule: &ComputeSchedule,
    deadlock: &Deadlock,
    hoisted: bool,
) -> Diagnostic {
    let buffered_ok =
        deadlock.semantics == Semantics::Rendezvous && find_deadlock(program, Semantics::Buffered).is_ok();
    let d = report(program, schedule, deadlock, buffered_ok);
    if hoisted || !buffered_ok {
        d
    } else {
        d.with_help(
            "drop --no-hoist: stpc then posts the receives these sends wait for earlier, grouped with the sends (as Megatron does)",
        )
    }
}

/// The index of the compute op that follows instruction `instr` on its
/// rank (or the last op, when none follows).
fn op_near(program: &Program, rank: Rank, instr: usize) -> usize {
    let instrs = &program.ranks[rank.index()].instrs;
    let before = instrs[..instr].iter().filter(|i| matches!(i, Instr::Compute(_))).count();
    let total = instrs.iter().filter(|i| matches!(i, Instr::Compute(_))).count();
    before.min(total.saturating_sub(1))
}

fn why(b: &Blocked) -> String {
    let mut parts: Vec<String> = b
        .pending
        .iter()
        .map(|p| {
            let t = p.transfer;
            match (p.wait, t.dir) {
                (Wait::EarlierMessage, _) => format!("`{t}` waits for an earlier message on the same link"),
                (Wait::PeerNotPosted, Direction::Send) => {
                    format!("`{t}` waits for {} to post its receive", t.peer)
                }
                (Wait::PeerNotPosted, Direction::Recv) => format!("`{t}` waits for {} to send it", t.peer),
            }
        })
        .collect();
    if !b.waiting_for.is_empty() {
        let ranks: Vec<String> = b.waiting_for.iter().map(Rank::to_string).collect();
        parts.push(format!("its gradient reduction waits for {} to reach it", ranks.join(", ")));
    }
    parts.join("; ")
}

fn report(program: &Program, s: &ComputeSchedule, deadlock: &Deadlock, buffered_ok: bool) -> Diagnostic {
    let message = match deadlock.semantics {
        Semantics::Rendezvous => "the program deadlocks when sends wait for their receives (as NCCL's do)",
        Semantics::Buffered => "the program deadlocks even with buffered sends",
    };
    let mut d = Diagnostic::new(Code::CommDeadlock, message);
    let mut marks = Vec::new();
    let mut labelled: Vec<(crate::syntax::span::Span, Vec<String>)> = Vec::new();
    for b in &deadlock.blocked {
        let op = op_near(program, b.rank, b.instr);
        marks.push((b.rank, op));
        let Some(scheduled) = s.ranks[b.rank.index()].get(op) else { continue };
        let origin = &scheduled.origin;
        let text = format!("rank {} is stuck next to {} ({origin})", b.rank.0, grid::cell(&scheduled.compute));
        match labelled.iter_mut().find(|(span, _)| *span == origin.span) {
            Some((_, texts)) => texts.push(text),
            None => labelled.push((origin.span, vec![text])),
        }
        d.notes.push(format!(
            "{} is blocked in instruction {} (next to op {op}, {}): {}",
            b.rank,
            b.instr,
            grid::cell(&scheduled.compute),
            why(b)
        ));
    }
    for (span, texts) in labelled {
        d = d.with_label(span, texts.join("; "));
    }
    if let Some(g) = grid::grid(s, &marks) {
        d.notes.push(format!("the ops of every rank:\n{g}"));
    }
    if buffered_ok {
        d.help = Some(
            "it runs if sends are buffered; if your runtime buffers them, pass --comm buffered, otherwise reorder the ops so that every send meets a posted receive"
                .into(),
        );
    }
    d
}
