//! The stream runner: runs a program on a [`Device`] the way a GPU runs it,
//! every pipeline rank (and tensor-parallel shard) of the program in one
//! process, as the CUDA backend's single-GPU mode does.
//!
//! Each shard has a host thread that enqueues its instructions on two
//! streams: a **compute** stream (the passes' GEMMs and element-wise
//! kernels, in the program's unit order) and a **communication** stream.
//! Host threads meet only where the IR's semantics make them meet (a
//! send and its receive, the shards of an all-reduce); the device work
//! itself is ordered by events:
//! - a point-to-point receive is a device-to-device copy on the receiver's
//!   communication stream, after it waits for an event the sender recorded
//!   once the buffer was written; the receiver's compute waits for the
//!   copy's event before reading the buffer;
//! - a tensor-parallel all-reduce sums the shards' partial results in shard
//!   order on shard 0's communication stream, after waiting for each
//!   shard's event, and hands every shard its own copy with an event — so
//!   a braided pass's all-reduce runs while the other pass computes;
//! - a buffer another thread reads is kept until the reader's event says
//!   the read has finished.
//!
//! Across processes (one per pipeline rank, [`crate::launch`]) a shard
//! reaches the same shard of another rank either through the device's own
//! transport — a [`Fabric`] such as NCCL, whose sends and receives are
//! enqueued on the communication stream as one group per instruction — or
//! *staged* through host memory: the sender copies the buffer to the host
//! once its write has finished and the frame goes over TCP; the receiver
//! uploads it on its communication stream.
//!
//! Each instruction's span is timed with events on its stream. The run's
//! weight gradients are kept per microbatch and summed on the host in
//! microbatch order, as [`crate::cpu`] does, so on [`crate::device::HostDevice`]
//! they equal a sequential run's bit for bit.

use crate::cpu::{prepare, CpuOptions, CpuReport};
use crate::device::{Device, DeviceResult};
use crate::model::{Model, ShardGrads, Tensor};
use crate::threads::{self, slice, Board, ThreadResult};
use crate::ExecError;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier, Condvar, Mutex, OnceLock};
use std::time::Instant;
use stp_ir::{Buffer, Compute, Direction, Instr, Part, Pass, PassKind, Program, Rank, Transfer};

/// A device's own point-to-point transport between processes (NCCL):
/// each shard thread connects once, from its own thread, with its
/// communication stream.
pub trait Fabric<D: Device>: Sync {
    /// Whether its links also sum the tensor-parallel shards of a rank
    /// ([`Link::all_reduce`]), as they must when each shard has a device
    /// of its own.
    fn carries_collectives(&self) -> bool {
        false
    }

    /// Joins shard `shard` of pipeline rank `rank` to the same shard of
    /// every other rank (all of them join at once); its transfers then run
    /// on `stream`.
    fn connect<'f>(
        &'f self,
        device: &D,
        rank: Rank,
        shard: usize,
        stream: &D::Stream,
    ) -> DeviceResult<Box<dyn Link<D> + 'f>>;
}

/// One shard thread's end of a [`Fabric`].
pub trait Link<D: Device> {
    /// Enqueues one group on `stream`: every send, then a receive of
    /// `len` values from each `(peer, len)`, matched in order per peer as
    /// NCCL matches them. Returns the receive buffers, written once the
    /// stream gets past the group.
    fn group(
        &mut self,
        device: &D,
        stream: &D::Stream,
        sends: &[(Rank, &D::Buffer)],
        recvs: &[(Rank, usize)],
    ) -> DeviceResult<Vec<D::Buffer>>;

    /// Enqueues on `stream` the sum of `part` (`len` values) over the
    /// shards of this pipeline rank; returns the sum, written once the
    /// stream gets past it.
    fn all_reduce(&mut self, device: &D, stream: &D::Stream, part: &D::Buffer, len: usize) -> DeviceResult<D::Buffer> {
        let _ = (device, stream, part, len);
        Err("this transport does not sum tensor-parallel shards".into())
    }
}

/// How the shard threads of a run reach the same shard of other ranks.
pub(crate) enum Peers<'a, D: Device> {
    /// Every rank runs in this process: device-to-device copies.
    Local,
    /// Through host memory and the given channels (per shard of the rank
    /// this process runs), which [`crate::launch`] links over TCP.
    Staged(Vec<threads::Ports<Tensor>>),
    /// Through the device's own transport.
    Fabric(&'a dyn Fabric<D>),
}

/// One shard thread's way to its peers, as [`Peers`] hands it over.
enum Handed<'a, D: Device> {
    Local(Ports<D>),
    Staged(threads::Ports<Tensor>),
    Fabric(&'a dyn Fabric<D>),
}

/// One shard thread's way to its peers, once connected.
enum Route<'a, D: Device> {
    Local(Ports<D>),
    Staged(threads::Ports<Tensor>),
    Device(Box<dyn Link<D> + 'a>),
}

/// A row-major matrix on the device, and the event (on another stream)
/// after which it may be read, if it was not written on the reader's stream.
struct Mat<D: Device> {
    rows: usize,
    cols: usize,
    buf: Arc<D::Buffer>,
    ready: Option<Arc<D::Event>>,
}

impl<D: Device> Clone for Mat<D> {
    fn clone(&self) -> Self {
        Mat { rows: self.rows, cols: self.cols, buf: Arc::clone(&self.buf), ready: self.ready.clone() }
    }
}

