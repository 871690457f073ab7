//! The native half of the `stp` Python package: the stp compiler,
//! checker and simulator in-process.
//!
//! The interface is deliberately narrow — every function takes one JSON
//! request and returns one JSON answer — so that the Python half
//! (`python/stp/`) owns the API users see (keyword arguments, dataclasses,
//! exceptions) and this file owns only the translation to the compiler's
//! own types. An answer is `{"ok": true, ...}` or `{"ok": false,
//! "error": {...}}`; nothing here raises except on a request the Python
//! half built wrongly.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};
use stp_ir::simulate::{CostModel, Semantics};
use stpc::diag::{render::render, Diagnostic};
use stpc::elab::{Limits, ParamArgs};
use stpc::lower::LowerOptions;
use stpc::opt::Solver;
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

/// What to compile, as the Python half sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompileRequest {
    /// A standard schedule's name, when `source` is absent.
    name: Option<String>,
    /// Schedule source text, and the file name diagnostics show for it.
    source: Option<String>,
    #[serde(default = "default_file_name")]
    file_name: String,
    /// Which schedule of the file, when it defines several.
    schedule: Option<String>,
    p: Option<i64>,
    m: Option<i64>,
    v: Option<i64>,
    #[serde(default)]
    params: Vec<(String, i64)>,
    #[serde(default)]
    memory: Vec<(String, i64)>,
    /// A cost model (the JSON form `stpc --cost` reads), for planning
    /// `auto` schedules and for the answer's lower bound.
    cost: Option<Value>,
    #[serde(default = "one")]
    tp: u32,
    #[serde(default)]
    sequence_parallel: bool,
    #[serde(default = "default_comm")]
    comm: String,
    #[serde(default = "default_solver")]
    solver: String,
    #[serde(default = "default_effort")]
    solver_effort: f64,
    max_ops: Option<usize>,
    #[serde(default = "yes")]
    hoist: bool,
}

