//! The CUDA backend (feature `cuda`): the stream runner ([`crate::streams`])
//! on a GPU. cudarc opens the CUDA libraries at run time, so this compiles
//! on machines without CUDA; every entry point first checks that the
//! libraries are there and reports clearly when they are not (cudarc
//! itself would panic).
//!
//! Single-GPU mode runs every pipeline rank and tensor-parallel shard of a
//! program in one process on one GPU, each with its own compute and
//! communication stream: GEMMs through cuBLAS (one handle per compute
//! stream), tanh and its gradient and the all-reduce's adds as small
//! kernels, point-to-point transfers as device-to-device copies ordered
//! by events. Multi-process mode ([`run_process`]) runs one pipeline rank
//! per process, its shards on the process's GPU or each on a GPU of its
//! own, with point-to-point transfers through NCCL (one communicator per
//! tensor-parallel shard, linking that shard of every rank; the unique ids
//! travel over the TCP rendezvous) or staged through host memory; shards
//! on GPUs of their own sum their partial results with an NCCL all-reduce
//! (one communicator per process). The kernels ship as PTX, which the
//! driver compiles; where the driver refuses it, the same kernels are
//! compiled from CUDA C with NVRTC, if the machine has it.

use crate::cpu::{CpuOptions, CpuReport};
use crate::device::{ColumnMajorGemm, Device, DeviceResult};
use crate::launch::{self, Env};
use crate::model::Model;
use crate::streams::{self, Fabric, Link, Peers};
use crate::ExecError;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::Duration;
use stp_ir::{Program, Rank};

/// What the machine offers.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    /// Number of CUDA devices.
    pub devices: usize,
    /// Name of device 0.
    pub name: String,
    /// Whether cuBLAS can be opened (single-GPU mode needs it).
    pub cublas: bool,
    /// Whether NCCL can be opened (multi-process runs would need it).
    pub nccl: bool,
}

/// Finds the CUDA driver, device 0, cuBLAS and NCCL.
pub fn probe() -> Result<CudaInfo, ExecError> {
    require_driver()?;
    let devices =
        CudaContext::device_count().map_err(|e| ExecError::Setup(format!("cannot count CUDA devices: {e:?}")))?;
    if devices < 1 {
        return Err(ExecError::Setup("the CUDA driver reports no devices".into()));
    }
    let context = CudaContext::new(0).map_err(|e| ExecError::Setup(format!("cannot open CUDA device 0: {e:?}")))?;
    let name = context.name().map_err(|e| ExecError::Setup(format!("cannot read the device's name: {e:?}")))?;
    // SAFETY: only checks whether the shared libraries can be opened.
    let (cublas, nccl) = unsafe { (cudarc::cublas::sys::is_culib_present(), cudarc::nccl::sys::is_culib_present()) };
    Ok(CudaInfo { devices: devices as usize, name, cublas, nccl })
}

fn require_driver() -> Result<(), ExecError> {
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(ExecError::Setup(
            "no CUDA driver (libcuda) on this machine; use --backend cpu, or --backend streams to run the CUDA \
             backend's stream logic on the host"
                .into(),
        ));
    }
    Ok(())
}

/// Runs `program` on `device` (see [`CudaDevice::open`]) in single-GPU
/// mode: every rank and shard in this process, each with its own streams.
pub fn run(device: &CudaDevice, program: &Program, model: &Model, options: CpuOptions) -> Result<CpuReport, ExecError> {
    streams::run(device, program, model, options)
}

/// How the processes of a multi-process run reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// NCCL send and receive on the communication stream.
    Nccl,
    /// Staged through host memory, over the rendezvous's TCP links.
    Host,
}

