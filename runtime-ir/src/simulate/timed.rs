//! Timed execution of rank programs under a cost model: a compute stream
//! per rank, a communication stream per pair of ranks (as PyTorch's NCCL
//! process groups run point-to-point operations), rendezvous sends (or,
//! with [`simulate_with`], buffered ones).
//!
//! A compute starts when the rank's compute stream is free and every
//! buffer it reads is ready, and takes its passes' time plus whatever of
//! their tensor-parallel collectives is exposed (see [`CostModel`]). A
//! transfer is posted when the stream to its peer is free and, for a send,
//! the buffer is ready; it completes `p2p` after both sides have posted it
//! (and after the previous message on its link), and a received buffer is
//! ready then; a buffered send completes when posted. Groups only fix the
//! posting order. Frees take no time.

use super::{waiting_in_reduction, Blocked, Deadlock, Pending, Reductions, Semantics, TransferIndex, Wait};
use crate::ids::{Rank, Stage};
use crate::program::{Compute, Direction, Instr, Part, Pass, PassKind, Program};
use crate::slots::BufferSlots;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Times of the passes and transfers, in any unit (the default is "one
/// forward = 1").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostModel {
    /// One forward of one stage for one microbatch (`T_F`).
    pub forward: f64,
    /// One input-gradient backward (`T_B`).
    pub backward_input: f64,
    /// One weight-gradient backward (`T_W`); a full backward takes `T_B + T_W`.
    pub backward_weight: f64,
    /// The tensor-parallel collective of one forward or input-gradient pass
    /// (`T_AR`), exposed unless other compute hides it: a standalone `F`
    /// or `B` exposes all of it; a full `BW` hides it behind its own weight
    /// gradient; in a braided pair each pass's collective hides behind the
    /// other pass's compute. `W` has none. 0 without tensor parallelism.
    pub tp_collective: f64,
    /// One point-to-point transfer, once both sides have posted it.
    pub p2p: f64,
    /// Per stage, its own times, where stages differ (the first holding
    /// the embedding, the last the LM head and loss): empty when every
    /// stage takes the times above, else one entry per stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageTimes>,
    /// A recompute `R` as a fraction of its stage's forward compute: 1
    /// (the default) re-runs the whole forward (Megatron's full
    /// recompute), less a part of it (selective recompute). Its TP
    /// collectives are the forward's.
    #[serde(default = "full_recompute", skip_serializing_if = "is_full_recompute")]
    pub recompute: f64,
    /// With several pipelines: one gradient reduction ([`Instr::Reduce`])
    /// between the copies of a model part, once every owner has reached it
    /// (0, the default, leaves it out of the step as the papers' bubble
    /// formulas do; it overlaps the optimizer's data-parallel all-reduce).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reduce: f64,
}

fn is_zero(f: &f64) -> bool {
    *f == 0.0
}

fn full_recompute() -> f64 {
    1.0
}

fn is_full_recompute(f: &f64) -> bool {
    *f == 1.0
}

/// The times of one stage's passes (see [`CostModel`]'s fields of the
/// same names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTimes {
    /// `T_F` of this stage.
    pub forward: f64,
    /// `T_B` of this stage.
    pub backward_input: f64,
    /// `T_W` of this stage.
    pub backward_weight: f64,
    /// `T_AR` of this stage's `F` and `B`.
    pub tp_collective: f64,
}

impl StageTimes {
    /// The settings by name.
    pub fn fields(&self) -> [(&'static str, f64); 4] {
        [
            ("forward", self.forward),
            ("backward_input", self.backward_input),
            ("backward_weight", self.backward_weight),
            ("tp_collective", self.tp_collective),
        ]
    }

    /// Pure compute time of a pass of this kind (`R`: a whole forward,
    /// which [`CostModel::compute`] scales by its `recompute` fraction).
    pub fn compute(&self, kind: PassKind) -> f64 {
        match kind {
            PassKind::F | PassKind::R => self.forward,
            PassKind::B => self.backward_input,
            PassKind::W => self.backward_weight,
            PassKind::BW => self.backward_input + self.backward_weight,
        }
    }

    /// The collective a pass of this kind issues (none for `W`).
    pub fn collective(&self, kind: PassKind) -> f64 {
        match kind {
            PassKind::W => 0.0,
            _ => self.tp_collective,
        }
    }
}

impl Default for CostModel {
    fn default() -> CostModel {
        CostModel {
            forward: 1.0,
            backward_input: 1.0,
            backward_weight: 1.0,
            tp_collective: 0.0,
            p2p: 0.0,
            stages: Vec::new(),
            recompute: 1.0,
            reduce: 0.0,
        }
    }
}

impl CostModel {
    /// The largest time any one setting may have. Times are relative (one
    /// forward is usually 1); beyond this, sums over millions of passes
    /// lose the precision the schedulers and the lower bound need.
    pub const MAX_TIME: f64 = 1e9;

