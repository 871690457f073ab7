//! A campaign: cases drawn from every family by number, each judged by the
//! oracles, panics caught and counted, slow cases timed. Case `i` of seed
//! `s` is the same on every machine.

use crate::mutate;
use crate::oracle::{judge_program, judge_schedule, refusal, Verdict};
use crate::rng::Rng;
use crate::valid::{random_schedule, random_schedule_of_pipelines};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};
use stp_ir::Program;
use stpc::elab::{Limits, ParamArgs};
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

/// What a case feeds stp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// A random valid schedule (compiled, run on every executor).
    Valid,
    /// A token mutant of a standard schedule or an example.
    Source,
    /// A structural mutant of a compiled program.
    Program,
    /// A byte mutant of a program's JSON form.
    Json,
    /// A byte mutant of a program's text form.
    Text,
    /// A cell mutant of a PyTorch schedule CSV.
    Csv,
    /// A byte mutant of a `--cost` file with per-stage times.
    Cost,
}

impl Family {
    /// Every family, in the order cases cycle through them.
    pub const ALL: [Family; 7] =
        [Family::Valid, Family::Source, Family::Program, Family::Json, Family::Text, Family::Csv, Family::Cost];

    /// The family's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Family::Valid => "valid schedules",
            Family::Source => ".sched mutants",
            Family::Program => "IR mutants",
            Family::Json => "IR JSON mutants",
            Family::Text => "IR text mutants",
            Family::Csv => "torch CSV mutants",
            Family::Cost => "cost file mutants",
        }
    }
}

/// How one case ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The case's family.
    pub family: Family,
    /// The oracles' verdict, or the message of a panic.
    pub verdict: Result<Verdict, String>,
    /// Wall time (reported, never judged: machines differ).
    pub elapsed: Duration,
}

/// Runs case `index` of campaign `seed`.
pub fn run_case(seed: u64, index: u64) -> Outcome {
    let family = Family::ALL[(index % Family::ALL.len() as u64) as usize];
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let started = Instant::now();
    let verdict = catch_unwind(AssertUnwindSafe(|| judge(family, &mut rng))).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())
    });
    Outcome { family, verdict, elapsed: started.elapsed() }
}

fn judge(family: Family, rng: &mut Rng) -> Verdict {
    match family {
        Family::Valid => {
            let case = if rng.chance(1, 4) { random_schedule_of_pipelines(rng) } else { random_schedule(rng) };
            judge_schedule(&case.source, case.p, case.m, if rng.chance(1, 8) { 2 } else { 1 })
        }
        Family::Source => {
            let source = mutate::mutate_source(rng);
            let (p, m, v) = mutate::params(rng);
            judge_source(&source, p, m, v)
        }
        Family::Program => {
            let mut program = base_program(rng);
            mutate::mutate_program(&mut program, rng);
            judge_loaded(Ok(program))
        }
        Family::Json => {
            // Either JSON form: version 1, or the compact version 2.
            let program = base_program(rng);
            let json = if rng.chance(1, 2) { stp_ir::to_compact_json(&program) } else { stp_ir::to_json(&program) };
            let text = mutate::mutate_text(&json, rng);
            judge_loaded(stp_ir::load_json(&text).map_err(|e| e.to_string()))
        }
        Family::Text => {
            let text = mutate::mutate_text(&stp_ir::print_text(&base_program(rng)), rng);
            judge_loaded(stp_ir::parse_text(&text).map_err(|e| e.to_string()))
        }
        Family::Csv => {
            let csv = stpc::emit::torch::torch_csv(&base_program(rng), false).text;
            let mutant = mutate::mutate_csv(&csv, rng);
            match stpc::emit::torch::import_torch_csv(&mutant, "imported") {
                Ok(imported) => judge_source(&imported.source, imported.ranks, imported.microbatches, 1),
                Err(_) => Verdict::Refused("import"),
            }
        }
        Family::Cost => judge_cost(rng),
    }
}

/// A `--cost` file with per-stage times, mutated: what
/// `CostModel::from_json` accepts must time a program to a finite
/// makespan.
fn judge_cost(rng: &mut Rng) -> Verdict {
    let program = base_program(rng);
    let stages = program.schedule.num_stages;
    let time = |rng: &mut Rng| rng.range(0, 400) as f64 / 100.0;
    let by_stage = (0..stages)
        .map(|_| stp_ir::simulate::StageTimes {
            forward: time(rng),
            backward_input: time(rng),
            backward_weight: time(rng),
            tp_collective: time(rng),
        })
        .collect();
    let cost = stp_ir::simulate::CostModel { stages: by_stage, ..stp_ir::simulate::CostModel::default() };
    let text = mutate::mutate_text(&serde_json::to_string(&cost).unwrap_or_default(), rng);
    let Ok(cost) = stp_ir::simulate::CostModel::from_json(&text, stages) else { return Verdict::Refused("cost") };
    match stp_ir::simulate::simulate(&program, &cost) {
        Ok(t) if t.makespan.is_finite() && t.makespan >= 0.0 => Verdict::Accepted,
        Ok(t) => Verdict::Disagreement(format!("an accepted cost model times the program at {}", t.makespan)),
        Err(d) => Verdict::Disagreement(format!("a verified program deadlocked in the timed simulation: {d}")),
    }
}

