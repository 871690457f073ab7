//! Expands a schedule's `check` directives into the parameter values of
//! every instance they name.

use super::params::ParamArgs;
use crate::diag::{Code, Diagnostic};
use crate::syntax::ast::{CheckAxis, CheckValues, Decl, Expr, ExprKind, Schedule, UnOp};
use crate::syntax::span::Span;

/// Most instances one directive may name.
pub const MAX_INSTANCES: usize = 100_000;

/// One `check` directive and the instances it names.
#[derive(Debug, Clone)]
pub struct CheckFamily {
    /// The directive.
    pub span: Span,
    /// Parameter values of each instance, in directive order.
    pub instances: Vec<Vec<(String, i64)>>,
}

/// Every `check` directive of `schedule`, expanded. Parameters no axis
/// names take their values from `given` (the command line).
pub fn check_families(schedule: &Schedule, given: &ParamArgs) -> Result<Vec<CheckFamily>, Diagnostic> {
    let mut families = Vec::new();
    for decl in &schedule.decls {
        let Decl::Check { axes, span } = decl else { continue };
        let mut fixed: Vec<(String, i64)> = Vec::new();
        for p in &schedule.params {
            if axes.iter().any(|a| a.name.name == p.name.name) {
                continue;
            }
            let value = given.named.iter().rev().find(|(n, _)| *n == p.name.name).map(|(_, v)| *v).or(match p.kind {
                crate::syntax::ast::ParamKind::Ranks => given.ranks,
                crate::syntax::ast::ParamKind::Microbatches => given.microbatches,
                crate::syntax::ast::ParamKind::Chunks => given.chunks,
                crate::syntax::ast::ParamKind::Int => None,
            });
            match value {
                Some(v) => fixed.push((p.name.name.clone(), v)),
                None => {
                    return Err(Diagnostic::new(
                        Code::ParamValue,
                        format!("this check directive gives parameter `{}` no values", p.name.name),
                    )
                    .with_label(*span, format!("add `{} in ...` here, or give it on the command line", p.name.name)))
                }
            }
        }
        let mut instances = Vec::new();
        expand(axes, &mut fixed, &mut instances, *span)?;
        families.push(CheckFamily { span: *span, instances });
    }
    Ok(families)
}

fn expand(
    axes: &[CheckAxis],
    bound: &mut Vec<(String, i64)>,
    out: &mut Vec<Vec<(String, i64)>>,
    span: Span,
) -> Result<(), Diagnostic> {
    let Some((axis, rest)) = axes.split_first() else {
        if out.len() >= MAX_INSTANCES {
            return Err(Diagnostic::new(
                Code::Limit,
                format!("this check directive names more than {MAX_INSTANCES} instances"),
            )
            .with_label(span, "too many instances"));
        }
        out.push(bound.clone());
        return Ok(());
    };
    let values: Vec<i64> = match &axis.values {
        CheckValues::Range { start, end, inclusive } => {
            let (a, b) = (value(start, bound)?, value(end, bound)?);
            let b = if *inclusive { b.saturating_add(1) } else { b };
            if b.saturating_sub(a) > MAX_INSTANCES as i64 {
                return Err(Diagnostic::new(
                    Code::Limit,
                    format!("the range of `{}` has more than {MAX_INSTANCES} values", axis.name.name),
                )
                .with_label(start.span.to(end.span), "too many values"));
            }
            (a..b).collect()
        }
        CheckValues::List(items) => items.iter().map(|e| value(e, bound)).collect::<Result<_, _>>()?,
    };
    for v in values {
        bound.push((axis.name.name.clone(), v));
        let result = expand(rest, bound, out, span);
        bound.pop();
        result?;
    }
    Ok(())
}

/// Evaluates an axis value over the parameters bound so far (integer
/// arithmetic, `min`, `max`, `if`); anything else is refused.
fn value(e: &Expr, bound: &[(String, i64)]) -> Result<i64, Diagnostic> {
    let bad = |why: String| Diagnostic::new(Code::Arithmetic, why).with_label(e.span, "in this check directive value");
    Ok(match &e.kind {
        ExprKind::Int(n) => *n,
        ExprKind::Real(_) => return Err(bad("a check directive value must be a whole number".into())),
        ExprKind::Bool(b) => i64::from(*b),
        ExprKind::Var(name) => match bound.iter().rev().find(|(n, _)| *n == name.name) {
            Some((_, v)) => *v,
            None => {
                return Err(Diagnostic::new(
                    Code::UnknownName,
                    format!("`{}` has no value yet in this check directive", name.name),
                )
                .with_label(e.span, "name it in an earlier axis, or give it on the command line"))
            }
        },
        ExprKind::Unary(UnOp::Neg, a) => {
            value(a, bound)?.checked_neg().ok_or_else(|| bad("integer overflow".into()))?
        }
        ExprKind::Unary(UnOp::Not, a) => i64::from(value(a, bound)? == 0),
        ExprKind::Binary(op, a, b) => {
            let (x, y) = (value(a, bound)?, value(b, bound)?);
            use crate::syntax::ast::BinOp::*;
            let r = match op {
                Add => x.checked_add(y),
                Sub => x.checked_sub(y),
                Mul => x.checked_mul(y),
                Div => x.checked_div(y),
                Rem => x.checked_rem(y),
                Eq => Some(i64::from(x == y)),
                Ne => Some(i64::from(x != y)),
                Lt => Some(i64::from(x < y)),
                Le => Some(i64::from(x <= y)),
                Gt => Some(i64::from(x > y)),
                Ge => Some(i64::from(x >= y)),
                And => Some(i64::from(x != 0 && y != 0)),
                Or => Some(i64::from(x != 0 || y != 0)),
            };
            r.ok_or_else(|| bad(format!("`{x} {} {y}` overflows or divides by zero", op.as_str())))?
        }
        ExprKind::If(c, a, b) => {
            if value(c, bound)? != 0 {
                value(a, bound)?
            } else {
                value(b, bound)?
            }
        }
        ExprKind::Call(name, args) if name.name == "min" || name.name == "max" => {
            let vals: Vec<i64> = args.iter().map(|a| value(a, bound)).collect::<Result<_, _>>()?;
            let pick = if name.name == "min" { vals.iter().min() } else { vals.iter().max() };
            pick.copied().unwrap_or(0)
        }
        ExprKind::Call(name, _) => {
            return Err(Diagnostic::new(
                Code::UnknownName,
                format!("check directive values cannot call `{}`", name.name),
            )
            .with_label(e.span, "use arithmetic, min, max or if here"))
        }
        ExprKind::Error => 0,
    })
}