impl<D: Device> Mat<D> {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A shard's partial result of an all-reduce and the event after its write.
type Contribution<D> = (Mat<D>, Arc<<D as Device>::Event>);

/// A buffer another thread wrote or reads, and the event after which this
/// thread may let it go.
type Held<D> = (Arc<<D as Device>::Buffer>, Arc<<D as Device>::Event>);

/// A pass's weight gradients (dA1, dB1, dA2, dB2), as far as it computes them.
type Grads<D> = [Option<Mat<D>>; 4];

/// Per (stage, microbatch), one shard's weight gradients on the host.
type HostGrads = Vec<((usize, usize), ShardGrads)>;

/// What a forward keeps for its backward, on one shard.
struct Stash<D: Device> {
    x: Mat<D>,
    z1: Mat<D>,
    h: Mat<D>,
    z2: Mat<D>,
    backward: Option<Backward<D>>,
}

/// What the input-gradient pass leaves for the weight gradients.
struct Backward<D: Device> {
    dy: Mat<D>,
    dz2: Mat<D>,
    dh: Mat<D>,
    dz1: Mat<D>,
}

enum Value<D: Device> {
    Tensor(Mat<D>),
    Stash(Box<Stash<D>>),
    /// The stash of a forward the rank recomputes: only its input, until
    /// the `R` restores the rest.
    Checkpoint(Mat<D>),
}

/// A pass's state between its units.
struct Partial<D: Device> {
    x: Option<Mat<D>>,
    z1: Option<Mat<D>>,
    h: Option<Mat<D>>,
    dy: Option<Mat<D>>,
    dz2: Option<Mat<D>>,
    dh: Option<Mat<D>>,
    grads: Grads<D>,
}

impl<D: Device> Default for Partial<D> {
    fn default() -> Self {
        Partial { x: None, z1: None, h: None, dy: None, dz2: None, dh: None, grads: [None, None, None, None] }
    }
}

/// One shard thread's channels ([`threads::Ports`]), carrying device
/// matrices with the event after their last write.
type Ports<D> = threads::Ports<Mat<D>>;

/// The all-reduce among one rank's shard threads: every shard leaves its
/// partial result and an event; shard 0 sums them and leaves each shard
/// its copy.
struct Reducer<D: Device> {
    state: Mutex<Round<D>>,
    turned: Condvar,
}

struct Round<D: Device> {
    generation: u64,
    parts: Vec<Option<Contribution<D>>>,
    arrived: usize,
    outputs: Vec<Option<Mat<D>>>,
}

/// Runs `program` on `model` on `device`, every rank in this process, one
/// host thread per rank and shard. The program is verified first.
pub fn run<D: Device>(
    device: &D,
    program: &Program,
    model: &Model,
    options: CpuOptions,
) -> Result<CpuReport, ExecError> {
    prepare(program, model)?;
    let ranks: Vec<usize> = (0..program.ranks.len()).collect();
    execute(&[device], program, model, options, &ranks, Peers::Local)
}

/// Runs every rank of `program` in this process as [`run`] does, but with
/// its transfers through `fabric`, as separate processes would make them,
/// shard `k` on `devices[k]` (or all on one): how a transport is tested
/// against the sequential run.
pub fn run_over<D: Device>(
    devices: &[&D],
    program: &Program,
    model: &Model,
    options: CpuOptions,
    fabric: &dyn Fabric<D>,
) -> Result<CpuReport, ExecError> {
    prepare(program, model)?;
    let ranks: Vec<usize> = (0..program.ranks.len()).collect();
    execute(devices, program, model, options, &ranks, Peers::Fabric(fabric))
}

/// Runs the shard threads of `ranks` (every rank with [`Peers::Local`];
/// else the one rank this process runs, which has called [`prepare`]),
/// thread `t` being shard `t % tp` of `ranks[t / tp]`, on `devices[t % tp]`
/// (or every shard on `devices[0]`).
pub(crate) fn execute<D: Device>(
    devices: &[&D],
    program: &Program,
    model: &Model,
    options: CpuOptions,
    ranks: &[usize],
    peers: Peers<'_, D>,
) -> Result<CpuReport, ExecError> {
    if program.schedule.pipelines > 1 && matches!(&peers, Peers::Fabric(_)) {
        return Err(ExecError::Setup(format!(
            "`{}` runs {} pipelines (model copies); a device transport (NCCL) does not run the gradient \
             reductions between copies yet: run it over the host transport (--transport host)",
            program.schedule.name, program.schedule.pipelines
        )));
    }
    let tp = program.schedule.tp as usize;
    let threads = ranks.len() * tp;
    // With a fabric that sums the shards, each shard may have a device of its own.
    let collectives_on_links = matches!(&peers, Peers::Fabric(fabric) if fabric.carries_collectives());
    let handed: Vec<Handed<D>> = match peers {
        Peers::Local => threads::mesh(ranks.len(), tp).into_iter().map(Handed::Local).collect(),
        Peers::Staged(ports) => ports.into_iter().map(Handed::Staged).collect(),
        Peers::Fabric(fabric) => (0..threads).map(|_| Handed::Fabric(fabric)).collect(),
    };
    if handed.len() != threads {
        return Err(ExecError::Setup(format!("{} sets of links for {threads} shard threads", handed.len())));
    }
    if devices.is_empty() || (devices.len() > 1 && (devices.len() != tp || !collectives_on_links)) {
        return Err(ExecError::Setup(format!(
            "{} devices for {tp} tensor-parallel shards: give one device for all, or one per shard with a transport \
             that sums the shards (NCCL)",
            devices.len()
        )));
    }
    let reducers: Vec<Arc<Reducer<D>>> = ranks
        .iter()
        .map(|_| {
            let round = Round {
                generation: 0,
                parts: (0..tp).map(|_| None).collect(),
                arrived: 0,
                outputs: (0..tp).map(|_| None).collect(),
            };
            Arc::new(Reducer { state: Mutex::new(round), turned: Condvar::new() })
        })
        .collect();
    let board = Arc::new(Board::new(threads));
    // Every thread uploads its weights, then all start from one timed
    // event per device.
    let started = Barrier::new(threads + 1);
    let device_of = |shard: usize| shard % devices.len();
    let bases: Vec<OnceLock<D::Event>> = devices.iter().map(|_| OnceLock::new()).collect();
    let clocks =
        devices.iter().map(|d| d.new_stream(false)).collect::<Result<Vec<_>, _>>().map_err(ExecError::Setup)?;
    let results: Vec<Result<ThreadResult, ExecError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = handed
            .into_iter()
            .enumerate()
            .map(|(t, handed)| {
                let (rank, shard) = (ranks[t / tp], t % tp);
                let (board, reducer, started, base) =
                    (Arc::clone(&board), Arc::clone(&reducers[t / tp]), &started, &bases[device_of(shard)]);
                let device = devices[device_of(shard)];
                scope.spawn(move || {
                    let setup = Setup { device, program, model, options, rank, shard, thread: t, collectives_on_links };
                    let worker = Worker::new(setup, handed, Arc::clone(&board), reducer);
                    started.wait();
                    started.wait();
                    let result = match (worker, base.get()) {
                        (Ok(mut worker), Some(base)) => worker.run(base),
                        (Err(e), _) => Err(e),
                        (_, None) => Err(ExecError::Setup("the device could not record the starting event".into())),
                    };
                    if result.is_err() {
                        board.stop();
                    }
                    result
                })
            })
            .collect();
        started.wait();
        let mut failed = None;
        for ((device, clock), base) in devices.iter().zip(&clocks).zip(&bases) {
            match device.record(clock, true) {
                Ok(event) => {
                    let _ = base.set(event);
                }
                Err(message) => failed = Some(message),
            }
        }
        started.wait();
        let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap_or(Err(ExecError::Panicked))).collect();
        if let Some(message) = failed {
            results.push(Err(ExecError::Setup(format!("cannot record the starting event: {message}"))));
        }
        results
    });
    threads::report(program, model, ranks, &board, results)
}

