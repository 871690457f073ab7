//! The CPU backend, the semantic reference: one thread per pipeline rank
//! and tensor-parallel shard, real f32 arithmetic ([`crate::model`]),
//! all-reduces across a rank's shard threads, point-to-point messages over
//! channels with the IR's matching rules, and a watchdog that names the
//! instruction every thread is stuck at when the program deadlocks.

use crate::model::{self, Model, ShardGrads, Tensor};
use crate::threads::{self, slice, Board, ThreadResult};
use crate::ExecError;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use stp_ir::{Buffer, BufferKind, Compute, Instr, Part, Pass, PassKind, Program, Rank};

pub use crate::threads::{CpuOptions, CpuReport};

/// What a forward keeps for its backward, on one shard: its input, its
/// activations and the attention output; after `B`, what `W` needs.
#[derive(Debug, Clone)]
struct Stash {
    x: Tensor,
    z1: Tensor,
    h: Tensor,
    z2: Tensor,
    backward: Option<Backward>,
}

/// What the input-gradient pass leaves for the weight gradients.
#[derive(Debug, Clone)]
struct Backward {
    dy: Tensor,
    dz2: Tensor,
    dh: Tensor,
    dz1: Tensor,
}

/// A live buffer on a shard thread.
#[derive(Debug, Clone)]
enum Value {
    Tensor(Tensor),
    Stash(Box<Stash>),
    /// The stash of a forward the rank recomputes: only its input, until
    /// the `R` restores the rest.
    Checkpoint(Tensor),
}

/// One CPU shard thread's channels ([`threads::Ports`]), carrying tensors.
pub(crate) type Ports = threads::Ports<Tensor>;

/// The all-reduce among one rank's shard threads.
struct Reducer {
    tp: usize,
    state: Mutex<Round>,
    turned: Condvar,
}

#[derive(Default)]
struct Round {
    generation: u64,
    parts: Vec<Option<Tensor>>,
    arrived: usize,
    result: Option<Tensor>,
}

/// Runs `program` on `model` (which must have the program's TP size), every
/// rank in this process. The program is verified first.
pub fn run(program: &Program, model: &Model, options: CpuOptions) -> Result<CpuReport, ExecError> {
    prepare(program, model)?;
    let (n, tp) = (program.ranks.len(), program.schedule.tp as usize);
    let ports = threads::mesh(n, tp);
    execute(program, model, options, &(0..n).collect::<Vec<_>>(), ports)
}

/// Runs only `rank`'s shard threads, whose messages to and from the other
/// ranks go through `ports` (one per shard): one process of a
/// multi-process run ([`crate::launch`]), which has called [`prepare`]
/// before meeting the others. The report covers this rank; the gradients
/// of other ranks' stages stay empty.
pub(crate) fn run_rank(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    rank: usize,
    ports: Vec<Ports>,
) -> Result<CpuReport, ExecError> {
    execute(program, model, options, &[rank], ports)
}

/// Verifies `program` and that `model` fits it.
pub(crate) fn prepare(program: &Program, model: &Model) -> Result<(), ExecError> {
    stp_ir::verify(program).map_err(ExecError::Invalid)?;
    let tp = program.schedule.tp as usize;
    if model.tp != tp {
        return Err(ExecError::Setup(format!("the program has tp = {tp} but the model {} shards", model.tp)));
    }
    let meta = &program.schedule;
    if model.stages.len() != meta.parts() as usize || model.inputs.len() != meta.num_microbatches as usize {
        let copies =
            if meta.pipelines > 1 { format!(" ({} pipelines of them)", meta.pipelines) } else { String::new() };
        return Err(ExecError::Setup(format!(
            "the program has {} model parts{copies} and {} microbatches but the model {} and {}",
            meta.parts(),
            meta.num_microbatches,
            model.stages.len(),
            model.inputs.len()
        )));
    }
    Ok(())
}

