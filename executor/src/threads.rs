//! What the two thread-per-shard runners — the CPU backend ([`crate::cpu`])
//! and the stream runner ([`crate::streams`]) — share: the channels
//! between shard threads and the IR's send/receive matching over them,
//! the board the deadlock watchdog reads, waiting in short slices with a
//! timeout, and assembling the report from the threads' results.

use crate::model::{self, Model, ShardGrads, Tensor};
use crate::ExecError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use stp_ir::simulate::Semantics;
use stp_ir::{Buffer, Direction, Program, Rank, Transfer};

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct CpuOptions {
    /// Rendezvous (a group completes when its sends have been received, as
    /// NCCL) or buffered sends.
    pub semantics: Semantics,
    /// How long any thread may wait before the run is declared deadlocked.
    pub timeout: Duration,
    /// Stream backends: wait for the device after every instruction, so no
    /// two streams' work overlaps. A debugging aid: a result that is wrong
    /// only without it points at a missing wait between streams (or a
    /// buffer reused before a reader on another stream was done).
    pub serialize: bool,
}

impl Default for CpuOptions {
    fn default() -> CpuOptions {
        CpuOptions { semantics: Semantics::Rendezvous, timeout: Duration::from_secs(2), serialize: false }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct CpuReport {
    /// The ranks this process ran (all of them, unless it is one process
    /// of a multi-process run); `peak_stashes` and `timeline` follow this
    /// order.
    pub ranks: Vec<Rank>,
    /// Per model part (stage of one pipeline; every stage with one), the
    /// weight gradients (`4 · tp` tensors, see [`crate::model::accumulate`])
    /// summed over microbatches in microbatch order. With several
    /// pipelines every rank holds its parts' whole gradient only through
    /// the program's gradient reductions; a rank that ends without one is
    /// an error.
    pub gradients: Vec<Vec<Tensor>>,
    /// Per rank run, the most activation stashes live at once, counted between
    /// compute instructions (after the frees that follow each), as the
    /// checker counts memory.
    pub peak_stashes: Vec<usize>,
    /// Per rank run (its first shard), (instruction, start, end) in
    /// seconds since the run began.
    pub timeline: Vec<Vec<(usize, f64, f64)>>,
}

/// Where every thread is, for the watchdog's report; and whether the run
/// has been declared stuck.
pub(crate) struct Board {
    at: Mutex<Vec<Option<usize>>>,
    stuck: AtomicBool,
}

impl Board {
    pub(crate) fn new(threads: usize) -> Board {
        Board { at: Mutex::new(vec![Some(0); threads]), stuck: AtomicBool::new(false) }
    }

    /// Thread `thread` is at instruction `instr`.
    pub(crate) fn enter(&self, thread: usize, instr: usize) {
        if let Ok(mut at) = self.at.lock() {
            at[thread] = Some(instr);
        }
    }

    /// Thread `thread` has run its last instruction.
    pub(crate) fn finish(&self, thread: usize) {
        if let Ok(mut at) = self.at.lock() {
            at[thread] = None;
        }
    }

    /// Declares the run stuck: every waiting thread gives up.
    pub(crate) fn stop(&self) -> ExecError {
        self.stuck.store(true, Ordering::SeqCst);
        ExecError::Stuck
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stuck.load(Ordering::SeqCst)
    }

    /// Waits on `poll` in short slices until it yields, the run is declared
    /// stuck elsewhere, or this thread has waited past `timeout`.
    pub(crate) fn wait<T>(
        &self,
        timeout: Duration,
        mut poll: impl FnMut() -> Option<Result<T, RecvTimeoutError>>,
    ) -> Result<T, ExecError> {
        let started = Instant::now();
        loop {
            match poll() {
                Some(Ok(value)) => return Ok(value),
                Some(Err(RecvTimeoutError::Timeout)) => {}
                Some(Err(RecvTimeoutError::Disconnected)) | None => return Err(self.stop()),
            }
            if self.stopped() || started.elapsed() > timeout {
                return Err(self.stop());
            }
        }
    }

    /// Whether a thread that started waiting at `started` should give up.
    pub(crate) fn gives_up(&self, started: Instant, timeout: Duration) -> bool {
        if self.stopped() || started.elapsed() > timeout {
            self.stop();
            return true;
        }
        false
    }
}

/// How long one slice of a wait lasts.
pub(crate) fn slice() -> Duration {
    Duration::from_millis(20)
}

/// What one shard thread produced.
pub(crate) struct ThreadResult {
    /// ((stage, microbatch), this shard's weight gradients).
    pub(crate) grads: Vec<((usize, usize), ShardGrads)>,
    pub(crate) peak_stashes: usize,
    /// (instruction, start, end) in seconds since the run began.
    pub(crate) timeline: Vec<(usize, f64, f64)>,
}

/// The report of a run of `ranks`' shard threads (thread `t` being shard
/// `t % tp` of `ranks[t / tp]`), or the error that stopped it: a thread's
/// own failure first, else the deadlock the board shows.
pub(crate) fn report(
    program: &Program,
    model: &Model,
    ranks: &[usize],
    board: &Board,
    results: Vec<Result<ThreadResult, ExecError>>,
) -> Result<CpuReport, ExecError> {
    let tp = program.schedule.tp as usize;
    // A thread that failed outright stopped the others; its error is the news.
    if let Some(i) = results
        .iter()
        .position(|r| matches!(r, Err(ExecError::Runtime { .. } | ExecError::Panicked | ExecError::Setup(_))))
    {
        return Err(results.into_iter().nth(i).and_then(Result::err).unwrap_or(ExecError::Panicked));
    }
    if board.stopped() {
        let at = board.at.lock().map(|v| v.clone()).unwrap_or_default();
        let blocked = at
            .iter()
            .enumerate()
            .filter(|(t, _)| t % tp == 0)
            .filter_map(|(t, i)| {
                let i = (*i)?;
                let rank = ranks[t / tp];
                let instr = program.ranks[rank].instrs.get(i)?;
                Some((Rank(rank as u32), i, instr.to_string().replace('\n', " ")))
            })
            .collect();
        return Err(ExecError::Deadlock { blocked });
    }
    let meta = &program.schedule;
    let (parts, mbs) = (meta.parts() as usize, meta.num_microbatches as usize);
    // grads[mb][part][shard]
    let mut grads: Vec<Vec<Vec<ShardGrads>>> = vec![vec![vec![ShardGrads::default(); tp]; parts]; mbs];
    let mut peak_stashes = vec![0; ranks.len()];
    let mut timeline = vec![Vec::new(); ranks.len()];
    for (t, result) in results.into_iter().enumerate() {
        let result = result?;
        if t % tp == 0 {
            whole_gradients(program, Rank(ranks[t / tp] as u32), &result.grads)?;
        }
        for ((stage, mb), g) in result.grads {
            // After a reduction the owners of a part's copies hold the same
            // contributions: any one of them fills the slot.
            let slot = &mut grads[mb][meta.chain().part(stp_ir::Stage(stage as u32)) as usize][t % tp];
            for (mine, part) in [(&mut slot.a1, g.a1), (&mut slot.b1, g.b1), (&mut slot.a2, g.a2), (&mut slot.b2, g.b2)]
            {
                if part.is_some() {
                    *mine = part;
                }
            }
        }
        if t % tp == 0 {
            peak_stashes[t / tp] = result.peak_stashes;
            timeline[t / tp] = result.timeline;
        }
    }
    // Summed in microbatch order, so the floats do not depend on the schedule.
    let mut gradients: Vec<Vec<Tensor>> = model.zero_gradients();
    for per_stage in &grads {
        for (s, shards) in per_stage.iter().enumerate() {
            for (k, g) in shards.iter().enumerate() {
                model::accumulate(&mut gradients[s], tp, k, g);
            }
        }
    }
    Ok(CpuReport { ranks: ranks.iter().map(|r| Rank(*r as u32)).collect(), gradients, peak_stashes, timeline })
}

/// Checks that `rank` ends the step holding, for every model part it owns
/// a copy of, the contribution of every microbatch of every copy: what the
/// gradient reductions are for (with one pipeline, its own stages').
fn whole_gradients(program: &Program, rank: Rank, grads: &[((usize, usize), ShardGrads)]) -> Result<(), ExecError> {
    let meta = &program.schedule;
    let chain = meta.chain();
    let held: std::collections::HashSet<(usize, usize)> = grads.iter().map(|(key, _)| *key).collect();
    for (s, owner) in meta.placement.iter().enumerate() {
        if *owner != rank {
            continue;
        }
        let part = chain.part(stp_ir::Stage(s as u32));
        let copies = (0..meta.pipelines.max(1)).map(|j| (j * chain.len + part) as usize);
        let expected: usize = copies.clone().map(|c| meta.pairs_of(stp_ir::Stage(c as u32)).count()).sum();
        let got = copies
            .flat_map(|c| meta.pairs_of(stp_ir::Stage(c as u32)).map(move |mb| (c, mb.index())))
            .filter(|k| held.contains(k))
            .count();
        if got != expected {
            return Err(ExecError::Runtime {
                rank,
                instr: program.ranks[rank.index()].instrs.len(),
                message: format!(
                    "ends the step with the weight gradient of part {part} over {got} of its {expected} \
                     microbatch contributions: its copies' gradients were never reduced"
                ),
            });
        }
    }
    Ok(())
}

/// The gradient reduction `reduce stages` ([`stp_ir::Instr::Reduce`]) on
/// one shard thread: sends this rank's weight-gradient contributions to
/// those stages (one message per microbatch, tagged with the pair's stash
/// buffer, which never travels otherwise) to every other rank that owns a
/// copy, then takes in theirs. Afterwards every owner holds every
/// contribution, and sums them in microbatch order as a one-pipeline run
/// does: the gradients equal the sequential run's bit for bit. The data
/// channels are FIFO and every earlier transfer between two owners has
/// been received before either reaches its reduction (verified programs
/// match all of them first), so the contributions come next on the link.
/// `carry` turns a host tensor into the party's message and back (the
/// stream runner's local links carry device matrices).
pub(crate) fn reduce_gradients<M, P: Party<M>>(
    party: &mut P,
    reduction: Reduction<'_>,
    grads: &mut Vec<((usize, usize), ShardGrads)>,
    instr: usize,
    carry: Carry<P, M>,
) -> Result<(), ExecError> {
    let Reduction { program, model, rank, shard, stages } = reduction;
    let meta = &program.schedule;
    let peers: Vec<Rank> = meta.owners(stages).into_iter().filter(|r| *r != rank).collect();
    let mine: Vec<((usize, usize), Tensor)> = grads
        .iter()
        .filter(|((s, _), _)| stages.iter().any(|st| st.index() == *s))
        .map(|(key, g)| (*key, g.flatten()))
        .collect();
    for peer in &peers {
        let mut messages = Vec::with_capacity(mine.len());
        for ((s, mb), flat) in &mine {
            let tag = Buffer::stash(stp_ir::Stage(*s as u32), stp_ir::Microbatch(*mb as u32));
            messages.push((tag, (carry.pack)(party, flat.clone(), instr)?));
        }
        let port = party
            .ports()
            .and_then(|p| p.data_out.get(peer))
            .ok_or_else(|| party.fail(instr, format!("no link to {peer}")))?;
        for message in messages {
            port.send(message).map_err(|_| party.fail(instr, format!("{peer} has stopped")))?;
        }
    }
    let timeout = party.options().timeout;
    for peer in &peers {
        let theirs: Vec<stp_ir::Stage> = stages.iter().copied().filter(|s| meta.owner(*s) == Some(*peer)).collect();
        let expected: usize = theirs.iter().map(|s| meta.pairs_of(*s).count()).sum();
        for _ in 0..expected {
            let ports = party.ports();
            let (tag, message) =
                party.board().wait(timeout, || ports?.data_in.get(peer).map(|rx| rx.recv_timeout(slice())))?;
            let flat = (carry.unpack)(party, message, instr)?;
            let weights = model.stages.get(meta.chain().part(tag.stage) as usize).and_then(|w| w.get(shard));
            let g = weights.and_then(|w| ShardGrads::unflatten(&flat, w)).filter(|_| theirs.contains(&tag.stage));
            let g = g.ok_or_else(|| {
                party.fail(instr, format!("{peer} sent {tag} during the reduction of {stages:?}, not a gradient of it"))
            })?;
            grads.push(((tag.stage.index(), tag.mb.index()), g));
        }
    }
    Ok(())
}

/// What a gradient reduction reduces, and where.
pub(crate) struct Reduction<'a> {
    pub(crate) program: &'a Program,
    pub(crate) model: &'a Model,
    pub(crate) rank: Rank,
    pub(crate) shard: usize,
    pub(crate) stages: &'a [stp_ir::Stage],
}

/// How a party's messages carry host tensors: `pack` one to send, `unpack`
/// one received.
pub(crate) struct Carry<P, M> {
    pub(crate) pack: fn(&mut P, Tensor, usize) -> Result<M, ExecError>,
    pub(crate) unpack: fn(&mut P, M, usize) -> Result<Tensor, ExecError>,
}

impl<P> Carry<P, Tensor> {
    /// Messages that are host tensors already.
    pub(crate) fn host() -> Carry<P, Tensor> {
        Carry { pack: |_, t, _| Ok(t), unpack: |_, t, _| Ok(t) }
    }
}

/// One shard thread's channels to the same shard of every peer rank:
/// messages (a buffer and its value) and, under rendezvous semantics,
/// acknowledgements. In one process they go straight to the peer's
/// thread; across processes, to the threads that move frames over TCP
/// ([`crate::launch`]).
pub(crate) struct Ports<M> {
    pub(crate) data_out: HashMap<Rank, Sender<(Buffer, M)>>,
    pub(crate) data_in: HashMap<Rank, Receiver<(Buffer, M)>>,
    pub(crate) ack_out: HashMap<Rank, Sender<Buffer>>,
    pub(crate) ack_in: HashMap<Rank, Receiver<Buffer>>,
}

impl<M> Default for Ports<M> {
    fn default() -> Self {
        Ports { data_out: HashMap::new(), data_in: HashMap::new(), ack_out: HashMap::new(), ack_in: HashMap::new() }
    }
}

/// Ports for `ranks` ranks of `tp` shards each, thread `r * tp + k` being
/// shard `k` of rank `r`: every shard linked to the same shard of every
/// other rank.
pub(crate) fn mesh<M>(ranks: usize, tp: usize) -> Vec<Ports<M>> {
    let mut ports: Vec<Ports<M>> = (0..ranks * tp).map(|_| Ports::default()).collect();
    for k in 0..tp {
        for a in 0..ranks {
            for b in (0..ranks).filter(|b| *b != a) {
                let (data_tx, data_rx) = mpsc::channel();
                let (ack_tx, ack_rx) = mpsc::channel();
                ports[a * tp + k].data_out.insert(Rank(b as u32), data_tx);
                ports[b * tp + k].data_in.insert(Rank(a as u32), data_rx);
                ports[b * tp + k].ack_out.insert(Rank(a as u32), ack_tx);
                ports[a * tp + k].ack_in.insert(Rank(b as u32), ack_rx);
            }
        }
    }
    ports
}

/// A shard thread as the watchdog and the error reports see it.
pub(crate) trait Waiter {
    fn board(&self) -> &Board;
    fn options(&self) -> &CpuOptions;
    /// A runtime error at instruction `instr` of this thread's rank.
    fn fail(&self, instr: usize, message: String) -> ExecError;
}

/// A shard thread as a party to point-to-point transfers.
pub(crate) trait Party<M>: Waiter {
    /// Its channels, if it reaches its peers by messages of type `M`.
    fn ports(&self) -> Option<&Ports<M>>;
    /// The message that sends `buffer`.
    fn outgoing(&mut self, buffer: Buffer, instr: usize) -> Result<M, ExecError>;
    /// Takes in a received `buffer`.
    fn incoming(&mut self, buffer: Buffer, message: M, instr: usize) -> Result<(), ExecError>;
}

/// Posts a group with NCCL's semantics (the IR's one semantics of a
/// group): every send at once, then the receives as their messages arrive,
/// in any order across peers and in listed order from any one peer (the
/// link's FIFO). Under rendezvous semantics each receive is acknowledged
/// the moment it completes, so a peer's send never waits on an unrelated
/// transfer of this group, and the group ends when its sends have been
/// received.
pub(crate) fn exchange<M, P: Party<M>>(party: &mut P, ops: &[Transfer], instr: usize) -> Result<(), ExecError> {
    let rendezvous = party.options().semantics == Semantics::Rendezvous;
    let timeout = party.options().timeout;
    for t in ops.iter().filter(|t| t.dir == Direction::Send) {
        let message = party.outgoing(t.buffer, instr)?;
        let port = party
            .ports()
            .and_then(|p| p.data_out.get(&t.peer))
            .ok_or_else(|| party.fail(instr, format!("no link to {}", t.peer)))?;
        port.send((t.buffer, message)).map_err(|_| party.fail(instr, format!("{} has stopped", t.peer)))?;
    }
    receive_as_they_arrive(party, ops, instr, rendezvous, timeout)?;
    if rendezvous {
        for t in ops.iter().filter(|t| t.dir == Direction::Send) {
            let ports = party.ports();
            let acked =
                party.board().wait(timeout, || ports?.ack_in.get(&t.peer).map(|rx| rx.recv_timeout(slice())))?;
            if acked != t.buffer {
                return Err(party.fail(instr, format!("{} acknowledged {acked}, not {}", t.peer, t.buffer)));
            }
        }
    }
    Ok(())
}

/// Completes the group's receives in whatever order their peers post the
/// matching sends: a receive from a slow peer does not hold back another
/// peer's message (nor, under rendezvous semantics, its acknowledgement).
fn receive_as_they_arrive<M, P: Party<M>>(
    party: &mut P,
    ops: &[Transfer],
    instr: usize,
    rendezvous: bool,
    timeout: Duration,
) -> Result<(), ExecError> {
    let mut pending: Vec<Transfer> = ops.iter().filter(|t| t.dir == Direction::Recv).copied().collect();
    let started = Instant::now();
    while !pending.is_empty() {
        // The first pending receive from each peer: later ones from the same
        // peer follow it on the link.
        let heads: Vec<usize> =
            (0..pending.len()).filter(|&i| pending[..i].iter().all(|t| t.peer != pending[i].peer)).collect();
        // With one peer to hear from, block on it; with several, poll them in turn.
        let wait = if heads.len() == 1 { slice() } else { Duration::from_micros(200) };
        let mut arrived = None;
        for (k, &i) in heads.iter().enumerate() {
            let rx = party
                .ports()
                .and_then(|p| p.data_in.get(&pending[i].peer))
                .ok_or_else(|| party.fail(instr, format!("no link from {}", pending[i].peer)))?;
            let got = if k == 0 {
                rx.recv_timeout(wait)
            } else {
                rx.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            };
            match got {
                Ok(message) => {
                    arrived = Some((i, message));
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(party.board().stop()),
            }
        }
        let Some((i, (buffer, message))) = arrived else {
            if party.board().gives_up(started, timeout) {
                return Err(ExecError::Stuck);
            }
            continue;
        };
        let t = pending.remove(i);
        if buffer != t.buffer {
            return Err(party.fail(instr, format!("expected {} from {}, but {buffer} arrived", t.buffer, t.peer)));
        }
        party.incoming(buffer, message, instr)?;
        if rendezvous {
            if let Some(ack) = party.ports().and_then(|p| p.ack_out.get(&t.peer)) {
                let _ = ack.send(buffer);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::whole_gradients;
    use crate::model::ShardGrads;
    use stp_ir::{Program, Rank, RankProgram, ScheduleMeta};

    /// Two one-stage pipelines on two ranks, a microbatch each way: part 0's
    /// gradient is whole only with both microbatches' contributions.
    #[test]
    fn a_rank_holding_part_of_a_gradient_is_an_error() {
        let meta = ScheduleMeta {
            name: "two-ways".into(),
            params: Vec::new(),
            num_ranks: 2,
            num_stages: 2,
            num_microbatches: 2,
            placement: vec![Rank(0), Rank(1)],
            tp: 1,
            pipelines: 2,
            routes: vec![0, 1],
        };
        let ranks = (0..2).map(|r| RankProgram { rank: Rank(r), instrs: Vec::new() }).collect();
        let program = Program { version: stp_ir::FORMAT_VERSION, schedule: meta, ranks };
        let own = vec![((0, 0), ShardGrads::default())];
        let error = whole_gradients(&program, Rank(0), &own).expect_err("half a gradient");
        assert!(error.to_string().contains("over 1 of its 2 microbatch contributions"), "{error}");
        let both = vec![((0, 0), ShardGrads::default()), ((1, 1), ShardGrads::default())];
        assert!(whole_gradients(&program, Rank(0), &both).is_ok());
    }
}