    /// The settings by name, as `--cost` files spell them.
    pub fn fields(&self) -> [(&'static str, f64); 5] {
        [
            ("forward", self.forward),
            ("backward_input", self.backward_input),
            ("backward_weight", self.backward_weight),
            ("tp_collective", self.tp_collective),
            ("p2p", self.p2p),
        ]
    }

    /// Why this cost model cannot be used, if it cannot: a time that is
    /// not a number, negative, or above [`CostModel::MAX_TIME`].
    pub fn problem(&self) -> Option<String> {
        let uniform = self.fields().map(|(name, v)| (name.to_string(), v));
        let staged =
            self.stages.iter().enumerate().flat_map(|(st, t)| {
                t.fields().into_iter().map(move |(name, v)| (format!("{name}` of stage {st} `"), v))
            });
        if !(0.0..=1.0).contains(&self.recompute) {
            return Some(format!(
                "cost setting `recompute` is {}: it is the fraction of a forward that a recompute re-runs, from 0 to 1 \
                 (1: full recompute)",
                self.recompute
            ));
        }
        let (name, value) = uniform.into_iter().chain(staged).find(|(_, v)| !(0.0..=Self::MAX_TIME).contains(v))?;
        let name = name.trim_end_matches(" `").to_string();
        let shown = if value.abs() >= 1e12 { format!("{value:e}") } else { value.to_string() };
        Some(format!(
            "cost setting `{name}` is {shown}: every time must be a number from 0 to {:e} (times are relative, \
             one forward is usually 1; scale them down)",
            Self::MAX_TIME
        ))
    }

    /// The uniform times, as every stage without an entry of its own
    /// takes them.
    pub fn uniform(&self) -> StageTimes {
        StageTimes {
            forward: self.forward,
            backward_input: self.backward_input,
            backward_weight: self.backward_weight,
            tp_collective: self.tp_collective,
        }
    }

    /// The times of `stage`'s passes.
    pub fn stage(&self, stage: Stage) -> StageTimes {
        self.stages.get(stage.index()).copied().unwrap_or_else(|| self.uniform())
    }

    /// The longest TP collective of any stage.
    pub fn longest_collective(&self) -> f64 {
        if self.stages.is_empty() {
            return self.tp_collective;
        }
        self.stages.iter().map(|t| t.tp_collective).fold(0.0, f64::max)
    }

    /// The cost model of a `--cost` file for a program of `stages` stages:
    /// the JSON form (missing fields keep their defaults), then
    /// [`CostModel::checked`].
    pub fn from_json(text: &str, stages: u32) -> Result<CostModel, String> {
        let cost: CostModel = serde_json::from_str(text).map_err(|e| format!("not a cost model: {e}"))?;
        cost.checked(stages)
    }

    /// Per-part times spread over the copies of each part: with
    /// `pipelines` model copies of `parts` parts each, a `stages` list of
    /// one entry per part becomes one per stage (every copy of a part
    /// takes the part's times). Anything else is left as it is.
    pub fn per_copy(mut self, parts: u32, pipelines: u32) -> CostModel {
        if pipelines > 1 && self.stages.len() == parts as usize {
            self.stages = self.stages.repeat(pipelines as usize);
        }
        self
    }

    /// This cost model, if it can time a program of `stages` stages: one
    /// entry per stage in `stages` (or none), and every time a number from
    /// 0 to [`CostModel::MAX_TIME`] ([`CostModel::problem`]).
    pub fn checked(self, stages: u32) -> Result<CostModel, String> {
        if !self.stages.is_empty() && self.stages.len() != stages as usize {
            return Err(format!(
                "the cost model gives times for {} stages, but this program has {stages}: give one entry per stage \
                 in `stages`, or none (every stage then takes the uniform times)",
                self.stages.len()
            ));
        }
        match self.problem() {
            Some(problem) => Err(problem),
            None => Ok(self),
        }
    }

    /// One line for reports: `T_F=1 T_B=1 T_W=1 T_AR=0 p2p=0`, or, with
    /// per-stage times, each differing setting's values listed by stage.
    pub fn summary(&self) -> String {
        let uniform = self.is_uniform();
        let by_stage: Vec<StageTimes> = if uniform { vec![self.uniform()] } else { self.stages.clone() };
        let mut parts: Vec<String> = ["T_F", "T_B", "T_W", "T_AR"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let values: Vec<f64> = by_stage.iter().map(|t| t.fields()[i].1).collect();
                if values.iter().all(|v| *v == values[0]) {
                    format!("{name}={}", significant(values[0]))
                } else {
                    let listed: Vec<String> = values.iter().map(|v| significant(*v)).collect();
                    format!("{name}=[{}]", listed.join(" "))
                }
            })
            .collect();
        parts.push(format!("p2p={}", significant(self.p2p)));
        if self.recompute != 1.0 {
            parts.push(format!("recompute={}", significant(self.recompute)));
        }
        if self.reduce != 0.0 {
            parts.push(format!("reduce={}", significant(self.reduce)));
        }
        let note = if uniform { "" } else { " (lists are by stage)" };
        format!("{}{note}", parts.join(" "))
    }

