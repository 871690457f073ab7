//! Executes rank programs: without timing to find deadlocks, under buffered
//! or rendezvous point-to-point semantics (this file), and with timing
//! under a cost model ([`timed`]).
//!
//! Compute and frees complete at once. A [`Instr::Comm`] posts all its
//! transfers and completes when each has: under [`Semantics::Buffered`] a
//! send completes when posted and a receive when its message has been sent;
//! under [`Semantics::Rendezvous`] a send and its receive complete together,
//! once both are posted. On every link messages complete in order. Running
//! ranks as far as they can go and stopping when none can is exact for this
//! model: completing one transfer never prevents another.

mod timed;

pub use timed::{
    held_back, simulate, simulate_with, time_units, CostModel, HeldBack, RankTimeline, Span, StageTimes, Stream,
    Timeline,
};

use crate::ids::Rank;
use crate::program::{Direction, Instr, Program, Transfer};
use crate::slots::FastMap;
use std::collections::VecDeque;
use std::fmt;

/// How a send behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Semantics {
    /// A send completes as soon as it is posted (unbounded buffering).
    Buffered,
    /// A send completes only together with its matching receive, once both
    /// are posted: NCCL's point-to-point behaviour.
    Rendezvous,
}

impl fmt::Display for Semantics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Semantics::Buffered => "buffered",
            Semantics::Rendezvous => "rendezvous",
        })
    }
}

/// Why a posted transfer has not completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The peer has not posted the matching transfer.
    PeerNotPosted,
    /// An earlier message on the same link has not completed.
    EarlierMessage,
}

/// A transfer a blocked rank is waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The transfer.
    pub transfer: Transfer,
    /// Why it has not completed.
    pub wait: Wait,
}

/// One rank that cannot proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The rank.
    pub rank: Rank,
    /// Index of the instruction it is blocked in.
    pub instr: usize,
    /// Its transfers that have not completed.
    pub pending: Vec<Pending>,
    /// When it is blocked in a gradient reduction ([`Instr::Reduce`]):
    /// the ranks that have not reached it. Empty otherwise.
    pub waiting_for: Vec<Rank>,
}

/// A state in which some ranks have instructions left and none can proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlock {
    /// The semantics under which it happens.
    pub semantics: Semantics,
    /// Every rank that has not finished, in rank order.
    pub blocked: Vec<Blocked>,
}

impl fmt::Display for Deadlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "deadlock under {} sends:", self.semantics)?;
        for b in &self.blocked {
            let mut pending: Vec<String> = b.pending.iter().map(|p| p.transfer.to_string()).collect();
            if !b.waiting_for.is_empty() {
                let ranks: Vec<String> = b.waiting_for.iter().map(Rank::to_string).collect();
                pending.push(format!("gradient reduction waiting for {}", ranks.join(", ")));
            }
            writeln!(f, "  {} blocked in instruction {}: {}", b.rank, b.instr, pending.join(", "))?;
        }
        Ok(())
    }
}

type Link = (Rank, Rank);

/// The gradient reductions ([`Instr::Reduce`]) ranks have reached: a
/// reduction completes once every rank that owns one of its stages has
/// reached it (a collective), and not before.
#[derive(Default)]
struct Reductions {
    /// Per reduction (keyed by its first stage): the ranks there and when
    /// each arrived.
    arrived: FastMap<u32, Vec<(usize, f64)>>,
}

impl Reductions {
    /// Records rank `r` reaching the reduction over `stages` at time `at`
    /// (once). Returns, when every owner has arrived, the last arrival's
    /// time and the other owners (to wake).
    fn arrive(&mut self, program: &Program, stages: &[crate::Stage], r: usize, at: f64) -> Option<(f64, Vec<usize>)> {
        let owners = program.schedule.owners(stages);
        let here = self.arrived.entry(stages.first().map_or(0, |s| s.0)).or_default();
        if !here.iter().any(|(q, _)| *q == r) {
            here.push((r, at));
        }
        (here.len() >= owners.len()).then(|| {
            let last = here.iter().map(|(_, t)| *t).fold(0.0, f64::max);
            (last, owners.iter().map(|o| o.index()).filter(|o| *o != r).collect())
        })
    }

