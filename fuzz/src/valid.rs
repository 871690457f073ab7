//! Random valid schedules: a random placement of stages on ranks, a random
//! choice of split (`B` then `W`) or full (`BW`) backward per pass, of
//! which passes are recomputed (an `R` between the `F` and the backward), and each
//! rank's order taken from one random run of the whole pipeline in which
//! every pass starts only once its inputs exist — so the compute order is
//! valid by construction, and some ready forwards are braided with a ready
//! backward of another microbatch. With several pipelines
//! ([`random_schedule_of_pipelines`]) the stages form model copies and each
//! microbatch takes a random one. Written out as `.sched` source, so the
//! whole compiler sees it as a user's file.

use crate::rng::Rng;
use std::fmt::Write;

/// One generated schedule and the parameters to compile it with.
#[derive(Debug, Clone)]
pub struct RandomSchedule {
    /// The `.sched` source.
    pub source: String,
    /// Pipeline ranks.
    pub p: usize,
    /// Microbatches.
    pub m: usize,
    /// Stages.
    pub stages: usize,
    /// `placement[s]`: the rank of stage `s`.
    pub placement: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    F,
    B,
    W,
    Bw,
    R,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    kind: Kind,
    stage: usize,
    mb: usize,
}

impl Op {
    fn write(&self, out: &mut String) {
        let name = match self.kind {
            Kind::F => "F",
            Kind::B => "B",
            Kind::W => "W",
            Kind::Bw => "BW",
            Kind::R => "R",
        };
        let _ = write!(out, "{name}({}, {})", self.mb, self.stage);
    }
}

/// Where each pass stands in the random run.
struct Progress {
    /// Stages per pipeline: stage `s` is position `s % chain` of pipeline `s / chain`.
    chain: usize,
    /// The pipeline of each microbatch.
    route: Vec<usize>,
    split: Vec<Vec<bool>>,
    recompute: Vec<Vec<bool>>,
    restored: Vec<Vec<bool>>,
    forward: Vec<Vec<bool>>,
    backward: Vec<Vec<bool>>,
    weight: Vec<Vec<bool>>,
}

impl Progress {
    fn ready(&self, op: Op) -> bool {
        let (s, i) = (op.stage, op.mb);
        if s / self.chain != self.route[i] {
            return false;
        }
        let (first, last) = (s % self.chain == 0, s % self.chain == self.chain - 1);
        match op.kind {
            Kind::F => !self.forward[s][i] && (first || self.forward[s - 1][i]),
            Kind::B | Kind::Bw => {
                self.forward[s][i]
                    && (!self.recompute[s][i] || self.restored[s][i])
                    && !self.backward[s][i]
                    && (last || self.backward[s + 1][i])
            }
            Kind::W => self.backward[s][i] && !self.weight[s][i],
            Kind::R => self.recompute[s][i] && self.forward[s][i] && !self.restored[s][i],
        }
    }

    fn run(&mut self, op: Op) {
        let (s, i) = (op.stage, op.mb);
        match op.kind {
            Kind::F => self.forward[s][i] = true,
            Kind::B => self.backward[s][i] = true,
            Kind::Bw => {
                self.backward[s][i] = true;
                self.weight[s][i] = true;
            }
            Kind::W => self.weight[s][i] = true,
            Kind::R => self.restored[s][i] = true,
        }
    }

    /// The passes of `stages_of` that could start now.
    fn ready_ops(&self, stages_of: &[usize], m: usize) -> Vec<Op> {
        let mut ops = Vec::new();
        for &s in stages_of {
            for i in 0..m {
                let backward = if self.split[s][i] { Kind::B } else { Kind::Bw };
                for kind in [Kind::F, backward, Kind::W, Kind::R] {
                    let op = Op { kind, stage: s, mb: i };
                    if (kind != Kind::W || self.split[s][i]) && self.ready(op) {
                        ops.push(op);
                    }
                }
            }
        }
        ops
    }
}

/// A random valid schedule on 2-4 ranks with up to `3p` stages and 1-4
/// microbatches.
pub fn random_schedule(rng: &mut Rng) -> RandomSchedule {
    let p = rng.range(2, 4);
    let m = rng.range(1, 4);
    let stages = rng.range(p, 3 * p);
    let placement = random_placement(rng, p, stages);
    generate(rng, Shape { p, m, stages, placement, pipelines: 1, route: vec![0; m] })
}

/// A random valid schedule of 2 or 3 pipelines (model copies) on 2-4
/// ranks, 1-6 microbatches each routed to a random pipeline, every stage
/// on a random rank: the gradient reductions stpc inserts must run on
/// every executor to the sequential run's gradients.
pub fn random_schedule_of_pipelines(rng: &mut Rng) -> RandomSchedule {
    let p = rng.range(2, 4);
    let m = rng.range(1, 6);
    let pipelines = rng.range(2, 3);
    let chain = rng.range(p.div_ceil(pipelines), 3 * p / pipelines);
    let stages = chain * pipelines;
    let placement = random_placement(rng, p, stages);
    let route = (0..m).map(|_| rng.range(0, pipelines - 1)).collect();
    generate(rng, Shape { p, m, stages, placement, pipelines, route })
}

/// What a random schedule is made of before its order is drawn.
struct Shape {
    p: usize,
    m: usize,
    stages: usize,
    placement: Vec<usize>,
    pipelines: usize,
    route: Vec<usize>,
}