/// Runs this process's rank of `program` (one process per pipeline rank,
/// as [`crate::launch`] meets them), its tensor-parallel shards as
/// threads: all on `devices[0]`, or shard `k` on `devices[k]` (NCCL only).
pub fn run_process(
    devices: &[CudaDevice],
    program: &Program,
    model: &Model,
    options: CpuOptions,
    env: &Env,
    rendezvous: Duration,
    transport: Transport,
) -> Result<CpuReport, ExecError> {
    let tp = program.schedule.tp as usize;
    let per_shard = devices.len() > 1;
    match (transport, devices) {
        (Transport::Host, [device]) => return launch::run_process_on(device, program, model, options, env, rendezvous),
        (Transport::Host, _) => {
            return Err(ExecError::Setup(
                "shards on GPUs of their own sum their results over NCCL: use --transport nccl".into(),
            ))
        }
        (_, []) => return Err(ExecError::Setup("no GPU to run on".into())),
        _ if per_shard && devices.len() != tp => {
            return Err(ExecError::Setup(format!("{} GPUs for {tp} tensor-parallel shards", devices.len())))
        }
        _ => {}
    }
    let make_ids = move || Nccl::make_ids(tp);
    launch::linked(program, model, options, env, rendezvous, Some(&make_ids), |_, ids| {
        // Rank 0 has it; this machine may not (cudarc would panic).
        require_nccl().map_err(|e| ExecError::Setup(format!("rank {}: {e}", env.rank)))?;
        let mut nccl = Nccl::from_ids(&ids, env.rank, env.world_size, tp).map_err(ExecError::Setup)?;
        if per_shard {
            // The shards of this rank are all in this process: its own id.
            nccl.shards =
                Some(Id::new().map_err(|e| ExecError::Setup(format!("NCCL cannot make a unique id: {e:?}")))?);
        }
        let devices: Vec<&CudaDevice> = devices.iter().collect();
        streams::execute(&devices, program, model, options, &[env.rank], Peers::Fabric(&nccl))
    })
}

/// Binds `stream`'s GPU to the calling thread, as NCCL (which works on
/// the current device) needs; cudarc's own calls bind it themselves.
fn make_current(stream: &CudaQueue) -> DeviceResult<()> {
    driver("cannot make the GPU current", stream.stream.context().bind_to_thread())
}

fn require_nccl() -> Result<(), String> {
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("NCCL (libnccl.so.2) is not on the library path; use --transport host".into());
    }
    Ok(())
}

/// NCCL as the stream runner's [`Fabric`]: shard `k` of every pipeline
/// rank shares communicator `k` (rank = pipeline rank); with `shards`,
/// the rank's shards share one more (rank = shard) for their all-reduces.
struct Nccl {
    ids: Vec<Id>,
    shards: Option<Id>,
    rank: usize,
    world: usize,
    tp: usize,
}

/// The length of an NCCL unique id.
const NCCL_ID: usize = 128;

impl Nccl {
    /// One unique id per shard, as bytes for the rendezvous.
    fn make_ids(tp: usize) -> Result<Vec<u8>, String> {
        require_nccl()?;
        let mut bytes = Vec::with_capacity(tp * NCCL_ID);
        for _ in 0..tp {
            let id = Id::new().map_err(|e| format!("NCCL cannot make a unique id: {e:?}"))?;
            bytes.extend(id.internal().iter().map(|c| *c as u8));
        }
        Ok(bytes)
    }

    fn from_ids(bytes: &[u8], rank: usize, world: usize, tp: usize) -> Result<Nccl, String> {
        if bytes.len() != tp * NCCL_ID {
            return Err(format!("rank 0 sent {} bytes of NCCL ids, not {tp} × {NCCL_ID}", bytes.len()));
        }
        let ids = bytes
            .chunks_exact(NCCL_ID)
            .map(|chunk| {
                let mut internal = [0 as std::ffi::c_char; NCCL_ID];
                for (slot, b) in internal.iter_mut().zip(chunk) {
                    *slot = *b as std::ffi::c_char;
                }
                Id::uninit(internal)
            })
            .collect();
        Ok(Nccl { ids, shards: None, rank, world, tp })
    }
}

impl Fabric<CudaDevice> for Nccl {
    fn carries_collectives(&self) -> bool {
        self.shards.is_some()
    }

    fn connect<'f>(
        &'f self,
        _: &CudaDevice,
        _: Rank,
        shard: usize,
        stream: &CudaQueue,
    ) -> DeviceResult<Box<dyn Link<CudaDevice> + 'f>> {
        let id = *self.ids.get(shard).ok_or_else(|| format!("no NCCL id for shard {shard}"))?;
        // NCCL works on the thread's current device: this shard's GPU.
        make_current(stream)?;
        let comm = Comm::from_rank(Arc::clone(&stream.stream), self.rank, self.world, id)
            .map_err(|e| format!("NCCL cannot join communicator {shard} as rank {}: {}", self.rank, nccl_reason(&e)))?;
        let shards = match self.shards {
            Some(id) => Some(Comm::from_rank(Arc::clone(&stream.stream), shard, self.tp, id).map_err(|e| {
                format!("NCCL cannot join the shards' communicator as shard {shard}: {}", nccl_reason(&e))
            })?),
            None => None,
        };
        Ok(Box::new(NcclLink { comm, shards }))
    }
}

