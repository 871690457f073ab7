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
}

impl Default for Request {
    fn default() -> Request {
        Request {
            schedule: None,
            params: ParamArgs::default(),
            limits: Limits::default(),
            lower: LowerOptions::default(),
            comm: Semantics::Rendezvous,
        }
    }
}

/// Parses and analyzes a file.
pub fn analyze(file: &SourceFile) -> Result<Module, Vec<Diagnostic>> {
    let (tree, errors) = syntax::parse(file);
    if !errors.is_empty() {
        return Err(errors);
    }
    sema::analyze(tree)
}

/// Parses, analyzes and elaborates the requested schedule.
pub fn elaborate(file: &SourceFile, request: &Request) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    let module = analyze(file)?;
    let schedule = elab::select_schedule(&module, request.schedule.as_deref()).map_err(|d| vec![d])?;
    elab::elaborate(&module, schedule, &request.params, request.limits)
}

/// Everything up to and including the safety checks.
pub fn check(file: &SourceFile, request: &Request) -> Result<CheckedSchedule, Vec<Diagnostic>> {
    check::check(elaborate(file, request)?).map_err(diag::collapse_repeats)
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
    let checked = check(file, request)?;
    let lowered = lower::lower(&checked, request.lower, request.comm).map_err(|e| vec![internal_error(&e)])?;
    if let Some(deadlock) = &lowered.deadlock {
        return Err(vec![check::comm_deadlock::report_deadlock(&lowered.program, checked.schedule(), deadlock)]);
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
