//! The safety checker: proves facts about a [`ComputeSchedule`] and returns
//! them as a [`CheckedSchedule`], the only thing lowering accepts.
//!
//! Invariants established (each in its own file):
//!
//! 1. **Coverage** (`coverage.rs`): every (stage, microbatch) has exactly
//!    one `F` and either exactly one `BW` or exactly one `B` and one `W`;
//!    a braided op counts as each of its passes. Elaboration has already
//!    established that every pass runs on the rank that owns its stage and
//!    names a stage and microbatch in range.
//! 2. **Local order** (`local_order.rs`): on its rank, `F(i, s)` runs before
//!    the backward of `(i, s)`, `B` before `W`; and where a pass consumes the
//!    output of a neighbouring stage on the same rank (`F(i, s)` needs
//!    `F(i, s-1)`, a backward of `(i, s)` needs the backward of
//!    `(i, s+1)`), the producer runs strictly earlier; a braided op pairs
//!    passes of different (stage, microbatch).
//! 3. **No dependency cycle** (`cycle.rs`): program order on every rank
//!    plus the data dependencies of every pass (`F(i, s)` needs `F(i, s-1)`;
//!    the backward of `(i, s)` needs `F(i, s)` and the backward of
//!    `(i, s+1)`; `W` needs `B`) form an acyclic graph. Otherwise the
//!    shortest cycle is reported as a chain of waits.
//! 5. **Memory** (`memory.rs`): under the memory model (`F` holds
//!    `activation` units per (stage, microbatch); `B` releases all but
//!    `weight_stash`, which `W` releases; `BW` releases all), no rank's live
//!    units exceed `budget`. Every rank's peak is recorded. The bound on
//!    deferred weight gradients (`max_deferred`) and a bare `W` with none
//!    deferred are enforced during elaboration, where the queue lives.
//!
//! Checked on the lowered program, after lowering (`comm_deadlock.rs`):
//!
//! 4. **No deadlock under the runtime's send semantics**: the rank programs
//!    run to completion when every send waits for its receive (rendezvous,
//!    NCCL's behaviour; the default) or, if asked, with buffered sends.
//!    Per-link FIFO order of the transfers is verified by `stp_ir::verify`.

pub mod comm_deadlock;
mod coverage;
mod cycle;
pub mod grid;
mod local_order;
mod memory;

pub use memory::RankPeak;

use crate::diag::Diagnostic;
use crate::elab::ComputeSchedule;
use stp_ir::{Chain, Microbatch, Pass, PassKind, Rank, Stage};

/// A schedule with the invariants in the module docs proven, and the
/// facts the proofs computed.
#[derive(Debug, Clone)]
pub struct CheckedSchedule {
    schedule: ComputeSchedule,
    peaks: Vec<RankPeak>,
}

impl CheckedSchedule {
    /// The schedule that was checked.
    pub fn schedule(&self) -> &ComputeSchedule {
        &self.schedule
    }

    /// Every rank's peak activation memory under the schedule's memory model.
    pub fn peaks(&self) -> &[RankPeak] {
        &self.peaks
    }
}

/// Checks every invariant in the module docs, reporting all violations.
pub fn check(schedule: ComputeSchedule) -> Result<CheckedSchedule, Vec<Diagnostic>> {
    let index = PassIndex::build(&schedule);
    let mut errors = coverage::check(&schedule, &index);
    if errors.is_empty() {
        errors.extend(local_order::check(&schedule, &index));
    }
    if errors.is_empty() {
        errors.extend(cycle::check(&schedule, &index));
    }
    let (peaks, memory_errors) = memory::check(&schedule);
    errors.extend(memory_errors);
    if errors.is_empty() {
        Ok(CheckedSchedule { schedule, peaks })
    } else {
        Err(errors)
    }
}

/// Where a pass appears: rank and position in the rank's op list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub rank: Rank,
    pub index: usize,
}

/// The first two occurrences of every pass, by (kind, stage, microbatch):
/// enough to find a pass that is missing or repeated.
pub(crate) struct PassIndex {
    num_microbatches: u32,
    /// `slots[kind][stage * m + mb]`: first and second positions in rank and program order.
    slots: [Vec<[Option<Position>; 2]>; 5],
}

impl PassIndex {
    fn build(s: &ComputeSchedule) -> PassIndex {
        let n = s.meta.num_stages as usize * s.meta.num_microbatches as usize;
        let slots = std::array::from_fn(|_| vec![[None, None]; n]);
        let mut index = PassIndex { num_microbatches: s.meta.num_microbatches, slots };
        for (r, ops) in s.ranks.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                for pass in &op.compute.passes {
                    let at = Some(Position { rank: Rank(r as u32), index: i });
                    let slot = index.slot(pass.stage, pass.mb);
                    let seen = &mut index.slots[kind_index(pass.kind)][slot];
                    if seen[0].is_none() {
                        seen[0] = at;
                    } else if seen[1].is_none() {
                        seen[1] = at;
                    }
                }
            }
        }
        index
    }

    fn slot(&self, stage: Stage, mb: Microbatch) -> usize {
        stage.index() * self.num_microbatches as usize + mb.index()
    }

    /// The first position of the pass, if it runs at all.
    pub fn first(&self, pass: Pass) -> Option<Position> {
        self.slots[kind_index(pass.kind)][self.slot(pass.stage, pass.mb)][0]
    }

    /// The second position of the pass, if it runs twice or more.
    pub fn second(&self, pass: Pass) -> Option<Position> {
        self.slots[kind_index(pass.kind)][self.slot(pass.stage, pass.mb)][1]
    }
}

fn kind_index(kind: PassKind) -> usize {
    match kind {
        PassKind::F => 0,
        PassKind::B => 1,
        PassKind::W => 2,
        PassKind::BW => 3,
        PassKind::R => 4,
    }
}

/// The passes `pass` consumes the output of (`s-1` and `s+1` in its
/// pipeline, see [`stp_ir::Chain`]): `F(i, s)` needs `F(i, s-1)`;
/// a backward of `(i, s)` needs `F(i, s)` — or, when the pair is
/// recomputed, its `R(i, s)`, which needs the `F` — and the backward of
/// `(i, s+1)` (whichever of `B` or `BW` the schedule runs there); `W(i, s)`
/// needs `B(i, s)`.
pub(crate) fn producers(pass: Pass, chain: Chain, index: &PassIndex) -> impl Iterator<Item = Pass> {
    let at = |kind, stage| Pass { kind, stage, mb: pass.mb };
    let backward_of = |stage: Stage| {
        if index.first(at(PassKind::BW, stage)).is_some() {
            at(PassKind::BW, stage)
        } else {
            at(PassKind::B, stage)
        }
    };
    let deps = match pass.kind {
        PassKind::F => [chain.prev(pass.stage).map(|prev| at(PassKind::F, prev)), None],
        PassKind::B | PassKind::BW => {
            let restored = if index.first(at(PassKind::R, pass.stage)).is_some() { PassKind::R } else { PassKind::F };
            [Some(at(restored, pass.stage)), chain.next(pass.stage).map(backward_of)]
        }
        PassKind::W => [Some(at(PassKind::B, pass.stage)), None],
        PassKind::R => [Some(at(PassKind::F, pass.stage)), None],
    };
    deps.into_iter().flatten()
}

/// `F(mb 3, stage 1)`: how diagnostics name a pass.
pub(crate) fn describe(pass: Pass) -> String {
    format!("{}(mb {}, stage {})", pass.kind, pass.mb.0, pass.stage.0)
}