    /// The owners of the reduction over `stages` that have not reached it.
    fn missing(&self, program: &Program, stages: &[crate::Stage]) -> Vec<Rank> {
        let here = self.arrived.get(&stages.first().map_or(0, |s| s.0));
        let owners = program.schedule.owners(stages);
        owners.into_iter().filter(|o| !here.is_some_and(|h| h.iter().any(|(q, _)| *q == o.index()))).collect()
    }
}

/// Where rank `r` is blocked in a gradient reduction: the owners that have
/// not reached it (empty when it is not in one).
fn waiting_in_reduction(program: &Program, reductions: &Reductions, r: usize, pc: usize) -> Vec<Rank> {
    match program.ranks[r].instrs.get(pc) {
        Some(Instr::Reduce { stages }) => reductions.missing(program, stages),
        _ => Vec::new(),
    }
}

/// A posted, incomplete transfer: the rank and its slot in the rank's current group.
#[derive(Debug, Clone, Copy)]
struct Posted {
    rank: Rank,
    slot: usize,
}

#[derive(Default)]
struct LinkState {
    sends_done: u32,
    recvs_done: u32,
    /// Posted, incomplete sends and receives, with their sequence numbers
    /// on the link (a handful at most: messages complete in order).
    waiting_sends: Vec<(u32, Posted)>,
    waiting_recvs: Vec<(u32, Posted)>,
    /// Where each receive on the link sits: (rank-local transfer index), by sequence number.
    recv_sites: Vec<usize>,
}

fn take_waiting(list: &mut Vec<(u32, Posted)>, seq: u32) -> Option<Posted> {
    let i = list.iter().position(|(s, _)| *s == seq)?;
    Some(list.swap_remove(i).1)
}

/// A transfer of the current group.
#[derive(Debug, Clone, Copy)]
struct Entry {
    transfer: Transfer,
    link: u32,
    seq: u32,
    done: bool,
}

/// What is known about each transfer of a rank's program before the run.
#[derive(Debug, Clone, Copy)]
struct TransferInfo {
    link: u32,
    seq: u32,
    /// Moved into an earlier group by hoisting: skip it where it was.
    moved: bool,
}

#[derive(Default)]
struct RankState {
    pc: usize,
    /// The current communication instruction's transfers, once posted.
    group: Vec<Entry>,
    posted: bool,
}

/// Runs `program` under `semantics`; returns the deadlock if it does not finish.
pub fn find_deadlock(program: &Program, semantics: Semantics) -> Result<(), Deadlock> {
    let mut sim = Sim::new(program, semantics);
    sim.run(false);
    sim.deadlock()
}

/// Moves receives earlier so that `program` runs to completion under
/// rendezvous semantics, where that is possible by regrouping alone.
///
/// The program runs until every rank is blocked. Whenever a rank is
/// blocked on a send whose receive the peer posts only in a later group
/// while the peer is itself blocked, the receive joins the peer's current
/// group (the send is already waiting, so it completes at once), and the
/// run continues. Sends never move, so no data dependency changes; FIFO
/// order on every link is kept because every earlier message on the link
/// has completed. Returns how many receives moved, or the deadlock that
/// regrouping cannot remove (a cycle of data dependencies through the ranks).
pub fn hoist_receives(program: &mut Program) -> Result<usize, Deadlock> {
    let mut sim = Sim::new(program, Semantics::Rendezvous);
    sim.run(true);
    let stuck = sim.deadlock().is_err();
    let moves = std::mem::take(&mut sim.moves);
    apply_moves(program, &moves);
    if stuck {
        // Report against the regrouped program, whose indices the caller sees.
        find_deadlock(program, Semantics::Rendezvous)?;
    }
    Ok(moves.len())
}

/// One receive moved: rank, its instruction and slot there, and the
/// instruction whose group it joins.
#[derive(Debug, Clone, Copy)]
struct Move {
    rank: usize,
    from_instr: usize,
    from_slot: usize,
    to_instr: usize,
}

