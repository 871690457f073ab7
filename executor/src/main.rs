//! `stp-exec`: run a compiled stp program.
#![allow(clippy::print_stdout)]

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use stp_exec::cpu::{self, CpuOptions, CpuReport};
use stp_exec::device::HostDevice;
use stp_exec::launch::{self, Env};
use stp_exec::measure;
use stp_exec::model::{sequential_gradients, Model, Tensor};
use stp_exec::streams;
use stp_exec::ExecError;
use stp_ir::simulate::{CostModel, Semantics};
use stp_ir::Program;

/// stp-exec: run a compiled stp program (program.json or program.txt from
/// `stpc compile`). The program is verified before anything runs.
#[derive(Parser)]
#[command(
    name = "stp-exec",
    version,
    about,
    after_help = "Examples:\n  \
        stp-exec run out/program.json --check --trace out/trace.json\n  \
        stp-exec launch out/program.json --check        (one process per rank, over TCP)\n  \
        stp-exec run out/program.json --backend cuda --check     (one GPU, every rank on its own streams)\n  \
        RANK=1 WORLD_SIZE=4 MASTER_ADDR=node0 MASTER_PORT=29500 stp-exec run out/program.json --backend cuda\n    \
        (one process per pipeline rank and GPU, transfers over NCCL)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one training step and report the measured per-rank timeline.
    /// With WORLD_SIZE set (as torchrun and Slurm wrappers set it, with
    /// RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), run only pipeline
    /// rank RANK and exchange with the other processes over TCP (or NCCL
    /// with --backend cuda; see --transport).
    Run(RunArgs),
    /// Start one `stp-exec run` process per pipeline rank on this machine,
    /// with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free
    /// MASTER_PORT set, as torchrun --standalone does; wait for all of them.
    Launch {
        /// How many processes (default: the program's pipeline ranks).
        #[arg(long)]
        nproc: Option<usize>,
        /// The port rank 0 listens on (default: a free one).
        #[arg(long)]
        master_port: Option<u16>,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The program (JSON or text form).
    program: PathBuf,
    /// Which backend runs it.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Send semantics of the channels between ranks (cpu backend, and
    /// host transfers).
    #[arg(long, value_enum, default_value = "rendezvous")]
    comm: Comm,
    /// Seconds any rank may wait before the run is declared deadlocked.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// In a multi-process run: seconds to wait for every process to
    /// reach the rendezvous.
    #[arg(long, default_value_t = 60.0)]
    rendezvous_timeout: f64,
    /// Seed of the model's weights and data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Hidden size of every stage's layer (its inner width is twice that).
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Rows (tokens) per microbatch.
    #[arg(long, default_value_t = 16)]
    rows: usize,
    /// Size every stage as the model shape of this file (as for `stpc
    /// simulate --model`: {"model": {"hidden", "ffn", "seq_len",
    /// "micro_batch", ...}}): hidden size `hidden`, inner width `ffn`,
    /// `seq_len · micro_batch` rows — the GEMMs the simulator's costs come
    /// from, one layer per stage.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["hidden", "rows"])]
    model: Option<PathBuf>,
    /// Also run the model sequentially on one thread and require the
    /// weight gradients to match: bit for bit on the cpu and streams
    /// backends (in a multi-process run, of the stages this process ran),
    /// within --tolerance on cuda.
    #[arg(long)]
    check: bool,
    /// With --check on cuda: the largest difference allowed in a gradient
    /// tensor, relative to that tensor's largest value (cuBLAS sums in
    /// another order than the CPU, and the GPU's tanh differs in its last bits).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
    /// With --backend cuda: the GPU (default: LOCAL_RANK if set, else 0).
    #[arg(long)]
    device: Option<usize>,
    /// In a multi-process run: how ranks send to each other. Default:
    /// nccl with --backend cuda, host otherwise.
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// In a multi-process cuda run: a GPU for each tensor-parallel shard
    /// (GPUs D·tp to D·tp + tp − 1, D being --device or LOCAL_RANK), the
    /// shards summing their results with NCCL all-reduces. Without it
    /// every shard of a rank shares the rank's GPU.
    #[arg(long)]
    gpu_per_shard: bool,
    /// Compare the measured makespan with the simulator's under this cost
    /// model (JSON as for `stpc simulate --cost`, times in milliseconds);
    /// without it, under the pass times measured in this run.
    #[arg(long, value_name = "FILE")]
    cost: Option<PathBuf>,
    /// Streams and cuda backends: wait for the device after every
    /// instruction (no overlap between streams; timings are meaningless).
    /// To debug wrong gradients: right only with it means a race between
    /// streams, wrong with it too means wrong arithmetic.
    #[arg(long)]
    serialize: bool,
    /// Write the measured timeline as a Chrome/Perfetto trace.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Threads and channels on this machine: the semantic reference.
    Cpu,
    /// The CUDA backend's stream runner on host memory: a compute and a
    /// communication stream per rank and shard, events, copies; checks
    /// that every read waits for its write. Needs no GPU.
    Streams,
    /// CUDA GPUs (build with `--features cuda`): cuBLAS GEMMs, a compute
    /// and a communication stream per rank and shard. In one process every
    /// rank on one GPU, transfers as device-to-device copies; under
    /// WORLD_SIZE or `launch`, one pipeline rank per process (see
    /// --transport, --gpu-per-shard).
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// NCCL send/receive on each rank's communication stream (--backend cuda).
    Nccl,
    /// Through host memory, over the rendezvous's TCP connections.
    Host,
}

