//! The evaluator: runs a schedule's declarations and rank bodies at
//! concrete parameters with checked 64-bit arithmetic.

use super::params::BoundParam;
use super::{ComputeSchedule, Limits, MemoryModel, Origin, ScheduledOp};
use crate::diag::{Code, Diagnostic};
use crate::sema::Module;
use crate::syntax::ast::*;
use crate::syntax::span::Span;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use stp_ir::simulate::CostModel;
use stp_ir::{Compute, Microbatch, Param, Pass, PassKind, Rank, ScheduleMeta, Stage};

/// How a name came to be bound; decides whether it is part of an op's origin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BindKind {
    Param,
    Iteration,
    Let,
}

#[derive(Clone)]
struct Binding<'m> {
    name: &'m str,
    sym: Symbol,
    value: i64,
    kind: BindKind,
}

/// The symbol of call arguments not yet bound to their parameters.
const UNBOUND: Symbol = Symbol(u32::MAX);

/// Elaboration ends early with this error.
type Fail = Box<Diagnostic>;

struct Eval<'m> {
    module: &'m Module,
    env: Vec<Binding<'m>>,
    /// Where the innermost function call's parameters start in `env`: a
    /// function sees only its own parameters.
    frame: usize,
    limits: Limits,
    steps: u64,
    ops: usize,
    /// By symbol: the shared name of an iteration variable, so origins share them.
    names: Vec<Option<Arc<str>>>,
    /// The rank being elaborated: implicit microbatches and deferred `W`s.
    rank_state: RankState,
    /// Most deferred `W`s pending at once (`memory { max_deferred = ... }`).
    max_deferred: Option<i64>,
}

/// Per-rank state of the implicit forms.
#[derive(Default)]
struct RankState {
    /// Next microbatch per (pass class, stage) for ops that omit it; `B` and
    /// `BW` share the backward class.
    next_mb: stp_ir::FastMap<(u8, u32), i64>,
    /// Deferred weight gradients, oldest first, with the op that deferred each.
    deferred: VecDeque<(Pass, Span)>,
    /// Weight gradients deferred with `defer auto`, for stpc to place.
    floating: Vec<(Pass, Origin)>,
    /// Indices (in the rank's program) of pairs joined by `&?`.
    maybe_braided: Vec<usize>,
    /// `reorder { ... }` regions: index ranges of the rank's program.
    regions: Vec<(usize, usize)>,
}

fn implicit_class(kind: PassKind) -> u8 {
    match kind {
        PassKind::F => 0,
        PassKind::B | PassKind::BW => 1,
        PassKind::W => 2,
        PassKind::R => 3,
    }
}

