//! The abstract syntax tree of a `.sched` file. Every node carries its span.

use super::span::Span;

/// A name interned for the file: equal names have equal symbols, so later
/// phases compare integers instead of strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Symbol(pub u32);

/// A name as written, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    /// The name.
    pub name: String,
    /// Its interned symbol (assigned by `syntax::parse` after parsing).
    pub sym: Symbol,
    /// Where it was written.
    pub span: Span,
}

/// A whole `.sched` file.
#[derive(Debug, Clone, Default)]
pub struct File {
    /// Schedules and functions, in source order.
    pub items: Vec<Item>,
}

/// A top-level item.
#[derive(Debug, Clone)]
pub enum Item {
    /// `schedule NAME(params) { ... }`
    Schedule(Schedule),
    /// `fn NAME(params) -> TYPE { expr }`
    Function(Function),
}

/// The type of a value: the language has integers and booleans, and in
/// cost settings decimal numbers (times).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A 64-bit signed integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// A decimal number (`1.5`): only a cost setting's value may be one;
    /// an integer is one wherever a decimal is expected.
    Real,
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Type::Int => "int",
            Type::Bool => "bool",
            Type::Real => "decimal",
        })
    }
}

/// One setting of a `memory { }` or `cost { }` block: `name = value;`,
/// or `name(v) = value;` where the value depends on `v` (a stage, or for
/// `budget` a rank).
#[derive(Debug, Clone)]
pub struct Setting {
    /// The setting's name.
    pub name: Ident,
    /// The stage (or rank) variable, if the value depends on one.
    pub index: Option<Ident>,
    /// The value.
    pub value: Expr,
}

/// A small pure function: `fn name(a: int, b: int) -> int { expr }`.
#[derive(Debug, Clone)]
pub struct Function {
    /// Doc comment lines, without the `///`.
    pub doc: Vec<String>,
    /// Its name.
    pub name: Ident,
    /// Parameters and their types.
    pub params: Vec<(Ident, Type)>,
    /// The declared result type.
    pub ret: Type,
    /// The body: one expression.
    pub body: Expr,
    /// The whole definition.
    pub span: Span,
}

/// What a schedule parameter means, which decides the command-line flag
/// that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Pipeline ranks (`-p`).
    Ranks,
    /// Microbatches per step (`-m`).
    Microbatches,
    /// Chunks (virtual stages) per rank (`-v`).
    Chunks,
    /// Any other integer (`--param name=value`).
    Int,
}

impl ParamKind {
    /// The spelling in a parameter list.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Ranks => "ranks",
            ParamKind::Microbatches => "microbatches",
            ParamKind::Chunks => "chunks",
            ParamKind::Int => "int",
        }
    }
}

/// One schedule parameter: `p: ranks`.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    /// Its name.
    pub name: Ident,
    /// What it means.
    pub kind: ParamKind,
    /// The whole declaration.
    pub span: Span,
}

/// `schedule NAME(params) { decls }`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Doc comment lines, without the `///`. The first is the summary.
    pub doc: Vec<String>,
    /// Its name.
    pub name: Ident,
    /// Its parameters.
    pub params: Vec<ParamDecl>,
    /// Declarations in source order.
    pub decls: Vec<Decl>,
    /// The whole schedule.
    pub span: Span,
}

/// A declaration inside a schedule.
#[derive(Debug, Clone)]
pub enum Decl {
    /// `stages EXPR;`: the number of pipeline stages.
    Stages {
        /// How many stages.
        count: Expr,
        /// The whole declaration.
        span: Span,
    },
    /// `place s -> EXPR;`: the rank that owns stage `s`.
    Place {
        /// The stage variable.
        var: Ident,
        /// The owning rank, in terms of `var` and the parameters.
        rank: Expr,
        /// The whole declaration.
        span: Span,
    },
    /// `pipelines EXPR;`: the stages form this many pipelines (model
    /// copies) of equal length, stage `s` in pipeline `s / (stages / n)`.
    Pipelines {
        /// How many pipelines.
        count: Expr,
        /// The whole declaration.
        span: Span,
    },
    /// `route i -> EXPR;`: the pipeline microbatch `i` flows through.
    Route {
        /// The microbatch variable.
        var: Ident,
        /// The pipeline, in terms of `var` and the parameters.
        pipeline: Expr,
        /// The whole declaration.
        span: Span,
    },
    /// `require COND [: "message"];`: where the schedule is valid.
    Require {
        /// Must hold for the parameters.
        cond: Expr,
        /// Shown when it does not.
        message: Option<String>,
        /// The whole declaration.
        span: Span,
    },
    /// `memory { name = EXPR; ... }`: the memory model and its bounds.
    Memory {
        /// The settings, in source order.
        fields: Vec<Setting>,
        /// The whole declaration.
        span: Span,
    },
    /// `cost { name = EXPR; name(s) = EXPR; ... }`: the pass and transfer
    /// times `stpc simulate` starts from (decimals allowed), the same for
    /// every stage or, with a stage variable, per stage.
    Cost {
        /// The settings, in source order.
        fields: Vec<Setting>,
        /// The whole declaration.
        span: Span,
    },
    /// `check p in 2..=8, m in [p, 2 * p];`: a family of instances the
    /// schedule must compile for (run by `stpc check --sweep`).
    Check {
        /// Each parameter and the values it takes, outermost first.
        axes: Vec<CheckAxis>,
        /// The whole declaration.
        span: Span,
    },
    /// `auto;`: instead of `rank r { ... }`, let stpc order the passes
    /// (the greedy scheduler of `opt/`) within the memory budget.
    Auto {
        /// The declaration.
        span: Span,
    },
    /// `recompute auto;`: let stpc recompute forwards (insert `R` passes)
    /// where a rank's order would exceed its memory budget.
    RecomputeAuto {
        /// The declaration.
        span: Span,
    },
    /// `rank r { ... }`: the program of every rank, in terms of `r`.
    Rank {
        /// The rank variable.
        var: Ident,
        /// The body.
        body: Block,
        /// The whole declaration.
        span: Span,
    },
}