fn default_file_name() -> String {
    "<string>".into()
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_comm() -> String {
    "rendezvous".into()
}
fn default_solver() -> String {
    "greedy".into()
}
fn default_effort() -> f64 {
    10.0
}

/// A failure the user caused, as the Python half raises it.
fn failure(kind: &str, message: String, report: String, diagnostics: Vec<Value>) -> String {
    json!({"ok": false, "error": {"kind": kind, "message": message, "report": report, "diagnostics": diagnostics}})
        .to_string()
}

fn cost_error(problem: String) -> String {
    failure("cost", problem.clone(), problem, Vec::new())
}

fn semantics(comm: &str) -> Result<Semantics, String> {
    match comm {
        "rendezvous" => Ok(Semantics::Rendezvous),
        "buffered" => Ok(Semantics::Buffered),
        other => Err(format!("comm must be \"rendezvous\" or \"buffered\", not {other:?}")),
    }
}

/// The schedule's source file: the given text, or the standard schedule.
fn source_file(r: &CompileRequest) -> Result<SourceFile, String> {
    if let Some(text) = &r.source {
        return Ok(SourceFile::new(r.file_name.clone(), text.clone()));
    }
    let name = r.name.as_deref().unwrap_or_default();
    match stp_stdlib::get(name) {
        Some(s) => Ok(SourceFile::new(s.path(), s.source)),
        None => {
            let names: Vec<&str> = stp_stdlib::ALL.iter().map(|s| s.name).collect();
            Err(format!(
                "{name:?} is neither schedule source, nor a .sched file, nor a standard schedule (standard schedules: {})",
                names.join(", ")
            ))
        }
    }
}

fn request(r: &CompileRequest) -> Result<Request, String> {
    let solver = match r.solver.as_str() {
        "greedy" => Solver::Greedy,
        "smt" => {
            if !(r.solver_effort.is_finite() && r.solver_effort > 0.0) {
                return Err(format!("solver_effort must be a positive number of seconds, not {}", r.solver_effort));
            }
            Solver::Smt { effort: r.solver_effort, cap: None, progress: None }
        }
        other => return Err(format!("solver must be \"greedy\" or \"smt\", not {other:?}")),
    };
    if r.tp == 0 {
        return Err("tp must be at least 1".into());
    }
    Ok(Request {
        schedule: r.schedule.clone(),
        params: ParamArgs {
            ranks: r.p,
            microbatches: r.m,
            chunks: r.v,
            named: r.params.clone(),
            memory: r.memory.clone(),
        },
        limits: Limits { max_ops: r.max_ops.unwrap_or(Limits::default().max_ops), ..Limits::default() },
        lower: LowerOptions {
            hoist: r.hoist,
            place_receives: r.hoist,
            tp: r.tp,
            sequence_parallel: r.sequence_parallel,
            ..LowerOptions::default()
        },
        comm: semantics(&r.comm)?,
        cost: None,
        solver,
    })
}

/// One diagnostic as data: code, message, where (1-based line and
/// column of the primary label), labels, notes and help.
fn diagnostic_json(d: &Diagnostic, file: &SourceFile) -> Value {
    let position = |offset: usize| {
        let line = file.line_of(offset);
        let line_start = file.text[..offset.min(file.text.len())].rfind('\n').map_or(0, |i| i + 1);
        let column = file.text.get(line_start..offset).map_or(1, |s| s.chars().count() + 1);
        (line, column)
    };
    let primary = d.primary_span().map(|s| position(s.start));
    json!({
        "code": d.code.as_str(),
        "title": d.code.describe().title,
        "message": d.message,
        "file": file.name,
        "line": primary.map(|p| p.0),
        "column": primary.map(|p| p.1),
        "labels": d.labels.iter().map(|l| {
            let (line, column) = position(l.span.start);
            json!({"line": line, "column": column, "message": l.message})
        }).collect::<Vec<_>>(),
        "notes": d.notes,
        "help": d.help,
    })
}

fn compile_error(diagnostics: &[Diagnostic], file: &SourceFile) -> String {
    let first = diagnostics.first().map(|d| format!("{}: {}", d.code.as_str(), d.message)).unwrap_or_default();
    failure(
        "compile",
        first,
        render(diagnostics, file, false),
        diagnostics.iter().map(|d| diagnostic_json(d, file)).collect(),
    )
}

/// The cost model a program is timed with: the request's, or the
/// schedule's own `cost { ... }` block, checked against its stages.
fn timing_cost(given: Option<CostModel>, meta: &stp_ir::ScheduleMeta, own: &CostModel) -> Result<CostModel, String> {
    let cost = given.unwrap_or_else(|| own.clone()).per_copy(meta.parts(), meta.pipelines.max(1));
    cost.checked(meta.num_stages)
}

fn compile_json(text: &str) -> Result<String, String> {
    let r: CompileRequest = serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))?;
    let mut req = request(&r)?;
    let file = match source_file(&r) {
        Ok(f) => f,
        Err(message) => return Ok(failure("schedule", message.clone(), message, Vec::new())),
    };
    let cost = match r.cost.clone().map(serde_json::from_value::<CostModel>).transpose() {
        Ok(c) => c,
        Err(e) => return Ok(cost_error(format!("not a cost model: {e}"))),
    };
    req.cost = None;
    if let Some(given) = &cost {
        // The shape decides how per-part times spread over stages, so the
        // planner gets the same costs the answer is timed with.
        match pipeline::elaborate_unplanned(&file, &req) {
            Ok(s) => match timing_cost(Some(given.clone()), &s.meta, &s.cost) {
                Ok(c) => req.cost = Some(c),
                Err(problem) => return Ok(cost_error(problem)),
            },
            Err(d) => return Ok(compile_error(&d, &file)),
        }
    }
    let build = match pipeline::build(&file, &req) {
        Ok(b) => b,
        Err(d) => return Ok(compile_error(&d, &file)),
    };
    let s = build.checked.schedule();
    let timing = match timing_cost(req.cost.clone(), &s.meta, &s.cost) {
        Ok(c) => c,
        Err(problem) => return Ok(cost_error(problem)),
    };
    let program: Value =
        serde_json::from_str(&stp_ir::to_json(&build.program)).map_err(|e| format!("internal error: {e}"))?;
    Ok(json!({
        "ok": true,
        "program": program,
        "cost": timing,
        "peaks": build.checked.peaks().iter().map(|p| p.units).collect::<Vec<_>>(),
        "notes": s.notes,
        "plan": s.plan.as_ref().map(|p| json!({
            "kept": p.kept,
            "makespan": p.makespan,
            "greedy_makespan": p.greedy_makespan,
            "lower_bound": p.lower_bound,
            "optimal": p.optimal,
            "fallback": p.fallback,
            "effort_spent": p.effort_spent,
            "summary": p.to_string(),
        })),
        "lower_bound": stpc::opt::bound::lower_bound(s, &timing),
        "ops": s.ranks.iter().map(Vec::len).sum::<usize>(),
    })
    .to_string())
}