    /// Whether every stage takes the same times.
    pub fn is_uniform(&self) -> bool {
        self.stages.iter().all(|t| *t == self.uniform())
    }

    /// Every stage's times scaled by `factor` (transfers unchanged): the
    /// same model cut into `1 / factor` times as many stages.
    pub fn scaled(&self, factor: f64) -> CostModel {
        let scale = |t: StageTimes| StageTimes {
            forward: t.forward * factor,
            backward_input: t.backward_input * factor,
            backward_weight: t.backward_weight * factor,
            tp_collective: t.tp_collective * factor,
        };
        let u = scale(self.uniform());
        CostModel {
            forward: u.forward,
            backward_input: u.backward_input,
            backward_weight: u.backward_weight,
            tp_collective: u.tp_collective,
            p2p: self.p2p,
            stages: self.stages.iter().map(|t| scale(*t)).collect(),
            recompute: self.recompute,
            reduce: self.reduce * factor,
        }
    }

    /// The uniform times on a model cut into `stages` stages whose first
    /// stage (the embedding) takes `first` times a middle one and whose
    /// last (the LM head and loss) `last` times, collectives included.
    pub fn with_heavy_ends(&self, stages: u32, first: f64, last: f64) -> CostModel {
        let mut by_stage = vec![self.uniform(); stages.max(1) as usize];
        let end = by_stage.len() - 1;
        for (st, factor) in [(0, first), (end, last)] {
            let t = &mut by_stage[st];
            (t.forward, t.backward_input, t.backward_weight, t.tp_collective) =
                (t.forward * factor, t.backward_input * factor, t.backward_weight * factor, t.tp_collective * factor);
        }
        CostModel { stages: by_stage, ..self.clone() }
    }

    /// The same model's times when it is cut into `to` stages instead of
    /// `from`: every stage's compute divided by `to / from`. Per-stage times
    /// split evenly when `to` is a multiple of `from` (each stage into
    /// `to / from` equal pieces); `None` when they cannot be split.
    pub fn recut(&self, from: u32, to: u32) -> Option<CostModel> {
        if from == to || from == 0 || to == 0 {
            return Some(self.clone());
        }
        let factor = f64::from(from) / f64::from(to);
        if self.is_uniform() {
            let mut cost = self.scaled(factor);
            cost.stages.clear();
            return Some(cost);
        }
        if !to.is_multiple_of(from) || self.stages.len() != from as usize {
            return None;
        }
        let pieces = (to / from) as usize;
        let mut cost = self.scaled(factor);
        cost.stages = cost.stages.iter().flat_map(|t| std::iter::repeat_n(*t, pieces)).collect();
        Some(cost)
    }

