//! Elaboration: a checked module at concrete parameter values -> a
//! [`ComputeSchedule`], the ordered compute ops of every rank, each
//! remembering the source line and loop iteration that produced it.

mod eval;
mod instances;
mod memory;
mod params;
mod plan;

use crate::diag::{Code, Diagnostic};
use crate::sema::Module;
use crate::syntax::ast::Schedule;
use crate::syntax::span::Span;
use std::fmt;
use std::sync::Arc;
use stp_ir::{Compute, Rank, ScheduleMeta};

pub use instances::{check_families, CheckFamily, MAX_INSTANCES};
pub use memory::{recomputed_pairs, MemoryModel, StageMemory};
pub use params::ParamArgs;
pub use plan::PlanReport;

/// Bounds that keep a runaway schedule from exhausting time or memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most compute ops in the whole schedule.
    pub max_ops: usize,
    /// Most evaluation steps (loop iterations and function calls).
    pub max_steps: u64,
}

impl Default for Limits {
    /// 4,000,000 ops admits production sizes (ZB-V at p = 256, m = 2048
    /// is 3,145,728 ops: 4.3 s and 2.7 GB peak) while a mistyped size
    /// is still refused before it takes the machine's memory (the whole
    /// path holds some 800 bytes per op at its peak).
    fn default() -> Limits {
        Limits { max_ops: 4_000_000, max_steps: 200_000_000 }
    }
}

/// A schedule evaluated at concrete parameters.
#[derive(Debug, Clone)]
pub struct ComputeSchedule {
    /// The pipeline's shape and parameters, as the IR will carry them.
    pub meta: ScheduleMeta,
    /// `ranks[r]`: the ops of rank `r` in program order.
    pub ranks: Vec<Vec<ScheduledOp>>,
    /// The `rank` declaration, for errors about ops that never ran.
    pub body_span: Span,
    /// The memory model the checker applies.
    pub memory: MemoryModel,
    /// The cost model the schedule declares (`cost { ... }`; unit costs
    /// otherwise), the simulator's starting point.
    pub cost: stp_ir::simulate::CostModel,
    /// The schedule says `auto`: `ranks` is empty until the scheduler in
    /// `opt/` fills it.
    pub auto: bool,
    /// The schedule says `recompute auto`: [`crate::opt::recompute`]
    /// recomputes forwards where a rank would exceed its budget.
    pub recompute_auto: bool,
    /// For an `auto` schedule, what the scheduler did.
    pub plan: Option<PlanReport>,
    /// Per rank, the weight gradients deferred with `B(...) defer auto`
    /// that stpc still has to place (`opt::place_w` empties it).
    pub floating: Vec<Vec<(stp_ir::Pass, Origin)>>,
    /// Per rank, the indices of the braided ops written with `&?`, which
    /// `opt::braid` keeps braided or splits.
    pub maybe_braided: Vec<Vec<usize>>,
    /// Per rank, the `reorder { ... }` regions (index ranges of its
    /// program) whose order `opt::reorder` may change.
    pub regions: Vec<Vec<(usize, usize)>>,
    /// What the optimizer passes decided that the user should hear.
    pub notes: Vec<String>,
    /// With `--tp`, the collective each op's units will carry once lowered
    /// (they run unit by unit, each collective on the rank's
    /// tensor-parallel stream): the optimizers time orders that way too.
    pub tp_units: Option<stp_ir::Collective>,
}

impl ComputeSchedule {
    /// Total compute ops over all ranks.
    pub fn num_ops(&self) -> usize {
        self.ranks.iter().map(Vec::len).sum()
    }

    /// The stages rank `r` owns, in increasing order.
    pub fn stages_of(&self, rank: Rank) -> Vec<stp_ir::Stage> {
        (0..self.meta.num_stages).map(stp_ir::Stage).filter(|s| self.meta.placement[s.index()] == rank).collect()
    }
}

/// One compute op of a rank and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledOp {
    /// The pass, or braided passes.
    pub compute: Compute,
    /// The source that produced it.
    pub origin: Origin,
}

/// Where an op came from: its span and the values of the rank and loop
/// variables when it was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The op call in the source.
    pub span: Span,
    /// Rank and loop variables, outermost first.
    pub iteration: Vec<(Arc<str>, i64)>,
}

impl fmt::Display for Origin {
    /// `r = 1, i = 3`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.iteration.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} = {value}")?;
        }
        Ok(())
    }
}

/// Picks the schedule to compile: the one named `name`, or the file's only
/// schedule when no name is given.
pub fn select_schedule<'m>(module: &'m Module, name: Option<&str>) -> Result<&'m Schedule, Diagnostic> {
    let all: Vec<&Schedule> = module.schedules().collect();
    let names = || all.iter().map(|s| format!("`{}`", s.name.name)).collect::<Vec<_>>().join(", ");
    match name {
        Some(name) => all.iter().copied().find(|s| s.name.name == name).ok_or_else(|| {
            Diagnostic::new(Code::ParamValue, format!("this file has no schedule named `{name}`"))
                .with_note(format!("it defines {}", if all.is_empty() { "no schedules".to_string() } else { names() }))
        }),
        None => match all.as_slice() {
            [only] => Ok(only),
            [] => Err(Diagnostic::new(Code::ScheduleShape, "this file defines no schedule")
                .with_help("add `schedule NAME(p: ranks, m: microbatches) { ... }`")),
            _ => Err(Diagnostic::new(Code::ParamValue, "this file defines several schedules; say which one")
                .with_note(format!("it defines {}", names()))
                .with_help("pass --schedule NAME")),
        },
    }
}

/// Evaluates `schedule` at the parameter values in `args`.
pub fn elaborate(
    module: &Module,
    schedule: &Schedule,
    args: &ParamArgs,
    limits: Limits,
) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    let bound = params::bind(schedule, args)?;
    eval::run(module, schedule, bound, args.memory.clone(), limits)
}