/// Compiles a schedule: `{"ok": true, "program": IR, "cost", "peaks",
/// "notes", "plan", "lower_bound", "ops"}` or a compile error. Other
/// Python threads run meanwhile (`solver="smt"` may work for seconds).
#[pyfunction]
fn compile(py: Python<'_>, request: &str) -> PyResult<String> {
    let request = request.to_owned();
    py.detach(move || compile_json(&request)).map_err(PyValueError::new_err)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateRequest {
    program: Value,
    cost: Value,
    #[serde(default = "default_comm")]
    comm: String,
}

fn simulate_json(text: &str) -> Result<String, String> {
    let r: SimulateRequest = serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))?;
    let program = match load_verified(&r.program.to_string()) {
        Ok(p) => p,
        Err(answer) => return Ok(answer),
    };
    let meta = &program.schedule;
    let cost = match serde_json::from_value::<CostModel>(r.cost) {
        Ok(c) => c,
        Err(e) => return Ok(cost_error(format!("not a cost model: {e}"))),
    };
    let cost = match cost.per_copy(meta.parts(), meta.pipelines.max(1)).checked(meta.num_stages) {
        Ok(c) => c,
        Err(problem) => return Ok(cost_error(problem)),
    };
    let timeline = match stp_ir::simulate::simulate_with(&program, &cost, semantics(&r.comm)?) {
        Ok(t) => t,
        Err(d) => return Ok(failure("deadlock", format!("the program deadlocks: {d}"), d.to_string(), Vec::new())),
    };
    Ok(json!({
        "ok": true,
        "makespan": timeline.makespan,
        "bubble_ratio": timeline.bubble_ratio(),
        "cost": cost,
        "ranks": timeline.ranks.iter().map(|r| json!({
            "rank": r.rank.0,
            "busy": r.busy,
            "idle": timeline.makespan - r.busy,
            "bubble": r.bubble,
            "exposed_comm": r.exposed_comm,
        })).collect::<Vec<_>>(),
    })
    .to_string())
}

/// Times a program under a cost model: `{"ok": true, "makespan",
/// "bubble_ratio", "cost", "ranks"}`, or why it cannot be timed.
#[pyfunction]
fn simulate(py: Python<'_>, request: &str) -> PyResult<String> {
    let request = request.to_owned();
    py.detach(move || simulate_json(&request)).map_err(PyValueError::new_err)
}

/// The program in `json`, verified; else the answer that says why not.
fn load_verified(json: &str) -> Result<stp_ir::Program, String> {
    let program = stp_ir::load_json(json).map_err(|e| {
        let message = format!("not an stp program: {e}");
        failure("verify", message.clone(), message, Vec::new())
    })?;
    if let Err(errors) = stp_ir::verify(&program) {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let message = format!("the program fails verification: {}", lines.first().cloned().unwrap_or_default());
        return Err(failure("verify", message, lines.join("\n"), Vec::new()));
    }
    Ok(program)
}

/// Reads and verifies a program in the IR's JSON form: `{"ok": true,
/// "program": IR}` (normalized) or why it is refused.
#[pyfunction]
fn verify(program: &str) -> String {
    match load_verified(program) {
        Ok(p) => {
            let normalized: Value = serde_json::from_str(&stp_ir::to_json(&p)).unwrap_or(Value::Null);
            json!({"ok": true, "program": normalized}).to_string()
        }
        Err(answer) => answer,
    }
}

/// A verified program as PyTorch's schedule CSV (`stpc export --format
/// torch-csv`, with `--comms` when `comms`): `{"ok": true, "csv": TEXT,
/// "notes": [...]}`, or why the format cannot hold it.
#[pyfunction]
fn torch_csv(program: &str, comms: bool) -> String {
    let program = match load_verified(program) {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let meta = &program.schedule;
    if meta.pipelines > 1 {
        let message = format!(
            "`{}` runs {} pipelines (model copies), which torch.distributed.pipelining cannot express",
            meta.name, meta.pipelines
        );
        let report = format!(
            "{message}: its schedule CSV has one chain of stages, every microbatch through all of them, and no \
             gradient reduction between copies; run it with stp.torch instead"
        );
        return failure("schedule", message, report, Vec::new());
    }
    let csv = stpc::emit::torch::torch_csv(&program, comms);
    json!({"ok": true, "csv": csv.text, "notes": csv.notes}).to_string()
}

/// A verified program in the compact JSON form (format version 2):
/// `{"ok": true, "json": TEXT}`, or why the program is refused.
#[pyfunction]
fn compact_json(program: &str) -> String {
    match load_verified(program) {
        Ok(p) => json!({"ok": true, "json": stp_ir::to_compact_json(&p)}).to_string(),
        Err(answer) => answer,
    }
}

/// The standard schedules: `[{"name", "summary", "source"}]`.
#[pyfunction]
fn standard_schedules() -> String {
    let all: Vec<Value> = stp_stdlib::ALL
        .iter()
        .map(|s| {
            let summary = s.source.lines().find_map(|l| l.strip_prefix("///")).unwrap_or_default().trim();
            json!({"name": s.name, "summary": summary, "source": s.source})
        })
        .collect();
    Value::Array(all).to_string()
}

/// The long explanation of an error code (`E0018`), as `stpc explain`
/// prints it; `None` for an unknown code.
#[pyfunction]
fn explain(code: &str) -> Option<String> {
    let info = stpc::diag::Code::parse(code)?.describe();
    Some(format!("{}: {}\n\n{}", info.code, info.title, info.explanation))
}

/// The version of stp this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _stp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(standard_schedules, m)?)?;
    m.add_function(wrap_pyfunction!(torch_csv, m)?)?;
    m.add_function(wrap_pyfunction!(compact_json, m)?)?;
    m.add_function(wrap_pyfunction!(explain, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