    /// Pure compute time of one pass.
    pub fn compute(&self, pass: Pass) -> f64 {
        let time = self.stage(pass.stage).compute(pass.kind);
        if pass.kind == PassKind::R {
            time * self.recompute
        } else {
            time
        }
    }

    /// The collective a pass issues (none for `W`).
    fn collective(&self, pass: Pass) -> f64 {
        self.stage(pass.stage).collective(pass.kind)
    }

    /// (compute, exposed collective time) of one compute instruction.
    pub fn time(&self, passes: &[Pass]) -> (f64, f64) {
        let compute: f64 = passes.iter().map(|p| self.compute(*p)).sum();
        let exposed = match passes {
            [one] if one.kind == PassKind::BW => {
                (self.collective(*one) - self.stage(one.stage).backward_weight).max(0.0)
            }
            [one] => self.collective(*one),
            [a, b] => {
                (self.collective(*a) - self.compute(*b)).max(0.0) + (self.collective(*b) - self.compute(*a)).max(0.0)
            }
            _ => passes.iter().map(|p| self.collective(*p)).sum(),
        };
        (compute, exposed)
    }
}

/// `v` to five significant digits, without trailing zeros: `1.3`,
/// `0.050879`, `2.5e-7`.
fn significant(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return v.to_string();
    }
    let magnitude = v.abs().log10().floor() as i32;
    if !(-5..=9).contains(&magnitude) {
        return format!("{v:.4e}");
    }
    let decimals = (4 - magnitude).max(0) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Which stream an interval ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The compute stream.
    Compute,
    /// The communication stream.
    Comm,
    /// The tensor-parallel stream (a compute's all-reduces, with `--tp`).
    Collective,
}

/// One instruction's interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// Index of the instruction in its rank's program.
    pub instr: usize,
    /// Its stream.
    pub stream: Stream,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
    /// Of the compute span, the time spent on exposed collectives.
    pub exposed: f64,
}

/// What one rank did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankTimeline {
    /// The rank.
    pub rank: Rank,
    /// Time its compute stream was busy (compute plus exposed collectives).
    pub busy: f64,
    /// Of that, exposed tensor-parallel collectives.
    pub exposed_comm: f64,
    /// Idle time of the compute stream between its first start and last end.
    pub bubble: f64,
    /// Intervals of every compute and communication instruction.
    pub spans: Vec<Span>,
    /// The tensor-parallel collectives, one interval each, tagged with the
    /// compute instruction that issued them (programs lowered with `--tp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collectives: Vec<Span>,
}

/// A timed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// When the last instruction of any rank ends.
    pub makespan: f64,
    /// Per rank, in rank order.
    pub ranks: Vec<RankTimeline>,
}

impl Timeline {
    /// Idle share of all ranks' compute streams over the makespan.
    pub fn bubble_ratio(&self) -> f64 {
        let capacity = self.makespan * self.ranks.len() as f64;
        if capacity == 0.0 {
            return 0.0;
        }
        1.0 - self.ranks.iter().map(|r| r.busy).sum::<f64>() / capacity
    }
}

#[derive(Debug, Clone, Copy)]
struct Posted {
    rank: usize,
    slot: usize,
    at: f64,
    /// When its data was ready (a send), else 0.
    ready: f64,
}

#[derive(Default)]
struct LinkState {
    done: u32,
    last_end: f64,
    waiting_sends: Vec<(u32, Posted)>,
    waiting_recvs: Vec<(u32, Posted)>,
}

#[derive(Default)]
struct RankState {
    pc: usize,
    compute_free: f64,
    /// When the stream to each peer is free.
    comm_free: Vec<f64>,
    /// End time of every compute run so far (by instruction index).
    ends: Vec<f64>,
    /// Completion time of every transfer (by rank-local transfer index).
    transfer_ends: Vec<f64>,
    /// The current group: (link, seq, direction, posted at, completion time once done).
    group: Vec<(u32, u32, Direction, f64, Option<f64>)>,
    /// Groups (instruction, peer) with a transfer posted late because the
    /// stream to its peer was still busy with earlier transfers.
    held: Vec<(usize, Rank)>,
    posted: bool,
    spans: Vec<Span>,
    busy: f64,
    exposed: f64,
    /// When the rank's tensor-parallel stream is free.
    tp_free: f64,
    collectives: Vec<Span>,
    /// When the rank's last gradient reduction ends: a rank's reductions
    /// run one after another, as collectives on one communicator do.
    reduced_until: f64,
}

