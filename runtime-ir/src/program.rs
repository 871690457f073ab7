//! The instruction stream: programs, rank programs, instructions and the
//! dataflow rules that say which buffers each compute pass reads and writes.

use crate::ids::{Buffer, Microbatch, Rank, Stage};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The version of the IR format this crate reads and writes. Readers refuse
/// any other version (see [`crate::load_json`] and [`crate::parse_text`]).
pub const FORMAT_VERSION: u32 = 1;

/// A whole pipeline program: one instruction stream per rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// Format version; always [`FORMAT_VERSION`] for programs this crate built.
    pub version: u32,
    /// Where the program came from and the shape of the pipeline.
    pub schedule: ScheduleMeta,
    /// One program per rank; `ranks[i].rank == Rank(i)`.
    pub ranks: Vec<RankProgram>,
}

/// The pipeline's shape and the schedule that produced the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleMeta {
    /// The schedule's name (e.g. `1f1b`).
    pub name: String,
    /// The parameter values the schedule was compiled with, in declaration order.
    pub params: Vec<Param>,
    /// Number of pipeline ranks; equals `Program::ranks.len()`.
    pub num_ranks: u32,
    /// Number of pipeline stages (model chunks); at least 1.
    pub num_stages: u32,
    /// Number of microbatches per training step; at least 1.
    pub num_microbatches: u32,
    /// `placement[s]` is the rank that owns stage `s`; its length is `num_stages`.
    pub placement: Vec<Rank>,
    /// Tensor-parallel group size behind every pipeline rank; 1 (the
    /// default, omitted from both forms) without tensor parallelism. With
    /// more, every compute lists its [`Unit`]s.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub tp: u32,
    /// Number of pipelines (model copies) the stages form; 1 (the default,
    /// omitted from both forms) for one chain of stages. With `n`, stages
    /// split into `n` consecutive chains of `num_stages / n`: stage `s` is
    /// part `s % len` of copy `s / len` of the model, and the copies of a
    /// part share their weights (their gradients are summed by
    /// [`Instr::Reduce`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub pipelines: u32,
    /// With several pipelines, `routes[i]` is the pipeline microbatch `i`
    /// flows through (its `len` stages, first to last, then back); empty
    /// with one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<u32>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl ScheduleMeta {
    /// The rank that owns `stage`, or `None` when the stage is out of range.
    pub fn owner(&self, stage: Stage) -> Option<Rank> {
        self.placement.get(stage.index()).copied()
    }

    /// The chains the stages form (see [`Chain`]).
    pub fn chain(&self) -> Chain {
        Chain { len: (self.num_stages / self.pipelines.max(1)).max(1) }
    }

    /// How many distinct model parts the stages compute: the stages of one
    /// pipeline (all of them with one).
    pub fn parts(&self) -> u32 {
        self.chain().len
    }

    /// The pipeline microbatch `mb` flows through (0 with one pipeline).
    pub fn route(&self, mb: Microbatch) -> u32 {
        self.routes.get(mb.index()).copied().unwrap_or(0)
    }

    /// The stages microbatch `mb` flows through, first to last.
    pub fn stages_of(&self, mb: Microbatch) -> impl Iterator<Item = Stage> {
        let len = self.chain().len;
        let first = self.route(mb) * len;
        (first..first + len).map(Stage)
    }

    /// Whether microbatch `mb` flows through `stage`.
    pub fn on_route(&self, stage: Stage, mb: Microbatch) -> bool {
        self.pipelines <= 1 || stage.0 / self.chain().len == self.route(mb)
    }

    /// The passes the program must run exactly once for every microbatch
    /// on its route: the (stage, microbatch) pairs, stage-major.
    pub fn pairs(&self) -> impl Iterator<Item = (Stage, Microbatch)> + '_ {
        (0..self.num_stages).map(Stage).flat_map(move |s| {
            (0..self.num_microbatches).map(Microbatch).filter(move |i| self.on_route(s, *i)).map(move |i| (s, i))
        })
    }

    /// The microbatches that flow through `stage`, ascending.
    pub fn pairs_of(&self, stage: Stage) -> impl Iterator<Item = Microbatch> + '_ {
        (0..self.num_microbatches).map(Microbatch).filter(move |i| self.on_route(stage, *i))
    }

    /// The sets of stages that are copies of one model part and sit on
    /// more than one stage, in part order: each is the subject of one
    /// [`Instr::Reduce`] on every rank that owns one of its stages. Empty
    /// with one pipeline.
    pub fn copy_sets(&self) -> Vec<Vec<Stage>> {
        if self.pipelines <= 1 {
            return Vec::new();
        }
        let len = self.chain().len;
        (0..len).map(|part| (0..self.pipelines).map(|j| Stage(j * len + part)).collect()).collect()
    }

    /// The ranks that own a stage of `stages`, ascending, each once.
    pub fn owners(&self, stages: &[Stage]) -> Vec<Rank> {
        let mut ranks: Vec<Rank> = stages.iter().filter_map(|s| self.owner(*s)).collect();
        ranks.sort();
        ranks.dedup();
        ranks
    }
}

