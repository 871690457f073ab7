//! Name resolution and type checking over the whole file, collecting every
//! error rather than stopping at the first.

use crate::diag::{Code, Diagnostic};
use crate::syntax::ast::*;
use crate::syntax::span::Span;
use std::collections::HashMap;

/// Builtin functions: each takes two or more ints and returns an int.
pub const BUILTINS: [&str; 2] = ["min", "max"];

/// The op names a rank body may call.
pub const OPS: [&str; 5] = ["F", "B", "W", "BW", "R"];

/// The settings of a `memory { ... }` block.
pub const MEMORY_FIELDS: [&str; 5] = ["activation", "weight_stash", "budget", "max_deferred", "recomputed"];

/// The settings of a `cost { ... }` block (the simulator's cost model).
pub const COST_FIELDS: [&str; 7] =
    ["forward", "backward_input", "backward_weight", "tp_collective", "p2p", "recompute", "reduce"];

/// The cost settings that may differ from stage to stage (`forward(s) = ...`).
pub const STAGE_COST_FIELDS: [&str; 4] = ["forward", "backward_input", "backward_weight", "tp_collective"];

/// The memory settings that may differ by stage (`activation(s) = ...`)
/// or by rank (`budget(r) = ...`), with what their index ranges over.
pub const INDEXED_MEMORY_FIELDS: [(&str, &str); 3] =
    [("activation", "stage"), ("weight_stash", "stage"), ("budget", "rank")];

/// The cost settings' indices: all range over stages.
const INDEXED_COST_FIELDS: [(&str, &str); 4] = [
    (STAGE_COST_FIELDS[0], "stage"),
    (STAGE_COST_FIELDS[1], "stage"),
    (STAGE_COST_FIELDS[2], "stage"),
    (STAGE_COST_FIELDS[3], "stage"),
];

/// Checks a whole file and returns every error found.
pub fn check_file(file: &File) -> Vec<Diagnostic> {
    let mut functions: HashMap<&str, &Function> = HashMap::new();
    let mut schedules: HashMap<&str, &Schedule> = HashMap::new();
    let mut errors = Vec::new();
    for item in &file.items {
        match item {
            Item::Function(f) => {
                let name = f.name.name.as_str();
                if BUILTINS.contains(&name) || OPS.contains(&name) {
                    errors.push(
                        Diagnostic::new(Code::Duplicate, format!("function `{name}` has the name of a builtin"))
                            .with_label(f.name.span, "pick another name"),
                    );
                } else if let Some(first) = functions.insert(name, f) {
                    errors.push(duplicate("function", name, f.name.span, first.name.span));
                }
            }
            Item::Schedule(s) => {
                if let Some(first) = schedules.insert(s.name.name.as_str(), s) {
                    errors.push(duplicate("schedule", &s.name.name, s.name.span, first.name.span));
                }
            }
        }
    }
    let mut checker = Checker { functions: &functions, scopes: Vec::new(), errors, decimals: false };
    for item in &file.items {
        match item {
            Item::Function(f) => checker.check_function(f),
            Item::Schedule(s) => checker.check_schedule(s),
        }
    }
    let mut errors = checker.errors;
    errors.extend(find_recursion(&functions));
    errors
}

fn duplicate(what: &str, name: &str, span: Span, first: Span) -> Diagnostic {
    Diagnostic::new(Code::Duplicate, format!("{what} `{name}` is defined twice"))
        .with_label(span, "defined again here")
        .with_label(first, "first defined here")
}

/// A name bound in some scope.
#[derive(Clone)]
struct Binding {
    name: String,
    ty: Type,
    span: Span,
}

struct Checker<'a> {
    functions: &'a HashMap<&'a str, &'a Function>,
    scopes: Vec<Vec<Binding>>,
    errors: Vec<Diagnostic>,
    /// Whether a decimal may appear here (a cost setting's value).
    decimals: bool,
}

