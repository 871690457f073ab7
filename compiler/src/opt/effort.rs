//! The solver's budget, counted in work rather than time, so that the same
//! input gives the same order on any machine under any load.
//!
//! Each search counts what it does in its own unit (passes the greedy
//! scheduler places, ops the local searches re-time, Z3's resource
//! counter) and converts it to *reference seconds*: how long that work
//! takes on one core of the 2-core machine the rates below were measured
//! on (`cargo run --release -p stpc --example effort_rates` measures them
//! again). A wall-clock cap may be set on top (`--solver-timeout`); when it
//! binds, the report says so, because only then can the result depend on
//! the machine.

use std::time::{Duration, Instant};

/// Greedy passes placed per reference second (randomized restarts).
pub const PASSES_PER_SECOND: f64 = 4_500_000.0;

/// Ops re-timed per reference second (local search, late acceptance:
/// every order scored re-times each of its ops).
pub const RETIMES_PER_SECOND: f64 = 100_000_000.0;

/// Z3 resource units (its `rlimit` counter) per reference second.
pub const Z3_UNITS_PER_SECOND: f64 = 2_000_000.0;

/// Pairs of passes the Z3 model is built from per reference second
/// (building is charged before Z3 runs: it has no counter of its own).
pub const PAIRS_PER_SECOND: f64 = 30_000.0;

/// Work left to a search, in reference seconds, and the wall-clock cap.
#[derive(Debug, Clone)]
pub struct Budget {
    total: f64,
    spent: f64,
    deadline: Option<Instant>,
    capped: bool,
}

impl Budget {
    /// `effort` reference seconds of work, stopped early at `cap` of wall
    /// clock if one is given.
    pub fn new(effort: f64, cap: Option<Duration>) -> Budget {
        Budget { total: effort.max(0.0), spent: 0.0, deadline: cap.map(|c| Instant::now() + c), capped: false }
    }

    /// The effort this budget was given.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Reference seconds of work left in all.
    pub fn left(&self) -> f64 {
        (self.total - self.spent).max(0.0)
    }

    /// Reference seconds left before `share` of the whole is spent: a
    /// phase that may take up to that share, counting what came before.
    pub fn left_until(&self, share: f64) -> f64 {
        (self.total * share - self.spent).max(0.0)
    }

    /// Counts `seconds` of work as done.
    pub fn spend(&mut self, seconds: f64) {
        self.spent += seconds.max(0.0);
    }

    /// Whether the wall-clock cap has passed (and remembers that it did).
    pub fn past_cap(&mut self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.capped = true;
        }
        self.capped
    }

    /// Wall-clock time left before the cap, if there is one.
    pub fn cap_left(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Remembers that a search was cut short by the cap.
    pub fn mark_capped(&mut self) {
        self.capped = true;
    }

    /// Whether the cap cut any search short: only then may the result
    /// differ between machines.
    pub fn capped(&self) -> bool {
        self.capped
    }
}

/// `seconds` of work as a count at `rate` per second (at least 1).
pub fn count(seconds: f64, rate: f64) -> usize {
    (seconds * rate).clamp(1.0, usize::MAX as f64 / 2.0) as usize
}

/// A count of work at `rate` per second, in reference seconds.
pub fn seconds(count: usize, rate: f64) -> f64 {
    count as f64 / rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_count_what_earlier_phases_spent() {
        let mut b = Budget::new(10.0, None);
        assert_eq!(b.left_until(0.2), 2.0);
        b.spend(1.5);
        assert_eq!(b.left_until(0.2), 0.5);
        b.spend(1.0);
        assert_eq!(b.left_until(0.2), 0.0, "an overrun phase leaves the next its own share only");
        assert_eq!(b.left(), 7.5);
        assert!(!b.past_cap() && !b.capped());
    }

    #[test]
    fn a_cap_in_the_past_binds_and_is_remembered() {
        let mut b = Budget::new(10.0, Some(Duration::ZERO));
        assert!(b.past_cap());
        assert!(b.capped());
        assert_eq!(b.cap_left(), Some(Duration::ZERO));
    }
}