/// Runs the shard threads of `ranks`, thread `t` being shard `t % tp` of
/// `ranks[t / tp]` with `ports[t]`.
fn execute(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    ranks: &[usize],
    ports: Vec<Ports>,
) -> Result<CpuReport, ExecError> {
    let tp = program.schedule.tp as usize;
    let threads = ranks.len() * tp;
    let reducers: Vec<Arc<Reducer>> = ranks
        .iter()
        .map(|_| {
            let state = Round { parts: vec![None; tp], ..Round::default() };
            Arc::new(Reducer { tp, state: Mutex::new(state), turned: Condvar::new() })
        })
        .collect();
    let board = Arc::new(Board::new(threads));
    let began = Instant::now();
    let results: Vec<Result<ThreadResult, ExecError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ports
            .into_iter()
            .enumerate()
            .map(|(t, ports)| {
                let board = Arc::clone(&board);
                let reducer = Arc::clone(&reducers[t / tp]);
                scope.spawn(move || {
                    let mut worker = Worker {
                        program,
                        model,
                        options,
                        rank: ranks[t / tp],
                        shard: t % tp,
                        thread: t,
                        ports,
                        board: Arc::clone(&board),
                        reducer,
                        began,
                        values: HashMap::new(),
                        recomputed: program.ranks[ranks[t / tp]].recomputed(),
                    };
                    let result = worker.run();
                    if result.is_err() {
                        // Stop the others instead of letting them wait for the watchdog.
                        board.stop();
                    }
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(ExecError::Panicked))).collect()
    });
    threads::report(program, model, ranks, &board, results)
}

struct Worker<'a> {
    program: &'a Program,
    model: &'a Model,
    options: CpuOptions,
    rank: usize,
    shard: usize,
    /// Index of this thread among the process's threads (on the board).
    thread: usize,
    ports: Ports,
    board: Arc<Board>,
    reducer: Arc<Reducer>,
    began: Instant,
    values: HashMap<Buffer, Value>,
    /// The pairs whose forwards keep only a checkpoint ([`Value::Checkpoint`]).
    recomputed: HashSet<(stp_ir::Stage, stp_ir::Microbatch)>,
}

/// The state of one pass between its units, within one compute.
#[derive(Default)]
struct Partial {
    x: Option<Tensor>,
    z1: Option<Tensor>,
    h: Option<Tensor>,
    dy: Option<Tensor>,
    dz2: Option<Tensor>,
    dh: Option<Tensor>,
    grads: ShardGrads,
}

