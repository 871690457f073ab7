//! Measured against simulated: how far a run's makespan is from what the
//! timed simulator predicts, either under a given cost model or under the
//! pass times measured in the run itself (calibration). The difference is
//! what the model leaves out: the executor's own overhead, waiting on
//! messages, and uneven pass times.

use stp_ir::simulate::{self, CostModel};
use stp_ir::{Instr, PassKind, Program};

/// Per rank, (instruction index, start, end) in seconds.
pub type Measured = [Vec<(usize, f64, f64)>];

/// A cost model (in seconds) whose pass times are the means measured for
/// computes that run one pass: `T_F` from `F`, `T_B` from `B`, `T_W` from
/// `W`; a `BW` contributes `T_B + T_W` (all of it to `T_B` when the program
/// has no separate `W`), the recompute fraction from `R`. Transfers and
/// collectives are taken as free.
pub fn calibrated_costs(program: &Program, measured: &Measured) -> CostModel {
    let mut sums = [(0.0, 0usize); 5];
    for (r, spans) in measured.iter().enumerate() {
        for &(i, start, end) in spans {
            let Some(Instr::Compute(c)) = program.ranks.get(r).and_then(|rank| rank.instrs.get(i)) else { continue };
            if let [pass] = c.passes.as_slice() {
                let slot = match pass.kind {
                    PassKind::F => 0,
                    PassKind::B => 1,
                    PassKind::W => 2,
                    PassKind::BW => 3,
                    PassKind::R => 4,
                };
                sums[slot].0 += end - start;
                sums[slot].1 += 1;
            }
        }
    }
    let mean = |(sum, n): (f64, usize)| if n == 0 { None } else { Some(sum / n as f64) };
    let forward = mean(sums[0]).unwrap_or(0.0);
    // A recompute re-runs (part of) the forward: its share of one.
    let recompute = match mean(sums[4]) {
        Some(r) if forward > 0.0 => (r / forward).clamp(0.0, 1.0),
        _ => 1.0,
    };
    let weight = mean(sums[2]);
    let input = match (mean(sums[1]), mean(sums[3]), weight) {
        (Some(b), _, _) => b,
        (None, Some(bw), Some(w)) => (bw - w).max(0.0),
        (None, Some(bw), None) => bw,
        (None, None, _) => 0.0,
    };
    CostModel {
        forward,
        backward_input: input,
        backward_weight: weight.unwrap_or(0.0),
        tp_collective: 0.0,
        p2p: 0.0,
        stages: Vec::new(),
        recompute,
        reduce: 0.0,
    }
}

/// A run's makespan next to the simulator's.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// When the last instruction of any rank ended.
    pub measured: f64,
    /// The simulated makespan under `cost`.
    pub simulated: f64,
    /// The cost model simulated.
    pub cost: CostModel,
}

impl Comparison {
    /// Measured over simulated.
    pub fn ratio(&self) -> f64 {
        if self.simulated > 0.0 {
            self.measured / self.simulated
        } else {
            f64::INFINITY
        }
    }
}

/// Compares a run with the simulator under `cost`, or under the run's own
/// pass times ([`calibrated_costs`]) when `cost` is `None`. `None` when the
/// simulation deadlocks (a program the executor ran cannot, unless it was
/// run with buffered sends).
pub fn compare(program: &Program, measured: &Measured, cost: Option<CostModel>) -> Option<Comparison> {
    let cost = cost.unwrap_or_else(|| calibrated_costs(program, measured));
    let simulated = simulate::simulate(program, &cost).ok()?.makespan;
    let measured = measured.iter().flatten().map(|s| s.2).fold(0.0, f64::max);
    Some(Comparison { measured, simulated, cost })
}