/// How stages chain into pipelines: stages `k·len .. (k+1)·len` are one
/// pipeline, first to last. With one pipeline `len` is the number of
/// stages. Every "the stage before / after / the last stage" rule of the
/// dataflow goes through here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// Stages per pipeline; at least 1.
    pub len: u32,
}

impl Chain {
    /// One pipeline of `num_stages` stages.
    pub fn single(num_stages: u32) -> Chain {
        Chain { len: num_stages.max(1) }
    }

    /// Whether `stage` is the first of its pipeline (fed by the data loader).
    pub fn is_first(self, stage: Stage) -> bool {
        stage.0.is_multiple_of(self.len)
    }

    /// Whether `stage` is the last of its pipeline (where the loss is).
    pub fn is_last(self, stage: Stage) -> bool {
        (stage.0 + 1).is_multiple_of(self.len)
    }

    /// The stage before `stage` in its pipeline.
    pub fn prev(self, stage: Stage) -> Option<Stage> {
        (!self.is_first(stage)).then(|| Stage(stage.0 - 1))
    }

    /// The stage after `stage` in its pipeline.
    pub fn next(self, stage: Stage) -> Option<Stage> {
        (!self.is_last(stage)).then(|| Stage(stage.0 + 1))
    }

    /// The model part `stage` computes (its position in its pipeline).
    pub fn part(self, stage: Stage) -> u32 {
        stage.0 % self.len
    }
}

/// One named parameter value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// The parameter's name in the schedule (`p`, `m`, `v`, ...).
    pub name: String,
    /// Its value.
    pub value: i64,
}

/// The instructions one rank's host thread issues, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankProgram {
    /// The rank that runs this program.
    pub rank: Rank,
    /// Instructions in issue order.
    pub instrs: Vec<Instr>,
}

impl RankProgram {
    /// The (stage, microbatch) pairs this rank recomputes (runs an `R`
    /// for): their forwards keep only their input in the stash.
    pub fn recomputed(&self) -> std::collections::HashSet<(Stage, Microbatch)> {
        self.instrs.iter().flat_map(Instr::passes).filter(|p| p.kind == PassKind::R).map(|p| (p.stage, p.mb)).collect()
    }
}

/// One instruction. See the crate docs for streams and ordering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Instr {
    /// Run compute passes on the compute stream.
    Compute(Compute),
    /// Post point-to-point transfers together on the communication stream
    /// (one NCCL group): none of them waits for another, and the
    /// instruction completes when all of them have. Never empty.
    Comm(Vec<Transfer>),
    /// Release a buffer once every earlier instruction that uses it is done.
    Free {
        /// The buffer released; it must be live.
        buffer: Buffer,
    },
    /// With several pipelines: sum the weight gradients of the copies of
    /// one model part (`stages`, every copy, ascending) over every rank that
    /// owns one of them, a collective (an all-reduce over those ranks; a
    /// local sum when one rank owns them all). Afterwards each owner holds
    /// the part's gradient over every microbatch of every copy. Every owner
    /// issues it once, after its last backward of those stages.
    Reduce {
        /// The copies of the part, ascending.
        stages: Vec<Stage>,
    },
}

/// Which way a transfer goes, seen from the rank that posts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Send a live buffer to the peer; it stays live here until freed.
    Send,
    /// Receive a buffer from the peer; it becomes live when the data has
    /// arrived, and must not be live here already.
    Recv,
}