impl Worker<'_> {
    fn run(&mut self) -> Result<ThreadResult, ExecError> {
        let mut result = ThreadResult { grads: Vec::new(), peak_stashes: 0, timeline: Vec::new() };
        let instrs = &self.program.ranks[self.rank].instrs;
        let thread = self.thread;
        for (i, instr) in instrs.iter().enumerate() {
            self.board.enter(thread, i);
            let start = self.began.elapsed().as_secs_f64();
            match instr {
                Instr::Compute(c) => {
                    // Between ops, after the frees that follow the previous one.
                    result.peak_stashes = result.peak_stashes.max(self.live_stashes());
                    self.compute(c, i, &mut result.grads)?;
                }
                Instr::Comm(ops) => threads::exchange(self, ops, i)?,
                Instr::Reduce { stages } => {
                    let (program, model) = (self.program, self.model);
                    let (rank, shard) = (Rank(self.rank as u32), self.shard);
                    let reduction = threads::Reduction { program, model, rank, shard, stages };
                    threads::reduce_gradients(self, reduction, &mut result.grads, i, threads::Carry::host())?
                }
                Instr::Free { buffer } => {
                    self.values
                        .remove(buffer)
                        .ok_or_else(|| self.error(i, format!("{buffer} is freed but not live")))?;
                }
            }
            result.timeline.push((i, start, self.began.elapsed().as_secs_f64()));
        }
        result.peak_stashes = result.peak_stashes.max(self.live_stashes());
        self.board.finish(thread);
        Ok(result)
    }

    fn live_stashes(&self) -> usize {
        self.values.values().filter(|v| matches!(v, Value::Stash(_))).count()
    }

    fn error(&self, instr: usize, message: String) -> ExecError {
        ExecError::Runtime { rank: Rank(self.rank as u32), instr, message }
    }

    fn tensor(&self, buffer: Buffer, instr: usize) -> Result<&Tensor, ExecError> {
        match self.values.get(&buffer) {
            Some(Value::Tensor(t)) => Ok(t),
            Some(Value::Stash(_) | Value::Checkpoint(_)) => {
                Err(self.error(instr, format!("{buffer} holds a stash, not a tensor")))
            }
            None => Err(self.error(instr, format!("reads {buffer}, which is not live"))),
        }
    }

    fn stash(&self, pass: Pass, instr: usize) -> Result<&Stash, ExecError> {
        match self.values.get(&Buffer::stash(pass.stage, pass.mb)) {
            Some(Value::Stash(s)) => Ok(s),
            Some(Value::Checkpoint(_)) => {
                Err(self.error(instr, format!("`{pass}` needs the activations its `R` restores, which has not run")))
            }
            _ => Err(self.error(instr, format!("`{pass}` needs the stash of its forward, which is not live"))),
        }
    }

    /// Runs a compute's units in the order the program lists them (the
    /// canonical order when it lists none).
    fn compute(
        &mut self,
        c: &Compute,
        instr: usize,
        grads: &mut Vec<((usize, usize), ShardGrads)>,
    ) -> Result<(), ExecError> {
        let units = if c.units.is_empty() { c.canonical_units() } else { c.units.clone() };
        let mut partials: Vec<Partial> = c.passes.iter().map(|_| Partial::default()).collect();
        for u in units {
            let i = usize::from(u.pass);
            let pass = c.passes[i];
            self.unit(pass, u.part, &mut partials[i], instr)?;
        }
        for (pass, partial) in c.passes.iter().zip(partials) {
            if matches!(pass.kind, PassKind::W | PassKind::BW) {
                grads.push(((pass.stage.index(), pass.mb.index()), partial.grads));
            }
        }
        Ok(())
    }

    fn all_reduce(&self, partial: Tensor) -> Result<Tensor, ExecError> {
        let r = &self.reducer;
        let mut round = r.state.lock().map_err(|_| ExecError::Panicked)?;
        let generation = round.generation;
        round.parts[self.shard] = Some(partial);
        round.arrived += 1;
        if round.arrived == r.tp {
            let parts: Vec<Tensor> = round.parts.iter_mut().filter_map(Option::take).collect();
            round.result = Some(model::sum_in_shard_order(&parts));
            round.arrived = 0;
            round.generation += 1;
            r.turned.notify_all();
            return round.result.clone().ok_or(ExecError::Panicked);
        }
        let started = Instant::now();
        while round.generation == generation {
            if self.board.gives_up(started, self.options.timeout) {
                return Err(ExecError::Stuck);
            }
            round = r.turned.wait_timeout(round, slice()).map_err(|_| ExecError::Panicked)?.0;
        }
        round.result.clone().ok_or(ExecError::Panicked)
    }

    /// One unit of one pass on this shard.
    fn unit(&mut self, pass: Pass, part: Part, st: &mut Partial, instr: usize) -> Result<(), ExecError> {
        let model = self.model;
        let chain = self.program.schedule.chain();
        let w = &model.stages[chain.part(pass.stage) as usize][self.shard];
        let missing = |what: &str| ExecError::Runtime {
            rank: Rank(self.rank as u32),
            instr,
            message: format!("`{pass}`: unit {} runs before {what}", part.as_str()),
        };
        match (pass.kind, part) {
            (PassKind::F | PassKind::R, Part::Attention) => {
                let x = match (pass.kind, chain.prev(pass.stage)) {
                    (PassKind::R, _) => match self.values.get(&Buffer::stash(pass.stage, pass.mb)) {
                        Some(Value::Checkpoint(x)) => x.clone(),
                        _ => return Err(self.error(instr, format!("`{pass}` finds no checkpoint of its forward"))),
                    },
                    (_, Some(prev)) => self.tensor(Buffer::act(prev, pass.mb), instr)?.clone(),
                    (_, None) => model.inputs[pass.mb.index()].clone(),
                };
                let (z1, p) = model::attn(w, &x);
                st.h = Some(self.all_reduce(p)?);
                st.x = Some(x);
                st.z1 = Some(z1);
            }
            (PassKind::F | PassKind::R, Part::Mlp) => {
                let h = st.h.take().ok_or_else(|| missing("attn"))?;
                let (z2, p) = model::mlp(w, &h);
                let y = self.all_reduce(p)?;
                let x = st.x.take().ok_or_else(|| missing("attn"))?;
                let z1 = st.z1.take().ok_or_else(|| missing("attn"))?;
                let stash = if pass.kind == PassKind::F && self.recomputed.contains(&(pass.stage, pass.mb)) {
                    // Dropped here, computed again (bit for bit) by the `R`.
                    Value::Checkpoint(x)
                } else {
                    Value::Stash(Box::new(Stash { x, z1, h, z2, backward: None }))
                };
                if pass.kind == PassKind::F {
                    self.values.insert(Buffer::act(pass.stage, pass.mb), Value::Tensor(y));
                }
                self.values.insert(Buffer::stash(pass.stage, pass.mb), stash);
            }
            (PassKind::B | PassKind::BW, Part::MlpDgrad) => {
                let dy_buffer = pass.output_grad(chain);
                let dy = match dy_buffer.kind {
                    BufferKind::Act => model::loss_grad(self.tensor(dy_buffer, instr)?),
                    _ => self.tensor(dy_buffer, instr)?.clone(),
                };
                let (dz2, p) = model::mlp_dgrad(w, &self.stash(pass, instr)?.z2, &dy);
                st.dh = Some(self.all_reduce(p)?);
                st.dy = Some(dy);
                st.dz2 = Some(dz2);
            }
            (PassKind::B | PassKind::BW, Part::AttentionDgrad) => {
                let dh = st.dh.clone().ok_or_else(|| missing("mlp-dgrad"))?;
                let (dz1, p) = model::attn_dgrad(w, &self.stash(pass, instr)?.z1, &dh);
                let dx = self.all_reduce(p)?;
                if !chain.is_first(pass.stage) {
                    self.values.insert(Buffer::grad(pass.stage, pass.mb), Value::Tensor(dx));
                }
                let backward = Backward {
                    dy: st.dy.clone().ok_or_else(|| missing("mlp-dgrad"))?,
                    dz2: st.dz2.clone().ok_or_else(|| missing("mlp-dgrad"))?,
                    dh,
                    dz1,
                };
                if let Some(Value::Stash(s)) = self.values.get_mut(&Buffer::stash(pass.stage, pass.mb)) {
                    s.backward = Some(backward);
                }
            }
            (PassKind::W | PassKind::BW, Part::MlpWgrad) => {
                let s = self.stash(pass, instr)?;
                let (a2, b2) = match (&s.backward, &st.dz2, &st.dy) {
                    (_, Some(dz2), Some(dy)) => model::mlp_wgrad(&s.h, &s.z2, dz2, dy),
                    (Some(b), _, _) => model::mlp_wgrad(&s.h, &s.z2, &b.dz2, &b.dy),
                    _ => return Err(missing("mlp-dgrad")),
                };
                st.grads.a2 = Some(a2);
                st.grads.b2 = Some(b2);
            }
            (PassKind::W | PassKind::BW, Part::AttentionWgrad) => {
                let s = self.stash(pass, instr)?;
                let b = s.backward.as_ref().ok_or_else(|| missing("attn-dgrad"))?;
                let (a1, b1) = model::attn_wgrad(&s.x, &s.z1, &b.dz1, &b.dh);
                st.grads.a1 = Some(a1);
                st.grads.b1 = Some(b1);
            }
            _ => return Err(self.error(instr, format!("`{pass}` has no unit {}", part.as_str()))),
        }
        Ok(())
    }
}

impl threads::Waiter for Worker<'_> {
    fn board(&self) -> &Board {
        &self.board
    }

    fn options(&self) -> &CpuOptions {
        &self.options
    }

    fn fail(&self, instr: usize, message: String) -> ExecError {
        self.error(instr, message)
    }
}

impl threads::Party<Tensor> for Worker<'_> {
    fn ports(&self) -> Option<&Ports> {
        Some(&self.ports)
    }

    fn outgoing(&mut self, buffer: Buffer, instr: usize) -> Result<Tensor, ExecError> {
        self.tensor(buffer, instr).cloned()
    }

    fn incoming(&mut self, buffer: Buffer, tensor: Tensor, _instr: usize) -> Result<(), ExecError> {
        self.values.insert(buffer, Value::Tensor(tensor));
        Ok(())
    }
}