fn apply_moves(program: &mut Program, moves: &[Move]) {
    // Moved receives join their new groups in the order they moved; then
    // they leave their old ones (highest slot first, so slots stay valid),
    // and groups left empty disappear.
    let mut removals: Vec<(usize, usize, usize)> = Vec::with_capacity(moves.len());
    for m in moves {
        let instrs = &mut program.ranks[m.rank].instrs;
        let t = instrs[m.from_instr].transfers()[m.from_slot];
        if let Instr::Comm(ops) = &mut instrs[m.to_instr] {
            ops.push(t);
        }
        removals.push((m.rank, m.from_instr, m.from_slot));
    }
    removals.sort_unstable_by(|a, b| b.cmp(a));
    let mut emptied = vec![false; program.ranks.len()];
    for (rank, instr, slot) in removals {
        if let Instr::Comm(ops) = &mut program.ranks[rank].instrs[instr] {
            ops.remove(slot);
            emptied[rank] |= ops.is_empty();
        }
    }
    for (rank, emptied) in program.ranks.iter_mut().zip(emptied) {
        if emptied {
            rank.instrs.retain(|i| !matches!(i, Instr::Comm(ops) if ops.is_empty()));
        }
    }
}

struct Sim<'a> {
    program: &'a Program,
    semantics: Semantics,
    /// Per rank, its transfers in program order.
    infos: Vec<Vec<TransferInfo>>,
    /// Per rank, index into `infos` of each instruction's first transfer
    /// (one more entry than instructions).
    starts: Vec<Vec<usize>>,
    ranks: Vec<RankState>,
    links: Vec<LinkState>,
    /// Receives moved into an earlier group (when hoisting).
    moves: Vec<Move>,
    reductions: Reductions,
}

/// Every transfer of a program numbered by link and position on its link.
struct TransferIndex {
    /// Per rank, its transfers in program order.
    infos: Vec<Vec<TransferInfo>>,
    /// Per rank, index into `infos` of each instruction's first transfer
    /// (one more entry than instructions).
    starts: Vec<Vec<usize>>,
    /// Per link: where each receive sits (rank-local transfer index), by sequence number.
    recv_sites: Vec<Vec<usize>>,
}

impl TransferIndex {
    fn new(program: &Program) -> TransferIndex {
        let mut link_ids: FastMap<Link, u32> = FastMap::default();
        let mut recv_sites: Vec<Vec<usize>> = Vec::new();
        let mut sent: Vec<u32> = Vec::new();
        let mut infos = Vec::with_capacity(program.ranks.len());
        let mut starts = Vec::with_capacity(program.ranks.len());
        for rp in &program.ranks {
            let mut rank_infos = Vec::new();
            let mut rank_starts = Vec::with_capacity(rp.instrs.len() + 1);
            for instr in &rp.instrs {
                rank_starts.push(rank_infos.len());
                for t in instr.transfers() {
                    let next = link_ids.len() as u32;
                    let link = *link_ids.entry(t.link(rp.rank)).or_insert(next);
                    if link as usize == recv_sites.len() {
                        recv_sites.push(Vec::new());
                        sent.push(0);
                    }
                    let seq = match t.dir {
                        Direction::Send => {
                            sent[link as usize] += 1;
                            sent[link as usize] - 1
                        }
                        Direction::Recv => {
                            recv_sites[link as usize].push(rank_infos.len());
                            recv_sites[link as usize].len() as u32 - 1
                        }
                    };
                    rank_infos.push(TransferInfo { link, seq, moved: false });
                }
            }
            rank_starts.push(rank_infos.len());
            infos.push(rank_infos);
            starts.push(rank_starts);
        }
        TransferIndex { infos, starts, recv_sites }
    }

    fn num_links(&self) -> usize {
        self.recv_sites.len()
    }
}