#[derive(Clone, Copy, ValueEnum)]
enum Comm {
    /// A group ends when its sends have been received (as NCCL).
    Rendezvous,
    /// Sends complete at once.
    Buffered,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => run(&args),
        Command::Launch { nproc, master_port, run } => launch_local(nproc, master_port, &run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> Result<(), String> {
    let env = Env::from_vars(|name| std::env::var(name).ok())?;
    if args.gpu_per_shard && (args.backend != Backend::Cuda || env.is_none()) {
        return Err("--gpu-per-shard is for multi-process cuda runs (stp-exec launch, or WORLD_SIZE set)".into());
    }
    if args.transport == Some(Transport::Nccl) && args.backend != Backend::Cuda {
        return Err(format!(
            "--transport nccl needs --backend cuda; the {} backend sends over TCP (--transport host)",
            backend_name(args.backend)
        ));
    }
    let program = load(&args.program)?;
    let meta = &program.schedule;
    let (hidden, inner, rows) = match &args.model {
        Some(path) => model_shape(path)?,
        None => (args.hidden.max(1), 2 * args.hidden.max(1), args.rows.max(1)),
    };
    // Copies of a part (several pipelines) share its weights.
    let (parts, mbs) = (meta.parts() as usize, meta.num_microbatches as usize);
    let model = Model::with_inner(parts, mbs, hidden, inner, rows, meta.tp as usize, args.seed);
    let options = CpuOptions {
        semantics: match args.comm {
            Comm::Rendezvous => Semantics::Rendezvous,
            Comm::Buffered => Semantics::Buffered,
        },
        timeout: Duration::from_secs_f64(args.timeout.max(0.01)),
        serialize: args.serialize,
    };
    let rendezvous = Duration::from_secs_f64(args.rendezvous_timeout.max(0.1));
    let report = match (&env, args.backend) {
        (None, Backend::Streams) => streams::run(&HostDevice::new(), &program, &model, options),
        (None, Backend::Cpu) => cpu::run(&program, &model, options),
        (Some(env), Backend::Streams) => {
            launch::run_process_on(&HostDevice::new(), &program, &model, options, env, rendezvous)
        }
        (Some(env), Backend::Cpu) => launch::run_process(&program, &model, options, env, rendezvous),
        (env, Backend::Cuda) => {
            let how = env.as_ref().map(|env| (env, rendezvous, args.transport, args.gpu_per_shard));
            run_on_gpu(&program, &model, options, args.device, how)
        }
    }
    .map_err(|e| match (&env, &e) {
        // Setup errors (the rendezvous) already say which rank they concern.
        (
            Some(env),
            ExecError::Runtime { .. } | ExecError::Deadlock { .. } | ExecError::Stuck | ExecError::Panicked,
        ) => {
            format!("rank {}: {e}", env.rank)
        }
        _ => e.to_string(),
    })?;
    let tag = env.as_ref().map_or(String::new(), |e| format!("[rank {}] ", e.rank));
    print_timeline(&program, &report, &tag);
    if args.check && args.backend == Backend::Cuda {
        check_gradients_within(&program, &model, &report, args.tolerance, &tag)?;
    } else if args.check {
        check_gradients(&program, &model, &report, &tag)?;
    }
    match &env {
        None => print_comparison(&program, &report, args.cost.as_deref())?,
        Some(_) if args.cost.is_some() => {
            eprintln!("{tag}note: --cost is ignored: comparing with the simulator needs every rank in one process");
        }
        Some(_) => {}
    }
    if let Some(trace) = &args.trace {
        let path = match &env {
            Some(env) => trace.with_extension(format!("rank{}.json", env.rank)),
            None => trace.clone(),
        };
        let mut spans = vec![Vec::new(); program.ranks.len()];
        for (rank, timeline) in report.ranks.iter().zip(&report.timeline) {
            spans[rank.index()] = timeline.clone();
        }
        write_trace(&path, &program, &spans)?;
        println!("{tag}wrote {}", path.display());
    }
    Ok(())
}

fn print_timeline(program: &Program, report: &CpuReport, tag: &str) {
    let meta = &program.schedule;
    println!("{tag}{} on {} ranks: one step of {} microbatches", meta.name, meta.num_ranks, meta.num_microbatches);
    println!("{tag}{:<6} {:>12} {:>12} {:>14}", "rank", "first (ms)", "last (ms)", "peak stashes");
    for ((rank, spans), peak) in report.ranks.iter().zip(&report.timeline).zip(&report.peak_stashes) {
        let first = spans.first().map_or(0.0, |s| s.1) * 1e3;
        let last = spans.last().map_or(0.0, |s| s.2) * 1e3;
        println!("{tag}{:<6} {first:>12.3} {last:>12.3} {peak:>14}", rank.index());
    }
}

/// Compares the gradients of the stages this process ran with a
/// sequential run's.
fn check_gradients(program: &Program, model: &Model, report: &CpuReport, tag: &str) -> Result<(), String> {
    let expected = sequential_gradients(model);
    let mine = stages_run(program, report);
    if let Some(s) = mine.iter().find(|s| report.gradients[**s] != expected[**s]) {
        return Err(format!("{tag}the weight gradients of stage {s} differ from a sequential run of the same model"));
    }
    println!("{tag}weight gradients of stages {mine:?} equal a sequential run's, bit for bit");
    Ok(())
}

/// Compares every gradient tensor with a sequential run's: the largest
/// difference relative to the tensor's largest value must stay within
/// `tolerance`. A failure names every tensor beyond it (which stage, which
/// weight, which shard), since the pattern says where to look.
fn check_gradients_within(
    program: &Program,
    model: &Model,
    report: &CpuReport,
    tolerance: f32,
    tag: &str,
) -> Result<(), String> {
    let expected = sequential_gradients(model);
    let tp = program.schedule.tp.max(1) as usize;
    let mine = stages_run(program, report);
    let mut worst = 0.0f32;
    let mut beyond = Vec::new();
    for &s in &mine {
        for (t, (g, w)) in report.gradients[s].iter().zip(&expected[s]).enumerate() {
            let relative = relative_difference(g, w);
            worst = worst.max(relative);
            if relative > tolerance {
                let weight = ["dA1", "dB1", "dA2", "dB2"][(t / tp).min(3)];
                let shard = if tp > 1 { format!(" (shard {})", t % tp) } else { String::new() };
                beyond.push(format!("stage {s} {weight}{shard}: {relative:.2e}"));
            }
        }
    }
    if !beyond.is_empty() {
        return Err(format!(
            "{tag}weight gradients differ from a sequential CPU run by more than {tolerance:.0e} of their largest \
             value: {}",
            beyond.join(", ")
        ));
    }
    println!(
        "{tag}weight gradients of stages {mine:?} match a sequential CPU run within {worst:.2e} of their largest \
         value (tolerance {tolerance:.0e})"
    );
    Ok(())
}

/// The largest difference between `got` and `want`, relative to `want`'s
/// largest value; infinite for a NaN or a shape mismatch.
fn relative_difference(got: &Tensor, want: &Tensor) -> f32 {
    if got.data.len() != want.data.len() {
        return f32::INFINITY;
    }
    let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let mut diff = 0.0f32;
    for (a, b) in got.data.iter().zip(&want.data) {
        let d = (a - b).abs();
        // f32::max would drop a NaN; a NaN anywhere is an infinite difference.
        if d.is_nan() {
            return f32::INFINITY;
        }
        diff = diff.max(d);
    }
    diff / scale
}

/// The stages whose passes ran in this process.
/// The model parts whose gradients this process holds: those of which
/// its ranks own a copy (a stage, with one pipeline).
fn stages_run(program: &Program, report: &CpuReport) -> Vec<usize> {
    let chain = program.schedule.chain();
    let placement = program.schedule.placement.iter().enumerate();
    let mut parts: Vec<usize> = placement
        .filter(|(_, owner)| report.ranks.contains(owner))
        .map(|(s, _)| chain.part(stp_ir::Stage(s as u32)) as usize)
        .collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

fn print_comparison(program: &Program, report: &CpuReport, cost: Option<&Path>) -> Result<(), String> {
    let given = match cost {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let ms: CostModel = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(CostModel { p2p: ms.p2p / 1e3, ..ms.scaled(1e-3) })
        }
        None => None,
    };
    let Some(c) = measure::compare(program, &report.timeline, given) else {
        println!("the simulator cannot run this program under rendezvous sends; no comparison");
        return Ok(());
    };
    let model = if cost.is_some() { "the given cost model" } else { "the pass times measured in this run" };
    println!(
        "makespan: measured {:.3} ms, simulated {:.3} ms under {model} ({}, in ms); measured/simulated {:.2}",
        c.measured * 1e3,
        c.simulated * 1e3,
        CostModel { p2p: c.cost.p2p * 1e3, ..c.cost.scaled(1e3) }.summary(),
        c.ratio()
    );
    Ok(())
}

/// Runs one child per rank with the torchrun variables set; fails when any fails.
fn launch_local(nproc: Option<usize>, master_port: Option<u16>, args: &RunArgs) -> Result<(), String> {
    let program = load(&args.program)?;
    let world = nproc.unwrap_or(program.ranks.len());
    if world != program.ranks.len() {
        return Err(format!(
            "--nproc {world}, but the program has {} pipeline ranks: every backend runs one process per rank",
            program.ranks.len()
        ));
    }
    // NCCL is the cuda backend's default (and needs it: see `run`).
    let nccl = args.backend == Backend::Cuda && args.transport != Some(Transport::Host);
    if let (true, Some(device), true) = (nccl, args.device, world > 1) {
        return Err(format!(
            "--device {device} puts all {world} processes on GPU {device}, and NCCL refuses two ranks on one GPU: \
             leave --device out (rank r then uses GPU r), or add --transport host"
        ));
    }
    let port = match master_port {
        Some(port) => port,
        None => std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port(),
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find stp-exec itself: {e}"))?;
    let mut children = Vec::new();
    for rank in 0..world {
        let child = std::process::Command::new(&exe)
            .arg("run")
            .args(run_args(args))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| format!("cannot start rank {rank}: {e}"))?;
        children.push(child);
    }
    let failed = wait_all(children);
    if failed.is_empty() {
        println!("all {world} processes finished");
        Ok(())
    } else {
        Err(format!("{} failed", failed.join(", ")))
    }
}

/// Waits for every child; once one fails, the others get a second to
/// report their own errors and are then stopped (they would otherwise
/// wait for the failed one until the rendezvous timeout). Returns how
/// each failed one ended.
fn wait_all(children: Vec<std::process::Child>) -> Vec<String> {
    let mut running: Vec<Option<std::process::Child>> = children.into_iter().map(Some).collect();
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut first_failure: Option<std::time::Instant> = None;
    while running.iter().any(Option::is_some) {
        for (rank, slot) in running.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let ended = match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(exit)) if exit.success() => None,
                Ok(Some(exit)) => Some(exit.to_string()),
                Err(e) => Some(e.to_string()),
            };
            *slot = None;
            if let Some(why) = ended {
                failures.push((rank, why));
                first_failure.get_or_insert_with(std::time::Instant::now);
            }
        }
        if first_failure.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            for (rank, slot) in running.iter_mut().enumerate() {
                if let Some(mut child) = slot.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push((rank, "stopped after another rank failed".into()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    failures.sort();
    failures.into_iter().map(|(rank, why)| format!("rank {rank} ({why})")).collect()
}

/// `args` as a child's command line.
fn run_args(args: &RunArgs) -> Vec<String> {
    let mut out = vec![
        args.program.display().to_string(),
        "--backend".into(),
        backend_name(args.backend).into(),
        "--tolerance".into(),
        args.tolerance.to_string(),
        "--comm".into(),
        match args.comm {
            Comm::Rendezvous => "rendezvous".into(),
            Comm::Buffered => "buffered".into(),
        },
        "--timeout".into(),
        args.timeout.to_string(),
        "--rendezvous-timeout".into(),
        args.rendezvous_timeout.to_string(),
        "--seed".into(),
        args.seed.to_string(),
    ];
    match &args.model {
        Some(path) => out.extend(["--model".into(), path.display().to_string()]),
        None => out.extend(["--hidden".into(), args.hidden.to_string(), "--rows".into(), args.rows.to_string()]),
    }
    if args.check {
        out.push("--check".into());
    }
    if let Some(device) = args.device {
        out.push("--device".into());
        out.push(device.to_string());
    }
    if let Some(transport) = args.transport {
        out.push("--transport".into());
        out.push(transport_name(transport).into());
    }
    if args.gpu_per_shard {
        out.push("--gpu-per-shard".into());
    }
    if args.serialize {
        out.push("--serialize".into());
    }
    if let Some(trace) = &args.trace {
        out.push("--trace".into());
        out.push(trace.display().to_string());
    }
    if let Some(cost) = &args.cost {
        out.push("--cost".into());
        out.push(cost.display().to_string());
    }
    out
}

fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Nccl => "nccl",
        Transport::Host => "host",
    }
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Cpu => "cpu",
        Backend::Streams => "streams",
        Backend::Cuda => "cuda",
    }
}

