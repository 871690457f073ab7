//! What the solver examples share.

use stp_ir::simulate::{simulate, CostModel, Semantics};
use stpc::elab::{ComputeSchedule, ScheduledOp};
use stpc::lower::LowerOptions;

/// The simulated makespan of `order`, the planned order of `auto`: checked
/// and lowered as `stpc` would.
pub fn simulated(auto: &ComputeSchedule, order: Vec<Vec<ScheduledOp>>, cost: &CostModel) -> f64 {
    let planned = ComputeSchedule { ranks: order, ..auto.clone() };
    let checked = stpc::check::check(planned).unwrap_or_else(|d| panic!("the planned order checks: {d:?}"));
    let lowered = stpc::lower::lower(&checked, LowerOptions::default(), Semantics::Rendezvous)
        .unwrap_or_else(|e| panic!("the planned order lowers: {}", e.pass));
    simulate(&lowered.program, cost).unwrap_or_else(|d| panic!("{d}")).makespan
}