impl<'a> Sim<'a> {
    fn new(program: &'a Program, semantics: Semantics) -> Sim<'a> {
        let TransferIndex { infos, starts, recv_sites } = TransferIndex::new(program);
        let links = recv_sites.into_iter().map(|recv_sites| LinkState { recv_sites, ..LinkState::default() }).collect();
        Sim {
            program,
            semantics,
            infos,
            starts,
            ranks: (0..program.ranks.len()).map(|_| RankState::default()).collect(),
            links,
            moves: Vec::new(),
            reductions: Reductions::default(),
        }
    }

    /// Runs every rank as far as it goes; with `hoist`, moves receives
    /// earlier whenever that unblocks a rank, and goes on.
    fn run(&mut self, hoist: bool) {
        let n = self.program.ranks.len();
        let mut work: VecDeque<usize> = (0..n).collect();
        let mut queued = vec![true; n];
        loop {
            while let Some(r) = work.pop_front() {
                queued[r] = false;
                for woken in self.run_rank(r) {
                    if !queued[woken] {
                        queued[woken] = true;
                        work.push_back(woken);
                    }
                }
            }
            if !hoist {
                return;
            }
            match self.hoist_one() {
                Some((a, b)) => {
                    for r in [a, b] {
                        if !queued[r] {
                            queued[r] = true;
                            work.push_back(r);
                        }
                    }
                }
                None => return,
            }
        }
    }

    fn deadlock(&self) -> Result<(), Deadlock> {
        let blocked: Vec<Blocked> = (0..self.program.ranks.len()).filter_map(|r| self.blocked(r)).collect();
        if blocked.is_empty() {
            Ok(())
        } else {
            Err(Deadlock { semantics: self.semantics, blocked })
        }
    }

    /// Runs rank `r` until it finishes or blocks; returns the ranks that
    /// may proceed because of what it completed.
    fn run_rank(&mut self, r: usize) -> Vec<usize> {
        let rank = Rank(r as u32);
        let instrs = &self.program.ranks[r].instrs;
        let mut woken = Vec::new();
        while self.ranks[r].pc < instrs.len() {
            if let Instr::Reduce { stages } = &instrs[self.ranks[r].pc] {
                match self.reductions.arrive(self.program, stages, r, 0.0) {
                    Some((_, others)) => {
                        woken.extend(others);
                        self.ranks[r].pc += 1;
                        continue;
                    }
                    None => break,
                }
            }
            if !matches!(instrs[self.ranks[r].pc], Instr::Comm(_)) {
                self.ranks[r].pc += 1;
                continue;
            }
            if !self.ranks[r].posted {
                self.post(rank);
            }
            for slot in 0..self.ranks[r].group.len() {
                let entry = self.ranks[r].group[slot];
                if !entry.done {
                    if let Some(peer) = self.try_complete(rank, slot, entry) {
                        woken.push(peer);
                    }
                }
            }
            if self.ranks[r].group.iter().all(|e| e.done) {
                let state = &mut self.ranks[r];
                state.pc += 1;
                state.posted = false;
                state.group.clear();
            } else {
                break;
            }
        }
        woken
    }

    /// Posts the transfers of `rank`'s current instruction (less any moved away).
    fn post(&mut self, rank: Rank) {
        let r = rank.index();
        let pc = self.ranks[r].pc;
        let ops = self.program.ranks[r].instrs[pc].transfers();
        let first = self.starts[r][pc];
        self.ranks[r].group.clear();
        for (k, t) in ops.iter().enumerate() {
            let info = self.infos[r][first + k];
            if !info.moved {
                self.register(rank, Entry { transfer: *t, link: info.link, seq: info.seq, done: false });
            }
        }
        self.ranks[r].posted = true;
    }

    /// Adds `entry` to `rank`'s current group and to its link's waiting list.
    fn register(&mut self, rank: Rank, entry: Entry) {
        let slot = self.ranks[rank.index()].group.len();
        let link = &mut self.links[entry.link as usize];
        let waiting = match entry.transfer.dir {
            Direction::Send => &mut link.waiting_sends,
            Direction::Recv => &mut link.waiting_recvs,
        };
        waiting.push((entry.seq, Posted { rank, slot }));
        self.ranks[rank.index()].group.push(entry);
    }

    /// Completes the transfer in `slot` of `rank`'s current group if it can;
    /// returns a peer that may proceed now (its transfer completed with this
    /// one, or it may be waiting for the message just sent).
    fn try_complete(&mut self, rank: Rank, slot: usize, entry: Entry) -> Option<usize> {
        let (t, seq) = (entry.transfer, entry.seq);
        let link = &mut self.links[entry.link as usize];
        let in_order = match t.dir {
            Direction::Send => link.sends_done == seq,
            Direction::Recv => link.recvs_done == seq,
        };
        if !in_order {
            return None;
        }
        let wake = match (self.semantics, t.dir) {
            (Semantics::Buffered, Direction::Send) => {
                link.sends_done += 1;
                take_waiting(&mut link.waiting_sends, seq);
                // The receiver may be waiting for this message.
                Some(t.peer.index())
            }
            (Semantics::Buffered, Direction::Recv) => {
                if link.sends_done <= seq {
                    return None;
                }
                link.recvs_done += 1;
                take_waiting(&mut link.waiting_recvs, seq);
                None
            }
            (Semantics::Rendezvous, dir) => {
                if link.sends_done != seq || link.recvs_done != seq {
                    return None;
                }
                let (mine, theirs) = match dir {
                    Direction::Send => (&mut link.waiting_sends, &mut link.waiting_recvs),
                    Direction::Recv => (&mut link.waiting_recvs, &mut link.waiting_sends),
                };
                let other = take_waiting(theirs, seq)?;
                take_waiting(mine, seq);
                link.sends_done += 1;
                link.recvs_done += 1;
                self.ranks[other.rank.index()].group[other.slot].done = true;
                Some(other.rank.index())
            }
        };
        self.ranks[rank.index()].group[slot].done = true;
        wake
    }

    /// Finds a blocked send whose receive the (blocked) peer posts only
    /// later, and moves that receive into the peer's current group.
    /// Returns the two ranks to run again.
    fn hoist_one(&mut self) -> Option<(usize, usize)> {
        for a in 0..self.ranks.len() {
            for k in 0..self.ranks[a].group.len() {
                let entry = self.ranks[a].group[k];
                if entry.done || entry.transfer.dir != Direction::Send {
                    continue;
                }
                let link = &self.links[entry.link as usize];
                let ready = link.sends_done == entry.seq
                    && link.recvs_done == entry.seq
                    && !link.waiting_recvs.iter().any(|(s, _)| *s == entry.seq);
                let b = entry.transfer.peer.index();
                let Some(&flat) = link.recv_sites.get(entry.seq as usize) else { continue };
                let to_instr = self.ranks[b].pc;
                if !ready || !self.ranks[b].posted || flat < self.starts[b][to_instr + 1] {
                    continue;
                }
                let from_instr = self.starts[b].partition_point(|&s| s <= flat) - 1;
                let from_slot = flat - self.starts[b][from_instr];
                self.infos[b][flat].moved = true;
                self.moves.push(Move { rank: b, from_instr, from_slot, to_instr });
                let transfer = self.program.ranks[b].instrs[from_instr].transfers()[from_slot];
                self.register(Rank(b as u32), Entry { transfer, link: entry.link, seq: entry.seq, done: false });
                return Some((a, b));
            }
        }
        None
    }

    fn blocked(&self, r: usize) -> Option<Blocked> {
        let state = &self.ranks[r];
        let instrs = &self.program.ranks[r].instrs;
        if state.pc >= instrs.len() {
            return None;
        }
        let rank = Rank(r as u32);
        let pending = state
            .group
            .iter()
            .filter(|e| !e.done)
            .map(|e| {
                let link = &self.links[e.link as usize];
                let earlier = match e.transfer.dir {
                    Direction::Send => link.sends_done < e.seq,
                    Direction::Recv => link.recvs_done < e.seq,
                };
                Pending { transfer: e.transfer, wait: if earlier { Wait::EarlierMessage } else { Wait::PeerNotPosted } }
            })
            .collect();
        let waiting_for = waiting_in_reduction(self.program, &self.reductions, r, state.pc);
        Some(Blocked { rank, instr: state.pc, pending, waiting_for })
    }
}
