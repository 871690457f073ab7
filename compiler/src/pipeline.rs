//! The phases chained together: what the CLI, the tests and the benchmarks call.

use crate::check::{self, CheckedSchedule};
use crate::diag::{self, Code, Diagnostic};
use crate::elab::{self, ComputeSchedule, Limits, ParamArgs};
use crate::lower::{self, LowerOptions};
use crate::sema::{self, Module};
use crate::syntax::{self, span::SourceFile};
use stp_ir::simulate::Semantics;
use stp_ir::Program;

/// What to compile and how.
#[derive(Debug, Clone)]
pub struct Request {
    /// Which schedule of the file; `None` means the file's only one.
    pub schedule: Option<String>,
    /// Parameter values.
    pub params: ParamArgs,
    /// Elaboration limits.
    pub limits: Limits,
    /// Lowering options.
    pub lower: LowerOptions,
    /// The send semantics the program must be deadlock-free under.
    pub comm: Semantics,
    /// The cost model to plan `auto` schedules with, instead of the
    /// schedule's own `cost { ... }`.
    pub cost: Option<stp_ir::simulate::CostModel>,
    /// Which scheduler orders `auto` schedules.
    pub solver: crate::opt::Solver,
}

impl Default for Request {
    fn default() -> Request {
        Request {
            schedule: None,
            params: ParamArgs::default(),
            limits: Limits::default(),
            lower: LowerOptions::default(),
            comm: Semantics::Rendezvous,
            cost: None,
            solver: crate::opt::Solver::default(),
        }
    }
}

/// The stack every entry point below runs its phases on, whatever thread
/// calls it: the recursive phases (name resolution, evaluation) go as
/// deep as the syntax limits allow ([`syntax::nesting`]), which needs
/// more than the 2 MiB of a spawned thread in an optimised build (about
/// 1.5 KiB a level). Reserved, not committed: pages are touched only as
/// deep as a source goes.
const PHASE_STACK: usize = 64 << 20;

/// Runs `f` on a stack of its own of [`PHASE_STACK`] bytes, unless the
/// caller's has half that left (an entry point called from another).
fn on_phase_stack<T>(f: impl FnOnce() -> T) -> T {
    stacker::maybe_grow(PHASE_STACK / 2, PHASE_STACK, f)
}

/// Parses and analyzes a file.
pub fn analyze(file: &SourceFile) -> Result<Module, Vec<Diagnostic>> {
    on_phase_stack(|| {
        let (tree, errors) = syntax::parse(file);
        if !errors.is_empty() {
            return Err(errors);
        }
        sema::analyze(tree)
    })
}

/// Parses, analyzes and elaborates the requested schedule.
pub fn elaborate(file: &SourceFile, request: &Request) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    on_phase_stack(|| elaborate_module(&analyze(file)?, request))
}

/// The schedule as written, before any optimizer runs: its shape,
/// declared costs and memory model (an `auto` schedule's ranks empty).
/// What a caller needs to derive the costs a schedule will be planned
/// with, without planning it.
pub fn elaborate_unplanned(file: &SourceFile, request: &Request) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    on_phase_stack(|| as_written(&analyze(file)?, request))
}

fn as_written(module: &Module, request: &Request) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    let schedule = elab::select_schedule(module, request.schedule.as_deref()).map_err(|d| vec![d])?;
    elab::elaborate(module, schedule, &request.params, request.limits)
}

fn elaborate_module(module: &Module, request: &Request) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    let mut elaborated = as_written(module, request)?;
    if let Some(cost) = request.cost.clone() {
        elaborated.cost = cost;
    }
    if request.lower.tp > 1 {
        // The optimizers below time orders as the program will run.
        let sequence_parallel = request.lower.sequence_parallel;
        elaborated.tp_units = Some(if sequence_parallel {
            stp_ir::Collective::ReduceScatterAllGather
        } else {
            stp_ir::Collective::AllReduce
        });
    }
    let moved = crate::opt::reorder::improve(&mut elaborated);
    for (indices, moved) in elaborated.maybe_braided.iter_mut().zip(&moved) {
        for at in indices.iter_mut() {
            *at = moved[*at];
        }
        indices.sort_unstable();
    }
    crate::opt::braid::decide(&mut elaborated);
    crate::opt::place_w::place(&mut elaborated);
    if !elaborated.auto && matches!(request.solver, crate::opt::Solver::Smt { .. }) {
        elaborated.notes.push(format!(
            "--solver smt has nothing to decide: `{}` writes out its order (only an `auto;` schedule is ordered \
             by the solver)",
            elaborated.meta.name
        ));
    }
    if elaborated.auto {
        let (ranks, report) = crate::opt::plan(&elaborated, request.solver).map_err(|d| vec![d])?;
        elaborated.ranks = ranks;
        elaborated.plan = Some(report);
    }
    crate::opt::recompute::fit(&mut elaborated);
    Ok(elaborated)
}

