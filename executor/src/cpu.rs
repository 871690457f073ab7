//! The CPU backend, the semantic reference: one thread per pipeline rank,
//! real f32 arithmetic ([`crate::model`]), point-to-point messages over
//! channels with the IR's matching rules, and a watchdog that names the
//! instruction every rank is stuck at when the program deadlocks.

use crate::model::{self, Model, Tensor};
use crate::ExecError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stp_ir::simulate::Semantics;
use stp_ir::{Buffer, BufferKind, Direction, Instr, Pass, PassKind, Program, Rank};

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct CpuOptions {
    /// Rendezvous (a group completes when its sends have been received, as
    /// NCCL) or buffered sends.
    pub semantics: Semantics,
    /// How long any rank may wait before the run is declared deadlocked.
    pub timeout: Duration,
}

impl Default for CpuOptions {
    fn default() -> CpuOptions {
        CpuOptions { semantics: Semantics::Rendezvous, timeout: Duration::from_secs(2) }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct CpuReport {
    /// Per stage, the weight gradient summed over microbatches in microbatch order.
    pub gradients: Vec<Tensor>,
    /// Per rank, the most activation stashes live at once, counted between
    /// compute instructions (after the frees that follow each), as the
    /// checker counts memory.
    pub peak_stashes: Vec<usize>,
    /// Per rank, (instruction, start, end) in seconds since the run began.
    pub timeline: Vec<Vec<(usize, f64, f64)>>,
}

/// A live buffer on a rank.
#[derive(Debug, Clone)]
enum Value {
    Tensor(Tensor),
    /// What a forward keeps for its backward: its input and output.
    Stash {
        x: Tensor,
        y: Tensor,
    },
}

/// One rank's ends of the channels to every peer.
#[derive(Default)]
struct Ports {
    data_out: HashMap<Rank, Sender<(Buffer, Tensor)>>,
    data_in: HashMap<Rank, Receiver<(Buffer, Tensor)>>,
    ack_out: HashMap<Rank, Sender<Buffer>>,
    ack_in: HashMap<Rank, Receiver<Buffer>>,
}

/// Where every rank is, for the watchdog's report.
struct Board {
    at: Mutex<Vec<Option<usize>>>,
    stuck: AtomicBool,
}

/// Runs `program` on `model`. The program is verified first.
pub fn run(program: &Program, model: &Model, options: CpuOptions) -> Result<CpuReport, ExecError> {
    stp_ir::verify(program).map_err(ExecError::Invalid)?;
    let n = program.ranks.len();
    let mut ports: Vec<Ports> = (0..n).map(|_| Ports::default()).collect();
    for a in 0..n {
        for b in 0..n {
            if a == b {
                continue;
            }
            let (data_tx, data_rx) = mpsc::channel();
            let (ack_tx, ack_rx) = mpsc::channel();
            ports[a].data_out.insert(Rank(b as u32), data_tx);
            ports[b].data_in.insert(Rank(a as u32), data_rx);
            ports[b].ack_out.insert(Rank(a as u32), ack_tx);
            ports[a].ack_in.insert(Rank(b as u32), ack_rx);
        }
    }
    let board = Arc::new(Board { at: Mutex::new(vec![Some(0); n]), stuck: AtomicBool::new(false) });
    let began = Instant::now();
    let results: Vec<Result<RankResult, ExecError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ports
            .into_iter()
            .enumerate()
            .map(|(r, ports)| {
                let board = Arc::clone(&board);
                scope.spawn(move || {
                    let mut worker = Worker {
                        program,
                        model,
                        options,
                        rank: r,
                        ports,
                        board: Arc::clone(&board),
                        began,
                        values: HashMap::new(),
                    };
                    let result = worker.run();
                    if result.is_err() {
                        // Stop the others instead of letting them wait for the watchdog.
                        board.stuck.store(true, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(ExecError::Panicked))).collect()
    });
    // A rank that failed outright stopped the others; its error is the news.
    if let Some(i) = results.iter().position(|r| matches!(r, Err(ExecError::Runtime { .. } | ExecError::Panicked))) {
        return Err(results.into_iter().nth(i).and_then(Result::err).unwrap_or(ExecError::Panicked));
    }
    if board.stuck.load(Ordering::SeqCst) {
        let at = board.at.lock().map(|v| v.clone()).unwrap_or_default();
        let blocked = at
            .iter()
            .enumerate()
            .filter_map(|(r, i)| {
                let i = (*i)?;
                let instr = program.ranks[r].instrs.get(i)?;
                Some((Rank(r as u32), i, instr.to_string().replace("\n", " ")))
            })
            .collect();
        return Err(ExecError::Deadlock { blocked });
    }
    let mut per_mb: Vec<Vec<Tensor>> = vec![
        vec![Tensor::zeros(0, 0); program.schedule.num_stages as usize];
        program.schedule.num_microbatches as usize
    ];
    let mut peak_stashes = Vec::with_capacity(n);
    let mut timeline = Vec::with_capacity(n);
    for result in results {
        let result = result?;
        for ((stage, mb), grad) in result.grads {
            per_mb[mb][stage] = grad;
        }
        peak_stashes.push(result.peak_stashes);
        timeline.push(result.timeline);
    }
    let gradients = model::sum_in_order(&per_mb, program.schedule.num_stages as usize, model.hidden);
    Ok(CpuReport { gradients, peak_stashes, timeline })
}

struct RankResult {
    grads: Vec<((usize, usize), Tensor)>,
    peak_stashes: usize,
    timeline: Vec<(usize, f64, f64)>,
}

struct Worker<'a> {
    program: &'a Program,
    model: &'a Model,
    options: CpuOptions,
    rank: usize,
    ports: Ports,
    board: Arc<Board>,
    began: Instant,
    values: HashMap<Buffer, Value>,
}

impl Worker<'_> {
    fn run(&mut self) -> Result<RankResult, ExecError> {
        let mut result = RankResult { grads: Vec::new(), peak_stashes: 0, timeline: Vec::new() };
        let instrs = &self.program.ranks[self.rank].instrs;
        for (i, instr) in instrs.iter().enumerate() {
            if let Ok(mut at) = self.board.at.lock() {
                at[self.rank] = Some(i);
            }
            let start = self.began.elapsed().as_secs_f64();
            if matches!(instr, Instr::Compute(_)) {
                // Between ops, after the frees that follow the previous one,
                // as the checker counts.
                result.peak_stashes = result.peak_stashes.max(self.live_stashes());
            }
            match instr {
                Instr::Compute(c) => {
                    for pass in &c.passes {
                        self.compute(*pass, i, &mut result.grads)?;
                    }
                }
                Instr::Comm(ops) => self.communicate(ops, i)?,
                Instr::Free { buffer } => {
                    self.values
                        .remove(buffer)
                        .ok_or_else(|| self.error(i, format!("{buffer} is freed but not live")))?;
                }
            }
            result.timeline.push((i, start, self.began.elapsed().as_secs_f64()));
        }
        result.peak_stashes = result.peak_stashes.max(self.live_stashes());
        if let Ok(mut at) = self.board.at.lock() {
            at[self.rank] = None;
        }
        Ok(result)
    }

    fn live_stashes(&self) -> usize {
        self.values.values().filter(|v| matches!(v, Value::Stash { .. })).count()
    }

    fn error(&self, instr: usize, message: String) -> ExecError {
        ExecError::Runtime { rank: Rank(self.rank as u32), instr, message }
    }

    fn tensor(&self, buffer: Buffer, instr: usize) -> Result<&Tensor, ExecError> {
        match self.values.get(&buffer) {
            Some(Value::Tensor(t)) => Ok(t),
            Some(Value::Stash { .. }) => Err(self.error(instr, format!("{buffer} holds a stash, not a tensor"))),
            None => Err(self.error(instr, format!("reads {buffer}, which is not live"))),
        }
    }

    fn stash(&self, pass: Pass, instr: usize) -> Result<(&Tensor, &Tensor), ExecError> {
        match self.values.get(&Buffer::stash(pass.stage, pass.mb)) {
            Some(Value::Stash { x, y }) => Ok((x, y)),
            _ => Err(self.error(instr, format!("`{pass}` needs the stash of its forward, which is not live"))),
        }
    }

    fn compute(
        &mut self,
        pass: Pass,
        instr: usize,
        grads: &mut Vec<((usize, usize), Tensor)>,
    ) -> Result<(), ExecError> {
        let weights = &self.model.weights[pass.stage.index()];
        match pass.kind {
            PassKind::F => {
                let x = match pass.stage.0.checked_sub(1) {
                    Some(prev) => self.tensor(Buffer::act(stp_ir::Stage(prev), pass.mb), instr)?.clone(),
                    None => self.model.inputs[pass.mb.index()].clone(),
                };
                let y = model::forward(weights, &x);
                self.values.insert(Buffer::act(pass.stage, pass.mb), Value::Tensor(y.clone()));
                self.values.insert(Buffer::stash(pass.stage, pass.mb), Value::Stash { x, y });
            }
            PassKind::B | PassKind::W | PassKind::BW => {
                let dy_buffer = pass.output_grad(self.program.schedule.num_stages);
                let dy = match dy_buffer.kind {
                    BufferKind::Act => model::loss_grad(self.tensor(dy_buffer, instr)?),
                    _ => self.tensor(dy_buffer, instr)?.clone(),
                };
                let (x, y) = self.stash(pass, instr)?;
                let (x, y) = (x.clone(), y.clone());
                if matches!(pass.kind, PassKind::W | PassKind::BW) {
                    grads.push(((pass.stage.index(), pass.mb.index()), model::weight_grad(&x, &y, &dy)));
                }
                if matches!(pass.kind, PassKind::B | PassKind::BW) && pass.stage.0 > 0 {
                    let dx = model::input_grad(weights, &y, &dy);
                    self.values.insert(Buffer::grad(pass.stage, pass.mb), Value::Tensor(dx));
                }
            }
        }
        Ok(())
    }

    /// Posts a group: every send at once, then every receive in order;
    /// under rendezvous semantics the group ends when its sends have been received.
    fn communicate(&mut self, ops: &[stp_ir::Transfer], instr: usize) -> Result<(), ExecError> {
        for t in ops.iter().filter(|t| t.dir == Direction::Send) {
            let tensor = self.tensor(t.buffer, instr)?.clone();
            let port =
                self.ports.data_out.get(&t.peer).ok_or_else(|| self.error(instr, format!("no link to {}", t.peer)))?;
            port.send((t.buffer, tensor)).map_err(|_| self.error(instr, format!("{} has stopped", t.peer)))?;
        }
        for t in ops.iter().filter(|t| t.dir == Direction::Recv) {
            let (buffer, tensor) = self.wait(|w| w.ports.data_in.get(&t.peer).map(|rx| rx.recv_timeout(slice())))?;
            if buffer != t.buffer {
                return Err(self.error(instr, format!("expected {} from {}, but {buffer} arrived", t.buffer, t.peer)));
            }
            self.values.insert(buffer, Value::Tensor(tensor));
            if self.options.semantics == Semantics::Rendezvous {
                if let Some(ack) = self.ports.ack_out.get(&t.peer) {
                    let _ = ack.send(buffer);
                }
            }
        }
        if self.options.semantics == Semantics::Rendezvous {
            for t in ops.iter().filter(|t| t.dir == Direction::Send) {
                let acked = self.wait(|w| w.ports.ack_in.get(&t.peer).map(|rx| rx.recv_timeout(slice())))?;
                if acked != t.buffer {
                    return Err(self.error(instr, format!("{} acknowledged {acked}, not {}", t.peer, t.buffer)));
                }
            }
        }
        Ok(())
    }

    /// Waits on `poll` in short slices until it yields, the run is declared
    /// stuck elsewhere, or this rank has waited past the timeout.
    fn wait<T>(&self, poll: impl Fn(&Self) -> Option<Result<T, RecvTimeoutError>>) -> Result<T, ExecError> {
        let started = Instant::now();
        loop {
            match poll(self) {
                Some(Ok(value)) => return Ok(value),
                Some(Err(RecvTimeoutError::Timeout)) => {}
                Some(Err(RecvTimeoutError::Disconnected)) | None => {
                    return Err(self.stuck());
                }
            }
            if self.board.stuck.load(Ordering::SeqCst) || started.elapsed() > self.options.timeout {
                return Err(self.stuck());
            }
        }
    }

    fn stuck(&self) -> ExecError {
        self.board.stuck.store(true, Ordering::SeqCst);
        ExecError::Stuck
    }
}

fn slice() -> Duration {
    Duration::from_millis(20)
}