struct NcclLink {
    comm: Comm,
    /// The rank's shards, when each has a GPU of its own.
    shards: Option<Comm>,
}

impl Link<CudaDevice> for NcclLink {
    fn group(
        &mut self,
        device: &CudaDevice,
        stream: &CudaQueue,
        sends: &[(Rank, &CudaSlice<f32>)],
        recvs: &[(Rank, usize)],
    ) -> DeviceResult<Vec<CudaSlice<f32>>> {
        let mut received: Vec<CudaSlice<f32>> =
            recvs.iter().map(|(_, n)| device.zeros(stream, *n)).collect::<Result<_, _>>()?;
        let peer = |r: &Rank| i32::try_from(r.index()).map_err(|_| format!("{r} is beyond NCCL's ranks"));
        make_current(stream)?;
        nccl("NCCL cannot start a group", group_start())?;
        let mut posted = Ok(());
        for (to, buf) in sends {
            posted = posted.and_then(|()| nccl("NCCL cannot post a send", self.comm.send(*buf, peer(to)?)));
        }
        for ((from, _), buf) in recvs.iter().zip(received.iter_mut()) {
            posted =
                posted.and_then(|()| nccl("NCCL cannot post a receive", self.comm.recv(buf, peer(from)?)).map(|_| ()));
        }
        // The group is closed even when a post failed.
        let ended = nccl("NCCL cannot end a group", group_end());
        posted?;
        ended?;
        Ok(received)
    }

    fn all_reduce(
        &mut self,
        device: &CudaDevice,
        stream: &CudaQueue,
        part: &CudaSlice<f32>,
        len: usize,
    ) -> DeviceResult<CudaSlice<f32>> {
        let shards = self.shards.as_ref().ok_or("the shards share a GPU: no NCCL communicator among them")?;
        let mut sum = device.zeros(stream, len)?;
        make_current(stream)?;
        nccl("NCCL all-reduce failed", shards.all_reduce(part, &mut sum, &ReduceOp::Sum))?;
        Ok(sum)
    }
}

/// One GPU as a [`Device`].
pub struct CudaDevice {
    context: Arc<CudaContext>,
    kernels: Kernels,
    /// The GPU's name, as the driver gives it.
    pub name: String,
}

struct Kernels {
    tanh: CudaFunction,
    tanh_grad: CudaFunction,
    add_into: CudaFunction,
}

/// A CUDA stream, with a cuBLAS handle bound to it if GEMMs run on it.
pub struct CudaQueue {
    stream: Arc<CudaStream>,
    blas: Option<CudaBlas>,
}

impl CudaDevice {
    /// Opens GPU `ordinal` and loads the kernels; a clear error, never a
    /// panic, when the driver, the device or cuBLAS is missing.
    pub fn open(ordinal: usize) -> Result<CudaDevice, ExecError> {
        require_driver()?;
        // SAFETY: only checks whether the shared library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(ExecError::Setup(
                "the CUDA driver is here but cuBLAS (libcublas.so) is not on the library path (LD_LIBRARY_PATH)".into(),
            ));
        }
        let devices =
            CudaContext::device_count().map_err(|e| ExecError::Setup(format!("cannot count CUDA devices: {e:?}")))?;
        if ordinal >= devices.max(0) as usize {
            return Err(ExecError::Setup(format!("there is no CUDA device {ordinal}: the driver reports {devices}")));
        }
        let context = CudaContext::new(ordinal)
            .map_err(|e| ExecError::Setup(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
        let name = context.name().map_err(|e| ExecError::Setup(format!("cannot read the device's name: {e:?}")))?;
        let kernels = load_kernels(&context)?;
        Ok(CudaDevice { context, kernels, name })
    }

    /// A new buffer of `n` values from `kernel(inputs..., out, n)`.
    fn elementwise(
        &self,
        on: &CudaQueue,
        kernel: &CudaFunction,
        inputs: &[&CudaSlice<f32>],
        n: usize,
    ) -> DeviceResult<CudaSlice<f32>> {
        let (count, cfg) = grid(n)?;
        let mut out = self.alloc(on, n)?;
        {
            let mut launch = on.stream.launch_builder(kernel);
            for input in inputs {
                launch.arg(*input);
            }
            launch.arg(&mut out).arg(&count);
            // SAFETY: the kernel reads and writes indices below `count`, the buffers' length.
            launched(unsafe { launch.launch(cfg) })?;
        }
        Ok(out)
    }

    fn alloc(&self, on: &CudaQueue, n: usize) -> DeviceResult<CudaSlice<f32>> {
        // SAFETY: every caller writes all `n` values before anything reads them.
        unsafe { on.stream.alloc::<f32>(n) }.map_err(|e| format!("cannot allocate {n} floats: {e:?}"))
    }
}