/// Everything up to and including the safety checks.
pub fn check(file: &SourceFile, request: &Request) -> Result<CheckedSchedule, Vec<Diagnostic>> {
    on_phase_stack(|| check_module(&analyze(file)?, request))
}

fn check_module(module: &Module, request: &Request) -> Result<CheckedSchedule, Vec<Diagnostic>> {
    check::check(elaborate_module(module, request)?).map_err(diag::collapse_repeats)
}

/// A compiled schedule: what was checked and the program it lowered to.
#[derive(Debug, Clone)]
pub struct Build {
    /// The checked compute schedule.
    pub checked: CheckedSchedule,
    /// The verified program, deadlock-free under the requested semantics.
    pub program: Program,
}

/// The whole path: source to a verified program that runs to completion
/// under the requested send semantics.
pub fn build(file: &SourceFile, request: &Request) -> Result<Build, Vec<Diagnostic>> {
    on_phase_stack(|| build_module(&analyze(file)?, request))
}

fn build_module(module: &Module, request: &Request) -> Result<Build, Vec<Diagnostic>> {
    let checked = check_module(module, request)?;
    let lowered = lower::lower(&checked, request.lower, request.comm).map_err(|e| vec![internal_error(&e)])?;
    if let Some(deadlock) = &lowered.deadlock {
        return Err(vec![check::comm_deadlock::report_deadlock(
            &lowered.program,
            checked.schedule(),
            deadlock,
            request.lower.hoist,
        )]);
    }
    Ok(Build { checked, program: lowered.program })
}

/// [`build`], keeping only the program.
pub fn compile(file: &SourceFile, request: &Request) -> Result<Program, Vec<Diagnostic>> {
    build(file, request).map(|b| b.program)
}

fn internal_error(e: &lower::LowerError) -> Diagnostic {
    Diagnostic::new(Code::Internal, format!("internal compiler error: lowering pass `{}` produced invalid IR", e.pass))
        .with_note(e.errors.iter().take(5).map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
        .with_help("this is a bug in stpc; please report it with the schedule and parameters")
}

/// What a sweep over `check` directives found.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    /// Instances compiled successfully.
    pub passed: usize,
    /// Instances a `require` clause refuses (not compiled).
    pub skipped: usize,
    /// The `check` directives run.
    pub directives: usize,
}

/// Compiles every instance of every `check` directive of the requested
/// schedule. Instances a `require` refuses are skipped; the first instance
/// of a directive that fails otherwise is reported (E0025) with its errors.
pub fn sweep(file: &SourceFile, request: &Request) -> Result<Sweep, Vec<Diagnostic>> {
    on_phase_stack(|| sweep_module(&analyze(file)?, request))
}

fn sweep_module(module: &Module, request: &Request) -> Result<Sweep, Vec<Diagnostic>> {
    let schedule = elab::select_schedule(module, request.schedule.as_deref()).map_err(|d| vec![d])?;
    let families = elab::check_families(schedule, &request.params).map_err(|d| vec![d])?;
    if families.is_empty() {
        return Err(vec![Diagnostic::new(
            Code::CheckFailed,
            format!("schedule `{}` has no check directives", schedule.name.name),
        )
        .with_label(schedule.name.span, "nothing to sweep")
        .with_help("add one, e.g. `check p in 2..=8, m in [p, 2 * p, 4 * p];`")]);
    }
    let mut sweep = Sweep { directives: families.len(), ..Sweep::default() };
    let mut errors = Vec::new();
    for family in &families {
        for values in &family.instances {
            let mut instance = request.clone();
            instance.params =
                ParamArgs { named: values.clone(), memory: request.params.memory.clone(), ..ParamArgs::default() };
            match build_module(module, &instance) {
                Ok(_) => sweep.passed += 1,
                // Only a `require` clause puts an instance outside the schedule's
                // domain; any other refusal there is a failure of the schedule.
                Err(d) if d.iter().all(|d| d.code == Code::RequireFailed) => sweep.skipped += 1,
                Err(d) => {
                    let shown: Vec<String> = values.iter().map(|(n, v)| format!("{n} = {v}")).collect();
                    errors.push(
                        Diagnostic::new(
                            Code::CheckFailed,
                            format!("the schedule fails at {}, which its `require` clauses admit", shown.join(", ")),
                        )
                        .with_label(family.span, format!("this directive includes {}", shown.join(", ")))
                        .with_note(format!("first error there: [{}] {}", d[0].code, d[0].message))
                        .with_help("fix the schedule there, or tighten its `require` clauses to exclude it"),
                    );
                    errors.extend(d);
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(sweep)
    } else {
        Err(errors)
    }
}
