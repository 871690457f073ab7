//! The stable error codes. Each has a title and an explanation that
//! `stpc explain` prints and the book repeats with an example.

use std::fmt;

/// A stable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    /// The text is not valid `.sched` syntax.
    Syntax,
    /// A name is used that is not defined where it is used.
    UnknownName,
    /// A value has the wrong type.
    TypeMismatch,
    /// A function or builtin is called with the wrong number of arguments.
    Arity,
    /// A statement calls something that is not an op.
    UnknownOp,
    /// A binding hides another binding of the same name.
    Shadowing,
    /// Two things in one scope have the same name.
    Duplicate,
    /// A schedule lacks a required declaration or has one twice.
    ScheduleShape,
    /// Functions call each other in a cycle.
    Recursion,
    /// A parameter value is missing, unknown, or not allowed.
    ParamValue,
    /// A `require` clause does not hold for the given parameters.
    RequireFailed,
    /// Integer overflow or division by zero.
    Arithmetic,
    /// A stage index is out of range, or a stage is placed on no rank.
    StageRange,
    /// An op names a stage its rank does not own (or does not name one when it must).
    StageOwnership,
    /// An op names a microbatch out of range.
    MicrobatchRange,
    /// The schedule is too large to elaborate within the limits.
    Limit,
    /// An op's arguments are malformed (unknown or repeated names, too many passes).
    OpArgs,
    /// A (stage, microbatch) is missing a pass or has one twice.
    Coverage,
    /// Passes of one (stage, microbatch) run in the wrong order on their rank.
    LocalOrder,
    /// Ops wait for each other in a cycle: the schedule deadlocks whatever the runtime.
    DependencyCycle,
    /// The lowered program deadlocks under the runtime's send semantics.
    CommDeadlock,
    /// A rank's live activation memory exceeds the budget.
    MemoryBudget,
    /// A bare `W` runs with no deferred weight gradient pending.
    NothingDeferred,
    /// More weight gradients are deferred than the schedule allows.
    DeferredLimit,
    /// A `check` directive found an instance that `require` admits but that fails.
    CheckFailed,
    /// A bug in stpc itself.
    Internal,
}