/// Who a shard thread is.
struct Setup<'a, D: Device> {
    device: &'a D,
    program: &'a Program,
    model: &'a Model,
    options: CpuOptions,
    rank: usize,
    shard: usize,
    /// Its index among the run's shard threads (the board's).
    thread: usize,
    /// Whether its link sums the rank's shards (else the rank's reducer does).
    collectives_on_links: bool,
}

struct Worker<'a, D: Device> {
    device: &'a D,
    program: &'a Program,
    options: CpuOptions,
    rank: usize,
    shard: usize,
    thread: usize,
    compute: D::Stream,
    comm: D::Stream,
    /// Per stage this rank holds: A1, B1, A2, B2 of this shard.
    weights: HashMap<usize, [Mat<D>; 4]>,
    /// The first stage's inputs, per microbatch, if this rank holds it.
    inputs: HashMap<usize, Mat<D>>,
    values: HashMap<Buffer, Value<D>>,
    /// The pairs whose forwards keep only a checkpoint ([`Value::Checkpoint`]).
    recomputed: HashSet<(stp_ir::Stage, stp_ir::Microbatch)>,
    /// The shape of every buffer that crosses ranks (a stage's input or
    /// its gradient): rows × hidden.
    shape: (usize, usize),
    route: Route<'a, D>,
    board: Arc<Board>,
    reducer: Arc<Reducer<D>>,
    /// Whether the link to the peers sums this rank's shards.
    sums_on_link: bool,
    /// Buffers another thread wrote or will read, kept until that work's event.
    pending: Vec<Held<D>>,
    /// Per instruction, timed events before and after it.
    spans: Vec<(usize, D::Event, D::Event)>,
    grads: Vec<((usize, usize), Grads<D>)>,
    /// Gradients brought to the host by reductions, every owner's.
    reduced: HostGrads,
    model: &'a Model,
}

