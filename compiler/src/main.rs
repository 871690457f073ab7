//! The `stpc` command line: the only code in stpc that prints.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use stp_ir::simulate::{CostModel, Semantics};
use stpc::diag::{self, Code, Diagnostic};
use stpc::elab::{Limits, ParamArgs};
use stpc::emit::{self, Emit};
use stpc::lower::LowerOptions;
use stpc::opt::Solver;
use stpc::pipeline::{self, Build, Request};
use stpc::syntax::span::SourceFile;

// The compile path allocates a small vector or two per op (a million-op
// schedule makes millions): mimalloc serves them from thread-local pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// stpc: compile pipeline-parallel training schedules written in the .sched
/// language into checked, per-rank instruction streams.
#[derive(Parser)]
#[command(name = "stpc", version, about, long_about = None)]
#[command(
    after_help = "Examples:\n  stpc list\n  stpc compile 1f1b -p 4 -m 8 -o out/\n  stpc compile my.sched -p 8 -m 32 --emit text\n  stpc check interleaved-1f1b -p 4 -m 8 -v 2\n  stpc check stp --sweep\n  stpc simulate stp -p 4 -m 12 --t-b 2\n  stpc simulate examples/auto_looped.sched -p 3 -m 6 --t-b 2 --solver smt\n  stpc viz zb-v -p 4 -m 8 -o zbv.svg\n  stpc diff interleaved-1f1b zb-v -p 4 -m 8 -v 2\n  stpc export zb-h1 -p 4 -m 8 --comms > zbh1.csv\n  stpc explain E0011\n\nThe book (book/src in the repository) teaches the language and every error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the standard schedules with a one-line description each.
    List,
    /// Parse, type-check, elaborate and check a schedule; write nothing.
    Check {
        #[command(flatten)]
        target: Target,
        /// Check every instance of the schedule's `check` directives
        /// instead of one instance.
        #[arg(long)]
        sweep: bool,
    },
    /// Compile a schedule to per-rank instruction streams (the stp IR).
    Compile {
        #[command(flatten)]
        target: Target,
        /// Output format; repeat for several (`--emit json --emit text`).
        #[arg(long, value_enum, default_value = "json")]
        emit: Vec<EmitArg>,
        /// Write program.json / program.txt into this directory (created if
        /// missing) instead of printing to standard output.
        #[arg(short = 'o', long = "out-dir", value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Verify the IR after every lowering pass, not only after the last.
        #[arg(long)]
        verify_each: bool,
    },
    /// Run the compiled program under a cost model and report makespan,
    /// per-rank busy and idle time, bubble, exposed communication and memory.
    Simulate {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        cost: CostArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Simulate a schedule and write its timeline as a Chrome trace
    /// (open it in https://ui.perfetto.dev or chrome://tracing).
    Trace {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        cost: CostArgs,
        /// Where to write the trace.
        #[arg(short = 'o', long = "output", value_name = "FILE", default_value = "trace.json")]
        output: PathBuf,
    },
    /// Write a schedule in another runtime's format: today PyTorch
    /// pipelining's CSV (one row per rank; `--comms` adds the transfers).
    Export {
        #[command(flatten)]
        target: Target,
        /// The format.
        #[arg(long, value_enum, default_value = "torch-csv")]
        format: ExportFormat,
        /// Include the sends and receives (PyTorch's compute_comms form).
        #[arg(long)]
        comms: bool,
        /// Write here instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read a PyTorch pipelining schedule CSV, write it as a `.sched`
    /// schedule and check it: does the order you run today hold up?
    Import {
        /// The CSV: one row per rank (compute-only or with transfers).
        csv: PathBuf,
        /// Write the schedule here (default: standard output).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// The schedule's name.
        #[arg(long, default_value = "imported")]
        name: String,
        /// When to colour diagnostics.
        #[arg(long, value_enum, default_value = "auto")]
        color: ColorArg,
    },
    /// Draw the simulated timeline as an SVG picture: one row per rank,
    /// boxes coloured by pass kind, microbatch numbers, gaps for idle time.
    Viz {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        cost: CostArgs,
        /// Where to write the picture.
        #[arg(short = 'o', long = "output", value_name = "FILE", default_value = "schedule.svg")]
        output: PathBuf,
        /// svg, or html: the SVG in a page whose boxes show op details
        /// when the pointer rests on them.
        #[arg(long, value_enum, default_value = "svg")]
        format: VizFormat,
        /// Unit steps, as the papers draw schedules: every pass takes one
        /// time unit and transfers none, whatever costs the schedule or
        /// the flags give.
        #[arg(long, conflicts_with_all = ["cost", "model", "t_f", "t_b", "t_w", "t_ar", "t_p2p"])]
        unit: bool,
        /// Draw each rank's live activations over time under its row
        /// (every rank on one scale; the rank's peak at the right).
        #[arg(long = "memory")]
        memory_lane: bool,
    },
    /// Compare two schedules under one cost model: makespan, bubble,
    /// throughput, exposed communication and peak memory side by side.
    Diff {
        /// The first schedule (a standard name or a .sched path) and its
        /// parameters; `-v` applies only to schedules with a `chunks`
        /// parameter.
        #[command(flatten)]
        target: Target,
        /// The second schedule.
        other: String,
        #[command(flatten)]
        cost: CostArgs,
    },
    /// Check a compiled program (JSON or text form) as an executor would:
    /// format version, structural invariants, and that it runs to
    /// completion under the given send semantics.
    Verify {
        /// A program.json or program.txt.
        program: PathBuf,
        /// The send semantics to run it under.
        #[arg(long, value_enum, default_value = "rendezvous")]
        comm: CommArg,
    },
    /// Explain an error code, e.g. `stpc explain E0011`.
    Explain {
        /// The code (E0001...); omit it to list every code.
        code: Option<String>,
    },
}

/// Which schedule, with which parameters.
#[derive(Args, Clone)]
struct Target {
    /// A standard schedule name (see `stpc list`) or a path to a .sched file.
    schedule: String,
    /// Pipeline ranks: the value of the schedule's `ranks` parameter.
    #[arg(short = 'p', long = "ranks", value_name = "N")]
    ranks: Option<i64>,
    /// Microbatches per step: the value of the `microbatches` parameter.
    #[arg(short = 'm', long = "microbatches", value_name = "N")]
    microbatches: Option<i64>,
    /// Chunks (virtual stages) per rank: the value of the `chunks` parameter.
    #[arg(short = 'v', long = "chunks", value_name = "N")]
    chunks: Option<i64>,
    /// Any parameter by name; repeatable.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, i64)>,
    /// Override a memory setting (activation, weight_stash, budget,
    /// max_deferred, recomputed) on every stage and rank; repeatable.
    #[arg(long = "mem", value_name = "SETTING=VALUE", value_parser = parse_param)]
    memory: Vec<(String, i64)>,
    /// Which schedule of the file, when it defines several.
    #[arg(long = "schedule", value_name = "NAME")]
    schedule_name: Option<String>,
    /// Refuse schedules with more compute ops than this (compiling holds
    /// about 800 bytes per op at its peak: 4,000,000 ops take some 3 GB).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_ops)]
    max_ops: usize,
    /// The send semantics of the runtime the program must not deadlock
    /// under: rendezvous (a send waits for its receive, as NCCL) or buffered.
    #[arg(long, value_enum, default_value = "rendezvous")]
    comm: CommArg,
    /// Tensor-parallel group size behind each pipeline rank: every compute
    /// then lists its units and all-reduces (and --model uses it).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    tp: u32,
    /// With --tp: sequence parallelism (reduce-scatter and all-gather of
    /// the same volume instead of all-reduces).
    #[arg(long)]
    sequence_parallel: bool,
    /// Post every receive right before the op that needs it (as PyTorch's
    /// schedule runtime does) instead of moving receives earlier where
    /// that avoids a deadlock, or between groups where that shortens the
    /// simulated step.
    #[arg(long)]
    no_hoist: bool,
    /// How to order the passes of an `auto` schedule: greedy (a list
    /// scheduler and a bounded local search; measured on one core of the CI
    /// machine: under a second up to p = 16, m = 64, about 1.3 s at
    /// p = 32, m = 128 and 2.7 s at m = 256, growing with passes times
    /// ranks; its policies share the machine's cores, so half that on
    /// two) or smt
    /// (the same, then randomized restarts of the list scheduler and, on
    /// large instances, late acceptance hill climbing; then Z3 searches
    /// the whole step for a shorter order and may prove it optimal, then
    /// windows of the best order with the rest kept).
    #[arg(long, value_enum, default_value = "greedy")]
    solver: SolverArg,
    /// With --solver smt: how much work the search may do, in reference
    /// seconds (about that many seconds of one core of a 2-core CI
    /// machine; counted in work done, never on the clock, so the same
    /// effort gives the same order on any machine). Up to a fifth goes to
    /// randomized restarts; above 200 passes a third to late acceptance and
    /// a tenth to Z3 on the whole step, else a third to the whole step;
    /// the rest to windows of the best order, and what they leave to prove
    /// a higher lower bound.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_effort)]
    solver_effort: f64,
    /// With --solver smt: a wall-clock limit on top of --solver-effort
    /// (none by default). When it stops the search first, the report says
    /// so: only then can the order differ from machine to machine.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    solver_timeout: Option<f64>,
    /// When to colour diagnostics.
    #[arg(long, value_enum, default_value = "auto")]
    color: ColorArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum VizFormat {
    /// A standalone SVG picture.
    Svg,
    /// An HTML page holding the SVG, with hover details.
    Html,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// torch.distributed.pipelining's schedule CSV.
    TorchCsv,
}

#[derive(Clone, Copy, ValueEnum)]
enum SolverArg {
    /// The greedy list scheduler, then a local search.
    Greedy,
    /// Greedy and the local search, then the Z3 scheduler.
    Smt,
}

fn parse_effort(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Ok(t),
        _ => Err(format!("`{text}` is not an effort: give reference seconds above 0, at most 86400")),
    }
}

fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Ok(t),
        _ => Err(format!("`{text}` is not a time limit: give seconds above 0, at most 86400")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum CommArg {
    /// A send completes only together with its receive (NCCL).
    Rendezvous,
    /// A send completes at once.
    Buffered,
}

/// The cost model, from a file and/or flags (flags win).
#[derive(Args)]
struct CostArgs {
    /// A cost model as JSON: {"forward": 1, "backward_input": 1,
    /// "backward_weight": 1, "tp_collective": 0, "p2p": 0, "recompute": 1,
    /// "reduce": 0, "stages": [{"forward": ..., "backward_input": ..., "backward_weight":
    /// ..., "tp_collective": ...}, one per stage]}; missing fields keep their
    /// defaults (no "stages": every stage alike).
    #[arg(long, value_name = "FILE")]
    cost: Option<PathBuf>,
    /// Time of one forward (T_F), on every stage.
    #[arg(long, value_name = "T")]
    t_f: Option<f64>,
    /// Time of one input-gradient backward (T_B).
    #[arg(long, value_name = "T")]
    t_b: Option<f64>,
    /// Time of one weight-gradient backward (T_W).
    #[arg(long, value_name = "T")]
    t_w: Option<f64>,
    /// Exposed time of one pass's tensor-parallel collective (T_AR).
    #[arg(long, value_name = "T")]
    t_ar: Option<f64>,
    /// Time of one point-to-point transfer.
    #[arg(long, value_name = "T")]
    t_p2p: Option<f64>,
    /// Derive the times from model and hardware dimensions, in seconds:
    /// {"model": {"hidden", "ffn", "layers", "seq_len", "micro_batch",
    /// "vocab" (optional: the LM head on the last stage)}, "hardware": {...}
    /// (default: A800-like), "tp": N}. Layers are whole: stages that get
    /// more of them, or the head, take longer.
    #[arg(long, value_name = "FILE", conflicts_with = "cost")]
    model: Option<PathBuf>,
}

/// The `--model` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    model: stpc::cost::ModelShape,
    hardware: Option<stpc::cost::Hardware>,
    /// The tensor-parallel size the times are derived for (default: --tp).
    tp: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmitArg {
    /// The IR as JSON (program.json).
    Json,
    /// The IR text form (program.txt).
    Text,
    /// The IR as compact JSON, format version 2 (program.compact.json): each rank's instructions as one array of
    /// integers, about a fifth of the size of `json`; stp-exec and Python's stp read both
    Compact,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorArg {
    Auto,
    Always,
    Never,
}

fn parse_param(s: &str) -> Result<(String, i64), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, found `{s}`"))?;
    let value = value.trim().parse().map_err(|_| format!("`{value}` is not an integer"))?;
    Ok((name.trim().to_string(), value))
}

/// `println!` that ends the program quietly when standard output is closed
/// (`stpc ... | head`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// `print!` with the same behaviour as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if write!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// A failure that has already been explained to the user.
struct Reported;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::List => list(),
        Command::Check { target, sweep: false } => check(&target),
        Command::Check { target, sweep: true } => sweep(&target),
        Command::Compile { target, emit, out_dir, verify_each } => {
            compile(&target, &emit, out_dir.as_deref(), verify_each)
        }
        Command::Simulate { target, cost, json } => simulate(&target, &cost, json),
        Command::Trace { target, cost, output } => trace(&target, &cost, &output),
        Command::Viz { target, cost, output, format, unit, memory_lane } => {
            viz(&target, &cost, &output, VizOptions { format, unit, memory: memory_lane })
        }
        Command::Diff { target, other, cost } => diff(&target, &other, &cost),
        Command::Import { csv, output, name, color } => import_torch(&csv, output.as_deref(), &name, color),
        Command::Export { target, format: ExportFormat::TorchCsv, comms, output } => {
            export_torch(&target, comms, output.as_deref())
        }
        Command::Verify { program, comm } => verify_program(&program, comm),
        Command::Explain { code } => explain(code.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Reported) => ExitCode::from(1),
    }
}