pub(super) fn run(
    module: &Module,
    schedule: &Schedule,
    params: Vec<BoundParam>,
    args_memory: Vec<(String, i64)>,
    limits: Limits,
) -> Result<ComputeSchedule, Vec<Diagnostic>> {
    let mut ev = Eval {
        module,
        env: Vec::new(),
        frame: 0,
        limits,
        steps: 0,
        ops: 0,
        names: Vec::new(),
        rank_state: RankState::default(),
        max_deferred: None,
    };
    for (decl, p) in schedule.params.iter().zip(&params) {
        ev.env.push(Binding { name: &decl.name.name, sym: decl.name.sym, value: p.value, kind: BindKind::Param });
    }
    let value_of = |kind: ParamKind| params.iter().find(|p| p.kind == kind).map_or(1, |p| p.value);
    let num_ranks = value_of(ParamKind::Ranks) as u32;
    let num_microbatches = value_of(ParamKind::Microbatches) as u32;

    let mut errors: Vec<Diagnostic> = Vec::new();
    for decl in &schedule.decls {
        if let Decl::Require { cond, message, span } = decl {
            match ev.eval(cond) {
                Ok(0) => errors.push(ev.require_failed(cond, message.as_deref(), *span)),
                Ok(_) => {}
                Err(e) => errors.push(*e),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let num_stages = ev.stages(schedule).map_err(|e| vec![*e])?;
    ev.within_size_limits(schedule, num_ranks, num_stages, num_microbatches, None).map_err(|e| vec![*e])?;
    let memory = ev.memory(schedule, &args_memory, num_stages, num_ranks).map_err(|e| vec![*e])?;
    ev.max_deferred = memory.max_deferred;
    ev.within_size_limits(schedule, num_ranks, num_stages, num_microbatches, Some(&memory)).map_err(|e| vec![*e])?;
    let cost = ev.cost(schedule, num_stages).map_err(|e| vec![*e])?;
    let placement = ev.placement(schedule, num_stages, num_ranks).map_err(|e| vec![*e])?;
    let (pipelines, routes) = ev.pipelines(schedule, num_stages, num_microbatches).map_err(|e| vec![*e])?;
    let meta = |placement| ScheduleMeta {
        name: schedule.name.name.clone(),
        params: params.iter().map(|p| Param { name: p.name.clone(), value: p.value }).collect(),
        num_ranks,
        num_stages,
        num_microbatches,
        placement,
        tp: 1,
        pipelines,
        routes: routes.clone(),
    };
    let recompute_auto = schedule.decls.iter().any(|d| matches!(d, Decl::RecomputeAuto { .. }));
    if let Some(span) = schedule.decls.iter().find_map(|d| match d {
        Decl::Auto { span } => Some(*span),
        _ => None,
    }) {
        // The passes are ordered by the scheduler in `opt/`, not here.
        return Ok(ComputeSchedule {
            meta: meta(placement),
            ranks: vec![Vec::new(); num_ranks as usize],
            body_span: span,
            memory,
            cost,
            auto: true,
            recompute_auto,
            plan: None,
            floating: Vec::new(),
            maybe_braided: Vec::new(),
            regions: Vec::new(),
            notes: Vec::new(),
            tp_units: None,
        });
    }
    let Some((var, body, body_span)) = schedule.decls.iter().find_map(|d| match d {
        Decl::Rank { var, body, span } => Some((var, body, *span)),
        _ => None,
    }) else {
        return Err(vec![Diagnostic::new(Code::ScheduleShape, "schedule has no `rank` declaration")]);
    };

    let mut owned = vec![Vec::new(); num_ranks as usize];
    for (s, r) in placement.iter().enumerate() {
        owned[r.index()].push(s as u32);
    }
    // With several pipelines, the microbatches of each, in order: the k-th
    // implicit op of a stage runs the k-th microbatch of its pipeline.
    let mut by_pipeline = vec![Vec::new(); if pipelines > 1 { pipelines as usize } else { 0 }];
    for (i, j) in routes.iter().enumerate() {
        by_pipeline[*j as usize].push(i as u32);
    }
    let chain_len = num_stages / pipelines;
    let shape = Shape { num_stages, num_microbatches, placement: &placement, owned: &owned, by_pipeline, chain_len };
    let mut ranks = Vec::with_capacity(num_ranks as usize);
    let mut floating = Vec::with_capacity(num_ranks as usize);
    let mut maybe_braided = Vec::with_capacity(num_ranks as usize);
    let mut regions = Vec::with_capacity(num_ranks as usize);
    let mut seen: HashMap<(Code, Span), usize> = HashMap::new();
    for r in 0..num_ranks {
        let mut ops = Vec::new();
        ev.env.push(Binding { name: &var.name, sym: var.sym, value: i64::from(r), kind: BindKind::Iteration });
        ev.rank_state = RankState::default();
        let result = ev.exec_block(body, Rank(r), &shape, &mut ops);
        let result = result.and_then(|()| ev.leftover_deferred(Rank(r)).map_or(Ok(()), Err));
        ev.env.truncate(params.len());
        floating.push(std::mem::take(&mut ev.rank_state.floating));
        maybe_braided.push(std::mem::take(&mut ev.rank_state.maybe_braided));
        regions.push(std::mem::take(&mut ev.rank_state.regions));
        match result {
            Ok(()) => {}
            Err(e) if e.code == Code::Limit => {
                errors.push(*e);
                break;
            }
            Err(e) => match e.primary_span().and_then(|s| seen.get(&(e.code, s)).copied()) {
                Some(first) => errors[first].notes.push(format!("the same error occurs on rank {r}")),
                None => {
                    if let Some(s) = e.primary_span() {
                        seen.insert((e.code, s), errors.len());
                    }
                    errors.push(*e);
                }
            },
        }
        ranks.push(ops);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ComputeSchedule {
        meta: meta(placement),
        ranks,
        body_span,
        memory,
        cost,
        auto: false,
        recompute_auto,
        plan: None,
        floating,
        maybe_braided,
        regions,
        notes: Vec::new(),
        tp_units: None,
    })
}

struct Shape<'a> {
    num_stages: u32,
    num_microbatches: u32,
    placement: &'a [Rank],
    /// `owned[r]`: the stages of rank `r`, in increasing order (looked up
    /// per op, so computed once).
    owned: &'a [Vec<u32>],
    /// With several pipelines, per pipeline its microbatches in order;
    /// empty with one.
    by_pipeline: Vec<Vec<u32>>,
    /// Stages per pipeline.
    chain_len: u32,
}

impl<'m> Eval<'m> {
    /// `where p = 4, m = 8, r = 1, i = 3`: every binding in scope.
    fn context(&self) -> String {
        let parts: Vec<String> = self.env[self.frame..].iter().map(|b| format!("{} = {}", b.name, b.value)).collect();
        format!("where {}", parts.join(", "))
    }

    fn fail(&self, code: Code, message: String, span: Span, label: String) -> Fail {
        Box::new(Diagnostic::new(code, message).with_label(span, label).with_note(self.context()))
    }

    fn step(&mut self, span: Span) -> Result<(), Fail> {
        self.steps += 1;
        if self.steps > self.limits.max_steps {
            return Err(self.fail(
                Code::Limit,
                format!("elaboration ran more than {} steps", self.limits.max_steps),
                span,
                "still running here".into(),
            ));
        }
        Ok(())
    }

    /// Refuses, before any per-stage or per-rank work, a shape whose passes
    /// alone exceed `--max-ops` (every (stage, microbatch) needs a forward
    /// and a backward), more ranks than `--max-ops`, and memory settings so
    /// large that adding up a rank's activations could overflow.
    fn within_size_limits(
        &self,
        schedule: &'m Schedule,
        num_ranks: u32,
        num_stages: u32,
        num_microbatches: u32,
        memory: Option<&MemoryModel>,
    ) -> Result<(), Fail> {
        let span = schedule
            .decls
            .iter()
            .find_map(|d| match d {
                Decl::Stages { count, .. } => Some(count.span),
                _ => None,
            })
            .unwrap_or(schedule.name.span);
        let max_ops = self.limits.max_ops as u64;
        let passes = 2 * u64::from(num_stages) * u64::from(num_microbatches);
        let too_large = |what: String| {
            Box::new(
                Diagnostic::new(Code::Limit, what)
                    .with_label(span, format!("p = {num_ranks}, {num_stages} stages, m = {num_microbatches}"))
                    .with_help("raise the limit with --max-ops N if this size is intended"),
            )
        };
        if passes > max_ops {
            return Err(too_large(format!(
                "the schedule needs at least {passes} ops ({num_stages} stages × {num_microbatches} microbatches × \
                 a forward and a backward), more than the limit of {max_ops}"
            )));
        }
        if u64::from(num_ranks) > max_ops {
            return Err(too_large(format!("{num_ranks} ranks are more than the limit of {max_ops} ops")));
        }
        let Some(memory) = memory else { return Ok(()) };
        let all_activations =
            i128::from(memory.largest_activation()) * i128::from(num_stages) * i128::from(num_microbatches);
        let largest_budget = memory.budgets.iter().copied().chain(memory.budget).max().unwrap_or(0);
        let largest = all_activations.max(i128::from(largest_budget));
        if largest > i128::from(MAX_MEMORY_UNITS) {
            return Err(Box::new(
                Diagnostic::new(
                    Code::ParamValue,
                    format!(
                        "memory settings too large: {} units (activation {} × {num_stages} stages × \
                         {num_microbatches} microbatches, or the budget) exceed the limit of {MAX_MEMORY_UNITS} \
                         (2^62), where adding them up could overflow",
                        largest,
                        memory.largest_activation()
                    ),
                )
                .with_label(memory.budget_span.unwrap_or(schedule.name.span), "memory model of this schedule")
                .with_help("state memory in a coarser unit (MiB rather than bytes, say)"),
            ));
        }
        Ok(())
    }

    fn require_failed(&mut self, cond: &'m Expr, message: Option<&str>, span: Span) -> Diagnostic {
        let mut names = Vec::new();
        collect_vars(cond, &mut names);
        let values: Vec<String> =
            names.iter().filter_map(|n| self.lookup(n.sym).map(|v| format!("{} = {v}", n.name))).collect();
        let d = Diagnostic::new(Code::RequireFailed, "requirement not met")
            .with_label(span, message.unwrap_or("this requirement is false for the given parameters"));
        if values.is_empty() {
            d
        } else {
            d.with_note(format!("where {}", values.join(", ")))
        }
    }

    /// The memory model: defaults, then the `memory` block, then `overrides`.
    /// The memory model: defaults, then the `memory` block's settings for
    /// every stage and rank, then those written per stage or rank
    /// (`activation(s) = ...`, `budget(r) = ...`), then `overrides`, which
    /// set a value for every stage or rank.
    fn memory(
        &mut self,
        schedule: &'m Schedule,
        overrides: &[(String, i64)],
        num_stages: u32,
        num_ranks: u32,
    ) -> Result<MemoryModel, Fail> {
        let mut model = MemoryModel::default();
        let mut spans: HashMap<&str, Span> = HashMap::new();
        let settings = block_settings(schedule, |d| match d {
            Decl::Memory { fields, .. } => Some(fields),
            _ => None,
        });
        for setting in settings.iter().filter(|s| s.index.is_none()) {
            let v = self.eval(&setting.value)?;
            spans.insert(setting.name.name.as_str(), setting.value.span);
            set_memory_field(&mut model, &setting.name.name, v);
        }
        for setting in settings.iter().filter(|s| s.index.is_some()) {
            spans.insert(setting.name.name.as_str(), setting.value.span);
            if setting.name.name == "budget" {
                model.budgets =
                    (0..i64::from(num_ranks)).map(|r| self.indexed(setting, r)).collect::<Result<_, _>>()?;
                continue;
            }
            if model.stages.is_empty() {
                model.stages = vec![model.stage(Stage(0)); num_stages as usize];
            }
            for st in 0..num_stages as usize {
                let v = self.indexed(setting, st as i64)?;
                match setting.name.name.as_str() {
                    "activation" => model.stages[st].activation = v,
                    _ => model.stages[st].weight_stash = v,
                }
            }
        }
        for (name, v) in overrides {
            if !crate::sema::MEMORY_FIELDS.contains(&name.as_str()) {
                return Err(Box::new(
                    Diagnostic::new(Code::ParamValue, format!("`--mem {name}=...`: `{name}` is not a memory setting"))
                        .with_label(schedule.name.span, "for this schedule")
                        .with_help(format!("the settings are {}", crate::sema::MEMORY_FIELDS.join(", "))),
                ));
            }
            spans.remove(name.as_str());
            set_memory_field(&mut model, name, *v);
        }
        model.budget_span = spans.get("budget").copied();
        self.memory_problem(&model, &spans, schedule.name.span)?;
        Ok(model)
    }

    /// An error for a negative setting, or a weight stash larger than its
    /// activation, naming the stage or rank.
    fn memory_problem(&self, model: &MemoryModel, spans: &HashMap<&str, Span>, fallback: Span) -> Result<(), Fail> {
        let stages = if model.stages.is_empty() { vec![model.stage(Stage(0))] } else { model.stages.clone() };
        let at_stage = |st: usize| if model.stages.is_empty() { String::new() } else { format!(" at stage {st}") };
        let mut bad: Vec<(&str, String, String)> = Vec::new();
        for (st, m) in stages.iter().enumerate() {
            if m.activation < 0 {
                bad.push((
                    "activation",
                    format!("must not be negative{}", at_stage(st)),
                    format!("this is {}", m.activation),
                ));
            } else if m.weight_stash < 0 || m.weight_stash > m.activation {
                bad.push((
                    "weight_stash",
                    format!("must be between 0 and `activation`{}", at_stage(st)),
                    format!("activation = {}, weight_stash = {}", m.activation, m.weight_stash),
                ));
            }
        }
        let budgets = model.budget.iter().map(|b| (*b, String::new()));
        let per_rank = model.budgets.iter().enumerate().map(|(r, b)| (*b, format!(" for rank {r}")));
        if let Some((b, which)) = budgets.chain(per_rank).find(|(b, _)| *b < 0) {
            bad.push(("budget", format!("must not be negative{which}"), format!("this is {b}")));
        }
        if let Some(units) = model.recomputed.filter(|u| *u < 0) {
            bad.push(("recomputed", "must not be negative".into(), format!("this is {units}")));
        }
        if let Some(d) = model.max_deferred.filter(|d| *d < 0) {
            bad.push(("max_deferred", "must not be negative".into(), format!("this is {d}")));
        }
        let Some((name, rule, label)) = bad.into_iter().next() else { return Ok(()) };
        let span = spans.get(name).copied().unwrap_or(fallback);
        Err(self.fail(Code::ParamValue, format!("memory setting `{name}` {rule}"), span, label))
    }

    /// An integer setting's value with its index variable (a stage or a
    /// rank) bound to `index`.
    fn indexed(&mut self, setting: &'m Setting, index: i64) -> Result<i64, Fail> {
        self.with_index(setting, Some(index), |ev, value| ev.eval(value))
    }

    /// `eval` of a setting's value with its index variable, if it has one
    /// and `index` is given, bound to `index`; one evaluation step.
    fn with_index<T>(
        &mut self,
        setting: &'m Setting,
        index: Option<i64>,
        eval: impl FnOnce(&mut Self, &'m Expr) -> Result<T, Fail>,
    ) -> Result<T, Fail> {
        self.step(setting.value.span)?;
        let (Some(var), Some(index)) = (&setting.index, index) else { return eval(self, &setting.value) };
        self.env.push(Binding { name: &var.name, sym: var.sym, value: index, kind: BindKind::Iteration });
        let v = eval(self, &setting.value);
        self.env.pop();
        v
    }

    /// The cost model: unit costs, then the `cost` block's settings —
    /// first those for every stage, then those written per stage
    /// (`forward(s) = ...`), evaluated for each stage.
    fn cost(&mut self, schedule: &'m Schedule, num_stages: u32) -> Result<CostModel, Fail> {
        let mut cost = CostModel::default();
        let settings = block_settings(schedule, |d| match d {
            Decl::Cost { fields, .. } => Some(fields),
            _ => None,
        });
        for setting in settings.iter().filter(|s| s.index.is_none()) {
            let v = self.time(setting, None)?;
            let field = match setting.name.name.as_str() {
                "forward" => &mut cost.forward,
                "backward_input" => &mut cost.backward_input,
                "backward_weight" => &mut cost.backward_weight,
                "tp_collective" => &mut cost.tp_collective,
                "recompute" => &mut cost.recompute,
                "reduce" => &mut cost.reduce,
                _ => &mut cost.p2p,
            };
            *field = v;
        }
        let per_stage: Vec<&&'m Setting> = settings.iter().filter(|s| s.index.is_some()).collect();
        if per_stage.is_empty() {
            return Ok(cost);
        }
        let mut stages = vec![cost.uniform(); num_stages as usize];
        for setting in per_stage {
            for (st, times) in stages.iter_mut().enumerate() {
                let v = self.time(setting, Some(st as i64))?;
                let field = match setting.name.name.as_str() {
                    "forward" => &mut times.forward,
                    "backward_input" => &mut times.backward_input,
                    "backward_weight" => &mut times.backward_weight,
                    _ => &mut times.tp_collective,
                };
                *field = v;
            }
        }
        cost.stages = stages;
        Ok(cost)
    }

    /// A cost setting's value (with its stage variable bound to `stage`),
    /// checked to be a time from 0 to [`CostModel::MAX_TIME`].
    fn time(&mut self, setting: &'m Setting, stage: Option<i64>) -> Result<f64, Fail> {
        let value = &setting.value;
        let v = self.with_index(setting, stage, |ev, value| ev.eval_real(value))?;
        if setting.name.name == "recompute" && !(0.0..=1.0).contains(&v) {
            return Err(self.fail(
                Code::ParamValue,
                "cost setting `recompute` is the fraction of a forward a recompute re-runs: from 0 to 1 (1: full \
                 recompute)"
                    .into(),
                value.span,
                format!("this is {v}"),
            ));
        }
        if !(0.0..=CostModel::MAX_TIME).contains(&v) {
            let at = stage.map(|st| format!(" at stage {st}")).unwrap_or_default();
            return Err(self.fail(
                Code::ParamValue,
                format!(
                    "cost setting `{}` must be from 0 to {:e}{at} (times are relative: one forward is usually 1)",
                    setting.name.name,
                    CostModel::MAX_TIME
                ),
                value.span,
                format!("this is {v}"),
            ));
        }
        Ok(v)
    }

    /// A cost setting's expression, in decimals: `/` divides exactly;
    /// names, calls and integer-only operators (`%`) are evaluated as
    /// integers.
    fn eval_real(&mut self, e: &'m Expr) -> Result<f64, Fail> {
        let truth = |x: f64| f64::from(u8::from(x != 0.0));
        match &e.kind {
            ExprKind::Real(x) => Ok(*x),
            ExprKind::Unary(UnOp::Neg, a) => Ok(-self.eval_real(a)?),
            ExprKind::Unary(UnOp::Not, a) => Ok(truth(f64::from(u8::from(self.eval_real(a)? == 0.0)))),
            ExprKind::Binary(BinOp::And, a, b) => Ok(truth(self.eval_real(a)? * self.eval_real(b)?)),
            ExprKind::Binary(BinOp::Or, a, b) => {
                let x = self.eval_real(a)?;
                Ok(if x != 0.0 { 1.0 } else { truth(self.eval_real(b)?) })
            }
            ExprKind::Binary(BinOp::Rem, ..) => Ok(self.eval(e)? as f64),
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.eval_real(a)?, self.eval_real(b)?);
                let result = match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div if y == 0.0 => {
                        return Err(self.fail(Code::Arithmetic, "division by zero".into(), b.span, "this is 0".into()))
                    }
                    BinOp::Div => x / y,
                    BinOp::Eq => f64::from(u8::from(x == y)),
                    BinOp::Ne => f64::from(u8::from(x != y)),
                    BinOp::Lt => f64::from(u8::from(x < y)),
                    BinOp::Le => f64::from(u8::from(x <= y)),
                    BinOp::Gt => f64::from(u8::from(x > y)),
                    _ => f64::from(u8::from(x >= y)),
                };
                if result.is_finite() {
                    Ok(result)
                } else {
                    Err(self.fail(Code::Arithmetic, "a time out of range".into(), e.span, format!("this is {result}")))
                }
            }
            ExprKind::If(c, a, b) => {
                if self.eval_real(c)? != 0.0 {
                    self.eval_real(a)
                } else {
                    self.eval_real(b)
                }
            }
            ExprKind::Call(name, args) if matches!(name.name.as_str(), "min" | "max") => {
                let mut values = Vec::with_capacity(args.len());
                for a in args {
                    values.push(self.eval_real(a)?);
                }
                let pick = if name.name == "min" { f64::min } else { f64::max };
                Ok(values.into_iter().reduce(pick).unwrap_or(0.0))
            }
            _ => Ok(self.eval(e)? as f64),
        }
    }

    fn stages(&mut self, schedule: &'m Schedule) -> Result<u32, Fail> {
        let Some(count) = schedule.decls.iter().find_map(|d| match d {
            Decl::Stages { count, .. } => Some(count),
            _ => None,
        }) else {
            return Err(Box::new(Diagnostic::new(Code::ScheduleShape, "schedule has no `stages` declaration")));
        };
        let n = self.eval(count)?;
        if n < 1 || n > i64::from(u32::MAX) {
            return Err(self.fail(
                Code::StageRange,
                format!("the number of stages must be positive, but is {n}"),
                count.span,
                format!("this is {n}"),
            ));
        }
        Ok(n as u32)
    }

    /// `pipelines N;` and `route i -> EXPR;`: how many pipelines the stages
    /// form and each microbatch's (empty with one pipeline).
    fn pipelines(
        &mut self,
        schedule: &'m Schedule,
        num_stages: u32,
        num_microbatches: u32,
    ) -> Result<(u32, Vec<u32>), Fail> {
        let count = schedule.decls.iter().find_map(|d| match d {
            Decl::Pipelines { count, .. } => Some(count),
            _ => None,
        });
        let route = schedule.decls.iter().find_map(|d| match d {
            Decl::Route { var, pipeline, span } => Some((var, pipeline, *span)),
            _ => None,
        });
        let Some(count) = count else {
            return match route {
                Some((_, _, span)) => Err(Box::new(
                    Diagnostic::new(Code::ScheduleShape, "`route` without `pipelines`: there is one pipeline")
                        .with_label(span, "every microbatch flows through the one pipeline")
                        .with_help("declare `pipelines N;` to split the stages into N pipelines"),
                )),
                None => Ok((1, Vec::new())),
            };
        };
        let n = self.eval(count)?;
        if n < 1 || n > i64::from(num_stages) || i64::from(num_stages) % n != 0 {
            return Err(self.fail(
                Code::StageRange,
                format!("{num_stages} stages cannot form {n} pipelines of equal length"),
                count.span,
                format!("this is {n}; it must divide stages = {num_stages}"),
            ));
        }
        let n = n as u32;
        if n == 1 {
            return Ok((1, Vec::new()));
        }
        let Some((var, pipeline, _)) = route else {
            return Err(Box::new(
                Diagnostic::new(Code::ScheduleShape, format!("with {n} pipelines every microbatch needs a route"))
                    .with_label(count.span, format!("{n} pipelines"))
                    .with_help("add `route i -> EXPR;` giving the pipeline (0..pipelines) microbatch i flows through"),
            ));
        };
        let mut routes = Vec::with_capacity(num_microbatches as usize);
        for i in 0..num_microbatches {
            self.step(pipeline.span)?;
            self.env.push(Binding { name: &var.name, sym: var.sym, value: i64::from(i), kind: BindKind::Iteration });
            let j = self.eval(pipeline);
            self.env.pop();
            let j = j?;
            if !(0..i64::from(n)).contains(&j) {
                return Err(self.fail(
                    Code::StageRange,
                    format!("microbatch {i} is routed to pipeline {j}, which does not exist"),
                    pipeline.span,
                    format!("this is {j} for {} = {i}; pipelines are 0..{n}", var.name),
                ));
            }
            routes.push(j as u32);
        }
        Ok((n, routes))
    }

    fn placement(&mut self, schedule: &'m Schedule, num_stages: u32, num_ranks: u32) -> Result<Vec<Rank>, Fail> {
        let Some((var, rank)) = schedule.decls.iter().find_map(|d| match d {
            Decl::Place { var, rank, .. } => Some((var, rank)),
            _ => None,
        }) else {
            return Err(Box::new(Diagnostic::new(Code::ScheduleShape, "schedule has no `place` declaration")));
        };
        let mut placement = Vec::with_capacity(num_stages as usize);
        for s in 0..num_stages {
            self.step(rank.span)?;
            self.env.push(Binding { name: &var.name, sym: var.sym, value: i64::from(s), kind: BindKind::Iteration });
            let r = self.eval(rank);
            let r = r.and_then(|r| {
                if (0..i64::from(num_ranks)).contains(&r) {
                    Ok(Rank(r as u32))
                } else {
                    Err(self.fail(
                        Code::StageRange,
                        format!("stage {s} is placed on rank {r}, which does not exist"),
                        rank.span,
                        format!("this is {r}; ranks are 0..{num_ranks}"),
                    ))
                }
            });
            self.env.pop();
            placement.push(r?);
        }
        Ok(placement)
    }

    fn exec_block(
        &mut self,
        block: &'m Block,
        rank: Rank,
        shape: &Shape,
        out: &mut Vec<ScheduledOp>,
    ) -> Result<(), Fail> {
        let depth = self.env.len();
        let result = block.iter().try_for_each(|stmt| self.exec_stmt(stmt, rank, shape, out));
        self.env.truncate(depth);
        result
    }

    fn exec_stmt(&mut self, stmt: &'m Stmt, rank: Rank, shape: &Shape, out: &mut Vec<ScheduledOp>) -> Result<(), Fail> {
        match &stmt.kind {
            StmtKind::Let(name, value) => {
                let value = self.eval(value)?;
                self.env.push(Binding { name: &name.name, sym: name.sym, value, kind: BindKind::Let });
            }
            StmtKind::For { var, start, end, inclusive, reversed, body } => {
                let start = self.eval(start)?;
                let end = self.eval(end)?;
                let end = if *inclusive { end.saturating_add(1) } else { end };
                let values: Box<dyn Iterator<Item = i64>> =
                    if *reversed { Box::new((start..end).rev()) } else { Box::new(start..end) };
                for i in values {
                    self.step(stmt.span)?;
                    self.env.push(Binding { name: &var.name, sym: var.sym, value: i, kind: BindKind::Iteration });
                    let result = self.exec_block(body, rank, shape, out);
                    self.env.pop();
                    result?;
                }
            }
            StmtKind::Reorder(body) => {
                let first = out.len();
                self.exec_block(body, rank, shape, out)?;
                if out.len() - first > 1 {
                    self.rank_state.regions.push((first, out.len()));
                }
            }
            StmtKind::Repeat { count, body } => {
                let count = self.eval(count)?;
                for _ in 0..count {
                    self.step(stmt.span)?;
                    self.exec_block(body, rank, shape, out)?;
                }
            }
            StmtKind::If { cond, then, otherwise } => {
                let branch = if self.eval(cond)? != 0 { then } else { otherwise };
                self.exec_block(branch, rank, shape, out)?;
            }
            StmtKind::Op(calls) => {
                let mut passes = Vec::with_capacity(calls.len());
                for call in calls {
                    passes.push(self.pass(call, rank, shape)?);
                }
                self.ops += 1;
                if self.ops > self.limits.max_ops {
                    return Err(self
                        .fail(
                            Code::Limit,
                            format!("the schedule has more than {} ops", self.limits.max_ops),
                            stmt.span,
                            "the op past the limit".into(),
                        )
                        .map_help("raise the limit with --max-ops N if this size is intended"));
                }
                let origin = self.origin(stmt.span);
                if passes.len() == 2 && calls.iter().any(|c| c.maybe_braided) {
                    self.rank_state.maybe_braided.push(out.len());
                }
                out.push(ScheduledOp { compute: Compute { passes, units: Vec::new() }, origin });
            }
            StmtKind::Error => {}
        }
        Ok(())
    }

    fn origin(&mut self, span: Span) -> Origin {
        let names = &mut self.names;
        let iteration = self
            .env
            .iter()
            .filter(|b| b.kind == BindKind::Iteration)
            .map(|b| {
                let sym = b.sym.0 as usize;
                if names.len() <= sym {
                    names.resize(sym + 1, None);
                }
                (names[sym].get_or_insert_with(|| Arc::from(b.name)).clone(), b.value)
            })
            .collect();
        Origin { span, iteration }
    }

    fn pass(&mut self, call: &'m OpCall, rank: Rank, shape: &Shape) -> Result<Pass, Fail> {
        let kind = PassKind::from_name(&call.name.name).unwrap_or(PassKind::F);
        let Some(args) = &call.args else { return self.pop_deferred(call) };
        let mut mb = None;
        let mut stage = None;
        for (i, arg) in args.iter().enumerate() {
            let value = self.eval(&arg.value)?;
            let slot = arg.name.as_ref().map_or(if i == 0 { "mb" } else { "stage" }, |n| n.name.as_str());
            if slot == "mb" {
                mb = Some((value, arg.value.span));
            } else {
                stage = Some((value, arg.value.span));
            }
        }
        let stage = match stage {
            Some((s, span)) => self.check_stage(s, span, rank, shape, call)?,
            None => self.implicit_stage(rank, shape, call)?,
        };
        let (mb, mb_span) = match mb {
            Some(given) => given,
            None => {
                let next = self.rank_state.next_mb.entry((implicit_class(kind), stage.0)).or_insert(0);
                *next += 1;
                let k = *next - 1;
                match shape.by_pipeline.get((stage.0 / shape.chain_len) as usize) {
                    // Past its pipeline's last microbatch: out of range below.
                    Some(mine) => {
                        (mine.get(k as usize).map_or(i64::from(shape.num_microbatches), |i| i64::from(*i)), call.span)
                    }
                    None => (k, call.span),
                }
            }
        };
        if !(0..i64::from(shape.num_microbatches)).contains(&mb) {
            let what = if args.iter().any(|a| a.name.as_ref().is_none_or(|n| n.name == "mb")) {
                format!("this is {mb}; microbatches are 0..{}", shape.num_microbatches)
            } else {
                format!(
                    "this is the {} `{kind}` of stage {} on this rank, but there are {} microbatches",
                    ordinal(mb + 1),
                    stage.0,
                    shape.num_microbatches
                )
            };
            return Err(self.fail(
                Code::MicrobatchRange,
                format!("microbatch {mb} is out of range: there are {} microbatches", shape.num_microbatches),
                mb_span,
                what,
            ));
        }
        let pass = Pass { kind, stage, mb: Microbatch(mb as u32) };
        if call.defer_auto {
            let origin = self.origin(call.span);
            self.rank_state.floating.push((Pass { kind: PassKind::W, ..pass }, origin));
        } else if call.defer {
            self.defer(pass, call.span)?;
        }
        Ok(pass)
    }

    /// Queues the `W` of `B` pass `b`, within the `max_deferred` bound.
    fn defer(&mut self, b: Pass, span: Span) -> Result<(), Fail> {
        self.rank_state.deferred.push_back((Pass { kind: PassKind::W, ..b }, span));
        let pending = self.rank_state.deferred.len() as i64;
        match self.max_deferred {
            Some(bound) if pending > bound => Err(self
                .fail(
                    Code::DeferredLimit,
                    format!("{pending} weight gradients are deferred at once, but at most {bound} may be"),
                    span,
                    format!("this defers W(mb {}, stage {})", b.mb.0, b.stage.0),
                )
                .map_note(format!("pending: {}", self.describe_deferred()))),
            _ => Ok(()),
        }
    }

    /// The oldest deferred `W`, for a bare `W`.
    fn pop_deferred(&mut self, call: &OpCall) -> Result<Pass, Fail> {
        if let Some((w, _)) = self.rank_state.deferred.pop_front() {
            return Ok(w);
        }
        let error = self
            .fail(
                Code::NothingDeferred,
                "`W` runs with no deferred weight gradient pending".into(),
                call.span,
                "nothing is deferred on this rank here".into(),
            )
            .map_help("defer one first with `B(...) defer`, or name the pass: `W(mb, stage)`");
        Err(match self.rank_state.floating.len() {
            0 => error,
            n => error.map_note(format!(
                "{n} weight gradient(s) on this rank were deferred with `defer auto`: stpc places those, a bare `W` never runs them"
            )),
        })
    }

    fn describe_deferred(&self) -> String {
        let items: Vec<String> =
            self.rank_state.deferred.iter().map(|(w, _)| format!("W(mb {}, stage {})", w.mb.0, w.stage.0)).collect();
        items.join(", ")
    }

    /// A rank ended with deferred weight gradients that never ran.
    fn leftover_deferred(&self, rank: Rank) -> Option<Fail> {
        let (first, span) = *self.rank_state.deferred.front()?;
        Some(Box::new(
            Diagnostic::new(
                Code::Coverage,
                format!(
                    "rank {} ends with {} deferred weight gradients that never run",
                    rank.0,
                    self.rank_state.deferred.len()
                ),
            )
            .with_label(span, format!("W(mb {}, stage {}) is deferred here but never run", first.mb.0, first.stage.0))
            .with_note(format!("still pending: {}", self.describe_deferred()))
            .with_help("run each deferred gradient with a bare `W`"),
        ))
    }

    fn check_stage(&self, s: i64, span: Span, rank: Rank, shape: &Shape, call: &OpCall) -> Result<Stage, Fail> {
        if !(0..i64::from(shape.num_stages)).contains(&s) {
            return Err(self.fail(
                Code::StageRange,
                format!("stage {s} is out of range: there are {} stages", shape.num_stages),
                span,
                format!("this is {s}; stages are 0..{}", shape.num_stages),
            ));
        }
        let owner = shape.placement[s as usize];
        if owner != rank {
            return Err(self
                .fail(
                    Code::StageOwnership,
                    format!(
                        "`{}` on rank {} names stage {s}, which is placed on rank {}",
                        call.name.name, rank.0, owner.0
                    ),
                    span,
                    format!("stage {s} lives on rank {}", owner.0),
                )
                .map_note(format!("rank {} owns stages {}", rank.0, list_stages(shape, rank))));
        }
        Ok(Stage(s as u32))
    }

    fn implicit_stage(&self, rank: Rank, shape: &Shape, call: &OpCall) -> Result<Stage, Fail> {
        match shape.owned[rank.index()].as_slice() {
            [s] => Ok(Stage(*s)),
            [] => Err(self.fail(
                Code::StageOwnership,
                format!("rank {} owns no stage, so `{}` has nothing to run", rank.0, call.name.name),
                call.span,
                "this op".into(),
            )),
            _ => Err(self
                .fail(
                    Code::StageOwnership,
                    format!("rank {} owns several stages, so `{}` must name one", rank.0, call.name.name),
                    call.span,
                    "no stage given".into(),
                )
                .map_note(format!("rank {} owns stages {}", rank.0, list_stages(shape, rank)))
                .map_help(format!("write `{}(mb, stage)`", call.name.name))),
        }
    }

    fn lookup(&self, name: Symbol) -> Option<i64> {
        self.env[self.frame..].iter().rev().find(|b| b.sym == name).map(|b| b.value)
    }

    fn eval(&mut self, e: &'m Expr) -> Result<i64, Fail> {
        match &e.kind {
            ExprKind::Int(n) => Ok(*n),
            ExprKind::Bool(b) => Ok(i64::from(*b)),
            ExprKind::Var(name) => Ok(self.lookup(name.sym).unwrap_or(0)),
            ExprKind::Unary(UnOp::Neg, a) => {
                let a = self.eval(a)?;
                a.checked_neg().ok_or_else(|| self.overflow(e, format!("-({a})")))
            }
            ExprKind::Unary(UnOp::Not, a) => Ok(i64::from(self.eval(a)? == 0)),
            ExprKind::Binary(BinOp::And, a, b) => Ok(i64::from(self.eval(a)? != 0 && self.eval(b)? != 0)),
            ExprKind::Binary(BinOp::Or, a, b) => Ok(i64::from(self.eval(a)? != 0 || self.eval(b)? != 0)),
            ExprKind::Binary(op, a, b) => {
                let (x, y) = (self.eval(a)?, self.eval(b)?);
                self.binary(*op, x, y, e, b)
            }
            ExprKind::If(c, a, b) => {
                if self.eval(c)? != 0 {
                    self.eval(a)
                } else {
                    self.eval(b)
                }
            }
            ExprKind::Call(name, args) => self.call(name, args, e.span),
            // The checker allows decimals only in cost settings, which
            // `eval_real` evaluates.
            ExprKind::Real(x) => Ok(*x as i64),
            ExprKind::Error => Ok(0),
        }
    }

    fn binary(&self, op: BinOp, x: i64, y: i64, e: &Expr, rhs: &Expr) -> Result<i64, Fail> {
        let checked = match op {
            BinOp::Add => x.checked_add(y),
            BinOp::Sub => x.checked_sub(y),
            BinOp::Mul => x.checked_mul(y),
            BinOp::Div | BinOp::Rem if y == 0 => {
                return Err(self.fail(
                    Code::Arithmetic,
                    format!("{} by zero", if op == BinOp::Div { "division" } else { "remainder" }),
                    rhs.span,
                    "this is 0".into(),
                ));
            }
            BinOp::Div => x.checked_div(y),
            BinOp::Rem => x.checked_rem(y),
            BinOp::Eq => Some(i64::from(x == y)),
            BinOp::Ne => Some(i64::from(x != y)),
            BinOp::Lt => Some(i64::from(x < y)),
            BinOp::Le => Some(i64::from(x <= y)),
            BinOp::Gt => Some(i64::from(x > y)),
            BinOp::Ge => Some(i64::from(x >= y)),
            BinOp::And | BinOp::Or => Some(i64::from(x != 0 && y != 0)),
        };
        checked.ok_or_else(|| self.overflow(e, format!("{x} {} {y}", op.as_str())))
    }

    fn overflow(&self, e: &Expr, computation: String) -> Fail {
        self.fail(
            Code::Arithmetic,
            "integer overflow".into(),
            e.span,
            format!("`{computation}` does not fit in 64 bits"),
        )
    }

    fn call(&mut self, name: &'m Ident, args: &'m [Expr], span: Span) -> Result<i64, Fail> {
        self.step(span)?;
        let base = self.env.len();
        let result = self.call_in_frame(name, args, base);
        self.env.truncate(base);
        result.map_err(|e| e.map_label(span, format!("in this call of `{}`", name.name)))
    }

    /// Evaluates the arguments onto the stack (unnamed, so later arguments
    /// still see the caller's names), then the body with only them visible.
    fn call_in_frame(&mut self, name: &'m Ident, args: &'m [Expr], base: usize) -> Result<i64, Fail> {
        for a in args {
            let value = self.eval(a)?;
            self.env.push(Binding { name: "", sym: UNBOUND, value, kind: BindKind::Let });
        }
        let values = self.env[base..].iter().map(|b| b.value);
        match name.name.as_str() {
            "min" => return Ok(values.min().unwrap_or(0)),
            "max" => return Ok(values.max().unwrap_or(0)),
            _ => {}
        }
        let Some(f) = self.module.function(name.sym) else { return Ok(0) };
        for (binding, (param, _)) in self.env[base..].iter_mut().zip(&f.params) {
            binding.name = &param.name;
            binding.sym = param.sym;
        }
        let caller = std::mem::replace(&mut self.frame, base);
        let result = self.eval(&f.body);
        self.frame = caller;
        result
    }
}

