//! Rank programs without frees -> rank programs that free every buffer
//! right after its last use on the rank.

use std::collections::HashMap;
use stp_ir::{Buffer, Instr, Program};

pub(super) fn run(program: &mut Program) {
    let num_stages = program.schedule.num_stages;
    for rank in &mut program.ranks {
        let mut last_use: HashMap<Buffer, usize> = HashMap::new();
        for (i, instr) in rank.instrs.iter().enumerate() {
            let used = instr.reads(num_stages).into_iter().chain(instr.writes());
            for buffer in used {
                last_use.insert(buffer, i);
            }
        }
        let mut frees_after: Vec<Vec<Buffer>> = vec![Vec::new(); rank.instrs.len()];
        for (buffer, i) in last_use {
            frees_after[i].push(buffer);
        }
        let old = std::mem::take(&mut rank.instrs);
        rank.instrs.reserve(old.len() * 2);
        for (instr, mut frees) in old.into_iter().zip(frees_after) {
            rank.instrs.push(instr);
            frees.sort();
            rank.instrs.extend(frees.into_iter().map(|buffer| Instr::Free { buffer }));
        }
    }
}
