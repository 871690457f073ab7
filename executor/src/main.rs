//! `stp-exec`: run a compiled stp program.
#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use stp_exec::cpu::{self, CpuOptions};
use stp_exec::model::{sequential_gradients, Model};
use stp_ir::simulate::Semantics;
use stp_ir::Program;

/// stp-exec: run a compiled stp program (program.json or program.txt from
/// `stpc compile`). The program is verified before anything runs.
#[derive(Parser)]
#[command(name = "stp-exec", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one training step and report the measured per-rank timeline.
    Run {
        /// The program (JSON or text form).
        program: PathBuf,
        /// Which backend runs it.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
        /// Send semantics of the CPU backend's channels.
        #[arg(long, value_enum, default_value = "rendezvous")]
        comm: Comm,
        /// Seconds any rank may wait before the run is declared deadlocked.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Seed of the model's weights and data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Hidden size of every stage's layer.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Rows (tokens) per microbatch.
        #[arg(long, default_value_t = 16)]
        rows: usize,
        /// Also run the model sequentially on one thread and require the
        /// weight gradients to match bit for bit.
        #[arg(long)]
        check: bool,
        /// Write the measured timeline as a Chrome/Perfetto trace.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// Threads and channels on this machine: the semantic reference.
    Cpu,
    /// CUDA and NCCL (not built yet).
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Comm {
    /// A group ends when its sends have been received (as NCCL).
    Rendezvous,
    /// Sends complete at once.
    Buffered,
}

fn main() -> ExitCode {
    let Command::Run { program, backend, comm, timeout, seed, hidden, rows, check, trace } = Cli::parse().command;
    match run(&program, backend, comm, timeout, seed, hidden, rows, check, trace.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    path: &Path,
    backend: Backend,
    comm: Comm,
    timeout: f64,
    seed: u64,
    hidden: usize,
    rows: usize,
    check: bool,
    trace: Option<&Path>,
) -> Result<(), String> {
    if let Backend::Cuda = backend {
        return cuda_backend();
    }
    let program = load(path)?;
    let meta = &program.schedule;
    let model = Model::new(
        meta.num_stages as usize,
        meta.num_microbatches as usize,
        hidden.max(1),
        rows.max(1),
        meta.tp as usize,
        seed,
    );
    let options = CpuOptions {
        semantics: match comm {
            Comm::Rendezvous => Semantics::Rendezvous,
            Comm::Buffered => Semantics::Buffered,
        },
        timeout: Duration::from_secs_f64(timeout.max(0.01)),
    };
    let report = cpu::run(&program, &model, options).map_err(|e| e.to_string())?;
    println!("{} on {} ranks: one step of {} microbatches", meta.name, meta.num_ranks, meta.num_microbatches);
    println!("{:<6} {:>12} {:>12} {:>14}", "rank", "first (ms)", "last (ms)", "peak stashes");
    for (r, (spans, peak)) in report.timeline.iter().zip(&report.peak_stashes).enumerate() {
        let first = spans.first().map_or(0.0, |s| s.1) * 1e3;
        let last = spans.last().map_or(0.0, |s| s.2) * 1e3;
        println!("{r:<6} {first:>12.3} {last:>12.3} {peak:>14}");
    }
    if check {
        if report.gradients != sequential_gradients(&model) {
            return Err("the weight gradients differ from a sequential run of the same model".into());
        }
        println!("weight gradients equal a sequential run's, bit for bit");
    }
    if let Some(trace) = trace {
        write_trace(trace, &program, &report.timeline)?;
        println!("wrote {}", trace.display());
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<(), String> {
    let info = stp_exec::cuda::probe().map_err(|e| e.to_string())?;
    Err(format!(
        "found {} CUDA device(s) ({}), but running programs on GPUs is not implemented yet; use --backend cpu",
        info.devices, info.name
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<(), String> {
    Err("this stp-exec was built without the `cuda` feature (cargo build -p stp-exec --features cuda); use --backend cpu".into())
}

fn load(path: &Path) -> Result<Program, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.trim_start().starts_with('{') {
        stp_ir::load_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        stp_ir::parse_text(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
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
