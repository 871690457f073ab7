//! The memory model: how many units each pass allocates or releases, by
//! stage, and the budget each rank must stay within. Every consumer (the
//! checker, the lower bound, the schedulers) reads it through these
//! methods, so per-stage activations and per-rank budgets mean the same
//! thing everywhere.

use super::ScheduledOp;
use crate::syntax::span::Span;
use std::collections::HashSet;
use stp_ir::{Microbatch, Pass, PassKind, Stage};

/// One stage's activation memory, in units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageMemory {
    /// Units `F(mb, s)` allocates.
    pub activation: i64,
    /// Of those, units kept after `B` until `W` runs.
    pub weight_stash: i64,
}

/// How much activation memory each pass holds, in units, and the bounds a
/// rank must stay within (`memory { ... }` block, `--mem` overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryModel {
    /// Units `F(mb, s)` allocates (`activation`, default 1), on every
    /// stage without an entry in `stages`.
    pub activation: i64,
    /// Of those, units kept after `B` until `W` runs (`weight_stash`,
    /// default 0): `B` releases the rest, `W` this part, `BW` all.
    pub weight_stash: i64,
    /// Per stage (`activation(s) = ...`, `weight_stash(s) = ...`); empty
    /// when every stage takes the uniform numbers.
    pub stages: Vec<StageMemory>,
    /// Most units live on one rank at once (`budget`), if bounded.
    pub budget: Option<i64>,
    /// Per rank (`budget(r) = ...`); empty when every rank has `budget`.
    pub budgets: Vec<i64>,
    /// Where the budget was declared, for diagnostics.
    pub budget_span: Option<Span>,
    /// Most weight gradients deferred at once on one rank (`max_deferred`), if bounded.
    pub max_deferred: Option<i64>,
    /// Units a recomputed forward does not keep (`recomputed`): they are
    /// freed when its `F` ends and allocated again by its `R`. `None`
    /// (the default) is all of them, full recompute; fewer is selective.
    pub recomputed: Option<i64>,
}

impl Default for MemoryModel {
    fn default() -> MemoryModel {
        MemoryModel {
            activation: 1,
            weight_stash: 0,
            stages: Vec::new(),
            budget: None,
            budgets: Vec::new(),
            budget_span: None,
            max_deferred: None,
            recomputed: None,
        }
    }
}

/// The (stage, microbatch) pairs one rank's ops recompute (run an `R`
/// for), as `RankProgram::recomputed` reads them from a lowered program.
pub fn recomputed_pairs(ops: &[ScheduledOp]) -> HashSet<(Stage, Microbatch)> {
    ops.iter().flat_map(|op| &op.compute.passes).filter(|p| p.kind == PassKind::R).map(|p| (p.stage, p.mb)).collect()
}

impl MemoryModel {
    /// The memory of `stage`'s passes.
    pub fn stage(&self, stage: Stage) -> StageMemory {
        self.stages
            .get(stage.index())
            .copied()
            .unwrap_or(StageMemory { activation: self.activation, weight_stash: self.weight_stash })
    }

    /// Units a pass of `kind` on `stage` allocates (positive) or releases
    /// (negative); an `F` as though its pair were not recomputed (see
    /// [`MemoryModel::pass_deltas`]).
    pub fn delta(&self, kind: PassKind, stage: Stage) -> i64 {
        let m = self.stage(stage);
        match kind {
            PassKind::F => m.activation,
            PassKind::B => -(m.activation - m.weight_stash),
            PassKind::W => -m.weight_stash,
            PassKind::BW => -m.activation,
            PassKind::R => self.recomputed_units(stage),
        }
    }

    /// Units a recomputed forward of `stage` frees at its end and its `R`
    /// allocates again.
    pub fn recomputed_units(&self, stage: Stage) -> i64 {
        let activation = self.stage(stage).activation;
        self.recomputed.map_or(activation, |units| units.min(activation))
    }

    /// Per op of one rank's program, per pass, what it allocates or
    /// releases: a forward whose pair the rank recomputes (an `R` follows)
    /// keeps only what recomputation does not restore.
    pub fn pass_deltas<'a>(&'a self, ops: &'a [ScheduledOp]) -> impl Iterator<Item = Vec<(Pass, i64)>> + 'a {
        let recomputed = recomputed_pairs(ops);
        ops.iter().map(move |op| {
            op.compute
                .passes
                .iter()
                .map(|p| {
                    let mut units = self.delta(p.kind, p.stage);
                    if p.kind == PassKind::F && recomputed.contains(&(p.stage, p.mb)) {
                        units -= self.recomputed_units(p.stage);
                    }
                    (*p, units)
                })
                .collect()
        })
    }

    /// Rank `rank`'s budget, if bounded.
    pub fn budget_of(&self, rank: usize) -> Option<i64> {
        self.budgets.get(rank).copied().or(self.budget)
    }

    /// Whether any rank has a budget.
    pub fn is_bounded(&self) -> bool {
        self.budget.is_some() || !self.budgets.is_empty()
    }

    /// The largest activation of any stage.
    pub fn largest_activation(&self) -> i64 {
        self.stages.iter().map(|m| m.activation).fold(self.activation, i64::max)
    }

    /// The smallest activation of any stage (the uniform one when there
    /// are no per-stage numbers).
    pub fn smallest_activation(&self) -> i64 {
        if self.stages.is_empty() {
            return self.activation;
        }
        self.stages.iter().map(|m| m.activation).min().unwrap_or(self.activation)
    }

    /// One line for diagnostics: what F allocates and B keeps.
    pub fn describe(&self) -> String {
        if self.stages.iter().all(|m| m.activation == self.activation && m.weight_stash == self.weight_stash) {
            return format!(
                "F holds {} unit(s) per (stage, microbatch); B releases all but {}, which W releases",
                self.activation, self.weight_stash
            );
        }
        let acts: Vec<String> = self.stages.iter().map(|m| m.activation.to_string()).collect();
        let stash: Vec<String> = self.stages.iter().map(|m| m.weight_stash.to_string()).collect();
        format!(
            "F holds [{}] unit(s) per microbatch by stage; B releases all but [{}], which W releases",
            acts.join(" "),
            stash.join(" ")
        )
    }
}