impl<'a, D: Device> Worker<'a, D> {
    /// Makes the thread's streams, uploads its weights and inputs, and
    /// connects it to its peers.
    fn new(
        setup: Setup<'a, D>,
        handed: Handed<'a, D>,
        board: Arc<Board>,
        reducer: Arc<Reducer<D>>,
    ) -> Result<Self, ExecError> {
        let Setup { device, program, model, options, rank, shard, thread, collectives_on_links } = setup;
        let setup = |what: &str, e: String| ExecError::Setup(format!("rank {rank} shard {shard}: {what}: {e}"));
        let compute = device.new_stream(true).map_err(|e| setup("cannot create its compute stream", e))?;
        let comm = device.new_stream(false).map_err(|e| setup("cannot create its communication stream", e))?;
        let upload = |t: &Tensor| -> DeviceResult<Mat<D>> {
            let buf = device.upload(&compute, &t.data)?;
            Ok(Mat { rows: t.rows, cols: t.cols, buf: Arc::new(buf), ready: None })
        };
        let mut weights = HashMap::new();
        for (s, owner) in program.schedule.placement.iter().enumerate() {
            if owner.index() != rank {
                continue;
            }
            // Copies of a part (several pipelines) share its weights.
            let w = &model.stages[program.schedule.chain().part(stp_ir::Stage(s as u32)) as usize][shard];
            let mats = [upload(&w.a1), upload(&w.b1), upload(&w.a2), upload(&w.b2)];
            let [a1, b1, a2, b2] = mats.map(|m| m.map_err(|e| setup("cannot upload its weights", e)));
            weights.insert(s, [a1?, b1?, a2?, b2?]);
        }
        let mut inputs = HashMap::new();
        let chain = program.schedule.chain();
        let feeds = program.schedule.placement.iter().enumerate();
        if feeds.filter(|(s, _)| chain.is_first(stp_ir::Stage(*s as u32))).any(|(_, owner)| owner.index() == rank) {
            for (mb, x) in model.inputs.iter().enumerate() {
                inputs.insert(mb, upload(x).map_err(|e| setup("cannot upload the inputs", e))?);
            }
        }
        device.synchronize(&compute).map_err(|e| setup("cannot finish uploading", e))?;
        let route = match handed {
            Handed::Local(ports) => Route::Local(ports),
            Handed::Staged(ports) => Route::Staged(ports),
            Handed::Fabric(fabric) => {
                let link = fabric.connect(device, Rank(rank as u32), shard, &comm);
                Route::Device(link.map_err(|e| setup("cannot join its peers", e))?)
            }
        };
        let shape = model.inputs.first().map_or((0, 0), |x| (x.rows, x.cols));
        Ok(Worker {
            device,
            program,
            options,
            rank,
            shard,
            thread,
            compute,
            comm,
            weights,
            inputs,
            values: HashMap::new(),
            recomputed: program.ranks[rank].recomputed(),
            shape,
            route,
            board,
            reducer,
            sums_on_link: collectives_on_links,
            pending: Vec::new(),
            spans: Vec::new(),
            grads: Vec::new(),
            reduced: Vec::new(),
            model,
        })
    }

    fn run(&mut self, base: &D::Event) -> Result<ThreadResult, ExecError> {
        let setup = |e: String| self.error(0, format!("cannot start: {e}"));
        self.device.wait(&self.compute, base).map_err(setup)?;
        self.device.wait(&self.comm, base).map_err(setup)?;
        let mut peak_stashes = 0;
        let instrs = &self.program.ranks[self.rank].instrs;
        for (i, instr) in instrs.iter().enumerate() {
            self.board.enter(self.thread, i);
            let before = self.device.record(self.stream_of(instr), true);
            match instr {
                Instr::Compute(c) => {
                    // Between ops, after the frees that follow the previous one.
                    peak_stashes = peak_stashes.max(self.live_stashes());
                    self.compute(c, i)?;
                }
                Instr::Comm(ops) => match self.route {
                    Route::Local(_) => threads::exchange::<Mat<D>, _>(self, ops, i)?,
                    Route::Staged(_) => threads::exchange::<Tensor, _>(self, ops, i)?,
                    Route::Device(_) => self.exchange_on_device(ops, i)?,
                },
                Instr::Free { buffer } => {
                    self.values
                        .remove(buffer)
                        .ok_or_else(|| self.error(i, format!("{buffer} is freed but not live")))?;
                }
                Instr::Reduce { stages } => self.reduce(stages, i)?,
            }
            let after = self.device.record(self.stream_of(instr), true);
            let span = before.and_then(|b| after.map(|a| (i, b, a)));
            self.spans.push(self.check(i, span)?);
            if self.options.serialize {
                self.check(i, self.device.synchronize(&self.compute))?;
                self.check(i, self.device.synchronize(&self.comm))?;
            }
            self.release_finished();
        }
        peak_stashes = peak_stashes.max(self.live_stashes());
        self.wait_for_device()?;
        self.board.finish(self.thread);
        let last = instrs.len();
        self.check(last, self.device.synchronize(&self.compute))?;
        self.check(last, self.device.synchronize(&self.comm))?;
        self.pending.clear();
        let mut timeline = Vec::with_capacity(self.spans.len());
        for (i, before, after) in &self.spans {
            let start = self.check(*i, self.device.seconds_between(base, before))?;
            let end = self.check(*i, self.device.seconds_between(base, after))?;
            timeline.push((*i, start, end));
        }
        let mut grads = self.download_gradients(last)?;
        grads.append(&mut self.reduced);
        Ok(ThreadResult { grads, peak_stashes, timeline })
    }

    /// The stream an instruction's work goes on (a free enqueues nothing:
    /// its span is timed on the compute stream).
    fn stream_of(&self, instr: &Instr) -> &D::Stream {
        if matches!(instr, Instr::Comm(_)) {
            &self.comm
        } else {
            &self.compute
        }
    }