/// What `stpc explain` and the book say about a code.
#[derive(Debug, Clone, Copy)]
pub struct CodeInfo {
    /// The code.
    pub code: Code,
    /// A short title.
    pub title: &'static str,
    /// What it means and how to fix it.
    pub explanation: &'static str,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 26] = [
        Code::Syntax,
        Code::UnknownName,
        Code::TypeMismatch,
        Code::Arity,
        Code::UnknownOp,
        Code::Shadowing,
        Code::Duplicate,
        Code::ScheduleShape,
        Code::Recursion,
        Code::ParamValue,
        Code::RequireFailed,
        Code::Arithmetic,
        Code::StageRange,
        Code::StageOwnership,
        Code::MicrobatchRange,
        Code::Limit,
        Code::OpArgs,
        Code::Coverage,
        Code::LocalOrder,
        Code::DependencyCycle,
        Code::CommDeadlock,
        Code::MemoryBudget,
        Code::NothingDeferred,
        Code::DeferredLimit,
        Code::CheckFailed,
        Code::Internal,
    ];

    /// The code as printed: `E0001`.
    pub fn as_str(self) -> &'static str {
        self.info().0
    }

    /// Looks a code up by its printed form (case-insensitive).
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// Title and explanation.
    pub fn describe(self) -> CodeInfo {
        let (_, title, explanation) = self.info();
        CodeInfo { code: self, title, explanation }
    }

    fn info(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Code::Syntax => ("E0001", "syntax error", "The file is not valid .sched syntax. The report shows what the parser expected at the first token it could not use; it recovers at the next statement or block, so later syntax errors are reported too."),
            Code::UnknownName => ("E0002", "unknown name", "A name is used where it is not defined. Names are the schedule's parameters, the variable of `place` inside its expression, the variable of `rank` inside its body, `let` bindings from the statement after them to the end of their block, loop variables inside their loop, and functions defined anywhere in the file. Functions see only their own parameters."),
            Code::TypeMismatch => ("E0003", "type mismatch", "The language has two types, `int` and `bool`. Arithmetic, ranges, op arguments, `stages` and `place` take ints; `if`, `require`, `&&`, `||` and `!` take bools; comparisons take ints and give a bool. There are no implicit conversions. Inside a `cost { }` setting, times may also be decimals (`forward = 1.5;`; an int is a decimal there wherever one is expected); a decimal anywhere else (a budget, a stage, a microbatch) is this error, and so is a per-stage form (`p2p(s) = ...`) of a setting that is one number for the whole schedule."),
            Code::Arity => ("E0004", "wrong number of arguments", "A function or builtin is called with a different number of arguments than it takes. `min` and `max` take two or more; a user function takes exactly the parameters it declares; an op takes a microbatch and an optional stage."),
            Code::UnknownOp => ("E0005", "not an op", "A statement in a rank body calls something that is not an op. The ops are F (forward), B (input-gradient backward), W (weight-gradient backward) and BW (full backward). Functions compute values; they cannot be statements."),
            Code::Shadowing => ("E0006", "shadowed name", "A `let`, loop, `place` or `rank` variable has the same name as a binding that is already visible (a parameter, a function, a builtin or an enclosing binding). Shadowing is refused because in index arithmetic it almost always hides a bug; pick another name. Sibling scopes may reuse names."),
            Code::Duplicate => ("E0007", "duplicate definition", "Two schedules, two functions, or two parameters of one schedule or function have the same name."),
            Code::ScheduleShape => ("E0008", "malformed schedule", "A schedule needs exactly one parameter of kind `ranks` and one of kind `microbatches`, at most one of kind `chunks`, and exactly one each of `stages`, `place` and `rank` declarations; at most one `pipelines` and one `route`, and with several pipelines a `route`."),
            Code::Recursion => ("E0009", "recursive function", "Functions may call other functions but not, directly or through others, themselves: every schedule must terminate."),
            Code::ParamValue => ("E0010", "bad parameter value", "A parameter the schedule declares was not given a value, a value was given for a parameter it does not declare, or a value is below 1 for `ranks`, `microbatches` or `chunks`. Set `ranks` with -p, `microbatches` with -m, `chunks` with -v and any parameter with --param name=value."),
            Code::RequireFailed => ("E0011", "requirement not met", "A `require` clause is false for the given parameters: the schedule is not valid there. The report shows the values of the names in the condition."),
            Code::Arithmetic => ("E0012", "arithmetic error", "An expression overflowed 64-bit integers or divided by zero, for the parameter values and loop iteration shown."),
            Code::StageRange => ("E0013", "stage out of range", "An op names a stage outside 0..stages, `stages` is not positive, `place` maps a stage to a rank outside 0..p, `pipelines` does not divide the stages into chains of equal length, or `route` sends a microbatch to a pipeline outside 0..pipelines."),
            Code::StageOwnership => ("E0014", "stage not on this rank", "An op names a stage that `place` puts on another rank, or omits the stage on a rank that owns several stages (then the stage must be named)."),
            Code::MicrobatchRange => ("E0015", "microbatch out of range", "An op names a microbatch outside 0..m."),
            Code::Limit => ("E0016", "schedule too large", "The schedule is larger than a limit: more ops than --max-ops (counted before any work where the shape alone needs more: every (stage, microbatch) needs a forward and a backward), more ranks than --max-ops, more loop iterations than the evaluation limit, blocks and parentheses nested more than 256 deep, or one expression with more than 2,000 operators (trees that deep would exhaust the stack). Raise --max-ops if the size is intended; split deep or long expressions with `let` or a function."),
            Code::OpArgs => ("E0017", "malformed op", "An op's arguments are malformed: a named argument other than `mb` and `stage`, an argument given twice, a positional argument after a named one, more than two arguments, or more than two passes braided with `&`."),
            Code::Coverage => ("E0018", "missing or repeated pass", "Every (stage, microbatch) needs exactly one F and either one BW or one B and one W; a braided op counts as each of its passes. With several pipelines that holds for the stages of each microbatch's own pipeline, and a pass on any other stage is an error. The report names the pass that is missing, repeated or off its route."),
            Code::LocalOrder => ("E0019", "passes out of order", "On the rank that owns a stage, F(mb, s) must come before its backward, B before W, and a pass must come after the pass of the neighbouring stage it consumes when that stage lives on the same rank."),
            Code::DependencyCycle => ("E0020", "dependency cycle (deadlock)", "Every pass waits for the passes whose output it consumes (F(i, s) for F(i, s-1); the backward of (i, s) for the backward of (i, s+1)), and every rank runs its ops in program order. When these waits form a cycle, the schedule deadlocks on any runtime. The report shows the shortest cycle as a chain of ops, each with its rank, line and loop iteration."),
            Code::CommDeadlock => ("E0021", "deadlock under rendezvous sends", "The lowered program deadlocks when a send completes only together with its receive, as NCCL point-to-point sends do (and as PyTorch and Megatron meet them, as hangs). The report shows where every rank is blocked and on which transfer. Typical causes: a rank sends before its peer can post the receive while the peer is itself sending, or two logical streams share a link and the receiver needs the later message first. Reorder the ops so each rank's sends meet posted receives; use --comm buffered only if your runtime really buffers sends."),
            Code::MemoryBudget => ("E0022", "memory over budget", "A rank's live activation memory, under the schedule's memory model (memory { ... } block or --mem), exceeds its budget (`budget`, or its own `budget(r)`; activations may differ by stage, `activation(s)`). The report shows the op that crosses the budget and what is live at that moment. Run fewer forwards ahead, or raise the budget if the hardware allows it. For an `auto` schedule it means no order fits: a rank needs at least the sum of its stages' activations (a microbatch's activations of all its stages are live at once), and that much always suffices."),
            Code::NothingDeferred => ("E0023", "no deferred weight gradient", "A bare `W` runs the oldest deferred weight-gradient pass (deferred with `B(...) defer`), but none is pending on this rank at that point."),
            Code::DeferredLimit => ("E0024", "too many deferred weight gradients", "More weight-gradient passes are deferred at once than the schedule's `max_deferred` bound allows. Each one keeps its stash alive; run a `W` earlier, or raise the bound."),
            Code::CheckFailed => ("E0025", "check directive failed", "A `check` directive (or `stpc check --sweep`) evaluated the schedule over a family of parameters and found an instance that every `require` admits but that fails to compile. Either the schedule is wrong there or its `require` clauses are too weak; the report names the instance and shows its error."),
            Code::Internal => ("E0999", "internal compiler error", "stpc produced an invalid program from a schedule it had checked. This is a bug in stpc, not in the schedule; please report it with the schedule and the parameters."),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