/// Runs a compute's units from `start`: each on the compute stream, each
/// all-reduce on the tensor-parallel stream after its unit. A forward or
/// input-gradient unit consumes the all-reduced output of its pass's
/// previous reducing unit and waits for it; a weight-gradient unit only
/// follows its pass's previous unit. A unit takes its pass's time divided
/// among the pass's units of its kind (halves), an all-reduce `T_AR / 2`.
/// Returns (start, when the compute stream is free, when the outputs are
/// ready, compute time, time the compute stream waited on all-reduces).
fn run_units(c: &Compute, cost: &CostModel, start: f64, tp: &mut TpStream<'_>) -> (f64, f64, f64, f64, f64) {
    let n = c.passes.len();
    // Per pass: end of its last unit, end of its last all-reduce.
    let mut last_unit = vec![start; n];
    let mut last_reduce = vec![start; n];
    let mut clock = start;
    let mut compute = 0.0;
    let mut waited = 0.0;
    for u in &c.units {
        let i = usize::from(u.pass);
        let Some(pass) = c.passes.get(i) else { continue };
        let weight_grad = matches!(u.part, Part::MlpWgrad | Part::AttentionWgrad);
        let input = if weight_grad { last_unit[i] } else { last_reduce[i].max(last_unit[i]) };
        let begin = clock.max(input);
        let duration = unit_time(&cost.stage(pass.stage), pass.kind, u.part, cost.recompute);
        waited += begin - clock;
        clock = begin + duration;
        compute += duration;
        last_unit[i] = clock;
        if u.collective.is_some() {
            let reduce_start = tp.free.max(clock);
            *tp.free = reduce_start + cost.stage(pass.stage).tp_collective / 2.0;
            last_reduce[i] = *tp.free;
            tp.spans.push(Span {
                instr: tp.instr,
                stream: Stream::Collective,
                start: reduce_start,
                end: *tp.free,
                exposed: 0.0,
            });
        }
    }
    let outputs = last_unit.iter().chain(&last_reduce).copied().fold(clock, f64::max);
    (start, clock, outputs, compute, waited)
}

/// One compute's units from `start`, as [`simulate`] runs a program
/// lowered with `--tp` (the compute must list its units): returns when
/// the compute stream is free and when the compute's outputs are ready;
/// `tp_free`, when the rank's tensor-parallel stream is free, moves on.
/// Schedulers time candidate orders with it.
pub fn time_units(c: &Compute, cost: &CostModel, start: f64, tp_free: &mut f64) -> (f64, f64) {
    let mut spans = Vec::new();
    let mut tp = TpStream { instr: 0, free: tp_free, spans: &mut spans };
    let (_, free, outputs, _, _) = run_units(c, cost, start, &mut tp);
    (free, outputs)
}

/// A rank's tensor-parallel stream while one compute's units run.
struct TpStream<'a> {
    /// The compute instruction issuing the collectives.
    instr: usize,
    /// When the stream is free.
    free: &'a mut f64,
    /// The collectives run so far.
    spans: &'a mut Vec<Span>,
}

/// The compute time of one unit: half of its pass's dgrad (or forward)
/// time, or half of its weight-gradient time.
fn unit_time(cost: &StageTimes, kind: PassKind, part: Part, recompute: f64) -> f64 {
    match (kind, part) {
        (_, Part::MlpWgrad | Part::AttentionWgrad) => cost.backward_weight / 2.0,
        (PassKind::F, _) => cost.forward / 2.0,
        (PassKind::R, _) => cost.forward * recompute / 2.0,
        _ => cost.backward_input / 2.0,
    }
}

/// What last made a buffer live on a rank, while the dependencies are collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Writer {
    #[default]
    None,
    Instr(u32),
    Transfer(u32),
}

/// Where a buffer an instruction reads was made: by a compute (instruction
/// index) or by a receive (rank-local transfer index).
#[derive(Debug, Clone, Copy)]
enum Dep {
    Instr(usize),
    Transfer(usize),
}