/// Draws the passes' kinds and one random run of the pipeline, and writes
/// the schedule that runs it.
fn generate(rng: &mut Rng, shape: Shape) -> RandomSchedule {
    let Shape { p, m, stages, placement, pipelines, route } = shape;
    let split: Vec<Vec<bool>> = (0..stages).map(|_| (0..m).map(|_| rng.chance(1, 2)).collect()).collect();
    let recompute: Vec<Vec<bool>> = (0..stages).map(|_| (0..m).map(|_| rng.chance(1, 4)).collect()).collect();
    let grid = vec![vec![false; m]; stages];
    let mut progress = Progress {
        chain: stages / pipelines,
        route: route.clone(),
        split,
        recompute,
        restored: grid.clone(),
        forward: grid.clone(),
        backward: grid.clone(),
        weight: grid,
    };
    let stages_of: Vec<Vec<usize>> = (0..p).map(|r| (0..stages).filter(|s| placement[*s] == r).collect()).collect();
    let mut orders: Vec<Vec<(Op, Option<Op>)>> = vec![Vec::new(); p];
    loop {
        let ready: Vec<(usize, Vec<Op>)> =
            (0..p).map(|r| (r, progress.ready_ops(&stages_of[r], m))).filter(|(_, ops)| !ops.is_empty()).collect();
        if ready.is_empty() {
            break;
        }
        let (rank, ops) = rng.pick(&ready);
        let op = *rng.pick(ops);
        let partner = if op.kind == Kind::F && rng.chance(1, 3) {
            let backwards: Vec<Op> = ops.iter().copied().filter(|o| o.kind != Kind::F && o.mb != op.mb).collect();
            (!backwards.is_empty()).then(|| *rng.pick(&backwards))
        } else {
            None
        };
        progress.run(op);
        if let Some(b) = partner {
            progress.run(b);
        }
        orders[*rank].push((op, partner));
    }
    let routes = (pipelines > 1).then_some((pipelines, route.as_slice()));
    RandomSchedule { source: write_source(p, stages, &placement, routes, &orders), p, m, stages, placement }
}

/// A random placement left to stpc to order (`auto;`), with room for
/// every microbatch's activations on every rank: stpc's own orders must
/// run on every executor too.
pub fn random_auto_schedule(rng: &mut Rng) -> RandomSchedule {
    let p = rng.range(2, 4);
    let m = rng.range(1, 6);
    let stages = rng.range(p, 3 * p);
    let placement = random_placement(rng, p, stages);
    let mut source = String::new();
    let _ = writeln!(source, "schedule random_auto(p: ranks, m: microbatches) {{");
    let _ = writeln!(source, "  require p == {p};\n  stages {stages};");
    let _ = writeln!(source, "  place s -> {};", stpc::emit::torch::placement_expression(&placement));
    let _ = writeln!(source, "  memory {{ budget = {}; }}", stages * m);
    let _ = writeln!(source, "  cost {{ {} }}", random_stage_costs(rng, stages));
    let _ = writeln!(source, "  auto;\n}}");
    RandomSchedule { source, p, m, stages, placement }
}

/// Per-stage times in decimals (some stages heavier, as the embedding and
/// the LM head are): the planner orders for them, and its order must still
/// run on every executor.
fn random_stage_costs(rng: &mut Rng, stages: usize) -> String {
    let mut settings = Vec::new();
    for name in ["forward", "backward_input", "backward_weight"] {
        let heavy = rng.range(0, stages - 1);
        let tenths = rng.range(5, 30);
        settings.push(format!("{name}(s) = if s == {heavy} {{ {}.{} }} else {{ 1 }};", tenths / 10, tenths % 10));
    }
    settings.join(" ")
}

/// Every rank owns at least one stage; the rest land anywhere.
fn random_placement(rng: &mut Rng, p: usize, stages: usize) -> Vec<usize> {
    let mut placement: Vec<usize> = (0..stages).map(|s| if s < p { s } else { rng.range(0, p - 1) }).collect();
    for s in (1..stages).rev() {
        let t = rng.range(0, s);
        placement.swap(s, t);
    }
    placement
}

fn write_source(
    p: usize,
    stages: usize,
    placement: &[usize],
    routes: Option<(usize, &[usize])>,
    orders: &[Vec<(Op, Option<Op>)>],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "schedule random(p: ranks, m: microbatches) {{");
    let _ = writeln!(out, "  require p == {p};");
    let _ = writeln!(out, "  stages {stages};");
    if let Some((pipelines, route)) = routes {
        let _ = writeln!(out, "  pipelines {pipelines};");
        let _ = writeln!(out, "  route i -> {};", table_expression("i", route));
    }
    let _ = writeln!(out, "  place s -> {};", stpc::emit::torch::placement_expression(placement));
    let _ = writeln!(out, "  rank r {{");
    for (r, ops) in orders.iter().enumerate() {
        let _ = writeln!(out, "    if r == {r} {{");
        for (op, partner) in ops {
            out.push_str("      ");
            op.write(&mut out);
            if let Some(b) = partner {
                out.push_str(" & ");
                b.write(&mut out);
            }
            out.push('\n');
        }
        let _ = writeln!(out, "    }}");
    }
    let _ = writeln!(out, "  }}\n}}");
    out
}

/// An expression of `var` that is `values[var]` for every index: a chain
/// of `if`s (the last value as the fallback).
fn table_expression(var: &str, values: &[usize]) -> String {
    let Some((last, rest)) = values.split_last() else { return "0".into() };
    let mut out = String::new();
    for (i, v) in rest.iter().enumerate() {
        let _ = write!(out, "if {var} == {i} {{ {v} }} else ");
    }
    let _ = write!(out, "{{ {last} }}");
    if rest.is_empty() {
        out = last.to_string();
    }
    out
}