/// One point-to-point transfer of a [`Instr::Comm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transfer {
    /// Send or receive.
    pub dir: Direction,
    /// The buffer that travels.
    pub buffer: Buffer,
    /// The other rank; never the rank that posts the transfer.
    pub peer: Rank,
}

impl Transfer {
    /// A send of `buffer` to `to`.
    pub fn send(buffer: Buffer, to: Rank) -> Transfer {
        Transfer { dir: Direction::Send, buffer, peer: to }
    }

    /// A receive of `buffer` from `from`.
    pub fn recv(buffer: Buffer, from: Rank) -> Transfer {
        Transfer { dir: Direction::Recv, buffer, peer: from }
    }

    /// The directed link `(sender, receiver)` this transfer uses when
    /// posted by `rank`.
    pub fn link(&self, rank: Rank) -> (Rank, Rank) {
        match self.dir {
            Direction::Send => (rank, self.peer),
            Direction::Recv => (self.peer, rank),
        }
    }
}

impl fmt::Display for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dir {
            Direction::Send => write!(f, "send {} -> {}", self.buffer, self.peer),
            Direction::Recv => write!(f, "recv {} <- {}", self.buffer, self.peer),
        }
    }
}

/// One compute instruction: a single pass, or two passes braided together
/// (STP's `F & B`: their units interleave so one pass's collectives overlap
/// the other's compute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compute {
    /// One pass, or two for a braided pair; never empty, never more than two.
    pub passes: Vec<Pass>,
    /// With tensor parallelism: the order in which the passes' units run on
    /// the compute stream, each followed by the collective it issues on the
    /// rank's tensor-parallel stream. Each pass's units appear in the order
    /// [`units_of`] gives; a braided pair interleaves the two passes' units
    /// so that one pass's collective runs while the other's unit computes.
    /// Empty without tensor parallelism.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
}

/// One piece of a pass under tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Unit {
    /// Index of the pass in [`Compute::passes`].
    pub pass: u8,
    /// Which piece.
    pub part: Part,
    /// The collective issued when the piece is done, if any.
    pub collective: Option<Collective>,
}

/// The pieces of a transformer layer's passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// Attention, forward.
    Attention,
    /// MLP, forward.
    Mlp,
    /// MLP, gradient with respect to its input.
    MlpDgrad,
    /// Attention, gradient with respect to its input.
    AttentionDgrad,
    /// MLP, gradient with respect to its weights.
    MlpWgrad,
    /// Attention, gradient with respect to its weights.
    AttentionWgrad,
}

impl Part {
    /// The spelling in the text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Attention => "attn",
            Part::Mlp => "mlp",
            Part::MlpDgrad => "mlp-dgrad",
            Part::AttentionDgrad => "attn-dgrad",
            Part::MlpWgrad => "mlp-wgrad",
            Part::AttentionWgrad => "attn-wgrad",
        }
    }

    /// The part spelled `s`.
    pub fn from_name(s: &str) -> Option<Part> {
        [Part::Attention, Part::Mlp, Part::MlpDgrad, Part::AttentionDgrad, Part::MlpWgrad, Part::AttentionWgrad]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A tensor-parallel collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Collective {
    /// All-reduce of the unit's output over the TP group. Text form `ar`.
    AllReduce,
    /// With sequence parallelism: reduce-scatter of the unit's output along
    /// the sequence, then all-gather of the next unit's input — the same
    /// volume as an all-reduce, in two halves. Text form `rs-ag`.
    ReduceScatterAllGather,
}

impl Collective {
    /// The spelling in the text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Collective::AllReduce => "ar",
            Collective::ReduceScatterAllGather => "rs-ag",
        }
    }

    /// The collective spelled `s`.
    pub fn from_name(s: &str) -> Option<Collective> {
        [Collective::AllReduce, Collective::ReduceScatterAllGather].into_iter().find(|c| c.as_str() == s)
    }
}