/// Runs `program` under `cost` with rendezvous sends. The program should
/// be verified; a deadlock is returned as such.
pub fn simulate(program: &Program, cost: &CostModel) -> Result<Timeline, Deadlock> {
    simulate_with(program, cost, Semantics::Rendezvous)
}

/// [`simulate`] under the given send semantics: a program checked for
/// buffered sends only is simulated with buffered sends.
pub fn simulate_with(program: &Program, cost: &CostModel, semantics: Semantics) -> Result<Timeline, Deadlock> {
    let ranks = run_program(program, cost, semantics)?;
    Ok(timeline(ranks))
}

/// What held transfers back in a timed run: per rank, the groups
/// (instruction index) with a transfer posted late because the stream to
/// that peer was still busy, and the peer. Where these are, moving a
/// receive to another group may shorten the step.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldBack {
    /// The run's makespan.
    pub makespan: f64,
    /// Per rank: (instruction, peer), in the order they happened.
    pub groups: Vec<Vec<(usize, Rank)>>,
}

/// Runs `program` as [`simulate`] does and says where transfers waited for
/// a busy stream.
pub fn held_back(program: &Program, cost: &CostModel) -> Result<HeldBack, Deadlock> {
    let ranks = run_program(program, cost, Semantics::Rendezvous)?;
    let makespan = makespan(&ranks);
    Ok(HeldBack { makespan, groups: ranks.into_iter().map(|r| r.held).collect() })
}

fn run_program(program: &Program, cost: &CostModel, semantics: Semantics) -> Result<Vec<RankState>, Deadlock> {
    let index = TransferIndex::new(program);
    let deps = writers(program, &index);
    let n = program.ranks.len();
    let mut ranks: Vec<RankState> = (0..n)
        .map(|r| RankState {
            comm_free: vec![0.0; n],
            transfer_ends: vec![0.0; index.infos[r].len()],
            ..RankState::default()
        })
        .collect();
    let mut links: Vec<LinkState> = (0..index.num_links()).map(|_| LinkState::default()).collect();
    let mut reductions = Reductions::default();
    let mut work: VecDeque<usize> = (0..n).collect();
    let mut queued = vec![true; n];
    while let Some(r) = work.pop_front() {
        queued[r] = false;
        let woken = run_rank(program, cost, semantics, &index, &deps, r, &mut ranks, &mut links, &mut reductions);
        for w in woken {
            if !queued[w] {
                queued[w] = true;
                work.push_back(w);
            }
        }
    }
    let blocked: Vec<Blocked> = (0..n)
        .filter(|&r| ranks[r].pc < program.ranks[r].instrs.len())
        .map(|r| Blocked {
            rank: Rank(r as u32),
            instr: ranks[r].pc,
            pending: program.ranks[r].instrs[ranks[r].pc]
                .transfers()
                .iter()
                .map(|t| Pending { transfer: *t, wait: Wait::PeerNotPosted })
                .collect(),
            waiting_for: waiting_in_reduction(program, &reductions, r, ranks[r].pc),
        })
        .collect();
    if !blocked.is_empty() {
        return Err(Deadlock { semantics, blocked });
    }
    Ok(ranks)
}

/// When the last instruction of any rank ends.
fn makespan(ranks: &[RankState]) -> f64 {
    ranks.iter().flat_map(|r| r.spans.iter().map(|s| s.end)).fold(0.0, f64::max)
}

fn timeline(ranks: Vec<RankState>) -> Timeline {
    let makespan = makespan(&ranks);
    let ranks = ranks
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            let computes = s.spans.iter().filter(|sp| sp.stream == Stream::Compute);
            let first = computes.clone().map(|sp| sp.start).fold(f64::INFINITY, f64::min);
            let last = computes.map(|sp| sp.end).fold(0.0, f64::max);
            let bubble = if first.is_finite() { (last - first - s.busy).max(0.0) } else { 0.0 };
            RankTimeline {
                rank: Rank(r as u32),
                busy: s.busy,
                exposed_comm: s.exposed,
                bubble,
                spans: s.spans,
                collectives: s.collectives,
            }
        })
        .collect();
    Timeline { makespan, ranks }
}