/// The most memory units a schedule may allocate in all, or budget: any
/// sum of a rank's live activations stays far from `i64::MAX`.
pub const MAX_MEMORY_UNITS: i64 = 1 << 62;

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `21st`
fn ordinal(n: i64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The settings of a schedule's blocks of one kind (`memory` or `cost`),
/// in order.
fn block_settings<'m>(
    schedule: &'m Schedule,
    block: impl Fn(&'m Decl) -> Option<&'m Vec<Setting>>,
) -> Vec<&'m Setting> {
    schedule.decls.iter().filter_map(block).flatten().collect()
}

/// Sets a memory setting on every stage or rank.
fn set_memory_field(model: &mut MemoryModel, name: &str, value: i64) {
    match name {
        "activation" => {
            model.activation = value;
            model.stages.iter_mut().for_each(|m| m.activation = value);
        }
        "weight_stash" => {
            model.weight_stash = value;
            model.stages.iter_mut().for_each(|m| m.weight_stash = value);
        }
        "budget" => {
            model.budget = Some(value);
            model.budgets.clear();
        }
        "max_deferred" => model.max_deferred = Some(value),
        "recomputed" => model.recomputed = Some(value),
        _ => {}
    }
}

fn list_stages(shape: &Shape, rank: Rank) -> String {
    let owned: Vec<String> = shape.owned[rank.index()].iter().map(|s| s.to_string()).collect();
    if owned.is_empty() {
        "none".into()
    } else {
        owned.join(", ")
    }
}

fn collect_vars<'a>(e: &'a Expr, out: &mut Vec<&'a Ident>) {
    e.walk(&mut |e| {
        if let ExprKind::Var(n) = &e.kind {
            if !out.iter().any(|o| o.sym == n.sym) {
                out.push(n);
            }
        }
    });
}

/// Builder-style tweaks on a boxed diagnostic.
trait FailExt {
    fn map_note(self, note: String) -> Self;
    fn map_help(self, help: impl Into<String>) -> Self;
    fn map_label(self, span: Span, message: String) -> Self;
}

impl FailExt for Fail {
    fn map_note(mut self, note: String) -> Self {
        self.notes.push(note);
        self
    }
    fn map_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    fn map_label(mut self, span: Span, message: String) -> Self {
        self.labels.push(crate::diag::Label { span, message });
        self
    }
}