/// Small limits keep every case fast; a refusal by limit is a refusal.
fn small_request(p: i64, m: i64, v: i64) -> Request {
    Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(m), chunks: Some(v), ..ParamArgs::default() },
        limits: Limits { max_ops: 20_000, max_steps: 2_000_000 },
        ..Request::default()
    }
}

/// A source compiled at `p`, `m` (and `v` where it has chunks).
fn judge_source(source: &str, p: i64, m: i64, v: i64) -> Verdict {
    let file = SourceFile::new("mutant.sched", source);
    let mut request = small_request(p, m, v);
    let has_chunks = pipeline::analyze(&file).is_ok_and(|module| {
        module
            .schedules()
            .next()
            .is_some_and(|s| s.params.iter().any(|p| p.kind == stpc::syntax::ast::ParamKind::Chunks))
    });
    if !has_chunks {
        request.params.chunks = None;
    }
    match pipeline::build(&file, &request) {
        Ok(build) if build.program.ranks.iter().map(|r| r.instrs.len()).sum::<usize>() <= 5_000 => {
            judge_program(&build.program)
        }
        Ok(_) => Verdict::Accepted,
        Err(d) => refusal(&d),
    }
}

/// A loaded program: what `verify` accepts and the simulator finds free of
/// deadlock must run on every executor.
fn judge_loaded(program: Result<Program, String>) -> Verdict {
    let Ok(program) = program else { return Verdict::Refused("load") };
    if stp_ir::verify(&program).is_err() {
        return Verdict::Refused("verify");
    }
    if stp_ir::simulate::find_deadlock(&program, stp_ir::simulate::Semantics::Rendezvous).is_err() {
        return Verdict::Refused("deadlock");
    }
    judge_program(&program)
}

/// A small compiled standard schedule to mutate.
fn base_program(rng: &mut Rng) -> Program {
    let s = rng.pick(stp_stdlib::ALL);
    let (p, m) = (rng.range(2, 4) as i64, rng.range(4, 8) as i64);
    // Schedules with a `chunks` parameter (interleaved 1F1B, looped BFS) take two.
    let takes_chunks = s.source.contains(": chunks)");
    let v = if takes_chunks { 2 } else { 1 };
    let m = if s.name == "interleaved-1f1b" { p * (m / p).max(1) } else { m.max(2 * p) };
    let file = SourceFile::new(s.path(), s.source);
    // The first size from (p, m) up that the schedule's `require`s admit
    // (DualPipe and Chimera pair ranks: they take an even p).
    (p..=p + 1)
        .flat_map(|p| (m..=4 * p + 4).map(move |m| (p, m)))
        .filter(|(p, m)| s.name != "interleaved-1f1b" || m % p == 0)
        .find_map(|(p, m)| {
            let mut request = small_request(p, m, v);
            if !takes_chunks {
                request.params.chunks = None;
            }
            pipeline::compile(&file, &request).ok()
        })
        .unwrap_or_else(|| panic!("{} p={p} builds at some m", s.name))
}

/// Counts of a campaign, by family.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// (family, accepted, refused, disagreements, panics, slow).
    pub rows: std::collections::BTreeMap<Family, [u64; 5]>,
    /// The first failures: (case, family, what).
    pub failures: Vec<(u64, Family, String)>,
    /// The slowest case: (case, seconds).
    pub slowest: (u64, f64),
}

impl Tally {
    /// Adds case `index`'s outcome; `slow` is the time past which a case counts as slow.
    pub fn add(&mut self, index: u64, outcome: Outcome, slow: Duration) {
        let row = self.rows.entry(outcome.family).or_default();
        let failure = match outcome.verdict {
            Ok(Verdict::Accepted) => {
                row[0] += 1;
                None
            }
            Ok(Verdict::Refused(_)) => {
                row[1] += 1;
                None
            }
            Ok(Verdict::Disagreement(why)) => {
                row[2] += 1;
                Some(format!("disagreement: {why}"))
            }
            Err(panic) => {
                row[3] += 1;
                Some(format!("panic: {panic}"))
            }
        };
        if outcome.elapsed > slow {
            row[4] += 1;
        }
        let seconds = outcome.elapsed.as_secs_f64();
        if seconds > self.slowest.1 {
            self.slowest = (index, seconds);
        }
        if let Some(what) = failure {
            if self.failures.len() < 20 {
                self.failures.push((index, outcome.family, what));
            }
        }
    }

    /// Disagreements plus panics.
    pub fn broken(&self) -> u64 {
        self.rows.values().map(|r| r[2] + r[3]).sum()
    }

    /// The campaign as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from("| family | cases | accepted | refused | disagreements | panics | slow |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        let mut total = [0u64; 5];
        for (family, r) in &self.rows {
            let cases: u64 = r[..4].iter().sum();
            out.push_str(&format!(
                "| {} | {cases} | {} | {} | {} | {} | {} |\n",
                family.name(),
                r[0],
                r[1],
                r[2],
                r[3],
                r[4]
            ));
            for (t, v) in total.iter_mut().zip(r) {
                *t += v;
            }
        }
        let cases: u64 = total[..4].iter().sum();
        out.push_str(&format!(
            "| **all** | {cases} | {} | {} | {} | {} | {} |\n",
            total[0], total[1], total[2], total[3], total[4]
        ));
        out
    }
}