fn list() -> Result<(), Reported> {
    for s in stp_stdlib::ALL {
        let file = SourceFile::new(s.path(), s.source);
        let summary = pipeline::analyze(&file)
            .ok()
            .and_then(|m| m.schedules().next().and_then(|s| s.doc.first().cloned()))
            .unwrap_or_default();
        outln!("{:<18} {summary}", s.name);
    }
    Ok(())
}

fn check(target: &Target) -> Result<(), Reported> {
    let file = load(target)?;
    let build = pipeline::build(&file, &request(target, false)).map_err(|d| report(&d, &file, target.color))?;
    let s = build.checked.schedule();
    tell_plan(&build, None);
    let params: Vec<String> = s.meta.params.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
    outln!(
        "ok: {} ({}): {} ranks, {} stages, {} microbatches, {} ops",
        s.meta.name,
        params.join(" "),
        s.meta.num_ranks,
        s.meta.num_stages,
        s.meta.num_microbatches,
        s.num_ops()
    );
    let budget = match (&s.memory.budgets[..], s.memory.budget) {
        ([], None) => String::new(),
        ([], Some(b)) => format!(" (budget {b})"),
        (budgets, _) => {
            let listed: Vec<String> = budgets.iter().map(i64::to_string).collect();
            format!(" (budgets by rank {})", listed.join(" "))
        }
    };
    outln!("peak activation memory per rank, in units: {}{budget}", summarize_peaks(build.checked.peaks()));
    Ok(())
}

