//! Helpers shared by the workspace-level test suites: reading fixture
//! headers and inline expectations.

use stpc::elab::{Limits, ParamArgs};
use stpc::pipeline::Request;

/// The request a fixture asks for in its first line, e.g.
/// `// args: -p 4 -m 8 -v 2 --param k=3 --mem budget=4 --max-ops 100
/// --schedule NAME --no-hoist --buffered`.
///
/// # Panics
/// When the header is missing or malformed: a fixture bug.
pub fn request_from_header(source: &str) -> Request {
    let first = source.lines().next().unwrap_or_default();
    let args = first.strip_prefix("// args:").unwrap_or_else(|| panic!("fixture must start with `// args: ...`"));
    let mut request = Request::default();
    let mut words = args.split_whitespace();
    let mut params = ParamArgs::default();
    let mut limits = Limits::default();
    while let Some(flag) = words.next() {
        match flag {
            "--no-hoist" => {
                request.lower.hoist = false;
                continue;
            }
            "--sweep" => continue,
            "--buffered" => {
                request.comm = stp_ir::simulate::Semantics::Buffered;
                continue;
            }
            _ => {}
        }
        let value = words.next().unwrap_or_else(|| panic!("flag {flag} needs a value"));
        let int = || value.parse::<i64>().unwrap_or_else(|_| panic!("{flag} {value}: not an integer"));
        match flag {
            "-p" => params.ranks = Some(int()),
            "-m" => params.microbatches = Some(int()),
            "-v" => params.chunks = Some(int()),
            "--max-ops" => limits.max_ops = int() as usize,
            "--mem" => {
                let (name, v) = value.split_once('=').unwrap_or_else(|| panic!("--mem {value}: expected NAME=VALUE"));
                params.memory.push((name.to_string(), v.parse().unwrap_or_else(|_| panic!("--mem {value}"))));
            }
            "--schedule" => request.schedule = Some(value.to_string()),
            "--param" => {
                let (name, v) = value.split_once('=').unwrap_or_else(|| panic!("--param {value}: expected NAME=VALUE"));
                params.named.push((name.to_string(), v.parse().unwrap_or_else(|_| panic!("--param {value}"))));
            }
            other => panic!("unknown fixture flag {other}"),
        }
    }
    request.params = params;
    request.limits = limits;
    request
}

/// Inline expectations: `(line, code)` for every `// error: E0001` comment.
pub fn expected_errors(source: &str) -> Vec<(usize, String)> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let (_, after) = line.split_once("// error:")?;
            Some((i + 1, after.split_whitespace().next()?.to_string()))
        })
        .collect()
}

/// Whether the fixture asks for `stpc check --sweep` (all `check` directives).
pub fn is_sweep(source: &str) -> bool {
    source.lines().next().is_some_and(|l| l.split_whitespace().any(|w| w == "--sweep"))
}

/// Runs a fixture the way its header asks: a sweep, or one compile.
pub fn run_fixture(file: &stpc::syntax::span::SourceFile) -> Result<(), Vec<stpc::diag::Diagnostic>> {
    let request = request_from_header(&file.text);
    if is_sweep(&file.text) {
        stpc::pipeline::sweep(file, &request).map(|_| ())
    } else {
        stpc::pipeline::compile(file, &request).map(|_| ())
    }
}

/// Compiles standard schedule `name` at `p` ranks, `m` microbatches and,
/// when given, `v` chunks, panicking with the rendered diagnostics if it fails.
pub fn build_std(name: &str, p: i64, m: i64, v: Option<i64>) -> stpc::pipeline::Build {
    build_std_tp(name, p, m, v, 1)
}

/// [`build_std`] for a tensor-parallel group of `tp` ranks behind each
/// pipeline rank (computes list their units).
pub fn build_std_tp(name: &str, p: i64, m: i64, v: Option<i64>, tp: u32) -> stpc::pipeline::Build {
    let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("no stdlib schedule {name}"));
    let file = stpc::syntax::span::SourceFile::new(s.path(), s.source);
    let mut request = stpc::pipeline::Request {
        params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), chunks: v, ..Default::default() },
        ..Default::default()
    };
    request.lower.tp = tp;
    stpc::pipeline::build(&file, &request)
        .unwrap_or_else(|d| panic!("{name} p={p} m={m} v={v:?}:\n{}", stpc::diag::render::render(&d, &file, false)))
}

/// Undoes the grouping of transfers: every send and receive becomes its
/// own communication instruction. Applied to 1F1B, both ranks then send
/// before they receive, which deadlocks under rendezvous sends.
pub fn ungroup_transfers(program: &mut stp_ir::Program) {
    for rank in &mut program.ranks {
        let old = std::mem::take(&mut rank.instrs);
        for instr in old {
            match instr {
                stp_ir::Instr::Comm(ops) => rank.instrs.extend(ops.into_iter().map(|t| stp_ir::Instr::Comm(vec![t]))),
                other => rank.instrs.push(other),
            }
        }
    }
}

/// `base`'s times on every stage of a `stages`-stage model, except that
/// the first stage (the embedding) costs `first` times as much and the
/// last (the LM head and the loss) `last` times as much.
pub fn heavy_ends(
    base: &stp_ir::simulate::CostModel,
    stages: u32,
    first: f64,
    last: f64,
) -> stp_ir::simulate::CostModel {
    let times = base.uniform();
    let scaled = |f: f64| stp_ir::simulate::StageTimes {
        forward: times.forward * f,
        backward_input: times.backward_input * f,
        backward_weight: times.backward_weight * f,
        tp_collective: times.tp_collective * f,
    };
    let factor = |s: u32| {
        if s == 0 {
            first
        } else if s + 1 == stages {
            last
        } else {
            1.0
        }
    };
    stp_ir::simulate::CostModel { stages: (0..stages).map(|s| scaled(factor(s))).collect(), ..base.clone() }
}
