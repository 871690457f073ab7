//! With several pipelines: every rank that owns a copy of a model part
//! ends its program with one gradient reduction over all the part's copies
//! ([`stp_ir::Instr::Reduce`]), in part order. The same order on every rank
//! is what makes the reductions — collectives over overlapping sets of
//! ranks — free of deadlock among themselves; at the end of the step they
//! come after every backward they sum, as a data-parallel all-reduce does.

use stp_ir::{Instr, Program};

pub(super) fn run(program: &mut Program) {
    let sets = program.schedule.copy_sets();
    for rank in &mut program.ranks {
        for set in &sets {
            if program.schedule.owners(set).contains(&rank.rank) {
                rank.instrs.push(Instr::Reduce { stages: set.clone() });
            }
        }
    }
}