/// The units of one pass, in execution order, and whether each issues an
/// all-reduce (Megatron's tensor-parallel layer: F all-reduces after
/// attention and after the MLP; the input-gradient pass after each of its
/// two GEMM groups; weight gradients need none, and a full backward runs
/// each weight gradient while the preceding all-reduce is in flight).
pub fn units_of(kind: PassKind) -> &'static [(Part, bool)] {
    match kind {
        PassKind::F | PassKind::R => &[(Part::Attention, true), (Part::Mlp, true)],
        PassKind::B => &[(Part::MlpDgrad, true), (Part::AttentionDgrad, true)],
        PassKind::W => &[(Part::MlpWgrad, false), (Part::AttentionWgrad, false)],
        PassKind::BW => &[
            (Part::MlpDgrad, true),
            (Part::MlpWgrad, false),
            (Part::AttentionDgrad, true),
            (Part::AttentionWgrad, false),
        ],
    }
}

impl Compute {
    /// A single, unbraided pass.
    pub fn single(pass: Pass) -> Compute {
        Compute { passes: vec![pass], units: Vec::new() }
    }

    /// The passes' units in the canonical order (one pass's units in turn,
    /// a braided pair's alternating), each reducing one with `collective`.
    pub fn canonical_units_with(&self, collective: Collective) -> Vec<Unit> {
        let lists: Vec<&[(Part, bool)]> = self.passes.iter().map(|p| units_of(p.kind)).collect();
        let longest = lists.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut units = Vec::new();
        for k in 0..longest {
            for (i, list) in lists.iter().enumerate() {
                if let Some(&(part, reduces)) = list.get(k) {
                    units.push(Unit { pass: i as u8, part, collective: reduces.then_some(collective) });
                }
            }
        }
        units
    }

    /// [`Compute::canonical_units_with`] all-reduces.
    pub fn canonical_units(&self) -> Vec<Unit> {
        self.canonical_units_with(Collective::AllReduce)
    }

    /// Whether this is a braided pair.
    pub fn is_braided(&self) -> bool {
        self.passes.len() > 1
    }
}

/// What a pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PassKind {
    /// Forward.
    F,
    /// Input-gradient backward (the weight gradient is left to `W`).
    B,
    /// Weight-gradient backward.
    W,
    /// Full backward: `B` and `W` in one pass.
    BW,
    /// Recompute (activation checkpointing): runs the forward of its
    /// (stage, microbatch) again from the stash to restore what the
    /// backward needs. A rank whose program recomputes a pair runs its `F`
    /// keeping only the forward's input in the stash; the `R` comes after
    /// that `F` and before the pair's `B` or `BW`, on the same rank.
    R,
}

impl PassKind {
    /// Every kind, in text-form order.
    pub const ALL: [PassKind; 5] = [PassKind::F, PassKind::B, PassKind::W, PassKind::BW, PassKind::R];

    /// The spelling in the text form and in `.sched` files.
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::F => "F",
            PassKind::B => "B",
            PassKind::W => "W",
            PassKind::BW => "BW",
            PassKind::R => "R",
        }
    }

    /// The kind spelled `s`, if any.
    pub fn from_name(s: &str) -> Option<PassKind> {
        PassKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for PassKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One compute pass of one stage over one microbatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pass {
    /// What is computed.
    pub kind: PassKind,
    /// The stage; must be owned by the rank that runs the pass.
    pub stage: Stage,
    /// The microbatch.
    pub mb: Microbatch,
}

impl Pass {
    /// The buffers this pass reads. `chain` tells which stage comes before
    /// and after, and where the loss is.
    ///
    /// - `F(s, i)` reads `act(s-1, i)` (nothing for the first stage of a
    ///   pipeline: the data loader feeds it).
    /// - `B`, `W`, `BW` of `(s, i)` read `stash(s, i)` and the output gradient:
    ///   `grad(s+1, i)`, or for the last stage its own output `act(s, i)`,
    ///   from which the loss gradient is computed.
    /// - `R` of `(s, i)` reads `stash(s, i)` (then holding the forward's
    ///   input) and restores the rest of it in place.
    pub fn reads(&self, chain: Chain) -> impl Iterator<Item = Buffer> {
        let pair = match self.kind {
            PassKind::F => [chain.prev(self.stage).map(|prev| Buffer::act(prev, self.mb)), None],
            PassKind::B | PassKind::W | PassKind::BW => {
                [Some(Buffer::stash(self.stage, self.mb)), Some(self.output_grad(chain))]
            }
            PassKind::R => [Some(Buffer::stash(self.stage, self.mb)), None],
        };
        pair.into_iter().flatten()
    }

    /// The buffers this pass creates.
    ///
    /// - `F(s, i)` writes `act(s, i)` and `stash(s, i)`.
    /// - `B` and `BW` of `(s, i)` write `grad(s, i)`, except on the first
    ///   stage of a pipeline (nothing consumes the gradient of the input data).
    /// - `W` writes nothing (weight gradients are accumulated, not buffers),
    ///   nor does `R` (it restores its stash in place).
    pub fn writes(&self, chain: Chain) -> impl Iterator<Item = Buffer> {
        let pair = match self.kind {
            PassKind::F => [Some(Buffer::act(self.stage, self.mb)), Some(Buffer::stash(self.stage, self.mb))],
            PassKind::B | PassKind::BW if !chain.is_first(self.stage) => {
                [Some(Buffer::grad(self.stage, self.mb)), None]
            }
            PassKind::B | PassKind::BW | PassKind::W | PassKind::R => [None, None],
        };
        pair.into_iter().flatten()
    }

    /// The gradient flowing into this stage's output: `grad(s+1, i)`, or the
    /// stage's own output `act(s, i)` when it is the last of its pipeline.
    pub fn output_grad(&self, chain: Chain) -> Buffer {
        match chain.next(self.stage) {
            Some(next) => Buffer::grad(next, self.mb),
            None => Buffer::act(self.stage, self.mb),
        }
    }
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.kind, self.stage, self.mb)
    }
}