/// Every rank's peak up to 16 ranks; past that the highest and lowest, so
/// that a million-rank check prints one line, not megabytes.
fn summarize_peaks(peaks: &[stpc::check::RankPeak]) -> String {
    const SHOWN: usize = 16;
    if peaks.len() <= SHOWN {
        return peaks.iter().map(|p| p.units.to_string()).collect::<Vec<_>>().join(" ");
    }
    let high = peaks.iter().enumerate().max_by_key(|(r, p)| (p.units, std::cmp::Reverse(*r)));
    let low = peaks.iter().enumerate().min_by_key(|(r, p)| (p.units, *r));
    match (high, low) {
        (Some((hr, h)), Some((lr, l))) => format!("highest {} (rank {hr}), lowest {} (rank {lr})", h.units, l.units),
        _ => String::new(),
    }
}

/// The solver's status line on a terminal: the best makespan so far.
fn draw_progress(best: f64, elapsed: std::time::Duration) {
    eprint!("\r\x1b[2Ksmt: best makespan {best:.3} after {:.1} s", elapsed.as_secs_f64());
}

/// Says on standard error how an `auto` schedule was ordered;
/// `simulated`: the program's simulated makespan under the schedule's
/// costs, when the caller has it (else it is simulated here, if needed).
fn tell_plan(build: &pipeline::Build, simulated: Option<f64>) {
    let plan = &build.checked.schedule().plan;
    if std::io::stderr().is_terminal() && plan.is_some() {
        // Clears the solver's status line, if it drew one.
        eprint!("\r\x1b[2K");
    }
    for note in &build.checked.schedule().notes {
        eprintln!("note: {note}");
    }
    if let Some(plan) = plan {
        // Planning times links one message at a time and, with --tp, ops
        // unit by unit, as the simulator does, but not the one stream a
        // pair of ranks shares for both directions (lowering's
        // `place_receives` removes most of that difference): the note
        // leads with the final program's makespan.
        let cost = &build.checked.schedule().cost;
        let simulated = simulated.or_else(|| stp_ir::simulate::simulate(&build.program, cost).ok().map(|t| t.makespan));
        eprintln!("note: {}", plan.describe(simulated));
        if simulated.is_some_and(|t| (t - plan.makespan).abs() > 1e-9) {
            eprintln!(
                "note: the final program's makespan differs from the plan's: planning does not make the transfers between \
                 two ranks share one stream (nor, with --tp, all-reduces on the tensor-parallel stream from one op \
                 to the next)"
            );
        }
    }
}

