//! What the scheduler did for an `auto` schedule: part of the schedule
//! as elaborated (the order it holds is the scheduler's), so that the
//! report lives here and `opt/` fills it without `elab/` depending on it.

/// What the scheduler did, for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanReport {
    /// The scheduler whose order was kept.
    pub kept: &'static str,
    /// The greedy order's makespan (per-pass durations: compute plus the
    /// exposed TP collective; transfers take `p2p`); `None` when the
    /// greedy scheduler found no order within the budget.
    pub greedy_makespan: Option<f64>,
    /// The kept order's makespan, in the same units.
    pub makespan: f64,
    /// No order can be faster than this: [`crate::opt::bound::lower_bound`], or a
    /// higher bound Z3 proved ([`crate::opt::raise_bound`]).
    pub lower_bound: f64,
    /// Whether Z3 proved `lower_bound` (no order of the passes, braids
    /// and `BW` ops is shorter) above the combinatorial bound.
    pub bound_by_z3: bool,
    /// No order is shorter: Z3 proved it, or the order meets the lower
    /// bound.
    pub optimal: bool,
    /// Why the solver's answer was not used, if it was asked for and not used.
    pub fallback: Option<String>,
    /// The work the solver did, in reference seconds ([`crate::opt::effort`]; 0 for
    /// the greedy scheduler).
    pub effort_spent: f64,
    /// Whether the wall-clock cap (`--solver-timeout`) cut the search
    /// short: only then may the order differ from machine to machine.
    pub capped: bool,
}

impl std::fmt::Display for PlanReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write(f, None)
    }
}

impl PlanReport {
    /// The report for the order as it finally runs: with `simulated`, the
    /// simulator's makespan of the lowered program leads, the planned one
    /// follows (they differ where planning models less than the simulator).
    pub fn describe(&self, simulated: Option<f64>) -> String {
        struct Final<'a>(&'a PlanReport, Option<f64>);
        impl std::fmt::Display for Final<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.write(f, self.1)
            }
        }
        Final(self, simulated.filter(|t| (t - self.makespan).abs() > 1e-9)).to_string()
    }

    fn write(&self, f: &mut std::fmt::Formatter<'_>, simulated: Option<f64>) -> std::fmt::Result {
        match simulated {
            Some(t) => write!(f, "auto: {} order, makespan {t:.3} ({:.3} as planned)", self.kept, self.makespan)?,
            None => write!(f, "auto: {} order, makespan {:.3}", self.kept, self.makespan)?,
        }
        match self.greedy_makespan {
            Some(greedy) if self.kept != "greedy" => write!(f, " (greedy: {greedy:.3})")?,
            None => write!(f, " (greedy found no order within the budget)")?,
            Some(_) => {}
        }
        if self.optimal {
            write!(f, ", proved optimal")?;
        } else if self.lower_bound > 0.0 {
            let gap = 100.0 * (self.makespan / self.lower_bound - 1.0);
            let by = if self.bound_by_z3 { ", proved by Z3" } else { "" };
            write!(f, ", at most {gap:.1}% above optimal (lower bound {:.3}{by})", self.lower_bound)?;
        }
        if let Some(why) = &self.fallback {
            write!(f, "; {why}")?;
        }
        if self.capped {
            write!(f, "; stopped by --solver-timeout: another machine may find another order")?;
        }
        Ok(())
    }
}
