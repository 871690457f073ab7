//! Rank programs without frees -> rank programs that free every buffer
//! right after its last use on the rank.

use stp_ir::{on_rank_halves_mut, Buffer, BufferSlots, Instr, Program, RankProgram};

pub(super) fn run(program: &mut Program) {
    let meta = &program.schedule;
    let (chain, stages, mbs) = (meta.chain(), meta.num_stages, meta.num_microbatches);
    let free_all = |ranks: &mut [RankProgram]| {
        let mut seen: BufferSlots<bool> = BufferSlots::new(stages, mbs);
        for rank in ranks {
            insert_into(rank, chain, &mut seen);
        }
    };
    // Each rank's frees depend on its own program only.
    on_rank_halves_mut(&mut program.ranks, free_all);
}

fn insert_into(rank: &mut RankProgram, chain: stp_ir::Chain, seen: &mut BufferSlots<bool>) {
    seen.reset();
    // Walking backwards, the first time a buffer appears is its last use.
    let mut frees_after: Vec<(usize, Buffer)> = Vec::new();
    for (i, instr) in rank.instrs.iter().enumerate().rev() {
        let first_in_instr = frees_after.len();
        for buffer in instr.reads(chain).chain(instr.writes(chain)) {
            if !seen.get(buffer) {
                seen.set(buffer, true);
                frees_after.push((i, buffer));
            }
        }
        frees_after[first_in_instr..].sort_unstable_by(|a, b| b.cmp(a));
    }
    let old = std::mem::take(&mut rank.instrs);
    rank.instrs.reserve(old.len() + frees_after.len());
    for (i, instr) in old.into_iter().enumerate() {
        rank.instrs.push(instr);
        while let Some((_, buffer)) = frees_after.pop_if(|(after, _)| *after == i) {
            rank.instrs.push(Instr::Free { buffer });
        }
    }
}
