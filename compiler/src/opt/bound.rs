//! A lower bound on the makespan: no rank can finish before its own work
//! is done, and no step before one microbatch has gone down and back up
//! the pipeline.

use crate::elab::ComputeSchedule;
use stp_ir::simulate::CostModel;

/// `max(busiest rank's compute, one microbatch's forward and backward
/// through every stage with the transfers between ranks)`.
pub fn lower_bound(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    let per_stage = cost.forward + cost.backward_input + cost.backward_weight;
    let mut work = vec![0.0; meta.num_ranks as usize];
    for owner in &meta.placement {
        work[owner.index()] += per_stage * f64::from(meta.num_microbatches);
    }
    let busiest = work.into_iter().fold(0.0, f64::max);
    let hops = meta.placement.windows(2).filter(|w| w[0] != w[1]).count() as f64;
    let critical = f64::from(meta.num_stages) * (cost.forward + cost.backward_input) + 2.0 * hops * cost.p2p;
    busiest.max(critical)
}