#[cfg(feature = "cuda")]
fn run_on_gpu(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    device: Option<usize>,
    multi: Option<(&Env, Duration, Option<Transport>, bool)>,
) -> Result<CpuReport, ExecError> {
    use stp_exec::cuda;
    let local = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok());
    let ordinal = device.or(local).unwrap_or(0);
    let Some((env, rendezvous, transport, per_shard)) = multi else {
        let device = cuda::CudaDevice::open(ordinal)?;
        println!("GPU {ordinal}: {} (single-GPU mode: every rank on its own streams)", device.name);
        return cuda::run(&device, program, model, options);
    };
    let transport = match transport {
        Some(Transport::Host) => cuda::Transport::Host,
        Some(Transport::Nccl) | None => cuda::Transport::Nccl,
    };
    let tp = program.schedule.tp as usize;
    let ordinals: Vec<usize> = if per_shard { (0..tp).map(|k| ordinal * tp + k).collect() } else { vec![ordinal] };
    let devices = ordinals.iter().map(|o| cuda::CudaDevice::open(*o)).collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = ordinals.iter().zip(&devices).map(|(o, d)| format!("GPU {o}: {}", d.name)).collect();
    println!("[rank {}] {} (transfers: {transport:?})", env.rank, names.join(", "));
    cuda::run_process(&devices, program, model, options, env, rendezvous, transport)
}