/// The length of a launch over `n` values, and its grid.
fn grid(n: usize) -> DeviceResult<(u32, LaunchConfig)> {
    let count = u32::try_from(n).map_err(|_| format!("{n} values are too many for one launch"))?;
    Ok((count, LaunchConfig::for_num_elems(count)))
}

fn launched<T>(result: Result<T, cudarc::driver::DriverError>) -> DeviceResult<()> {
    result.map(|_| ()).map_err(|e| format!("a kernel launch failed: {e:?}"))
}

/// An NCCL call's failure in words: NCCL's result code, and what it
/// usually means where that is known.
fn nccl<T>(what: &str, result: Result<T, cudarc::nccl::result::NcclError>) -> DeviceResult<T> {
    result.map_err(|e| format!("{what}: {}", nccl_reason(&e)))
}

fn nccl_reason(e: &cudarc::nccl::result::NcclError) -> String {
    use cudarc::nccl::sys::ncclResult_t;
    let hint = match e.0 {
        ncclResult_t::ncclInvalidUsage => {
            " (NCCL refuses two ranks of one communicator on the same GPU: give every pipeline rank a GPU of its \
             own, or use --transport host)"
        }
        ncclResult_t::ncclSystemError | ncclResult_t::ncclRemoteError => {
            " (a network or peer failure: is every rank reachable, and still running?)"
        }
        _ => "",
    };
    format!("{:?}{hint}", e.0)
}

fn driver<T, E: std::fmt::Debug>(what: &str, result: Result<T, E>) -> DeviceResult<T> {
    result.map_err(|e| format!("{what}: {e:?}"))
}

impl Device for CudaDevice {
    type Stream = CudaQueue;
    type Buffer = CudaSlice<f32>;
    type Event = CudaEvent;

    fn new_stream(&self, gemm: bool) -> DeviceResult<CudaQueue> {
        let stream = driver("cannot create a stream", self.context.new_stream())?;
        let blas = match gemm {
            true => Some(driver("cannot create a cuBLAS handle", CudaBlas::new(Arc::clone(&stream)))?),
            false => None,
        };
        Ok(CudaQueue { stream, blas })
    }

    fn upload(&self, on: &CudaQueue, data: &[f32]) -> DeviceResult<CudaSlice<f32>> {
        driver("cannot copy to the GPU", on.stream.clone_htod(data))
    }

    fn download(&self, on: &CudaQueue, buffer: &CudaSlice<f32>) -> DeviceResult<Vec<f32>> {
        let data = driver("cannot copy from the GPU", on.stream.clone_dtoh(buffer))?;
        driver("the stream failed", on.stream.synchronize())?;
        Ok(data)
    }

    fn gemm(
        &self,
        on: &CudaQueue,
        (a, a_shape, ta): (&CudaSlice<f32>, (usize, usize), bool),
        (b, b_shape, tb): (&CudaSlice<f32>, (usize, usize), bool),
    ) -> DeviceResult<CudaSlice<f32>> {
        let blas = on.blas.as_ref().ok_or("a GEMM on a stream without a cuBLAS handle")?;
        let g = ColumnMajorGemm::for_row_major(a_shape, ta, b_shape, tb)?;
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let int = |v: usize| i32::try_from(v).map_err(|_| format!("a GEMM dimension of {v} is too large"));
        let cfg = GemmConfig {
            transa: op(g.transa),
            transb: op(g.transb),
            m: int(g.m)?,
            n: int(g.n)?,
            k: int(g.k)?,
            alpha: 1.0f32,
            lda: int(g.lda)?,
            ldb: int(g.ldb)?,
            beta: 0.0f32,
            ldc: int(g.ldc)?,
        };
        let mut c = self.alloc(on, g.m * g.n)?;
        // SAFETY: the shapes above match the buffers' lengths (rows × columns).
        driver("cuBLAS SGEMM failed", unsafe { blas.gemm(cfg, b, a, &mut c) })?;
        Ok(c)
    }