/// Per rank, per instruction: where the buffers it reads were made (for a
/// communication group: those it sends).
fn writers(program: &Program, index: &TransferIndex) -> Vec<Vec<Vec<Dep>>> {
    let meta = &program.schedule;
    let mut writer: BufferSlots<Writer> = BufferSlots::new(meta.num_stages, meta.num_microbatches);
    program
        .ranks
        .iter()
        .enumerate()
        .map(|(r, rp)| {
            writer.reset();
            rp.instrs
                .iter()
                .enumerate()
                .map(|(i, instr)| {
                    let deps: Vec<Dep> = instr
                        .reads(meta.chain())
                        .filter_map(|b| match writer.get(b) {
                            Writer::None => None,
                            Writer::Instr(i) => Some(Dep::Instr(i as usize)),
                            Writer::Transfer(t) => Some(Dep::Transfer(t as usize)),
                        })
                        .collect();
                    match instr {
                        Instr::Comm(ops) => {
                            for (slot, t) in ops.iter().enumerate() {
                                if t.dir == Direction::Recv {
                                    let flat = index.starts[r][i] + slot;
                                    writer.set(t.buffer, Writer::Transfer(flat as u32));
                                }
                            }
                        }
                        _ => {
                            for b in instr.writes(meta.chain()) {
                                writer.set(b, Writer::Instr(i as u32));
                            }
                        }
                    }
                    deps
                })
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run_rank(
    program: &Program,
    cost: &CostModel,
    semantics: Semantics,
    index: &TransferIndex,
    deps: &[Vec<Vec<Dep>>],
    r: usize,
    ranks: &mut [RankState],
    links: &mut [LinkState],
    reductions: &mut Reductions,
) -> Vec<usize> {
    let instrs = &program.ranks[r].instrs;
    let chain = program.schedule.chain();
    let mut woken = Vec::new();
    while ranks[r].pc < instrs.len() {
        let pc = ranks[r].pc;
        let ready_of = |state: &RankState, d: &Dep| match *d {
            Dep::Instr(i) => state.ends[i],
            Dep::Transfer(t) => state.transfer_ends[t],
        };
        match &instrs[pc] {
            Instr::Compute(c) => {
                let state = &mut ranks[r];
                let ready = deps[r][pc].iter().map(|d| ready_of(state, d)).fold(0.0, f64::max);
                let (start, free, outputs_ready, compute, exposed) = if c.units.is_empty() {
                    let (compute, exposed) = cost.time(&c.passes);
                    let start = state.compute_free.max(ready);
                    let end = start + compute + exposed;
                    (start, end, end, compute, exposed)
                } else {
                    let mut tp = TpStream { instr: pc, free: &mut state.tp_free, spans: &mut state.collectives };
                    run_units(c, cost, state.compute_free.max(ready), &mut tp)
                };
                state.spans.push(Span { instr: pc, stream: Stream::Compute, start, end: free, exposed });
                state.busy += compute + exposed;
                state.exposed += exposed;
                state.compute_free = free;
                state.ends.push(outputs_ready);
                state.pc += 1;
            }
            Instr::Free { .. } => {
                ranks[r].ends.push(0.0);
                ranks[r].pc += 1;
            }
            Instr::Reduce { stages } => {
                // The weight gradients are complete once the compute stream drains.
                let arrival = ranks[r].compute_free.max(ranks[r].reduced_until);
                let Some((last, others)) = reductions.arrive(program, stages, r, arrival) else { break };
                let end = last + if others.is_empty() { 0.0 } else { cost.reduce };
                let state = &mut ranks[r];
                state.reduced_until = end;
                state.spans.push(Span { instr: pc, stream: Stream::Comm, start: last, end, exposed: 0.0 });
                state.ends.push(end);
                state.pc += 1;
                woken.extend(others);
            }
            Instr::Comm(ops) => {
                if !ranks[r].posted {
                    let first = index.starts[r][pc];
                    let state = &mut ranks[r];
                    state.group.clear();
                    for (slot, t) in ops.iter().enumerate() {
                        let info = index.infos[r][first + slot];
                        let ready = match t.dir {
                            Direction::Send => deps[r][pc]
                                .iter()
                                .filter(
                                    |d| matches!(d, Dep::Instr(i) if instrs[*i].writes(chain).any(|b| b == t.buffer)),
                                )
                                .map(|d| ready_of(state, d))
                                .fold(0.0, f64::max),
                            Direction::Recv => 0.0,
                        };
                        let at = state.comm_free[t.peer.index()].max(ready);
                        state.group.push((info.link, info.seq, t.dir, at, None));
                        let link = &mut links[info.link as usize];
                        let waiting = match t.dir {
                            Direction::Send => &mut link.waiting_sends,
                            Direction::Recv => &mut link.waiting_recvs,
                        };
                        waiting.push((info.seq, Posted { rank: r, slot, at, ready }));
                    }
                    state.posted = true;
                }
                // Complete every transfer whose partner is posted, in link order.
                let mut progress = true;
                while progress {
                    progress = false;
                    for slot in 0..ranks[r].group.len() {
                        let (link_id, seq, dir, at, done) = ranks[r].group[slot];
                        if done.is_some() {
                            continue;
                        }
                        if dir == Direction::Send && semantics == Semantics::Buffered {
                            // Done once posted; the receiver matches it later.
                            complete(ranks, index, program, r, slot, at);
                            woken.push(program.ranks[r].instrs[pc].transfers()[slot].peer.index());
                            progress = true;
                            continue;
                        }
                        let link = &mut links[link_id as usize];
                        if link.done != seq {
                            continue;
                        }
                        let theirs = match dir {
                            Direction::Send => &mut link.waiting_recvs,
                            Direction::Recv => &mut link.waiting_sends,
                        };
                        let Some(i) = theirs.iter().position(|(s, _)| *s == seq) else { continue };
                        let other = theirs.swap_remove(i).1;
                        let mine = match dir {
                            Direction::Send => &mut link.waiting_sends,
                            Direction::Recv => &mut link.waiting_recvs,
                        };
                        let own = mine.iter().position(|(s, _)| *s == seq).map(|j| mine.swap_remove(j).1);
                        let own = own.unwrap_or(Posted { rank: r, slot, at, ready: 0.0 });
                        let (sender, receiver) = match dir {
                            Direction::Send => (own, other),
                            Direction::Recv => (other, own),
                        };
                        note_held(ranks, sender, receiver);
                        let end = at.max(other.at).max(link.last_end) + cost.p2p;
                        link.last_end = end;
                        link.done += 1;
                        complete(ranks, index, program, r, slot, end);
                        // A buffered send completed when it was posted.
                        if semantics == Semantics::Rendezvous {
                            complete(ranks, index, program, other.rank, other.slot, end);
                            if other.rank != r {
                                woken.push(other.rank);
                            }
                        }
                        progress = true;
                    }
                }
                let state = &mut ranks[r];
                if state.group.iter().any(|g| g.4.is_none()) {
                    break;
                }
                let start = state.group.iter().map(|g| g.3).fold(f64::INFINITY, f64::min);
                let end = state.group.iter().filter_map(|g| g.4).fold(start, f64::max);
                state.spans.push(Span { instr: pc, stream: Stream::Comm, start, end, exposed: 0.0 });
                state.ends.push(end);
                state.posted = false;
                state.pc += 1;
            }
        }
    }
    woken
}

/// Records a transfer posted later than it could have been because a
/// stream to the peer was busy: the receive after its send (receives are
/// otherwise posted at once), or the send after both its data and its
/// receive were ready.
fn note_held(ranks: &mut [RankState], sender: Posted, receiver: Posted) {
    const EPS: f64 = 1e-9;
    if receiver.at > sender.at + EPS {
        let pc = ranks[receiver.rank].pc;
        ranks[receiver.rank].held.push((pc, Rank(sender.rank as u32)));
    } else if sender.at > sender.ready + EPS && sender.at > receiver.at + EPS {
        let pc = ranks[sender.rank].pc;
        ranks[sender.rank].held.push((pc, Rank(receiver.rank as u32)));
    }
}

/// Marks slot `slot` of rank `r`'s current group complete at `end`.
fn complete(ranks: &mut [RankState], index: &TransferIndex, program: &Program, r: usize, slot: usize, end: f64) {
    let state = &mut ranks[r];
    state.group[slot].4 = Some(end);
    let flat = index.starts[r][state.pc] + slot;
    state.transfer_ends[flat] = end;
    let peer = program.ranks[r].instrs[state.pc].transfers()[slot].peer;
    state.comm_free[peer.index()] = end;
}