fn sweep(target: &Target) -> Result<(), Reported> {
    let file = load(target)?;
    let done = pipeline::sweep(&file, &request(target, false)).map_err(|d| report(&d, &file, target.color))?;
    outln!(
        "ok: {} instances from {} check directive(s) compile ({} outside the require clauses skipped)",
        done.passed,
        done.directives,
        done.skipped
    );
    Ok(())
}

fn compile(target: &Target, emits: &[EmitArg], out_dir: Option<&Path>, verify_each: bool) -> Result<(), Reported> {
    let file = load(target)?;
    let build = pipeline::build(&file, &request(target, verify_each)).map_err(|d| report(&d, &file, target.color))?;
    tell_plan(&build, None);
    let Build { checked, program } = build;
    // The process ends after this command: handing a million-op schedule
    // back to the allocator piece by piece would take longer than writing it.
    std::mem::forget(checked);
    let program = std::mem::ManuallyDrop::new(program);
    let mut formats: Vec<Emit> = emits
        .iter()
        .map(|e| match e {
            EmitArg::Json => Emit::Json,
            EmitArg::Text => Emit::Text,
            EmitArg::Compact => Emit::Compact,
        })
        .collect();
    formats.dedup();
    // Render everything first, so a failure leaves no output behind.
    let rendered: Vec<(Emit, String)> = formats.iter().map(|f| (*f, f.render(&program))).collect();
    let rendered = std::mem::ManuallyDrop::new(rendered);
    match out_dir {
        None => {
            for (_, text) in rendered.iter() {
                out!("{text}");
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_error(&format!("cannot create directory {}", dir.display()), &e))?;
            // All outputs of one command land together or not at all.
            let paths: Vec<std::path::PathBuf> = rendered.iter().map(|(f, _)| dir.join(f.file_name())).collect();
            let files: Vec<(&std::path::Path, &[u8])> =
                paths.iter().zip(rendered.iter()).map(|(p, (_, text))| (p.as_path(), text.as_bytes())).collect();
            emit::write_all_atomic(&files)
                .map_err(|(path, e)| io_error(&format!("cannot write {} (nothing written)", path.display()), &e))?;
            for path in &paths {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// The cost model the flags describe, starting from the schedule's own
/// (`declared`), for a pipeline of `pp` ranks with `chunks` stages each and
/// `tp`-way tensor parallelism.
fn cost_model(args: &CostArgs, declared: CostModel, tp: u32, pp: u32, cut: Cut) -> Result<CostModel, Reported> {
    // Each rank holds `chunks` parts of one model copy; with several
    // pipelines the copies' stages repeat the parts' times.
    let chunks = (cut.parts() / pp.max(1)).max(1);
    if let Some(path) = &args.model {
        let text =
            std::fs::read_to_string(path).map_err(|e| io_error(&format!("cannot read {}", path.display()), &e))?;
        let file: ModelFile = serde_json::from_str(&text).map_err(|e| {
            eprintln!("error: {} is not a model description: {e}", path.display());
            Reported
        })?;
        let tp = match (file.tp, tp) {
            (Some(0), _) => {
                eprintln!("error: {}: `tp` must be at least 1", path.display());
                return Err(Reported);
            }
            (Some(from_file), 1) => from_file,
            (Some(from_file), given) if from_file != given => {
                eprintln!("error: {} says tp = {from_file}, but --tp is {given}: say it once", path.display());
                return Err(Reported);
            }
            _ => tp,
        };
        let hw = file.hardware.unwrap_or_else(stpc::cost::Hardware::a800);
        let derived = stpc::cost::model::cost_model(&file.model, &hw, &stpc::cost::Parallelism { tp, pp, chunks });
        return override_times(derived, args, cut);
    }
    let cost = match &args.cost {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| io_error(&format!("cannot read {}", path.display()), &e))?;
            let parsed: CostModel = serde_json::from_str(&text).map_err(|e| {
                eprintln!("error: {} is not a cost model: {e}", path.display());
                Reported
            })?;
            parsed
        }
        None => declared,
    };
    override_times(cost, args, cut)
}

/// Applies the `--t-*` flags (to every stage: a flag states one time for
/// all of them) and checks the result for a program of `stages` stages.
/// `cost` with the `--t-*` flags applied and checked against the stages
/// of `cut`; times given per part (one entry per stage of one pipeline)
/// hold for every copy of the part.
fn override_times(mut cost: CostModel, args: &CostArgs, cut: Cut) -> Result<CostModel, Reported> {
    cost = cost.per_copy(cut.parts(), cut.pipelines);
    let set = |field: &mut f64, value: Option<f64>| {
        if let Some(v) = value {
            *field = v;
        }
    };
    set(&mut cost.forward, args.t_f);
    set(&mut cost.backward_input, args.t_b);
    set(&mut cost.backward_weight, args.t_w);
    set(&mut cost.tp_collective, args.t_ar);
    set(&mut cost.p2p, args.t_p2p);
    for stage in &mut cost.stages {
        set(&mut stage.forward, args.t_f);
        set(&mut stage.backward_input, args.t_b);
        set(&mut stage.backward_weight, args.t_w);
        set(&mut stage.tp_collective, args.t_ar);
    }
    cost.checked(cut.stages).map_err(|problem| {
        eprintln!("error: {problem}");
        Reported
    })
}

/// Builds the schedule for the costs it will be simulated with and runs
/// the timed simulation.
fn build_and_simulate(
    target: &Target,
    args: &CostArgs,
) -> Result<(pipeline::Build, CostModel, stp_ir::simulate::Timeline), Reported> {
    build_and_simulate_cut(target, args, None)
}

/// How a schedule cuts the model: its stages and its pipelines (model
/// copies), so `stages / pipelines` parts.
#[derive(Clone, Copy)]
struct Cut {
    stages: u32,
    pipelines: u32,
}

impl Cut {
    fn of(meta: &stp_ir::ScheduleMeta) -> Cut {
        Cut { stages: meta.num_stages, pipelines: meta.pipelines.max(1) }
    }

    fn parts(self) -> u32 {
        (self.stages / self.pipelines).max(1)
    }
}

/// The cost model another schedule was simulated with, and how it cut the
/// model.
type Reference = (Cut, CostModel);

/// `cost`, given for the stages of `from`, re-divided among the stages of
/// `to` so that both run the same model: one part's times are divided
/// among the parts of `to`, and every copy of a part takes its part's
/// times. `None` when per-part times cannot be divided evenly, or when the
/// copies of a part in `from` were given different times.
fn recut(cost: &CostModel, from: Cut, to: Cut) -> Option<CostModel> {
    let mut per_part = cost.clone();
    if !per_part.stages.is_empty() {
        let parts = from.parts() as usize;
        if per_part.stages.len() != from.stages as usize
            || per_part.stages.chunks(parts).any(|copy| copy != &per_part.stages[..parts])
        {
            return None;
        }
        per_part.stages.truncate(parts);
    }
    let mut cut = per_part.recut(from.parts(), to.parts())?;
    if !cut.stages.is_empty() {
        cut.stages = cut.stages.repeat(to.pipelines as usize);
    }
    Some(cut)
}

/// As [`build_and_simulate`]; with a `reference`, its costs (of the model
/// cut into its number of stages) re-divided among this schedule's stages,
/// so that both run the same model.
fn build_and_simulate_cut(
    target: &Target,
    args: &CostArgs,
    reference: Option<&Reference>,
) -> Result<(pipeline::Build, CostModel, stp_ir::simulate::Timeline), Reported> {
    let file = load(target)?;
    let mut request = request(target, false);
    // Only the shape and declared costs are needed here: nothing is
    // planned until the costs are known.
    let elaborated = pipeline::elaborate_unplanned(&file, &request).map_err(|d| report(&d, &file, target.color))?;
    let meta = &elaborated.meta;
    let here = Cut::of(meta);
    let (reference_cut, cost) = match reference {
        Some((cut, cost)) => (*cut, cost.clone()),
        None => (here, cost_model(args, elaborated.cost, target.tp, meta.num_ranks, here)?),
    };
    let Some(cost) = recut(&cost, reference_cut, here) else {
        let (from, to) = (reference_cut.parts(), here.parts());
        eprintln!(
            "error: {} cuts the model into {to} parts, the first schedule into {from}; per-stage times given for \
             {from} parts cannot be divided evenly among {to} (compare schedules whose part counts are multiples, \
             give the copies of a part the same times, or give uniform times)",
            meta.name
        );
        return Err(Reported);
    };
    // An `auto` schedule is planned for the costs it will be simulated with.
    request.cost = Some(cost.clone());
    let build = pipeline::build(&file, &request).map_err(|d| report(&d, &file, target.color))?;
    let timeline = stp_ir::simulate::simulate_with(&build.program, &cost, request.comm).map_err(|d| {
        eprintln!("internal error: a checked program deadlocked in the timed simulation:\n{d}");
        Reported
    })?;
    tell_plan(&build, Some(timeline.makespan));
    Ok((build, cost, timeline))
}

/// The target with `-v` dropped when its schedule has no `chunks`
/// parameter, so that one command line can compare, say, interleaved
/// 1F1B (which takes `-v`) with ZB-V (which does not).
fn without_foreign_chunks(target: &Target) -> Result<Target, Reported> {
    let file = load(target)?;
    let module = pipeline::analyze(&file).map_err(|d| report(&d, &file, target.color))?;
    let takes_chunks = module
        .schedules()
        .find(|s| target.schedule_name.as_deref().is_none_or(|n| s.name.name == n))
        .is_some_and(|s| s.params.iter().any(|p| p.kind == stpc::syntax::ast::ParamKind::Chunks));
    let mut t = target.clone();
    if !takes_chunks {
        t.chunks = None;
    }
    Ok(t)
}

fn diff(target: &Target, other: &str, args: &CostArgs) -> Result<(), Reported> {
    let first = without_foreign_chunks(target)?;
    let second = without_foreign_chunks(&Target { schedule: other.to_string(), ..target.clone() })?;
    let mut rows: Vec<[f64; 6]> = Vec::new();
    let mut names = Vec::new();
    let mut parts: Vec<u32> = Vec::new();
    let mut reference: Option<Reference> = None;
    for t in [&first, &second] {
        let (build, cost, timeline) = build_and_simulate_cut(t, args, reference.as_ref())?;
        let s = build.checked.schedule();
        names.push(s.meta.name.clone());
        parts.push(s.meta.parts());
        let first_cut = reference.get_or_insert_with(|| (Cut::of(&s.meta), cost.clone())).0;
        // A memory unit is one stage's activation: in the first's units.
        let unit = f64::from(first_cut.parts()) / f64::from(s.meta.parts());
        let peak = build.checked.peaks().iter().map(|p| p.units).max().unwrap_or(0) as f64 * unit;
        rows.push([
            timeline.makespan,
            timeline.bubble_ratio(),
            f64::from(s.meta.num_microbatches) / timeline.makespan,
            timeline.ranks.iter().map(|r| r.exposed_comm).sum(),
            peak,
            stpc::opt::bound::lower_bound(s, &cost),
        ]);
    }
    let labels = [
        "makespan",
        "bubble ratio",
        "throughput (mb/time)",
        "exposed comm (all ranks)",
        "peak memory (units)",
        "lower bound",
    ];
    let labels =
        labels.map(|l| if l.starts_with("peak") && parts[0] != parts[1] { "peak memory (first's units)" } else { l });
    if parts[0] != parts[1] {
        outln!(
            "note: {} cuts the model into {} parts, {} into {}; the times and memory units are those of {}'s \
             stages, divided among {}'s so that both run the same model",
            names[0],
            parts[0],
            names[1],
            parts[1],
            names[0],
            names[1]
        );
    }
    outln!("{:<26} {:>16} {:>16} {:>10}", "", names[0], names[1], "change");
    for (i, label) in labels.iter().enumerate() {
        let (a, b) = (rows[0][i], rows[1][i]);
        let change = if a == 0.0 { "-".to_string() } else { format!("{:+.1}%", 100.0 * (b / a - 1.0)) };
        outln!("{label:<26} {a:>16.4} {b:>16.4} {change:>10}");
    }
    let (a, b) = (rows[0][0], rows[1][0]);
    let verdict = if (a - b).abs() < 1e-9 {
        "equally fast".to_string()
    } else if a < b {
        format!("{} is faster by {:.1}%", names[0], 100.0 * (b / a - 1.0))
    } else {
        format!("{} is faster by {:.1}%", names[1], 100.0 * (a / b - 1.0))
    };
    outln!("{verdict}");
    Ok(())
}

/// How `stpc viz` draws.
struct VizOptions {
    format: VizFormat,
    unit: bool,
    memory: bool,
}

fn viz(target: &Target, args: &CostArgs, output: &Path, options: VizOptions) -> Result<(), Reported> {
    let VizOptions { format, unit, memory } = options;
    let unit_steps = CostArgs {
        cost: None,
        model: None,
        t_f: Some(1.0),
        t_b: Some(1.0),
        t_w: Some(1.0),
        t_ar: Some(0.0),
        t_p2p: Some(0.0),
    };
    let (build, cost, timeline) = build_and_simulate(target, if unit { &unit_steps } else { args })?;
    let s = build.checked.schedule();
    let mut params: Vec<String> = s.meta.params.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
    if target.tp > 1 {
        params.push(format!("tp={}", target.tp));
    }
    let title = format!("{} ({})", s.meta.name, params.join(" "));
    let peak = build.checked.peaks().iter().map(|p| p.units).max().unwrap_or(0);
    let summary = format!(
        "makespan {:.2}   bubble ratio {:.3}   peak activation memory {peak} units",
        timeline.makespan,
        timeline.bubble_ratio()
    );
    let extras = emit::svg::Extras { p2p: cost.p2p, memory };
    let svg = emit::svg::timeline_svg(&build.program, &timeline, extras, &title, &summary);
    let svg = match format {
        VizFormat::Svg => svg,
        VizFormat::Html => emit::svg::html_page(&title, &svg),
    };
    emit::write_atomic(output, svg.as_bytes())
        .map_err(|e| io_error(&format!("cannot write {}", output.display()), &e))?;
    outln!("wrote {} ({title}, makespan {:.3})", output.display(), timeline.makespan);
    Ok(())
}

fn trace(target: &Target, args: &CostArgs, output: &Path) -> Result<(), Reported> {
    let (build, _, timeline) = build_and_simulate(target, args)?;
    let spans: Vec<Vec<(usize, f64, f64)>> =
        timeline.ranks.iter().map(|r| r.spans.iter().map(|s| (s.instr, s.start, s.end)).collect()).collect();
    let collectives: Vec<Vec<(usize, f64, f64)>> =
        timeline.ranks.iter().map(|r| r.collectives.iter().map(|s| (s.instr, s.start, s.end)).collect()).collect();
    let text = stp_ir::trace::chrome_trace(&build.program, &spans, &collectives);
    emit::write_atomic(output, text.as_bytes())
        .map_err(|e| io_error(&format!("cannot write {}", output.display()), &e))?;
    outln!(
        "wrote {} ({} ranks, makespan {:.3}); open it in https://ui.perfetto.dev",
        output.display(),
        timeline.ranks.len(),
        timeline.makespan
    );
    Ok(())
}

fn import_torch(csv: &Path, output: Option<&Path>, name: &str, color: ColorArg) -> Result<(), Reported> {
    let text = std::fs::read_to_string(csv).map_err(|e| io_error(&format!("cannot read {}", csv.display()), &e))?;
    let valid_name = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid_name {
        eprintln!("error: `{name}` is not a schedule name (letters, digits and `_`, not starting with a digit)");
        return Err(Reported);
    }
    let imported = emit::torch::import_torch_csv(&text, name).map_err(|e| {
        eprintln!("error: {}: {e}", csv.display());
        Reported
    })?;
    if !imported.skipped.is_empty() {
        let counts: Vec<String> = imported.skipped.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
        eprintln!(
            "note: left out {}: stp schedules do not shard weights, and FSDP actions do not change which order is valid",
            counts.join(", ")
        );
    }
    let shown = output.map_or_else(|| csv.with_extension("sched"), Path::to_path_buf);
    let file = SourceFile::new(shown.to_string_lossy(), &imported.source);
    match output {
        None => out!("{}", imported.source),
        Some(path) => emit::write_atomic(path, imported.source.as_bytes())
            .map_err(|e| io_error(&format!("cannot write {}", path.display()), &e))?,
    }
    let request = Request {
        params: ParamArgs {
            ranks: Some(imported.ranks),
            microbatches: Some(imported.microbatches),
            ..ParamArgs::default()
        },
        ..Request::default()
    };
    let build = pipeline::build(&file, &request).map_err(|d| report(&d, &file, color))?;
    eprintln!(
        "ok: {} checks: {} ranks, {} stages, {} microbatches; every pass once, in dependency order, no deadlock",
        csv.display(),
        build.program.ranks.len(),
        build.checked.schedule().meta.num_stages,
        build.checked.schedule().meta.num_microbatches
    );
    Ok(())
}

fn export_torch(target: &Target, comms: bool, output: Option<&Path>) -> Result<(), Reported> {
    let file = load(target)?;
    let build = pipeline::build(&file, &request(target, false)).map_err(|d| report(&d, &file, target.color))?;
    tell_plan(&build, None);
    let meta = &build.program.schedule;
    if meta.pipelines > 1 {
        eprintln!(
            "error: `{}` runs {} pipelines (model copies), which torch.distributed.pipelining cannot express",
            meta.name, meta.pipelines
        );
        eprintln!(
            "  = note: its schedule CSV has one chain of stages, every microbatch through all of them, and no \
             gradient reduction between copies of a stage; nothing was written"
        );
        eprintln!(
            "  = help: run it with stp-exec or Python's stp.torch, or export a one-pipeline schedule (dualpipe-v folds \
             DualPipe into one)"
        );
        return Err(Reported);
    }
    let csv = emit::torch::torch_csv(&build.program, comms);
    for note in &csv.notes {
        eprintln!("note: {note}");
    }
    match output {
        None => out!("{}", csv.text),
        Some(path) => emit::write_atomic(path, csv.text.as_bytes())
            .map_err(|e| io_error(&format!("cannot write {}", path.display()), &e))?,
    }
    Ok(())
}

fn simulate(target: &Target, args: &CostArgs, json: bool) -> Result<(), Reported> {
    let (build, cost, timeline) = build_and_simulate(target, args)?;
    let bound = stpc::opt::bound::lower_bound(build.checked.schedule(), &cost);
    let peaks: Vec<i64> = build.checked.peaks().iter().map(|p| p.units).collect();
    let s = build.checked.schedule();
    if json {
        let report = serde_json::json!({
            "schedule": s.meta.name,
            "params": s.meta.params.iter().map(|p| (p.name.clone(), p.value)).collect::<std::collections::BTreeMap<_, _>>(),
            "cost": cost,
            "makespan": timeline.makespan,
            "lower_bound": bound,
            "plan": s.plan.as_ref().map(|p| serde_json::json!({
                "kept": p.kept,
                "makespan": p.makespan,
                "greedy_makespan": p.greedy_makespan,
                "lower_bound": p.lower_bound,
                "lower_bound_by_z3": p.bound_by_z3,
                "optimal": p.optimal,
                "fallback": p.fallback,
                "effort_spent": p.effort_spent,
                "stopped_by_timeout": p.capped,
            })),
            "bubble_ratio": timeline.bubble_ratio(),
            "throughput_microbatches_per_time": f64::from(s.meta.num_microbatches) / timeline.makespan,
            "ranks": timeline.ranks.iter().zip(&peaks).map(|(r, peak)| serde_json::json!({
                "rank": r.rank.0,
                "busy": r.busy,
                "idle": timeline.makespan - r.busy,
                "bubble": r.bubble,
                "exposed_comm": r.exposed_comm,
                "peak_memory": peak,
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        return Ok(());
    }
    let params: Vec<String> = s.meta.params.iter().map(|p| format!("{}={}", p.name, p.value)).collect();
    outln!("{} ({})", s.meta.name, params.join(" "));
    outln!("cost: {}", cost.summary());
    outln!(
        "makespan {:.3}   bubble ratio {:.4}   throughput {:.4} microbatches per time unit",
        timeline.makespan,
        timeline.bubble_ratio(),
        f64::from(s.meta.num_microbatches) / timeline.makespan
    );
    outln!(
        "lower bound {:.3} (one microbatch's round trip, or the best a rank could do alone within its memory): makespan is {:.1}% above it",
        bound,
        100.0 * (timeline.makespan / bound - 1.0)
    );
    outln!("{:<6} {:>10} {:>10} {:>10} {:>13} {:>12}", "rank", "busy", "idle", "bubble", "exposed comm", "peak memory");
    for (r, peak) in timeline.ranks.iter().zip(&peaks) {
        outln!(
            "{:<6} {:>10.3} {:>10.3} {:>10.3} {:>13.3} {:>12}",
            r.rank.0,
            r.busy,
            timeline.makespan - r.busy,
            r.bubble,
            r.exposed_comm,
            peak
        );
    }
    Ok(())
}

fn verify_program(path: &Path, comm: CommArg) -> Result<(), Reported> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(&format!("cannot read {}", path.display()), &e))?;
    let program = if text.trim_start().starts_with('{') {
        stp_ir::load_json(&text).map_err(|e| {
            eprintln!("error: {}: {e}", path.display());
            Reported
        })?
    } else {
        stp_ir::parse_text(&text).map_err(|e| {
            eprintln!("error: {}: {e}", path.display());
            Reported
        })?
    };
    if let Err(errors) = stp_ir::verify(&program) {
        eprintln!("error: {} is not a valid program:", path.display());
        for e in errors.iter().take(diag::MAX_REPORTED) {
            eprintln!("  {e}");
        }
        if errors.len() > diag::MAX_REPORTED {
            eprintln!("  and {} more", errors.len() - diag::MAX_REPORTED);
        }
        return Err(Reported);
    }
    let semantics = match comm {
        CommArg::Rendezvous => Semantics::Rendezvous,
        CommArg::Buffered => Semantics::Buffered,
    };
    if let Err(deadlock) = stp_ir::simulate::find_deadlock(&program, semantics) {
        eprintln!("error: {}: {deadlock}", path.display());
        for b in &deadlock.blocked {
            if let Some(instr) = program.ranks[b.rank.index()].instrs.get(b.instr) {
                eprintln!("  {} is at: {instr}", b.rank);
            }
        }
        return Err(Reported);
    }
    let instrs: usize = program.ranks.iter().map(|r| r.instrs.len()).sum();
    outln!(
        "ok: {} ({} ranks, {} instructions) is valid and runs to completion with {semantics} sends",
        path.display(),
        program.ranks.len(),
        instrs
    );
    Ok(())
}

fn explain(code: Option<&str>) -> Result<(), Reported> {
    let Some(code) = code else {
        for c in Code::ALL {
            outln!("{c}  {}", c.describe().title);
        }
        return Ok(());
    };
    let Some(c) = Code::parse(code) else {
        eprintln!("error: `{code}` is not an stpc error code; `stpc explain` lists them");
        return Err(Reported);
    };
    let info = c.describe();
    outln!("{c}: {}\n\n{}", info.title, info.explanation);
    Ok(())
}

fn request(target: &Target, verify_each: bool) -> Request {
    Request {
        schedule: target.schedule_name.clone(),
        params: ParamArgs {
            ranks: target.ranks,
            microbatches: target.microbatches,
            chunks: target.chunks,
            named: target.params.clone(),
            memory: target.memory.clone(),
        },
        limits: Limits { max_ops: target.max_ops, ..Limits::default() },
        lower: LowerOptions {
            verify_each,
            hoist: !target.no_hoist,
            place_receives: !target.no_hoist,
            tp: target.tp,
            sequence_parallel: target.sequence_parallel,
        },
        cost: None,
        solver: match target.solver {
            SolverArg::Greedy => Solver::Greedy,
            SolverArg::Smt => Solver::Smt {
                effort: target.solver_effort,
                cap: target.solver_timeout.map(std::time::Duration::from_secs_f64),
                progress: std::io::stderr().is_terminal().then_some(draw_progress as stpc::opt::Progress),
            },
        },
        comm: match target.comm {
            CommArg::Rendezvous => Semantics::Rendezvous,
            CommArg::Buffered => Semantics::Buffered,
        },
    }
}

/// Reads the schedule: a file if one exists (or it ends in .sched), else a
/// standard schedule name.
fn load(target: &Target) -> Result<SourceFile, Reported> {
    let name = target.schedule.as_str();
    let path = Path::new(name);
    if path.is_file() || name.ends_with(".sched") {
        return match std::fs::read_to_string(path) {
            Ok(text) => Ok(SourceFile::new(name, text)),
            Err(e) => Err(io_error(&format!("cannot read {name}"), &e)),
        };
    }
    if let Some(s) = stp_stdlib::get(name) {
        return Ok(SourceFile::new(s.path(), s.source));
    }
    let names: Vec<&str> = stp_stdlib::ALL.iter().map(|s| s.name).collect();
    eprintln!("error: `{name}` is neither a file nor a standard schedule");
    eprintln!("  standard schedules: {}", names.join(", "));
    Err(Reported)
}

fn report(diagnostics: &[Diagnostic], file: &SourceFile, color: ColorArg) -> Reported {
    let color = match color {
        ColorArg::Always => true,
        ColorArg::Never => false,
        ColorArg::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    eprint!("{}", diag::render::render(diagnostics, file, color));
    Reported
}

fn io_error(what: &str, e: &std::io::Error) -> Reported {
    eprintln!("error: {what}: {e}");
    Reported
}
