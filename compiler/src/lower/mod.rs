//! Lowering: a [`CheckedSchedule`] -> a verified [`Program`], one pass per file:
//!
//! 1. `insert_transfers`: compute ops become instructions, with a send after
//!    each op whose output another rank consumes and receives before each op
//!    that consumes another rank's output, posted in each link's send order.
//!    `insert_reductions` (several pipelines): each rank ends with one
//!    gradient reduction per model part it holds a copy of, in part order.
//! 2. `group_transfers`: consecutive transfers become one group, posted
//!    together, so a rank that sends one tensor and receives another does
//!    not wait for the send before posting the receive (which deadlocks
//!    under NCCL's rendezvous sends: 1F1B's steady state needs this).
//! 3. `hoist_receives` (rendezvous runtimes): runs the program and, where a
//!    rank waits on a send whose receive its blocked peer would post only
//!    later, moves that receive into the peer's current group, as
//!    Megatron's combined send/receive calls do by hand
//!    ([`stp_ir::simulate::hoist_receives`]). Interleaved 1F1B needs this.
//! 4. `insert_frees`: a free after each buffer's last use on its rank.
//! 5. `split_tp_units` (tensor parallelism, `tp > 1`): every compute lists
//!    its units and their all-reduces; braided pairs interleave them.
//! 6. `place_receives` (rendezvous runtimes, transfers that take time):
//!    moves receives between groups wherever that shortens the timed
//!    simulation under the schedule's cost model — transfers with one peer
//!    share a stream, so a receive in the wrong group holds back the rest.
//!
//! The result is verified with [`stp_ir::verify`] after the last pass, or
//! after every pass with [`LowerOptions::verify_each`]. A verification
//! failure here is a compiler bug, reported as such.

mod group_transfers;
mod insert_frees;
mod insert_reductions;
mod insert_transfers;
mod place_receives;
mod split_tp_units;

use crate::check::CheckedSchedule;
use stp_ir::simulate::{find_deadlock, hoist_receives, Deadlock, Semantics};
use stp_ir::{verify, Program, VerifyError};

/// Knobs for lowering.
#[derive(Debug, Clone, Copy)]
pub struct LowerOptions {
    /// Verify the IR after every pass, not only after the last.
    pub verify_each: bool,
    /// Run `hoist_receives` (on by default). Without it every receive is
    /// posted right before the op that needs it, as PyTorch's schedule
    /// runtime does, and programs that then deadlock are refused.
    pub hoist: bool,
    /// Run `place_receives` (on by default): move receives between groups
    /// where the timed simulation says the step gets shorter.
    pub place_receives: bool,
    /// Tensor-parallel group size behind each pipeline rank (1: none).
    pub tp: u32,
    /// With tensor parallelism, use sequence parallelism's reduce-scatter
    /// and all-gather instead of all-reduces.
    pub sequence_parallel: bool,
}

impl Default for LowerOptions {
    fn default() -> LowerOptions {
        LowerOptions { verify_each: false, hoist: true, place_receives: true, tp: 1, sequence_parallel: false }
    }
}

/// A lowering pass produced IR that fails verification: a compiler bug.
#[derive(Debug, Clone)]
pub struct LowerError {
    /// The pass after which verification failed.
    pub pass: &'static str,
    /// What failed.
    pub errors: Vec<VerifyError>,
}

impl std::fmt::Display for LowerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "internal compiler error: the IR after pass `{}` fails verification:", self.pass)?;
        for e in self.errors.iter().take(10) {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LowerError {}

/// What lowering produced.
#[derive(Debug, Clone)]
pub struct Lowered {
    /// The verified program.
    pub program: Program,
    /// How many receives `hoist_receives` moved into earlier groups.
    pub hoisted: usize,
    /// How many moves of receives `place_receives` kept.
    pub placed: usize,
    /// Set when the program deadlocks under the requested semantics even
    /// after regrouping: the checker reports it.
    pub deadlock: Option<Deadlock>,
}

/// Lowers a checked schedule to rank programs for a runtime with the given
/// send semantics.
pub fn lower(checked: &CheckedSchedule, options: LowerOptions, semantics: Semantics) -> Result<Lowered, LowerError> {
    let schedule = checked.schedule();
    let mut program = insert_transfers::run(schedule);
    insert_reductions::run(&mut program);
    if options.verify_each {
        // Buffers are not freed yet, so only leaks may be reported here.
        verify_ignoring_leaks(&program, "insert_transfers")?;
    }
    group_transfers::run(&mut program);
    if options.verify_each {
        verify_ignoring_leaks(&program, "group_transfers")?;
    }
    let (hoisted, deadlock) = match semantics {
        Semantics::Rendezvous if options.hoist => match hoist_receives(&mut program) {
            Ok(moved) => (moved, None),
            Err(deadlock) => (0, Some(deadlock)),
        },
        _ => (0, find_deadlock(&program, semantics).err()),
    };
    if options.verify_each {
        verify_ignoring_leaks(&program, "hoist_receives")?;
    }
    insert_frees::run(&mut program);
    if options.verify_each {
        verify(&program).map_err(|errors| LowerError { pass: "insert_frees", errors })?;
    }
    split_tp_units::run(&mut program, options.tp, options.sequence_parallel);
    verify(&program).map_err(|errors| LowerError { pass: "split_tp_units", errors })?;
    let placed = match semantics {
        Semantics::Rendezvous if options.place_receives && deadlock.is_none() => {
            place_receives::run(&mut program, &schedule.cost)
        }
        _ => 0,
    };
    if placed > 0 {
        verify(&program).map_err(|errors| LowerError { pass: "place_receives", errors })?;
    }
    // Found before frees were inserted, the deadlock's instruction indices
    // are of that shorter program: find it again in the one reported.
    let deadlock = deadlock.map(|found| find_deadlock(&program, found.semantics).err().unwrap_or(found));
    Ok(Lowered { program, hoisted, placed, deadlock })
}

fn verify_ignoring_leaks(program: &Program, pass: &'static str) -> Result<(), LowerError> {
    match verify(program) {
        Ok(()) => Ok(()),
        Err(errors) => {
            let real: Vec<VerifyError> =
                errors.into_iter().filter(|e| !e.message.ends_with("is never freed")).collect();
            if real.is_empty() {
                Ok(())
            } else {
                Err(LowerError { pass, errors: real })
            }
        }
    }
}