    /// Waits until the device has run every instruction, giving up when
    /// none finishes for the deadlock timeout: a transfer on the device
    /// (NCCL) whose peer never posts its match blocks the stream, not this
    /// thread. Names the first instruction the device has not finished.
    fn wait_for_device(&self) -> Result<(), ExecError> {
        let mut since = Instant::now();
        let mut next = 0;
        while let Some((i, _, after)) = self.spans.get(next) {
            if self.check(*i, self.device.is_complete(after))? {
                next += 1;
                since = Instant::now();
            } else if self.board.gives_up(since, self.options.timeout) {
                self.board.enter(self.thread, *i);
                return Err(ExecError::Stuck);
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Makes the communication stream wait until `m` has been written.
    fn comm_waits_for(&self, m: &Mat<D>, instr: usize) -> Result<(), ExecError> {
        let written = match &m.ready {
            Some(event) => Arc::clone(event),
            None => Arc::new(self.check(instr, self.device.record(&self.compute, false))?),
        };
        self.check(instr, self.device.wait(&self.comm, &written))
    }

    /// One transfer instruction as one group on the device's transport.
    fn exchange_on_device(&mut self, ops: &[Transfer], instr: usize) -> Result<(), ExecError> {
        let mut sends = Vec::new();
        for t in ops.iter().filter(|t| t.dir == Direction::Send) {
            let mat = self.tensor(t.buffer, instr)?;
            self.comm_waits_for(&mat, instr)?;
            sends.push((t.peer, mat));
        }
        let (rows, cols) = self.shape;
        let recvs: Vec<&Transfer> = ops.iter().filter(|t| t.dir == Direction::Recv).collect();
        let lengths: Vec<(Rank, usize)> = recvs.iter().map(|t| (t.peer, rows * cols)).collect();
        let Route::Device(link) = &mut self.route else {
            return Err(self.error(instr, "no device transport to the peers".into()));
        };
        let outgoing: Vec<(Rank, &D::Buffer)> = sends.iter().map(|(peer, m)| (*peer, &*m.buf)).collect();
        let received = link.group(self.device, &self.comm, &outgoing, &lengths);
        let received = self.check(instr, received)?;
        let done = Arc::new(self.check(instr, self.device.record(&self.comm, false))?);
        for (_, m) in sends {
            self.pending.push((m.buf, Arc::clone(&done)));
        }
        for (t, buf) in recvs.into_iter().zip(received) {
            let mat = Mat { rows, cols, buf: Arc::new(buf), ready: Some(Arc::clone(&done)) };
            self.values.insert(t.buffer, Value::Tensor(mat));
        }
        Ok(())
    }

    /// `reduce stages`: this shard's gradients so far come to the host and
    /// are exchanged with the other owners there, as the CPU backend does
    /// ([`threads::reduce_gradients`]); local links carry them as device
    /// matrices, staged ones as host tensors.
    fn reduce(&mut self, stages: &[stp_ir::Stage], instr: usize) -> Result<(), ExecError> {
        let mut host = std::mem::take(&mut self.reduced);
        host.append(&mut self.download_gradients(instr)?);
        let reduction = threads::Reduction {
            program: self.program,
            model: self.model,
            rank: Rank(self.rank as u32),
            shard: self.shard,
            stages,
        };
        match self.route {
            Route::Local(_) => {
                let carry = threads::Carry { pack: Self::upload_tensor, unpack: Self::download_matrix };
                threads::reduce_gradients::<Mat<D>, _>(self, reduction, &mut host, instr, carry)?
            }
            Route::Staged(_) => {
                threads::reduce_gradients::<Tensor, _>(self, reduction, &mut host, instr, threads::Carry::host())?
            }
            Route::Device(_) => return Err(self.error(instr, "no gradient reduction over a device transport".into())),
        }
        self.reduced = host;
        Ok(())
    }

    /// A host tensor as a device matrix, with the event its upload ends at.
    fn upload_tensor(&mut self, t: Tensor, instr: usize) -> Result<Mat<D>, ExecError> {
        let buf = self.check(instr, self.device.upload(&self.comm, &t.data))?;
        let uploaded = Arc::new(self.check(instr, self.device.record(&self.comm, false))?);
        Ok(Mat { rows: t.rows, cols: t.cols, buf: Arc::new(buf), ready: Some(uploaded) })
    }

    /// A device matrix back on the host, once its writer is done.
    fn download_matrix(&mut self, m: Mat<D>, instr: usize) -> Result<Tensor, ExecError> {
        if let Some(written) = &m.ready {
            self.check(instr, self.device.wait(&self.comm, written))?;
        }
        let data = self.check(instr, self.device.download(&self.comm, &m.buf))?;
        Ok(Tensor { rows: m.rows, cols: m.cols, data })
    }

    /// This shard's weight gradients, per (stage, microbatch), on the host.
    fn download_gradients(&mut self, instr: usize) -> Result<HostGrads, ExecError> {
        let mut out = Vec::with_capacity(self.grads.len());
        for (key, mats) in std::mem::take(&mut self.grads) {
            let mut host: [Option<Tensor>; 4] = [None, None, None, None];
            for (slot, mat) in host.iter_mut().zip(mats) {
                if let Some(m) = mat {
                    let data = self.check(instr, self.device.download(&self.compute, &m.buf))?;
                    *slot = Some(Tensor { rows: m.rows, cols: m.cols, data });
                }
            }
            let [a1, b1, a2, b2] = host;
            out.push((key, ShardGrads { a1, b1, a2, b2 }));
        }
        Ok(out)
    }

    /// Drops the buffers whose cross-stream work has finished.
    fn release_finished(&mut self) {
        let device = self.device;
        self.pending.retain(|(_, event)| !matches!(device.is_complete(event), Ok(true)));
    }

    fn live_stashes(&self) -> usize {
        self.values.values().filter(|v| matches!(v, Value::Stash(_))).count()
    }

    fn error(&self, instr: usize, message: String) -> ExecError {
        ExecError::Runtime { rank: Rank(self.rank as u32), instr, message }
    }

    /// A device error at instruction `instr`, said as a runtime error.
    fn check<T>(&self, instr: usize, result: DeviceResult<T>) -> Result<T, ExecError> {
        result.map_err(|e| self.error(instr, format!("device: {e}")))
    }

    fn tensor(&self, buffer: Buffer, instr: usize) -> Result<Mat<D>, ExecError> {
        match self.values.get(&buffer) {
            Some(Value::Tensor(t)) => Ok(t.clone()),
            Some(Value::Stash(_) | Value::Checkpoint(_)) => {
                Err(self.error(instr, format!("{buffer} holds a stash, not a tensor")))
            }
            None => Err(self.error(instr, format!("reads {buffer}, which is not live"))),
        }
    }

    fn stash(&self, pass: Pass, instr: usize) -> Result<&Stash<D>, ExecError> {
        match self.values.get(&Buffer::stash(pass.stage, pass.mb)) {
            Some(Value::Stash(s)) => Ok(s),
            Some(Value::Checkpoint(_)) => {
                Err(self.error(instr, format!("`{pass}` needs the activations its `R` restores, which has not run")))
            }
            _ => Err(self.error(instr, format!("`{pass}` needs the stash of its forward, which is not live"))),
        }
    }

    /// Makes the compute stream wait until `m` may be read.
    fn ready(&self, m: &Mat<D>, instr: usize) -> Result<(), ExecError> {
        match &m.ready {
            Some(event) => self.check(instr, self.device.wait(&self.compute, event)),
            None => Ok(()),
        }
    }

    /// `op(a) · op(b)` on the compute stream.
    fn gemm(&self, a: &Mat<D>, ta: bool, b: &Mat<D>, tb: bool, instr: usize) -> Result<Mat<D>, ExecError> {
        self.ready(a, instr)?;
        self.ready(b, instr)?;
        let rows = if ta { a.cols } else { a.rows };
        let cols = if tb { b.rows } else { b.cols };
        let out = self.device.gemm(&self.compute, (&a.buf, (a.rows, a.cols), ta), (&b.buf, (b.rows, b.cols), tb));
        Ok(Mat { rows, cols, buf: Arc::new(self.check(instr, out)?), ready: None })
    }

    fn tanh(&self, x: &Mat<D>, instr: usize) -> Result<Mat<D>, ExecError> {
        let out = self.device.tanh(&self.compute, &x.buf, x.len());
        Ok(Mat { rows: x.rows, cols: x.cols, buf: Arc::new(self.check(instr, out)?), ready: None })
    }

    /// `(d_out · Bᵀ) ⊙ (1 − z²)`, as [`crate::model`]'s `tanh_grad`.
    fn tanh_grad(&self, b: &Mat<D>, z: &Mat<D>, d_out: &Mat<D>, instr: usize) -> Result<Mat<D>, ExecError> {
        let g = self.gemm(d_out, false, b, true, instr)?;
        self.ready(z, instr)?;
        let out = self.device.tanh_grad(&self.compute, &g.buf, &z.buf, g.len());
        Ok(Mat { rows: g.rows, cols: g.cols, buf: Arc::new(self.check(instr, out)?), ready: None })
    }

    /// Runs a compute's units in the order the program lists them.
    fn compute(&mut self, c: &Compute, instr: usize) -> Result<(), ExecError> {
        let units = if c.units.is_empty() { c.canonical_units() } else { c.units.clone() };
        let mut partials: Vec<Partial<D>> = c.passes.iter().map(|_| Partial::default()).collect();
        for u in units {
            let i = usize::from(u.pass);
            self.unit(c.passes[i], u.part, &mut partials[i], instr)?;
        }
        for (pass, partial) in c.passes.iter().zip(partials) {
            if matches!(pass.kind, PassKind::W | PassKind::BW) {
                self.grads.push(((pass.stage.index(), pass.mb.index()), partial.grads));
            }
        }
        Ok(())
    }

    /// The sum over shards of `partial`, in shard order, ready for this
    /// shard's compute stream once its event has passed.
    fn all_reduce(&mut self, partial: Mat<D>, instr: usize) -> Result<Mat<D>, ExecError> {
        let tp = self.program.schedule.tp as usize;
        if tp == 1 {
            return Ok(partial);
        }
        if self.sums_on_link {
            return self.all_reduce_on_link(partial, instr);
        }
        let written = Arc::new(self.check(instr, self.device.record(&self.compute, false))?);
        let reducer = Arc::clone(&self.reducer);
        let mut round = reducer.state.lock().map_err(|_| ExecError::Panicked)?;
        let generation = round.generation;
        round.parts[self.shard] = Some((partial, written));
        round.arrived += 1;
        reducer.turned.notify_all();
        let started = Instant::now();
        if self.shard == 0 {
            while round.arrived < tp {
                if self.board.gives_up(started, self.options.timeout) {
                    return Err(ExecError::Stuck);
                }
                round = reducer.turned.wait_timeout(round, slice()).map_err(|_| ExecError::Panicked)?.0;
            }
            let parts: Vec<Contribution<D>> = round.parts.iter_mut().filter_map(Option::take).collect();
            let outputs = self.sum_parts(&parts, instr)?;
            for (slot, out) in round.outputs.iter_mut().zip(outputs) {
                *slot = Some(out);
            }
            round.arrived = 0;
            round.generation += 1;
            reducer.turned.notify_all();
        } else {
            while round.generation == generation {
                if self.board.gives_up(started, self.options.timeout) {
                    return Err(ExecError::Stuck);
                }
                round = reducer.turned.wait_timeout(round, slice()).map_err(|_| ExecError::Panicked)?.0;
            }
        }
        round.outputs[self.shard].take().ok_or(ExecError::Panicked)
    }

    /// The sum over shards through the device's transport, on this
    /// shard's communication stream.
    fn all_reduce_on_link(&mut self, partial: Mat<D>, instr: usize) -> Result<Mat<D>, ExecError> {
        self.comm_waits_for(&partial, instr)?;
        let Route::Device(link) = &mut self.route else {
            return Err(self.error(instr, "no device transport to sum the shards".into()));
        };
        let sum = link.all_reduce(self.device, &self.comm, &partial.buf, partial.len());
        let sum = self.check(instr, sum)?;
        let done = Arc::new(self.check(instr, self.device.record(&self.comm, false))?);
        self.pending.push((partial.buf, Arc::clone(&done)));
        Ok(Mat { rows: partial.rows, cols: partial.cols, buf: Arc::new(sum), ready: Some(done) })
    }

    /// On this (shard 0's) communication stream: waits for every part,
    /// sums them in shard order, and makes one copy per shard.
    fn sum_parts(&mut self, parts: &[Contribution<D>], instr: usize) -> Result<Vec<Mat<D>>, ExecError> {
        let (device, comm) = (self.device, &self.comm);
        let (rows, cols) = (parts[0].0.rows, parts[0].0.cols);
        let n = rows * cols;
        for (_, written) in parts {
            self.check(instr, device.wait(comm, written))?;
        }
        let mut total = self.check(instr, device.zeros(comm, n))?;
        for (part, _) in parts {
            self.check(instr, device.add_into(comm, &mut total, &part.buf, n))?;
        }
        let mut copies = Vec::with_capacity(parts.len());
        for _ in 1..parts.len() {
            copies.push(self.check(instr, device.copy(comm, &total, n))?);
        }
        copies.insert(0, total);
        let done = Arc::new(self.check(instr, device.record(comm, false))?);
        for (part, _) in parts {
            self.pending.push((Arc::clone(&part.buf), Arc::clone(&done)));
        }
        Ok(copies
            .into_iter()
            .map(|buf| Mat { rows, cols, buf: Arc::new(buf), ready: Some(Arc::clone(&done)) })
            .collect())
    }

    fn weights(&self, pass: Pass, instr: usize) -> Result<[Mat<D>; 4], ExecError> {
        self.weights
            .get(&pass.stage.index())
            .cloned()
            .ok_or_else(|| self.error(instr, format!("`{pass}` runs on a rank that does not hold its stage")))
    }

    /// One unit of one pass on this shard.
    fn unit(&mut self, pass: Pass, part: Part, st: &mut Partial<D>, instr: usize) -> Result<(), ExecError> {
        let [a1, b1, a2, b2] = self.weights(pass, instr)?;
        let rank = Rank(self.rank as u32);
        let missing = |what: &str| ExecError::Runtime {
            rank,
            instr,
            message: format!("`{pass}`: unit {} runs before {what}", part.as_str()),
        };
        match (pass.kind, part) {
            (PassKind::F | PassKind::R, Part::Attention) => {
                let x = match (pass.kind, self.program.schedule.chain().prev(pass.stage)) {
                    (PassKind::R, _) => match self.values.get(&Buffer::stash(pass.stage, pass.mb)) {
                        Some(Value::Checkpoint(x)) => x.clone(),
                        _ => return Err(self.error(instr, format!("`{pass}` finds no checkpoint of its forward"))),
                    },
                    (_, Some(prev)) => self.tensor(Buffer::act(prev, pass.mb), instr)?,
                    (_, None) => self
                        .inputs
                        .get(&pass.mb.index())
                        .cloned()
                        .ok_or_else(|| self.error(instr, format!("`{pass}` has no input")))?,
                };
                let z1 = self.tanh(&self.gemm(&x, false, &a1, false, instr)?, instr)?;
                let p = self.gemm(&z1, false, &b1, false, instr)?;
                st.h = Some(self.all_reduce(p, instr)?);
                st.x = Some(x);
                st.z1 = Some(z1);
            }
            (PassKind::F | PassKind::R, Part::Mlp) => {
                let h = st.h.take().ok_or_else(|| missing("attn"))?;
                let z2 = self.tanh(&self.gemm(&h, false, &a2, false, instr)?, instr)?;
                let p = self.gemm(&z2, false, &b2, false, instr)?;
                let y = self.all_reduce(p, instr)?;
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
                // The loss 0.5·|y|² has gradient y: the last stage reads its own output.
                let dy_buffer = pass.output_grad(self.program.schedule.chain());
                let dy = self.tensor(dy_buffer, instr)?;
                let z2 = self.stash(pass, instr)?.z2.clone();
                let dz2 = self.tanh_grad(&b2, &z2, &dy, instr)?;
                let p = self.gemm(&dz2, false, &a2, true, instr)?;
                st.dh = Some(self.all_reduce(p, instr)?);
                st.dy = Some(dy);
                st.dz2 = Some(dz2);
            }
            (PassKind::B | PassKind::BW, Part::AttentionDgrad) => {
                let dh = st.dh.clone().ok_or_else(|| missing("mlp-dgrad"))?;
                let z1 = self.stash(pass, instr)?.z1.clone();
                let dz1 = self.tanh_grad(&b1, &z1, &dh, instr)?;
                let p = self.gemm(&dz1, false, &a1, true, instr)?;
                let dx = self.all_reduce(p, instr)?;
                if !self.program.schedule.chain().is_first(pass.stage) {
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
                let (h, z2) = (s.h.clone(), s.z2.clone());
                let (dz2, dy) = match (&s.backward, &st.dz2, &st.dy) {
                    (_, Some(dz2), Some(dy)) => (dz2.clone(), dy.clone()),
                    (Some(b), _, _) => (b.dz2.clone(), b.dy.clone()),
                    _ => return Err(missing("mlp-dgrad")),
                };
                st.grads[2] = Some(self.gemm(&h, true, &dz2, false, instr)?);
                st.grads[3] = Some(self.gemm(&z2, true, &dy, false, instr)?);
            }
            (PassKind::W | PassKind::BW, Part::AttentionWgrad) => {
                let s = self.stash(pass, instr)?;
                let b = s.backward.as_ref().ok_or_else(|| missing("attn-dgrad"))?;
                let (x, z1, dz1, dh) = (s.x.clone(), s.z1.clone(), b.dz1.clone(), b.dh.clone());
                st.grads[0] = Some(self.gemm(&x, true, &dz1, false, instr)?);
                st.grads[1] = Some(self.gemm(&z1, true, &dh, false, instr)?);
            }
            _ => return Err(self.error(instr, format!("`{pass}` has no unit {}", part.as_str()))),
        }
        Ok(())
    }
}

impl<D: Device> threads::Waiter for Worker<'_, D> {
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

/// In one process, a point-to-point send hands over the matrix with an
/// event after its last write; a receive is a device-to-device copy on the
/// communication stream after that event, itself followed by an event the
/// compute stream waits for before reading.
impl<D: Device> threads::Party<Mat<D>> for Worker<'_, D> {
    fn ports(&self) -> Option<&Ports<D>> {
        match &self.route {
            Route::Local(ports) => Some(ports),
            _ => None,
        }
    }

    fn outgoing(&mut self, buffer: Buffer, instr: usize) -> Result<Mat<D>, ExecError> {
        let mut mat = self.tensor(buffer, instr)?;
        if mat.ready.is_none() {
            mat.ready = Some(Arc::new(self.check(instr, self.device.record(&self.compute, false))?));
        }
        Ok(mat)
    }

    fn incoming(&mut self, buffer: Buffer, sent: Mat<D>, instr: usize) -> Result<(), ExecError> {
        if let Some(written) = &sent.ready {
            self.check(instr, self.device.wait(&self.comm, written))?;
        }
        let copy = self.check(instr, self.device.copy(&self.comm, &sent.buf, sent.len()))?;
        let copied = Arc::new(self.check(instr, self.device.record(&self.comm, false))?);
        self.pending.push((Arc::clone(&sent.buf), Arc::clone(&copied)));
        let mat = Mat { rows: sent.rows, cols: sent.cols, buf: Arc::new(copy), ready: Some(copied) };
        self.values.insert(buffer, Value::Tensor(mat));
        Ok(())
    }
}

/// Across processes without a device transport, a send copies the matrix
/// to the host once its write has finished (on the communication stream,
/// so compute goes on), and a receive uploads it on the communication
/// stream, followed by an event the compute stream waits for.
impl<D: Device> threads::Party<Tensor> for Worker<'_, D> {
    fn ports(&self) -> Option<&threads::Ports<Tensor>> {
        match &self.route {
            Route::Staged(ports) => Some(ports),
            _ => None,
        }
    }

    fn outgoing(&mut self, buffer: Buffer, instr: usize) -> Result<Tensor, ExecError> {
        let mat = self.tensor(buffer, instr)?;
        self.comm_waits_for(&mat, instr)?;
        let data = self.check(instr, self.device.download(&self.comm, &mat.buf))?;
        Ok(Tensor { rows: mat.rows, cols: mat.cols, data })
    }

    fn incoming(&mut self, buffer: Buffer, sent: Tensor, instr: usize) -> Result<(), ExecError> {
        let buf = self.check(instr, self.device.upload(&self.comm, &sent.data))?;
        let uploaded = Arc::new(self.check(instr, self.device.record(&self.comm, false))?);
        let mat = Mat { rows: sent.rows, cols: sent.cols, buf: Arc::new(buf), ready: Some(uploaded) };
        self.values.insert(buffer, Value::Tensor(mat));
        Ok(())
    }
}