    fn tanh(&self, on: &CudaQueue, x: &CudaSlice<f32>, n: usize) -> DeviceResult<CudaSlice<f32>> {
        self.elementwise(on, &self.kernels.tanh, &[x], n)
    }

    fn tanh_grad(
        &self,
        on: &CudaQueue,
        g: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        n: usize,
    ) -> DeviceResult<CudaSlice<f32>> {
        self.elementwise(on, &self.kernels.tanh_grad, &[g, z], n)
    }

    fn zeros(&self, on: &CudaQueue, n: usize) -> DeviceResult<CudaSlice<f32>> {
        driver("cannot allocate", on.stream.alloc_zeros::<f32>(n))
    }

    fn add_into(&self, on: &CudaQueue, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> DeviceResult<()> {
        let (count, cfg) = grid(n)?;
        let mut launch = on.stream.launch_builder(&self.kernels.add_into);
        launch.arg(acc).arg(x).arg(&count);
        // SAFETY: the kernel reads and writes indices below `count`, the buffers' length.
        launched(unsafe { launch.launch(cfg) })
    }

    fn copy(&self, on: &CudaQueue, src: &CudaSlice<f32>, n: usize) -> DeviceResult<CudaSlice<f32>> {
        let mut dst = self.alloc(on, n)?;
        driver("a device-to-device copy failed", on.stream.memcpy_dtod(&src.slice(..n), &mut dst))?;
        Ok(dst)
    }

    fn record(&self, on: &CudaQueue, timed: bool) -> DeviceResult<CudaEvent> {
        let flags = if timed { CUevent_flags::CU_EVENT_DEFAULT } else { CUevent_flags::CU_EVENT_DISABLE_TIMING };
        driver("cannot record an event", on.stream.record_event(Some(flags)))
    }

    fn wait(&self, on: &CudaQueue, event: &CudaEvent) -> DeviceResult<()> {
        driver("cannot wait for an event", on.stream.wait(event))
    }

    fn is_complete(&self, event: &CudaEvent) -> DeviceResult<bool> {
        driver("an event failed", event.try_is_complete())
    }

    fn synchronize(&self, on: &CudaQueue) -> DeviceResult<()> {
        driver("the stream failed", on.stream.synchronize())
    }

    fn seconds_between(&self, start: &CudaEvent, end: &CudaEvent) -> DeviceResult<f64> {
        driver("cannot time events", start.elapsed_ms(end)).map(|ms| f64::from(ms) / 1e3)
    }
}

/// The kernels as PTX for any GPU from Volta on (the driver compiles it);
/// tanh as `sign(x)·(1 − 2/(e^{2|x|} + 1))`, and explicit rounding so no
/// multiply and add are fused into one (as on the CPU).
const PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry stp_tanh(.param .u64 px, .param .u64 py, .param .u32 pn)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<12>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [px];
    ld.param.u64 %rd2, [py];
    ld.param.u32 %r1, [pn];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra TANH_DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd3, %rd5;
    ld.global.f32 %f1, [%rd6];
    abs.f32 %f2, %f1;
    mov.f32 %f9, 0f4038AA3B;
    mul.rn.f32 %f3, %f2, %f9;
    ex2.approx.f32 %f4, %f3;
    mov.f32 %f10, 0f3F800000;
    add.rn.f32 %f5, %f4, %f10;
    mov.f32 %f11, 0f40000000;
    div.rn.f32 %f6, %f11, %f5;
    sub.rn.f32 %f7, %f10, %f6;
    copysign.f32 %f8, %f1, %f7;
    add.s64 %rd7, %rd4, %rd5;
    st.global.f32 [%rd7], %f8;
TANH_DONE:
    ret;
}