/// One parameter of a `check` directive and its values.
#[derive(Debug, Clone)]
pub struct CheckAxis {
    /// The parameter.
    pub name: Ident,
    /// Its values.
    pub values: CheckValues,
}

/// The values a `check` directive gives a parameter; they may use the
/// parameters of earlier axes.
#[derive(Debug, Clone)]
pub enum CheckValues {
    /// `a..b` or `a..=b`.
    Range {
        /// First value.
        start: Expr,
        /// Bound.
        end: Expr,
        /// Whether `end` is included.
        inclusive: bool,
    },
    /// `[e, e, ...]`.
    List(Vec<Expr>),
}

/// A sequence of statements.
pub type Block = Vec<Stmt>;

/// A statement in a rank body.
#[derive(Debug, Clone)]
pub struct Stmt {
    /// What it is.
    pub kind: StmtKind,
    /// Where it is.
    pub span: Span,
}

/// The kinds of statement.
#[derive(Debug, Clone)]
pub enum StmtKind {
    /// `let name = value;`
    Let(Ident, Expr),
    /// `for var in start..end { body }` (or `..=` for an inclusive end).
    For {
        /// The loop variable.
        var: Ident,
        /// First value.
        start: Expr,
        /// Bound.
        end: Expr,
        /// Whether `end` itself is included (`..=`).
        inclusive: bool,
        /// Whether the range runs from its last value down (`(A..B).rev()`).
        reversed: bool,
        /// The body.
        body: Block,
    },
    /// `reorder { body }`: the body's ops, in an order stpc may change
    /// within their dependencies and the rank's memory.
    Reorder(Block),
    /// `repeat count { body }`: the body `count` times, without a variable.
    Repeat {
        /// How many times.
        count: Expr,
        /// The body.
        body: Block,
    },
    /// `if cond { then } else { otherwise }`
    If {
        /// The condition.
        cond: Expr,
        /// Run when it holds.
        then: Block,
        /// Run when it does not.
        otherwise: Block,
    },
    /// One op, or several joined by `&` into one braided op.
    Op(Vec<OpCall>),
    /// A statement that failed to parse (an error was already reported).
    Error,
}

/// A call of an op like `F(i, s)`, `B(stage: b) defer` or a bare `W`.
#[derive(Debug, Clone)]
pub struct OpCall {
    /// The op's name as written (`F`, `B`, `W`, `BW`, or a mistake).
    pub name: Ident,
    /// Its arguments; `None` for a bare op without parentheses (only `W`,
    /// which runs the oldest deferred weight gradient).
    pub args: Option<Vec<Arg>>,
    /// `defer` after a `B`: its `W` joins the rank's queue of deferred
    /// weight gradients, for a bare `W` to run later.
    pub defer: bool,
    /// `defer auto` after a `B`: stpc places its `W` (in idle time after
    /// the `B`, else at the end of the rank).
    pub defer_auto: bool,
    /// Joined to its partner by `&?`: stpc braids the pair or runs it as
    /// two ops, whichever is faster.
    pub maybe_braided: bool,
    /// The whole call.
    pub span: Span,
}

/// An argument of an op: positional, or named (`stage: s`).
#[derive(Debug, Clone)]
pub struct Arg {
    /// The name, when given.
    pub name: Option<Ident>,
    /// The value.
    pub value: Expr,
}

/// An expression.
#[derive(Debug, Clone)]
pub struct Expr {
    /// What it is.
    pub kind: ExprKind,
    /// Where it is.
    pub span: Span,
}

/// Unary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// `-x`
    Neg,
    /// `!x`
    Not,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (rounds toward zero)
    Div,
    /// `%` (sign of the dividend)
    Rem,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `&&`
    And,
    /// `||`
    Or,
}

impl BinOp {
    /// `+ - * / %`.
    pub fn is_arithmetic(self) -> bool {
        matches!(self, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem)
    }

    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

/// The kinds of expression.
#[derive(Debug, Clone)]
pub enum ExprKind {
    /// An integer literal.
    Int(i64),
    /// A decimal literal (`2.5`).
    Real(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A name.
    Var(Ident),
    /// `-x`, `!x`
    Unary(UnOp, Box<Expr>),
    /// `a + b`, ...
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `name(args)`: a function or builtin (`min`, `max`).
    Call(Ident, Vec<Expr>),
    /// `if c { a } else { b }`
    If(Box<Expr>, Box<Expr>, Box<Expr>),
    /// An expression that failed to parse (an error was already reported).
    Error,
}

impl Expr {
    /// The direct subexpressions, in source order.
    pub fn children(&self) -> Vec<&Expr> {
        match &self.kind {
            ExprKind::Unary(_, a) => vec![a],
            ExprKind::Binary(_, a, b) => vec![a, b],
            ExprKind::If(c, a, b) => vec![c, a, b],
            ExprKind::Call(_, args) => args.iter().collect(),
            ExprKind::Int(_) | ExprKind::Real(_) | ExprKind::Bool(_) | ExprKind::Var(_) | ExprKind::Error => Vec::new(),
        }
    }

    /// This expression and all below it, depth first, in source order.
    pub fn walk<'a>(&'a self, visit: &mut impl FnMut(&'a Expr)) {
        visit(self);
        for child in self.children() {
            child.walk(visit);
        }
    }
}
