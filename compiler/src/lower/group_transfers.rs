//! Rank programs with one transfer per instruction -> rank programs whose
//! runs of consecutive transfers are posted as one group.

use stp_ir::{Instr, Program};

pub(super) fn run(program: &mut Program) {
    for rank in &mut program.ranks {
        let old = std::mem::take(&mut rank.instrs);
        let mut out: Vec<Instr> = Vec::with_capacity(old.len());
        for instr in old {
            match (out.last_mut(), instr) {
                (Some(Instr::Comm(group)), Instr::Comm(ops)) => group.extend(ops),
                (_, instr) => out.push(instr),
            }
        }
        rank.instrs = out;
    }
}