impl fmt::Display for Compute {
    /// `F s0 mb3 & B s0 mb1`, then with tensor parallelism the units:
    /// ` [0.attn ar, 1.mlp-dgrad ar, ...]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pass) in self.passes.iter().enumerate() {
            if i > 0 {
                f.write_str(" & ")?;
            }
            write!(f, "{pass}")?;
        }
        if !self.units.is_empty() {
            f.write_str(" [")?;
            for (i, u) in self.units.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}.{}", u.pass, u.part.as_str())?;
                if let Some(c) = u.collective {
                    write!(f, " {}", c.as_str())?;
                }
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

impl fmt::Display for Instr {
    /// One line, except that a group of transfers prints as a block:
    /// `group {`, one transfer per line, `}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Instr::Compute(c) => write!(f, "{c}"),
            Instr::Comm(ops) if ops.len() == 1 => write!(f, "{}", ops[0]),
            Instr::Comm(ops) => {
                f.write_str("group {")?;
                for op in ops {
                    write!(f, "\n    {op}")?;
                }
                f.write_str("\n  }")
            }
            Instr::Free { buffer } => write!(f, "free {buffer}"),
            Instr::Reduce { stages } => {
                f.write_str("reduce")?;
                for s in stages {
                    write!(f, " {s}")?;
                }
                Ok(())
            }
        }
    }
}

impl Instr {
    /// A single send.
    pub fn send(buffer: Buffer, to: Rank) -> Instr {
        Instr::Comm(vec![Transfer::send(buffer, to)])
    }

    /// A single receive.
    pub fn recv(buffer: Buffer, from: Rank) -> Instr {
        Instr::Comm(vec![Transfer::recv(buffer, from)])
    }

    /// The transfers of a communication instruction (empty for others).
    pub fn transfers(&self) -> &[Transfer] {
        match self {
            Instr::Comm(ops) => ops,
            _ => &[],
        }
    }

    /// The passes of a compute instruction (empty for others).
    pub fn passes(&self) -> &[Pass] {
        match self {
            Instr::Compute(c) => &c.passes,
            _ => &[],
        }
    }

    /// The buffers this instruction reads (a send reads what it sends).
    pub fn reads(&self, chain: Chain) -> impl Iterator<Item = Buffer> + '_ {
        let sent = self.transfers().iter().filter(|t| t.dir == Direction::Send).map(|t| t.buffer);
        self.passes().iter().flat_map(move |p| p.reads(chain)).chain(sent)
    }

    /// The buffers this instruction makes live.
    pub fn writes(&self, chain: Chain) -> impl Iterator<Item = Buffer> + '_ {
        let received = self.transfers().iter().filter(|t| t.dir == Direction::Recv).map(|t| t.buffer);
        self.passes().iter().flat_map(move |p| p.writes(chain)).chain(received)
    }
}
