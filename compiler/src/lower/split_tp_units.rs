//! Rank programs without tensor parallelism -> the same programs for a TP
//! group of `tp` ranks: every compute lists its units (attention and MLP
//! pieces, each with its all-reduce, or with sequence parallelism its
//! reduce-scatter and all-gather) in the canonical order, which for a
//! braided pair alternates the two passes so each one's all-reduce runs
//! under the other's compute.

use stp_ir::{Collective, Instr, Program};

pub(super) fn run(program: &mut Program, tp: u32, sequence_parallel: bool) {
    let collective = if sequence_parallel { Collective::ReduceScatterAllGather } else { Collective::AllReduce };
    program.schedule.tp = tp;
    if tp <= 1 {
        return;
    }
    for rank in &mut program.ranks {
        for instr in &mut rank.instrs {
            if let Instr::Compute(c) = instr {
                c.units = c.canonical_units_with(collective);
            }
        }
    }
}