impl Checker<'_> {
    fn lookup(&self, name: &str) -> Option<&Binding> {
        self.scopes.iter().rev().flat_map(|s| s.iter().rev()).find(|b| b.name == name)
    }

    /// Binds `name` in the innermost scope, refusing to hide any visible name.
    fn bind(&mut self, name: &Ident, ty: Type) {
        let earlier = self.lookup(&name.name).map(|b| b.span);
        if let Some(earlier) = earlier {
            self.errors.push(
                Diagnostic::new(Code::Shadowing, format!("`{}` is already bound", name.name))
                    .with_label(name.span, "this binding would hide the earlier one")
                    .with_label(earlier, "earlier binding")
                    .with_help("shadowing is not allowed; pick another name"),
            );
        } else if self.functions.contains_key(name.name.as_str()) || BUILTINS.contains(&name.name.as_str()) {
            self.errors.push(
                Diagnostic::new(Code::Shadowing, format!("`{}` would hide the function of that name", name.name))
                    .with_label(name.span, "pick another name"),
            );
        }
        if let Some(scope) = self.scopes.last_mut() {
            scope.push(Binding { name: name.name.clone(), ty, span: name.span });
        }
    }

    fn with_scope(&mut self, f: impl FnOnce(&mut Self)) {
        self.scopes.push(Vec::new());
        f(self);
        self.scopes.pop();
    }

    fn check_function(&mut self, f: &Function) {
        self.with_scope(|c| {
            for (name, ty) in &f.params {
                c.bind(name, *ty);
            }
            c.expect(&f.body, f.ret, "the function's declared result type");
        });
    }

    fn check_schedule(&mut self, s: &Schedule) {
        self.check_params(s);
        self.check_decl_counts(s);
        self.with_scope(|c| {
            for p in &s.params {
                c.bind(&p.name, Type::Int);
            }
            for decl in &s.decls {
                c.check_decl(decl);
            }
        });
    }

    fn check_params(&mut self, s: &Schedule) {
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for p in &s.params {
            if let Some(first) = seen.insert(p.name.name.as_str(), p.name.span) {
                self.errors.push(duplicate("parameter", &p.name.name, p.name.span, first));
            }
        }
        for kind in [ParamKind::Ranks, ParamKind::Microbatches, ParamKind::Chunks] {
            let of_kind: Vec<&ParamDecl> = s.params.iter().filter(|p| p.kind == kind).collect();
            let required = kind != ParamKind::Chunks;
            if of_kind.is_empty() && required {
                self.errors.push(
                    Diagnostic::new(
                        Code::ScheduleShape,
                        format!("schedule `{}` has no parameter of kind `{}`", s.name.name, kind.as_str()),
                    )
                    .with_label(
                        s.name.span,
                        format!("add a parameter like `{}: {}`", default_name(kind), kind.as_str()),
                    ),
                );
            }
            for extra in of_kind.iter().skip(1) {
                self.errors.push(
                    Diagnostic::new(
                        Code::ScheduleShape,
                        format!("schedule `{}` has more than one parameter of kind `{}`", s.name.name, kind.as_str()),
                    )
                    .with_label(extra.span, "second one here")
                    .with_label(of_kind[0].span, "first one here"),
                );
            }
        }
    }

    fn check_decl_counts(&mut self, s: &Schedule) {
        type IsKind = fn(&Decl) -> bool;
        // (name, example, required, is_kind): `memory` and `cost` blocks are
        // optional, but a second one would silently replace the first.
        let kinds: [(&str, &str, bool, IsKind); 8] = [
            ("stages", "stages p;", true, |d| matches!(d, Decl::Stages { .. })),
            ("place", "place s -> s;", true, |d| matches!(d, Decl::Place { .. })),
            ("rank", "rank r { ... }` or `auto;", true, |d| matches!(d, Decl::Rank { .. } | Decl::Auto { .. })),
            ("memory", "", false, |d| matches!(d, Decl::Memory { .. })),
            ("cost", "", false, |d| matches!(d, Decl::Cost { .. })),
            ("recompute auto", "", false, |d| matches!(d, Decl::RecomputeAuto { .. })),
            ("pipelines", "", false, |d| matches!(d, Decl::Pipelines { .. })),
            ("route", "", false, |d| matches!(d, Decl::Route { .. })),
        ];
        for (name, example, required, is_kind) in kinds {
            let found: Vec<&Decl> = s.decls.iter().filter(|d| is_kind(d)).collect();
            if found.is_empty() && required {
                self.errors.push(
                    Diagnostic::new(
                        Code::ScheduleShape,
                        format!("schedule `{}` has no `{name}` declaration", s.name.name),
                    )
                    .with_label(s.name.span, format!("add `{example}` to this schedule")),
                );
            }
            for extra in found.iter().skip(1) {
                self.errors.push(
                    Diagnostic::new(
                        Code::ScheduleShape,
                        format!("schedule `{}` has more than one `{name}` declaration", s.name.name),
                    )
                    .with_label(decl_span(extra), "second one here")
                    .with_label(decl_span(found[0]), "first one here"),
                );
            }
        }
    }

    fn check_decl(&mut self, decl: &Decl) {
        match decl {
            Decl::Stages { count, .. } => self.expect(count, Type::Int, "the number of stages"),
            Decl::Place { var, rank, .. } => self.with_scope(|c| {
                c.bind(var, Type::Int);
                c.expect(rank, Type::Int, "a rank");
            }),
            Decl::Require { cond, .. } => self.expect(cond, Type::Bool, "a requirement"),
            Decl::Pipelines { count, .. } => self.expect(count, Type::Int, "the number of pipelines"),
            Decl::Route { var, pipeline, .. } => self.with_scope(|c| {
                c.bind(var, Type::Int);
                c.expect(pipeline, Type::Int, "a pipeline");
            }),
            Decl::Auto { .. } | Decl::RecomputeAuto { .. } => {}
            Decl::Memory { fields, .. } => {
                self.check_settings(fields, &MEMORY_FIELDS, &INDEXED_MEMORY_FIELDS, "memory setting")
            }
            Decl::Cost { fields, .. } => {
                self.check_settings(fields, &COST_FIELDS, &INDEXED_COST_FIELDS, "cost setting")
            }
            Decl::Check { axes, .. } => self.check_axes(axes),
            Decl::Rank { var, body, .. } => self.with_scope(|c| {
                c.bind(var, Type::Int);
                c.check_block(body);
            }),
        }
    }

    /// A `memory { ... }` or `cost { ... }` block: known names, once each, int values.
    /// A block's settings: known names, each once, those in `per_stage`
    /// optionally with a stage variable; a cost's value is a decimal (an
    /// integer is one), a memory setting's an integer.
    fn check_settings(&mut self, fields: &[Setting], allowed: &[&str], indexed: &[(&str, &str)], what: &str) {
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let cost = what == "cost setting";
        for Setting { name, index, value } in fields {
            if !allowed.contains(&name.name.as_str()) {
                let d = Diagnostic::new(Code::UnknownName, format!("`{}` is not a {what}", name.name))
                    .with_label(name.span, "unknown setting");
                let d = match suggest(&name.name, allowed) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help(format!("the settings are {}", allowed.join(", "))),
                };
                self.errors.push(d);
            } else if let Some(first) = seen.insert(name.name.as_str(), name.span) {
                self.errors.push(duplicate(what, &name.name, name.span, first));
            }
            let takes_index = indexed.iter().any(|(n, _)| *n == name.name);
            if let Some(index) = index.as_ref().filter(|_| !takes_index && allowed.contains(&name.name.as_str())) {
                let listed: Vec<String> = indexed.iter().map(|(n, over)| format!("{n}({})", &over[..1])).collect();
                let d = Diagnostic::new(
                    Code::TypeMismatch,
                    format!("`{}` is one number for the whole schedule; it takes no `({})`", name.name, index.name),
                )
                .with_label(index.span, "not a per-stage or per-rank setting")
                .with_help(format!("settings that may differ: {}", listed.join(", ")));
                self.errors.push(d);
            }
            let want = if cost { Type::Real } else { Type::Int };
            self.decimals = cost;
            self.with_scope(|c| {
                if let Some(index) = index {
                    c.bind(index, Type::Int);
                }
                c.expect(value, want, &format!("a {what}"));
            });
            self.decimals = false;
        }
    }

    fn check_axes(&mut self, axes: &[CheckAxis]) {
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for axis in axes {
            match self.lookup(&axis.name.name) {
                Some(b) if b.ty == Type::Int => {}
                _ => self.errors.push(
                    Diagnostic::new(
                        Code::UnknownName,
                        format!("`{}` is not a parameter of this schedule", axis.name.name),
                    )
                    .with_label(axis.name.span, "a check directive ranges over the schedule's parameters"),
                ),
            }
            if let Some(first) = seen.insert(axis.name.name.as_str(), axis.name.span) {
                self.errors.push(duplicate("check axis", &axis.name.name, axis.name.span, first));
            }
            match &axis.values {
                CheckValues::Range { start, end, .. } => {
                    self.expect(start, Type::Int, "a range bound");
                    self.expect(end, Type::Int, "a range bound");
                }
                CheckValues::List(items) => items.iter().for_each(|e| self.expect(e, Type::Int, "a parameter value")),
            }
        }
    }

    fn check_block(&mut self, block: &Block) {
        self.with_scope(|c| {
            for stmt in block {
                c.check_stmt(stmt);
            }
        });
    }

    fn check_stmt(&mut self, stmt: &Stmt) {
        match &stmt.kind {
            StmtKind::Let(name, value) => {
                let ty = self.infer(value);
                self.bind(name, ty.unwrap_or(Type::Int));
            }
            StmtKind::For { var, start, end, body, .. } => {
                self.expect(start, Type::Int, "a range bound");
                self.expect(end, Type::Int, "a range bound");
                self.with_scope(|c| {
                    c.bind(var, Type::Int);
                    c.check_block(body);
                });
            }
            StmtKind::Repeat { count, body } => {
                self.expect(count, Type::Int, "a repeat count");
                self.check_block(body);
            }
            StmtKind::Reorder(body) => self.check_block(body),
            StmtKind::If { cond, then, otherwise } => {
                self.expect(cond, Type::Bool, "a condition");
                self.check_block(then);
                self.check_block(otherwise);
            }
            StmtKind::Op(calls) => {
                if calls.len() > 2 {
                    self.errors.push(
                        Diagnostic::new(Code::OpArgs, format!("{} passes are braided together", calls.len()))
                            .with_label(stmt.span, "a braided op holds at most two passes")
                            .with_help("split it into separate ops"),
                    );
                }
                for call in calls {
                    self.check_op_call(call);
                }
            }
            StmtKind::Error => {}
        }
    }

    fn check_op_call(&mut self, call: &OpCall) {
        let name = call.name.name.as_str();
        if !OPS.contains(&name) {
            let d = Diagnostic::new(Code::UnknownOp, format!("`{name}` is not an op"));
            let d = if self.functions.contains_key(name) || BUILTINS.contains(&name) {
                d.with_label(call.name.span, "this is a function: it computes a value and cannot be a statement")
            } else {
                d.with_label(call.name.span, "unknown op")
            };
            let d = match suggest(name, &OPS) {
                Some(s) => d.with_help(format!("the ops are F, B, W and BW; did you mean `{s}`?")),
                None => d.with_help(
                    "the ops are F (forward), B (input gradient), W (weight gradient) and BW (full backward)",
                ),
            };
            self.errors.push(d);
        }
        if call.defer && name != "B" {
            self.errors.push(
                Diagnostic::new(Code::OpArgs, format!("only `B` can defer its weight gradient, not `{name}`"))
                    .with_label(call.span, "`defer` here")
                    .with_help("`B(...) defer` queues its `W`; a bare `W` runs the oldest queued one"),
            );
        }
        let Some(args) = &call.args else {
            if name != "W" && OPS.contains(&name) {
                self.errors.push(
                    Diagnostic::new(Code::OpArgs, format!("`{name}` needs parentheses"))
                        .with_label(call.span, format!("write `{name}(mb)`, `{name}(mb, stage)` or `{name}(stage: s)`"))
                        .with_note(
                            "only `W` may stand alone: it runs the oldest weight gradient deferred with `B(...) defer`",
                        ),
                );
            }
            return;
        };
        let mut seen_named = false;
        let mut given: HashMap<&str, Span> = HashMap::new();
        for (i, arg) in args.iter().enumerate() {
            self.expect(&arg.value, Type::Int, "an op argument");
            let slot = match &arg.name {
                Some(n) => {
                    seen_named = true;
                    if n.name != "mb" && n.name != "stage" {
                        self.errors.push(
                            Diagnostic::new(Code::OpArgs, format!("op `{name}` has no argument named `{}`", n.name))
                                .with_label(n.span, "unknown argument name")
                                .with_help("ops take `mb` (the microbatch) and `stage`"),
                        );
                        continue;
                    }
                    n.name.as_str()
                }
                None if seen_named => {
                    self.errors.push(
                        Diagnostic::new(Code::OpArgs, "positional argument after a named one")
                            .with_label(arg.value.span, "name this argument too, or move it first"),
                    );
                    continue;
                }
                None if i == 0 => "mb",
                None if i == 1 => "stage",
                None => {
                    self.errors.push(
                        Diagnostic::new(
                            Code::Arity,
                            format!("op `{name}` takes at most 2 arguments, found {}", args.len()),
                        )
                        .with_label(arg.value.span, "extra argument")
                        .with_help(format!("write `{name}(mb)` or `{name}(mb, stage)`")),
                    );
                    continue;
                }
            };
            if let Some(first) = given.insert(slot, arg.value.span) {
                self.errors.push(
                    Diagnostic::new(Code::OpArgs, format!("argument `{slot}` is given twice"))
                        .with_label(arg.value.span, "given again here")
                        .with_label(first, "first given here"),
                );
            }
        }
    }

    /// Checks that `e` has type `want`; `what` says what the value is for.
    fn expect(&mut self, e: &Expr, want: Type, what: &str) {
        if let Some(found) = self.infer(e) {
            // An integer is a decimal wherever one is expected.
            if found != want && (found, want) != (Type::Int, Type::Real) {
                self.errors.push(
                    Diagnostic::new(Code::TypeMismatch, format!("expected {want}, found {found}"))
                        .with_label(e.span, format!("this is {} but {what} must be {}", article(found), article(want))),
                );
            }
        }
    }

    /// The type of `e` where a number (integer or decimal) is expected.
    fn numeric(&mut self, e: &Expr, what: &str) -> Option<Type> {
        let found = self.infer(e)?;
        if found == Type::Bool {
            self.errors.push(
                Diagnostic::new(Code::TypeMismatch, "expected a number, found bool")
                    .with_label(e.span, format!("this is a bool but {what} must be a number")),
            );
            return None;
        }
        Some(found)
    }

    /// The type of `e`, or `None` when it is unknown because of an error
    /// that has been reported.
    fn infer(&mut self, e: &Expr) -> Option<Type> {
        match &e.kind {
            ExprKind::Int(_) => Some(Type::Int),
            ExprKind::Real(_) if self.decimals => Some(Type::Real),
            ExprKind::Real(_) => {
                self.errors.push(
                    Diagnostic::new(Code::TypeMismatch, "a decimal number where only integers are allowed")
                        .with_label(e.span, "decimals are allowed only in cost settings (times)")
                        .with_help(
                            "stages, microbatches, ranks and memory units are whole numbers; state memory in a \
                             smaller unit to avoid fractions",
                        ),
                );
                None
            }
            ExprKind::Bool(_) => Some(Type::Bool),
            ExprKind::Error => None,
            ExprKind::Var(name) => self.infer_var(&name.name, e.span),
            ExprKind::Unary(UnOp::Neg, inner) if self.decimals => {
                self.expect(inner, Type::Real, "its operand");
                Some(Type::Real)
            }
            ExprKind::Unary(op, inner) => {
                let want = match op {
                    UnOp::Neg => Type::Int,
                    UnOp::Not => Type::Bool,
                };
                self.expect(inner, want, "its operand");
                Some(want)
            }
            // In a cost setting, arithmetic and comparisons take decimals
            // too (`/` divides exactly there); `%` stays integer.
            // Integer arithmetic stays integer (stage numbers compare with
            // `==`); a decimal operand or an exact `/` makes it a decimal.
            ExprKind::Binary(op, a, b) if self.decimals && op.is_arithmetic() && *op != BinOp::Rem => {
                let what = format!("an operand of `{}`", op.as_str());
                let (ta, tb) = (self.numeric(a, &what), self.numeric(b, &what));
                if *op == BinOp::Div || ta == Some(Type::Real) || tb == Some(Type::Real) {
                    Some(Type::Real)
                } else {
                    ta.and(tb)
                }
            }
            ExprKind::Binary(BinOp::Eq | BinOp::Ne, a, b) if self.decimals => {
                let (ta, tb) = (self.infer(a), self.infer(b));
                let numeric = |t| matches!(t, Some(Type::Int | Type::Real));
                if ta.is_some() && tb.is_some() && ta != tb && !(numeric(ta) && numeric(tb)) {
                    self.errors.push(
                        Diagnostic::new(Code::TypeMismatch, "the two sides of this comparison differ in type")
                            .with_label(e.span, "one side is a bool, the other a number"),
                    );
                }
                Some(Type::Bool)
            }
            ExprKind::Binary(op @ (BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge), a, b) if self.decimals => {
                let what = format!("an operand of `{}`", op.as_str());
                self.expect(a, Type::Real, &what);
                self.expect(b, Type::Real, &what);
                Some(Type::Bool)
            }
            ExprKind::Binary(op, a, b) => {
                let (operand, result) = match op {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => (Type::Int, Type::Int),
                    BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => (Type::Int, Type::Bool),
                    BinOp::And | BinOp::Or => (Type::Bool, Type::Bool),
                    BinOp::Eq | BinOp::Ne => {
                        let ta = self.infer(a);
                        if let Some(ta) = ta {
                            self.expect(b, ta, "the other side of the comparison");
                        } else {
                            self.infer(b);
                        }
                        return Some(Type::Bool);
                    }
                };
                let what = format!("an operand of `{}`", op.as_str());
                self.expect(a, operand, &what);
                self.expect(b, operand, &what);
                Some(result)
            }
            ExprKind::If(cond, a, b) if self.decimals => {
                self.expect(cond, Type::Bool, "a condition");
                let (ta, tb) = (self.infer(a), self.infer(b));
                match (ta, tb) {
                    (Some(Type::Bool), _) | (_, Some(Type::Bool)) if ta != tb => {
                        self.errors.push(
                            Diagnostic::new(Code::TypeMismatch, "the branches of this `if` differ in type")
                                .with_label(e.span, "one branch is a bool, the other a number"),
                        );
                        None
                    }
                    (Some(Type::Real), _) | (_, Some(Type::Real)) => Some(Type::Real),
                    _ => ta.or(tb),
                }
            }
            ExprKind::If(cond, a, b) => {
                self.expect(cond, Type::Bool, "a condition");
                let ta = self.infer(a);
                if let Some(ta) = ta {
                    self.expect(b, ta, "the other branch");
                } else {
                    self.infer(b);
                }
                ta
            }
            ExprKind::Call(name, args) => self.infer_call(name, args, e.span),
        }
    }

    fn infer_var(&mut self, name: &str, span: Span) -> Option<Type> {
        if let Some(b) = self.lookup(name) {
            return Some(b.ty);
        }
        let d = Diagnostic::new(Code::UnknownName, format!("unknown name `{name}`"));
        let d = if self.functions.contains_key(name) || BUILTINS.contains(&name) {
            d.with_label(span, "this is a function; call it with arguments")
        } else if self.errors.len() >= crate::diag::MAX_REPORTED {
            // Past what is shown, a suggestion would cost a scan of every
            // visible name for nothing (10,000 misspellings took minutes).
            d.with_label(span, "not defined here")
        } else {
            let visible: Vec<&str> = self.scopes.iter().flatten().map(|b| b.name.as_str()).collect();
            let d = d.with_label(span, "not defined here");
            match suggest(name, &visible) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d,
            }
        };
        self.errors.push(d);
        None
    }

    fn infer_call(&mut self, name: &Ident, args: &[Expr], span: Span) -> Option<Type> {
        let callee = name.name.as_str();
        if BUILTINS.contains(&callee) {
            if args.len() < 2 {
                self.errors.push(
                    Diagnostic::new(
                        Code::Arity,
                        format!("`{callee}` takes two or more arguments, found {}", args.len()),
                    )
                    .with_label(span, "too few arguments"),
                );
            }
            let want = if self.decimals { Type::Real } else { Type::Int };
            for a in args {
                self.expect(a, want, &format!("an argument of `{callee}`"));
            }
            return Some(if self.decimals { Type::Real } else { Type::Int });
        }
        if OPS.contains(&callee) {
            self.errors.push(
                Diagnostic::new(Code::UnknownName, format!("`{callee}` is an op, not a function"))
                    .with_label(span, "ops are statements in a rank body; they have no value"),
            );
            return None;
        }
        let Some(f) = self.functions.get(callee).copied() else {
            let names: Vec<&str> = self.functions.keys().copied().chain(BUILTINS).collect();
            let d = Diagnostic::new(Code::UnknownName, format!("unknown function `{callee}`"))
                .with_label(name.span, "no function of this name");
            let d = match suggest(callee, &names) {
                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                None => d,
            };
            self.errors.push(d);
            for a in args {
                self.infer(a);
            }
            return None;
        };
        if args.len() != f.params.len() {
            self.errors.push(
                Diagnostic::new(
                    Code::Arity,
                    format!(
                        "`{callee}` takes {} argument{}, found {}",
                        f.params.len(),
                        plural(f.params.len()),
                        args.len()
                    ),
                )
                .with_label(span, "wrong number of arguments")
                .with_label(f.name.span, "defined here"),
            );
        }
        for (a, (pname, pty)) in args.iter().zip(&f.params) {
            self.expect(a, *pty, &format!("parameter `{}` of `{callee}`", pname.name));
        }
        Some(f.ret)
    }
}

