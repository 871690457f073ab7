//! Compute schedule -> instruction streams with the point-to-point sends and
//! receives that move activations and gradients between ranks.
//!
//! A send follows the op that produces a buffer another rank consumes. The
//! consumer posts receives before the op that needs the buffer, in the
//! order the producer sends on that link: messages on a link match in posting order,
//! so when an op needs a buffer that was sent after others on the same link,
//! those others are received first and held.

use crate::elab::ComputeSchedule;
use std::collections::VecDeque;
use stp_ir::FastMap;
use stp_ir::{Buffer, BufferKind, BufferSlots, Chain, Compute, Instr, Program, Rank, RankProgram, FORMAT_VERSION};

pub(super) fn run(s: &ComputeSchedule) -> Program {
    let route = Route { s };
    let mut link_order = send_order(s, &route);
    let mut received: BufferSlots<bool> = BufferSlots::new(s.meta.num_stages, s.meta.num_microbatches);
    let ranks = (0..s.meta.num_ranks)
        .map(|r| {
            let rank = Rank(r);
            let ops = &s.ranks[r as usize];
            received.reset();
            let mut instrs = Vec::with_capacity(ops.len() * 3);
            for op in ops {
                for buffer in remote_inputs(&op.compute, s.meta.chain(), rank, &route) {
                    receive_through(buffer, rank, &route, &mut link_order, &mut received, &mut instrs);
                }
                instrs.push(Instr::Compute(op.compute.clone()));
                for buffer in op.compute.passes.iter().flat_map(|p| p.writes(s.meta.chain())) {
                    if let Some(to) = route.consumer(buffer).filter(|to| *to != rank) {
                        instrs.push(Instr::send(buffer, to));
                    }
                }
            }
            RankProgram { rank, instrs }
        })
        .collect();
    Program { version: FORMAT_VERSION, schedule: s.meta.clone(), ranks }
}

/// Where buffers are produced and consumed.
struct Route<'a> {
    s: &'a ComputeSchedule,
}

impl Route<'_> {
    fn owner(&self, stage: u32) -> Rank {
        self.s.meta.placement[stage as usize]
    }

    /// The rank that produces `buffer`: the owner of its stage.
    fn producer(&self, buffer: Buffer) -> Rank {
        self.owner(buffer.stage.0)
    }

    /// The rank that consumes `buffer` as a pass input, if any does.
    fn consumer(&self, buffer: Buffer) -> Option<Rank> {
        let chain = self.s.meta.chain();
        let stage = match buffer.kind {
            BufferKind::Act => chain.next(buffer.stage)?,
            BufferKind::Grad => chain.prev(buffer.stage)?,
            BufferKind::Stash => return None,
        };
        Some(self.owner(stage.0))
    }
}

/// Per directed link (from, to), the buffers in the order the sender sends them.
fn send_order(s: &ComputeSchedule, route: &Route) -> FastMap<(Rank, Rank), VecDeque<Buffer>> {
    let mut order: FastMap<(Rank, Rank), VecDeque<Buffer>> = FastMap::default();
    for (r, ops) in s.ranks.iter().enumerate() {
        let from = Rank(r as u32);
        let chain = s.meta.chain();
        for buffer in ops.iter().flat_map(|op| op.compute.passes.iter().flat_map(move |p| p.writes(chain))) {
            if let Some(to) = route.consumer(buffer).filter(|to| *to != from) {
                order.entry((from, to)).or_default().push_back(buffer);
            }
        }
    }
    order
}

/// The inputs of `compute` that another rank produces (a buffer two
/// braided passes both read appears twice; receiving is idempotent).
fn remote_inputs<'a>(
    compute: &'a Compute,
    chain: Chain,
    rank: Rank,
    route: &'a Route,
) -> impl Iterator<Item = Buffer> + 'a {
    compute
        .passes
        .iter()
        .flat_map(move |p| p.reads(chain))
        .filter(move |b| b.kind != BufferKind::Stash && route.producer(*b) != rank)
}

/// Posts receives on the link that carries `buffer`, in send order, until
/// `buffer` itself has been received.
fn receive_through(
    buffer: Buffer,
    rank: Rank,
    route: &Route,
    link_order: &mut FastMap<(Rank, Rank), VecDeque<Buffer>>,
    received: &mut BufferSlots<bool>,
    instrs: &mut Vec<Instr>,
) {
    let from = route.producer(buffer);
    let Some(queue) = link_order.get_mut(&(from, rank)) else { return };
    while !received.get(buffer) {
        let Some(next) = queue.pop_front() else { return };
        instrs.push(Instr::recv(next, from));
        received.set(next, true);
    }
}
