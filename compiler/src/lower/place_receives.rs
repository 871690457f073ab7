//! Rank programs whose receives sit where the earlier passes put them ->
//! the same programs with receives moved between groups wherever that
//! shortens the timed simulation of the step under the schedule's cost
//! model.
//!
//! Why: transfers to and from one peer share a stream (as NCCL's
//! point-to-point operations between two ranks do), so a receive posted in
//! a group that waits long — one `hoist_receives` filled to break a
//! deadlock, say — holds back every later transfer with that peer, sends
//! included. Planning times each transfer on its own and cannot see this;
//! on ZB-V at p = 4, m = 12 under the 12.1B model's costs it cost 0.65 time
//! units (0.85%) until receives were moved.
//!
//! How: a first-improvement local search guided by the simulator, which
//! says where a transfer waited for its stream ([`held_back`]). The
//! receives from that peer in that group and the few before it are tried
//! in each of the [`REACH`] groups before and after their own (never past
//! an instruction that reads the buffer, never past another receive on
//! the link, so every link's k-th send still meets its k-th receive: it
//! may join that receive's group, just ahead of it); a
//! move is kept when the simulated makespan drops and the program still
//! verifies, and the search starts over from the new program's waits. It
//! stops when no suspect moves or [`WORK`] is spent. Sends never move:
//! they follow their producers.

use stp_ir::simulate::{held_back, simulate, CostModel, HeldBack};
use stp_ir::{verify, Direction, Instr, Program, Transfer};

/// How many groups away a receive may move in one step: one was too few
/// (ZB-V, (c) costs: 77.10 where 3 reach 76.85, the planned makespan).
const REACH: usize = 3;

/// How many transfer groups, back from one where a transfer waited, may
/// hold the receive that kept the stream busy (ZB-V, (c) costs: 8 left it
/// at 76.97, 16 reach the planned 76.85).
const SUSPECT_WINDOW: usize = 16;

/// How much the search may simulate, in instructions (each trial
/// simulates the whole program); a count, not a clock, so the result does
/// not depend on the machine. At p = 4, m = 12 the search needs at most
/// 700 trials of about 700 instructions (20 ms here); at p = 32, m = 256
/// (100,000 instructions) it stops after 40 trials, about half a second.
const WORK: usize = 4_000_000;

/// Moves receives while the simulated makespan under `cost` shrinks;
/// returns how many moves were kept. Nothing moves when transfers are free
/// (`p2p` = 0: measured, there is nothing to gain) or the program
/// deadlocks.
pub(super) fn run(program: &mut Program, cost: &CostModel) -> usize {
    if cost.p2p <= 0.0 {
        return 0;
    }
    let size: usize = program.ranks.iter().map(|r| r.instrs.len()).sum::<usize>().max(1);
    let mut trials_left = WORK / size;
    let mut kept = 0;
    while trials_left > 0 {
        let Ok(held) = held_back(program, cost) else { return kept };
        let mut best = held.makespan;
        let moved = suspects(program, &held)
            .into_iter()
            .any(|(rank, at, slot)| try_moves(program, cost, rank, (at, slot), &mut best, &mut trials_left));
        if !moved {
            break;
        }
        kept += 1;
    }
    kept
}

/// The receives that may have held a transfer back, or were held back
/// themselves: on each rank, those from the peer in the group where a
/// transfer waited for its stream and in the [`SUSPECT_WINDOW`] transfer groups
/// before it. As (rank, instruction, slot), each once.
fn suspects(program: &Program, held: &HeldBack) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (rank, groups) in held.groups.iter().enumerate() {
        let instrs = &program.ranks[rank].instrs;
        for &(at, peer) in groups {
            let recent = (0..=at).rev().filter(|&j| matches!(instrs[j], Instr::Comm(_))).take(SUSPECT_WINDOW);
            for j in recent {
                let Instr::Comm(ops) = &instrs[j] else { continue };
                for (slot, t) in ops.iter().enumerate() {
                    if t.dir == Direction::Recv && t.peer == peer && seen.insert((rank, j, slot)) {
                        out.push((rank, j, slot));
                    }
                }
            }
        }
    }
    out
}

/// Tries the receive at (`at`, `slot`) of `rank` in each group within
/// [`REACH`]; keeps the first move that shortens the step.
fn try_moves(
    program: &mut Program,
    cost: &CostModel,
    rank: usize,
    (at, slot): (usize, usize),
    best: &mut f64,
    trials_left: &mut usize,
) -> bool {
    let Instr::Comm(ops) = &program.ranks[rank].instrs[at] else { return false };
    let t = ops[slot];
    if t.dir != Direction::Recv {
        return false;
    }
    for to in destinations(program, rank, at, slot, t) {
        if *trials_left == 0 {
            return false;
        }
        *trials_left -= 1;
        let trial = moved(program, rank, (at, slot), to);
        let Ok(timeline) = simulate(&trial, cost) else { continue };
        if timeline.makespan < *best - 1e-9 && verify(&trial).is_ok() {
            *best = timeline.makespan;
            *program = trial;
            return true;
        }
    }
    false
}

/// The groups the receive `t` at (`at`, `slot`) may join: up to [`REACH`]
/// before it and after it, stopping at an instruction that reads its
/// buffer or another receive on its link (whose order must hold).
fn destinations(program: &Program, rank: usize, at: usize, slot: usize, t: Transfer) -> Vec<usize> {
    let instrs = &program.ranks[rank].instrs;
    let chain = program.schedule.chain();
    let same_link = |o: &Transfer| o.dir == Direction::Recv && o.peer == t.peer;
    let Instr::Comm(own) = &instrs[at] else { return Vec::new() };
    let mut out = Vec::new();
    if !own[..slot].iter().any(same_link) {
        for (j, instr) in instrs[..at].iter().enumerate().rev() {
            if let Instr::Comm(ops) = instr {
                out.push(j);
                if out.len() == REACH || ops.iter().any(same_link) {
                    break;
                }
            }
        }
    }
    if own[slot + 1..].iter().any(same_link) {
        return out;
    }
    let mut later = 0;
    for (j, instr) in instrs.iter().enumerate().skip(at + 1) {
        if instr.reads(chain).any(|b| b == t.buffer) {
            break;
        }
        if let Instr::Comm(ops) = instr {
            out.push(j);
            later += 1;
            // It may join the next receive on its link, just ahead of it.
            if later == REACH || ops.iter().any(same_link) {
                break;
            }
        }
    }
    out
}

/// `program` with the receive at (`at`, `slot`) of `rank` moved to the end
/// of group `to`, or just ahead of a later receive on its link there (its
/// old group dropped if that leaves it empty).
fn moved(program: &Program, rank: usize, (at, slot): (usize, usize), to: usize) -> Program {
    let mut trial = program.clone();
    let instrs = &mut trial.ranks[rank].instrs;
    let Instr::Comm(ops) = &mut instrs[at] else { return trial };
    let t = ops.remove(slot);
    let emptied = ops.is_empty();
    if let Instr::Comm(ops) = &mut instrs[to] {
        let same_link = |o: &Transfer| o.dir == Direction::Recv && o.peer == t.peer;
        match ops.iter().position(same_link).filter(|_| to > at) {
            Some(ahead) => ops.insert(ahead, t),
            None => ops.push(t),
        }
    }
    if emptied {
        instrs.remove(at);
    }
    trial
}