fn decl_span(d: &Decl) -> Span {
    match d {
        Decl::Stages { span, .. }
        | Decl::Place { span, .. }
        | Decl::Require { span, .. }
        | Decl::Memory { span, .. }
        | Decl::Cost { span, .. }
        | Decl::Check { span, .. }
        | Decl::Auto { span }
        | Decl::RecomputeAuto { span }
        | Decl::Pipelines { span, .. }
        | Decl::Route { span, .. }
        | Decl::Rank { span, .. } => *span,
    }
}

fn default_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Ranks => "p",
        ParamKind::Microbatches => "m",
        ParamKind::Chunks => "v",
        ParamKind::Int => "n",
    }
}

fn article(t: Type) -> &'static str {
    match t {
        Type::Int => "an int",
        Type::Bool => "a bool",
        Type::Real => "a decimal",
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The candidate closest to `name` by edit distance, if it is close.
fn suggest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(&name.to_lowercase(), &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Reports each cycle in the call graph of user functions once.
fn find_recursion(functions: &HashMap<&str, &Function>) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let mut names: Vec<&str> = functions.keys().copied().collect();
    names.sort_by_key(|n| functions[n].span.start);
    let callees = |f: &Function| {
        let mut out = Vec::new();
        collect_calls(&f.body, &mut out);
        out.retain(|(n, _)| functions.contains_key(n.as_str()));
        out
    };
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut state: HashMap<&str, u8> = HashMap::new();
    for start in names {
        let mut path: Vec<(&str, Span)> = Vec::new();
        visit(start, Span::default(), functions, &callees, &mut state, &mut path, &mut errors);
    }
    errors
}

fn visit<'a>(
    name: &'a str,
    via: Span,
    functions: &HashMap<&'a str, &'a Function>,
    callees: &dyn Fn(&Function) -> Vec<(String, Span)>,
    state: &mut HashMap<&'a str, u8>,
    path: &mut Vec<(&'a str, Span)>,
    errors: &mut Vec<Diagnostic>,
) {
    match state.get(name) {
        Some(2) => return,
        Some(1) => {
            let pos = path.iter().position(|(n, _)| *n == name).unwrap_or(0);
            let cycle = &path[pos..];
            let chain: Vec<&str> = cycle.iter().map(|(n, _)| *n).chain([name]).collect();
            let mut d = Diagnostic::new(Code::Recursion, format!("function `{name}` calls itself"))
                .with_note(format!("call chain: {}", chain.join(" -> ")));
            for (i, (caller, _)) in cycle.iter().enumerate() {
                let call_span = cycle.get(i + 1).map_or(via, |(_, s)| *s);
                let callee = chain[i + 1];
                d = d.with_label(call_span, format!("`{caller}` calls `{callee}` here"));
            }
            errors.push(d.with_help("schedules must terminate: compute the value without recursion"));
            return;
        }
        _ => {}
    }
    let Some((key, f)) = functions.get_key_value(name) else { return };
    state.insert(key, 1);
    path.push((key, via));
    for (callee, span) in callees(f) {
        if let Some((callee_key, _)) = functions.get_key_value(callee.as_str()) {
            visit(callee_key, span, functions, callees, state, path, errors);
        }
    }
    path.pop();
    state.insert(key, 2);
}

fn collect_calls(e: &Expr, out: &mut Vec<(String, Span)>) {
    e.walk(&mut |e| {
        if let ExprKind::Call(name, _) = &e.kind {
            out.push((name.name.clone(), name.span));
        }
    });
}
