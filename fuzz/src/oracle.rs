//! The oracles: what a case must do to pass. A schedule or program may be
//! refused with a diagnostic; what stpc accepts must verify, be free of
//! deadlock in the IR's own semantics, and run on every executor backend
//! to the sequential run's gradients, bit for bit.

use std::time::Duration;
use stp_exec::cpu::{self, CpuOptions};
use stp_exec::device::HostDevice;
use stp_exec::model::{sequential_gradients, Model};
use stp_exec::streams;
use stp_ir::simulate::{find_deadlock, Semantics};
use stp_ir::Program;
use stpc::diag::Code;
use stpc::elab::ParamArgs;
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted, and every check of what was accepted passed.
    Accepted,
    /// Refused with a diagnostic (its code), as bad input should be.
    Refused(&'static str),
    /// A broken promise: accepted but failed later, or an internal error.
    Disagreement(String),
}

/// How long an executor thread may wait before the run counts as
/// deadlocked. Generous, so that a verdict never depends on the load of
/// the machine: a correct program finishes in milliseconds.
pub const EXECUTOR_TIMEOUT: Duration = Duration::from_secs(60);

/// Compiles `source` at `p` ranks and `m` microbatches (and `tp`
/// tensor-parallel shards per rank); if stpc accepts it, the program must
/// verify, have no deadlock under rendezvous sends, and reproduce the
/// sequential gradients on the CPU executor and the host stream runner.
pub fn judge_schedule(source: &str, p: usize, m: usize, tp: u32) -> Verdict {
    let file = SourceFile::new("case.sched", source);
    let mut request = Request {
        params: ParamArgs { ranks: Some(p as i64), microbatches: Some(m as i64), ..ParamArgs::default() },
        ..Request::default()
    };
    request.lower.tp = tp;
    match pipeline::build(&file, &request) {
        Ok(build) => judge_program(&build.program),
        Err(diagnostics) => refusal(&diagnostics),
    }
}

/// A refusal, or a disagreement when stpc owns up to an internal error.
pub fn refusal(diagnostics: &[stpc::diag::Diagnostic]) -> Verdict {
    match diagnostics.iter().find(|d| d.code == Code::Internal) {
        Some(d) => Verdict::Disagreement(format!("internal error: {}", d.message)),
        None => Verdict::Refused(diagnostics.first().map_or("?", |d| d.code.as_str())),
    }
}

/// A program that stpc (or `stpc verify`) accepted: every promise checked.
pub fn judge_program(program: &Program) -> Verdict {
    if let Err(errors) = stp_ir::verify(program) {
        let first = errors.first().map(ToString::to_string).unwrap_or_default();
        return Verdict::Disagreement(format!("accepted program fails verify: {first}"));
    }
    if let Err(deadlock) = find_deadlock(program, Semantics::Rendezvous) {
        return Verdict::Disagreement(format!("accepted program deadlocks in the simulator: {deadlock}"));
    }
    run_everywhere(program)
}

/// Runs a verified, deadlock-free program on the CPU executor and the host
/// stream runner; both must finish with the sequential run's gradients.
pub fn run_everywhere(program: &Program) -> Verdict {
    let meta = &program.schedule;
    let model = Model::new(meta.parts() as usize, meta.num_microbatches as usize, 4, 2, meta.tp as usize, 7);
    let expected = sequential_gradients(&model);
    let options = CpuOptions { semantics: Semantics::Rendezvous, timeout: EXECUTOR_TIMEOUT, serialize: false };
    let runs = [
        ("the CPU executor", cpu::run(program, &model, options).map(|r| r.gradients)),
        ("the stream runner", streams::run(&HostDevice::new(), program, &model, options).map(|r| r.gradients)),
    ];
    for (backend, run) in runs {
        match run {
            Ok(gradients) if gradients == expected => {}
            Ok(_) => return Verdict::Disagreement(format!("{backend}: gradients differ from the sequential run")),
            Err(e) => return Verdict::Disagreement(format!("{backend}: {e}")),
        }
    }
    Verdict::Accepted
}