#[cfg(not(feature = "cuda"))]
fn run_on_gpu(
    _: &Program,
    _: &Model,
    _: CpuOptions,
    _: Option<usize>,
    _: Option<(&Env, Duration, Option<Transport>, bool)>,
) -> Result<CpuReport, ExecError> {
    Err(ExecError::Setup(
        "this stp-exec was built without the `cuda` feature (cargo build --release -p stp-exec --features cuda); \
         use --backend cpu, or --backend streams for the CUDA backend's stream logic on the host"
            .into(),
    ))
}

/// (hidden, inner width, rows) from a `--model` file.
fn model_shape(path: &Path) -> Result<(usize, usize, usize), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let field = |name: &str| -> Result<usize, String> {
        let value = json.get("model").and_then(|m| m.get(name)).and_then(serde_json::Value::as_f64);
        match value {
            Some(v) if v >= 1.0 && v.fract() == 0.0 && v <= 1e9 => Ok(v as usize),
            Some(v) => Err(format!("{}: model.{name} = {v} is not a positive whole number", path.display())),
            None => Err(format!("{}: model.{name} is missing (the file's shape is {{\"model\": {{\"hidden\", \"ffn\", \"seq_len\", \"micro_batch\", ...}}}})", path.display())),
        }
    };
    let (hidden, ffn) = (field("hidden")?, field("ffn")?);
    let rows = field("seq_len")?.checked_mul(field("micro_batch")?).ok_or("seq_len · micro_batch overflows")?;
    Ok((hidden, ffn, rows))
}

/// Reads and verifies a program: nothing sized by the program (its model,
/// its buffers) is built before the program is known to be valid.
fn load(path: &Path) -> Result<Program, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let program = if text.trim_start().starts_with('{') {
        stp_ir::load_json(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        stp_ir::parse_text(&text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    stp_ir::verify(&program).map_err(|errors| format!("{}: {}", path.display(), ExecError::Invalid(errors)))?;
    Ok(program)
}

/// The measured timeline as a Chrome trace ([`stp_ir::trace`]), written
/// through a temporary file so a reader never sees half of it.
fn write_trace(path: &Path, program: &Program, timeline: &[Vec<(usize, f64, f64)>]) -> Result<(), String> {
    let text = stp_ir::trace::chrome_trace(program, timeline, &[]);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
