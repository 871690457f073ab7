//! Binds command-line parameter values to a schedule's declared parameters.

use crate::diag::{Code, Diagnostic};
use crate::syntax::ast::{ParamKind, Schedule};

/// Parameter values as the user gave them.
#[derive(Debug, Clone, Default)]
pub struct ParamArgs {
    /// `-p`: the parameter of kind `ranks`.
    pub ranks: Option<i64>,
    /// `-m`: the parameter of kind `microbatches`.
    pub microbatches: Option<i64>,
    /// `-v`: the parameter of kind `chunks`.
    pub chunks: Option<i64>,
    /// `--param name=value`, for any parameter.
    pub named: Vec<(String, i64)>,
    /// `--mem setting=value`: overrides of the `memory { ... }` block.
    pub memory: Vec<(String, i64)>,
}

/// A parameter with its value, in declaration order.
#[derive(Debug, Clone)]
pub struct BoundParam {
    pub name: String,
    pub kind: ParamKind,
    pub value: i64,
}

fn flag(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Ranks => "-p",
        ParamKind::Microbatches => "-m",
        ParamKind::Chunks => "-v",
        ParamKind::Int => "--param",
    }
}

/// Matches `args` to the schedule's parameters; every mismatch is an error.
pub fn bind(schedule: &Schedule, args: &ParamArgs) -> Result<Vec<BoundParam>, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let by_kind = [
        (ParamKind::Ranks, args.ranks),
        (ParamKind::Microbatches, args.microbatches),
        (ParamKind::Chunks, args.chunks),
    ];
    for (kind, value) in by_kind {
        if value.is_some() && !schedule.params.iter().any(|p| p.kind == kind) {
            errors.push(
                Diagnostic::new(
                    Code::ParamValue,
                    format!(
                        "schedule `{}` has no parameter of kind `{}`, so {} does not apply",
                        schedule.name.name,
                        kind.as_str(),
                        flag(kind)
                    ),
                )
                .with_label(schedule.name.span, "its parameters are declared here"),
            );
        }
    }
    for (name, _) in &args.named {
        if !schedule.params.iter().any(|p| &p.name.name == name) {
            let declared: Vec<&str> = schedule.params.iter().map(|p| p.name.name.as_str()).collect();
            errors.push(
                Diagnostic::new(
                    Code::ParamValue,
                    format!("schedule `{}` has no parameter `{name}`", schedule.name.name),
                )
                .with_label(schedule.name.span, format!("it declares {}", declared.join(", "))),
            );
        }
    }
    let mut bound = Vec::new();
    for p in &schedule.params {
        let named = args.named.iter().rev().find(|(n, _)| *n == p.name.name).map(|(_, v)| *v);
        let by_flag = by_kind.iter().find(|(k, _)| *k == p.kind).and_then(|(_, v)| *v);
        let Some(value) = named.or(by_flag) else {
            let how = match p.kind {
                ParamKind::Int => format!("pass --param {}=N", p.name.name),
                kind => format!("pass {} N (or --param {}=N)", flag(kind), p.name.name),
            };
            errors.push(
                Diagnostic::new(
                    Code::ParamValue,
                    format!("no value given for parameter `{}` ({})", p.name.name, p.kind.as_str()),
                )
                .with_label(p.span, "declared here")
                .with_help(how),
            );
            continue;
        };
        if p.kind != ParamKind::Int && value < 1 {
            errors.push(
                Diagnostic::new(
                    Code::ParamValue,
                    format!("parameter `{}` ({}) must be at least 1, but is {value}", p.name.name, p.kind.as_str()),
                )
                .with_label(p.span, "declared here"),
            );
            continue;
        }
        if p.kind != ParamKind::Int && value > i64::from(u32::MAX) {
            errors.push(
                Diagnostic::new(Code::Limit, format!("parameter `{}` = {value} is too large", p.name.name))
                    .with_label(p.span, "declared here"),
            );
            continue;
        }
        bound.push(BoundParam { name: p.name.name.clone(), kind: p.kind, value });
    }
    if errors.is_empty() {
        Ok(bound)
    } else {
        Err(errors)
    }
}