.visible .entry stp_tanh_grad(.param .u64 pg, .param .u64 pz, .param .u64 pout, .param .u32 pn)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<8>;
    .reg .b64 %rd<12>;
    ld.param.u64 %rd1, [pg];
    ld.param.u64 %rd2, [pz];
    ld.param.u64 %rd3, [pout];
    ld.param.u32 %r1, [pn];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra GRAD_DONE;
    mul.wide.u32 %rd4, %r5, 4;
    cvta.to.global.u64 %rd5, %rd1;
    cvta.to.global.u64 %rd6, %rd2;
    cvta.to.global.u64 %rd7, %rd3;
    add.s64 %rd8, %rd5, %rd4;
    add.s64 %rd9, %rd6, %rd4;
    add.s64 %rd10, %rd7, %rd4;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    mul.rn.f32 %f3, %f2, %f2;
    mov.f32 %f4, 0f3F800000;
    sub.rn.f32 %f5, %f4, %f3;
    mul.rn.f32 %f6, %f1, %f5;
    st.global.f32 [%rd10], %f6;
GRAD_DONE:
    ret;
}

.visible .entry stp_add_into(.param .u64 pacc, .param .u64 px, .param .u32 pn)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [pacc];
    ld.param.u64 %rd2, [px];
    ld.param.u32 %r1, [pn];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra ADD_DONE;
    mul.wide.u32 %rd3, %r5, 4;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    add.s64 %rd6, %rd4, %rd3;
    add.s64 %rd7, %rd5, %rd3;
    ld.global.f32 %f1, [%rd6];
    ld.global.f32 %f2, [%rd7];
    add.rn.f32 %f3, %f1, %f2;
    st.global.f32 [%rd6], %f3;
ADD_DONE:
    ret;
}
"#;

/// The same kernels in CUDA C, for NVRTC.
const CUDA_C: &str = r#"
extern "C" __global__ void stp_tanh(const float* x, float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = tanhf(x[i]);
}
extern "C" __global__ void stp_tanh_grad(const float* g, const float* z, float* out, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __fmul_rn(g[i], __fsub_rn(1.0f, __fmul_rn(z[i], z[i])));
}
extern "C" __global__ void stp_add_into(float* acc, const float* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] = __fadd_rn(acc[i], x[i]);
}
"#;

/// Loads the PTX kernels, or compiles the CUDA C ones with NVRTC when the
/// driver refuses the PTX.
fn load_kernels(context: &Arc<CudaContext>) -> Result<Kernels, ExecError> {
    let from_ptx = context.load_module(cudarc::nvrtc::Ptx::from_src(PTX));
    let module = match from_ptx {
        Ok(module) => module,
        Err(ptx_error) => {
            // SAFETY: only checks whether the shared library can be opened.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err(ExecError::Setup(format!(
                    "the driver refused the kernels' PTX ({ptx_error:?}) and NVRTC (libnvrtc.so) is not on the \
                     library path to compile them from CUDA C"
                )));
            }
            let ptx = cudarc::nvrtc::compile_ptx(CUDA_C).map_err(|e| {
                ExecError::Setup(format!("the driver refused the kernels' PTX ({ptx_error:?}) and NVRTC failed: {e:?}"))
            })?;
            context
                .load_module(ptx)
                .map_err(|e| ExecError::Setup(format!("cannot load the kernels NVRTC compiled: {e:?}")))?
        }
    };
    let function = |name: &str| {
        module.load_function(name).map_err(|e| ExecError::Setup(format!("the kernel {name} is missing: {e:?}")))
    };
    Ok(Kernels {
        tanh: function("stp_tanh")?,
        tanh_grad: function("stp_tanh_grad")?,
        add_into: function("stp_add_into")?,
    })
}

#[cfg(test)]
mod tests {
    /// Without a driver (as on CI), opening a GPU is a clear error, not a panic.
    #[test]
    fn without_a_driver_opening_a_gpu_is_a_clear_error() {
        // SAFETY: only checks whether the shared library can be opened.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a machine with a driver: gpu-check.sh covers it
        }
        let message = super::CudaDevice::open(0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("no CUDA driver"), "{message}");
        let message = super::probe().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("no CUDA driver"), "{message}");
    }
}
