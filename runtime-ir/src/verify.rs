//! Structural invariants of a [`Program`], checked before anything runs it.
//!
//! [`verify`] establishes, and reports every violation of:
//!
//! 1. shape: `ranks[i].rank == Rank(i)`, `num_ranks == ranks.len()`, at
//!    least one stage and microbatch, `placement.len() == num_stages`, every
//!    placement and peer in range, no rank sends to or receives from itself;
//! 2. ids in range: every stage and microbatch an instruction names exists;
//! 3. ownership: every compute pass runs on the rank that owns its stage;
//!    a compute instruction holds one or two passes;
//! 4. transfers: only activations and gradients travel, from the rank that
//!    owns the producing stage to the rank that owns the consuming stage;
//! 5. matching: every send has exactly one matching receive on the peer and
//!    vice versa, and on each directed link the sends and the receives come
//!    in the same order (point-to-point messages match in posting order, as
//!    in NCCL, so a different order would deliver the wrong tensor);
//! 6. buffer lifetime: on each rank every buffer an instruction reads is
//!    live, no buffer is made live twice, every buffer is freed exactly once
//!    and none is live at the end;
//! 7. coverage: every (stage, microbatch) runs exactly one `F` and either
//!    one `BW` or one `B` and one `W` — so an executor cannot silently
//!    leave a gradient out;
//! 8. pass order on a rank: a `W` runs in a later instruction than its own
//!    `B` (which leaves behind what `W` needs), and the two passes of a
//!    braided compute are independent: not of one (stage, microbatch), and
//!    neither reads a buffer the other writes;
//! 9. pipelines: the stages split evenly into `pipelines` chains, every
//!    microbatch has a route to one of them (and passes only through its
//!    stages), and with more than one, every rank that owns a copy of a
//!    model part runs one [`Instr::Reduce`] over all its copies, after its
//!    last backward of them.

use crate::ids::{Buffer, BufferKind, Rank, Stage};
use crate::program::{units_of, Collective, Compute, Direction, Instr, Part, Pass, PassKind, Program, Transfer};
use crate::slots::BufferSlots;
use crate::slots::FastMap;
use std::fmt;

/// One violated invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// The rank whose program is at fault, if one is.
    pub rank: Option<Rank>,
    /// The index of the offending instruction in that rank's program.
    pub instr: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rank, self.instr) {
            (Some(rank), Some(i)) => write!(f, "{rank} instruction {i}: {}", self.message),
            (Some(rank), None) => write!(f, "{rank}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Check every structural invariant listed in the module docs. Returns all
/// violations found, in rank and instruction order.
pub fn verify(program: &Program) -> Result<(), Vec<VerifyError>> {
    let mut v = Verifier { program, errors: Vec::new() };
    v.check_shape();
    if v.errors.is_empty() {
        v.errors = check_ranks(program);
        v.check_matching();
        v.check_coverage();
        v.check_reductions();
    }
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(v.errors)
    }
}

/// Invariants 2, 3, 6 and 8 for every rank, in rank order.
fn check_ranks(program: &Program) -> Vec<VerifyError> {
    let check = |ranks: &[crate::RankProgram]| {
        let meta = &program.schedule;
        let mut v = Verifier { program, errors: Vec::new() };
        let mut state = RankState::new(meta.num_stages, meta.num_microbatches);
        for rank in ranks {
            v.check_instructions(rank.rank, &rank.instrs, &mut state);
        }
        v.errors
    };
    crate::slots::on_rank_halves(&program.ranks, check).concat()
}

/// One rank's bookkeeping while its instructions are checked: each
/// buffer's life, and per (stage, microbatch) whether its input gradient
/// is done and whether a backward has started (kept in the pair's stash
/// slot: these are facts about the pair, not about a buffer).
struct RankState {
    buffers: BufferSlots<Life>,
    pairs: BufferSlots<u8>,
}

const INPUT_GRADIENT_DONE: u8 = 1;
const BACKWARD_STARTED: u8 = 2;

impl RankState {
    fn new(num_stages: u32, num_microbatches: u32) -> RankState {
        RankState {
            buffers: BufferSlots::new(num_stages, num_microbatches),
            pairs: BufferSlots::new(num_stages, num_microbatches),
        }
    }

    fn reset(&mut self) {
        self.buffers.reset();
        self.pairs.reset();
    }

    fn has(&self, pass: &Pass, flag: u8) -> bool {
        self.pairs.get(Buffer::stash(pass.stage, pass.mb)) & flag != 0
    }

    fn mark(&mut self, pass: &Pass, flag: u8) {
        let key = Buffer::stash(pass.stage, pass.mb);
        let flags = self.pairs.get(key);
        self.pairs.set(key, flags | flag);
    }
}

/// Where a buffer is in its life on one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Life {
    #[default]
    Unseen,
    Live,
    Dead,
}

struct Verifier<'a> {
    program: &'a Program,
    errors: Vec<VerifyError>,
}

impl Verifier<'_> {
    fn error(&mut self, rank: Option<Rank>, instr: Option<usize>, message: String) {
        self.errors.push(VerifyError { rank, instr, message });
    }

    fn check_shape(&mut self) {
        let meta = &self.program.schedule;
        if meta.num_ranks as usize != self.program.ranks.len() {
            self.error(
                None,
                None,
                format!("num_ranks is {} but there are {} rank programs", meta.num_ranks, self.program.ranks.len()),
            );
        }
        if meta.tp == 0 {
            self.error(None, None, "the tensor-parallel size must be at least 1".into());
        }
        if meta.num_stages == 0 || meta.num_microbatches == 0 {
            self.error(None, None, "a program needs at least one stage and one microbatch".into());
        }
        if meta.pipelines == 0 || !meta.num_stages.is_multiple_of(meta.pipelines.max(1)) {
            self.error(
                None,
                None,
                format!("{} stages do not split into {} pipelines of equal length", meta.num_stages, meta.pipelines),
            );
        }
        if meta.pipelines > 1 && meta.routes.len() != meta.num_microbatches as usize {
            self.error(
                None,
                None,
                format!(
                    "with {} pipelines every microbatch needs a route: {} routes for {} microbatches",
                    meta.pipelines,
                    meta.routes.len(),
                    meta.num_microbatches
                ),
            );
        }
        if meta.pipelines <= 1 && !meta.routes.is_empty() {
            self.error(None, None, "routes are given, but there is one pipeline".into());
        }
        if let Some((i, r)) = meta.routes.iter().enumerate().find(|(_, r)| **r >= meta.pipelines) {
            self.error(None, None, format!("mb{i} is routed to pipeline {r}, but there are {}", meta.pipelines));
        }
        if meta.placement.len() != meta.num_stages as usize {
            self.error(
                None,
                None,
                format!("placement names {} stages but num_stages is {}", meta.placement.len(), meta.num_stages),
            );
        }
        // Coverage needs a forward of every (stage, microbatch): a program
        // claiming more than its passes can cover is refused before any
        // table of that size is allocated (a 10 KB file may claim 4·10⁹).
        let passes: u64 = self.program.ranks.iter().flat_map(|r| &r.instrs).map(|i| i.passes().len() as u64).sum();
        let per_route = u64::from(meta.num_stages / meta.pipelines.max(1));
        let claimed = per_route * u64::from(meta.num_microbatches);
        if claimed > passes {
            self.error(
                None,
                None,
                format!(
                    "{per_route} stages × {} microbatches need at least {claimed} forwards, but the program has {passes} passes",
                    meta.num_microbatches
                ),
            );
        }
        for (s, rank) in meta.placement.iter().enumerate() {
            if rank.0 >= meta.num_ranks {
                self.error(None, None, format!("stage s{s} is placed on {rank}, which does not exist"));
            }
        }
        for (i, rank) in self.program.ranks.iter().enumerate() {
            if rank.rank.index() != i {
                self.error(None, None, format!("rank program {i} is labelled {}", rank.rank));
            }
        }
    }

    fn check_instructions(&mut self, rank: Rank, instrs: &[Instr], state: &mut RankState) {
        let chain = self.program.schedule.chain();
        state.reset();
        for (i, instr) in instrs.iter().enumerate() {
            let before = self.errors.len();
            self.check_ids(rank, i, instr);
            if self.errors.len() > before {
                continue;
            }
            if let Instr::Compute(c) = instr {
                self.check_pass_order(rank, i, c, state);
                for r in c.passes.iter().filter(|p| p.kind == PassKind::R) {
                    if state.has(r, BACKWARD_STARTED) {
                        self.error(Some(rank), Some(i), format!("`{r}` runs after the backward it restores for"));
                    }
                }
                for p in &c.passes {
                    match p.kind {
                        PassKind::B => state.mark(p, INPUT_GRADIENT_DONE | BACKWARD_STARTED),
                        PassKind::BW => state.mark(p, BACKWARD_STARTED),
                        _ => {}
                    }
                }
            }
            let state = &mut state.buffers;
            for buffer in instr.reads(chain) {
                let why = match state.get(buffer) {
                    Life::Live => continue,
                    Life::Dead => "already freed",
                    Life::Unseen => "never made live",
                };
                self.error(Some(rank), Some(i), format!("`{instr}` reads {buffer}, which is {why}"));
            }
            for buffer in instr.writes(chain) {
                if state.get(buffer) != Life::Unseen {
                    self.error(Some(rank), Some(i), format!("`{instr}` makes {buffer} live a second time"));
                }
                state.set(buffer, Life::Live);
            }
            if let Instr::Free { buffer } = instr {
                match state.get(*buffer) {
                    Life::Live => state.set(*buffer, Life::Dead),
                    Life::Dead => self.error(Some(rank), Some(i), format!("{buffer} is freed twice")),
                    Life::Unseen => self.error(Some(rank), Some(i), format!("{buffer} is freed before it is live")),
                }
            }
        }
        let mut leaked: Vec<Buffer> =
            state.buffers.entries().filter(|(_, life)| *life == Life::Live).map(|(b, _)| b).collect();
        leaked.sort();
        for buffer in leaked {
            self.error(Some(rank), None, format!("{buffer} is never freed"));
        }
    }

    /// Invariant 8 for one compute: every `W` after its `B`, and the passes
    /// of a braid independent of each other.
    fn check_pass_order(&mut self, rank: Rank, i: usize, c: &Compute, state: &RankState) {
        for w in c.passes.iter().filter(|p| p.kind == PassKind::W) {
            if !state.has(w, INPUT_GRADIENT_DONE) {
                self.error(Some(rank), Some(i), format!("`{w}` runs before `B {} {}` has finished", w.stage, w.mb));
            }
        }
        let [a, b] = c.passes.as_slice() else { return };
        let chain = self.program.schedule.chain();
        let depends = |x: &Pass, y: &Pass| x.reads(chain).any(|r| y.writes(chain).any(|w| w == r));
        if (a.stage, a.mb) == (b.stage, b.mb) {
            self.error(Some(rank), Some(i), format!("`{c}` braids two passes of {} {}", a.stage, a.mb));
        } else if depends(a, b) || depends(b, a) {
            self.error(Some(rank), Some(i), format!("`{c}` braids two passes where one needs the other's output"));
        }
    }

    fn check_ids(&mut self, rank: Rank, i: usize, instr: &Instr) {
        let meta = &self.program.schedule;
        let stage_ok = |s: Stage| s.0 < meta.num_stages;
        match instr {
            Instr::Compute(c) => {
                if c.passes.is_empty() || c.passes.len() > 2 {
                    self.error(
                        Some(rank),
                        Some(i),
                        format!("a compute holds one or two passes, not {}", c.passes.len()),
                    );
                }
                if let Some(problem) = unit_problem(c, meta.tp) {
                    self.error(Some(rank), Some(i), format!("`{c}`: {problem}"));
                }
                for pass in &c.passes {
                    if !stage_ok(pass.stage) || pass.mb.0 >= meta.num_microbatches {
                        self.error(Some(rank), Some(i), format!("`{pass}` names a stage or microbatch out of range"));
                    } else if !meta.on_route(pass.stage, pass.mb) {
                        self.error(Some(rank), Some(i), off_route(pass, meta));
                    } else if meta.owner(pass.stage) != Some(rank) {
                        let owner = meta.placement[pass.stage.index()];
                        self.error(
                            Some(rank),
                            Some(i),
                            format!("`{pass}` runs on {rank}, but {} is owned by {owner}", pass.stage),
                        );
                    }
                }
            }
            Instr::Comm(ops) => {
                if ops.is_empty() {
                    self.error(Some(rank), Some(i), "a communication group holds no transfer".into());
                }
                for t in ops {
                    self.check_transfer(rank, i, t);
                }
            }
            Instr::Free { buffer } => {
                if !stage_ok(buffer.stage) || buffer.mb.0 >= meta.num_microbatches {
                    self.error(Some(rank), Some(i), format!("`{instr}` names a stage or microbatch out of range"));
                }
            }
            Instr::Reduce { stages } => {
                if !meta.copy_sets().contains(stages) {
                    let len = meta.chain().len;
                    self.error(
                        Some(rank),
                        Some(i),
                        format!(
                            "`{instr}` does not name the copies of one model part: with {} pipelines of {len} stages \
                             part k's copies are sk, s(k+{len}), ...",
                            meta.pipelines
                        ),
                    );
                } else if !meta.owners(stages).contains(&rank) {
                    self.error(Some(rank), Some(i), format!("`{instr}` runs on {rank}, which owns none of its stages"));
                }
            }
        }
    }

    /// Invariant 9's reductions: on every rank, each copy set it owns a
    /// stage of is reduced exactly once, after its last backward there.
    fn check_reductions(&mut self) {
        let meta = &self.program.schedule;
        let sets = meta.copy_sets();
        for rank in &self.program.ranks {
            for set in &sets {
                if !meta.owners(set).contains(&rank.rank) {
                    continue;
                }
                let at: Vec<usize> = (rank.instrs.iter().enumerate())
                    .filter(|(_, ins)| matches!(ins, Instr::Reduce { stages } if stages == set))
                    .map(|(i, _)| i)
                    .collect();
                let name = Instr::Reduce { stages: set.clone() };
                match at.as_slice() {
                    [] => self.error(
                        Some(rank.rank),
                        None,
                        format!("`{name}` never runs: the copies' gradients are never summed"),
                    ),
                    [i] => {
                        let late = rank.instrs[*i..].iter().flat_map(Instr::passes).find(|p| {
                            set.contains(&p.stage) && matches!(p.kind, PassKind::B | PassKind::W | PassKind::BW)
                        });
                        if let Some(p) = late {
                            self.error(
                                Some(rank.rank),
                                Some(*i),
                                format!("`{name}` runs before `{p}`, whose gradient it must sum"),
                            );
                        }
                    }
                    [_, second, ..] => self.error(Some(rank.rank), Some(*second), format!("`{name}` runs twice")),
                }
            }
        }
    }

    fn check_transfer(&mut self, rank: Rank, i: usize, t: &Transfer) {
        let meta = &self.program.schedule;
        let buffer = t.buffer;
        if buffer.stage.0 >= meta.num_stages || buffer.mb.0 >= meta.num_microbatches {
            self.error(Some(rank), Some(i), format!("`{t}` names a stage or microbatch out of range"));
            return;
        }
        if t.peer.0 >= meta.num_ranks || t.peer == rank {
            self.error(Some(rank), Some(i), format!("`{t}` names peer {}, which is not another rank", t.peer));
            return;
        }
        let (sender, receiver) = t.link(rank);
        match self.transfer_route(buffer) {
            Some(route) if route == (sender, receiver) => {}
            Some((from, to)) => self.error(
                Some(rank),
                Some(i),
                format!("`{t}`: {buffer} travels from {from} to {to}, not from {sender} to {receiver}"),
            ),
            None => self.error(Some(rank), Some(i), format!("`{t}`: {buffer} is never transferred")),
        }
    }

    fn check_coverage(&mut self) {
        let meta = &self.program.schedule;
        let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
        let slot = |p: &Pass| {
            let kind = PassKind::ALL.iter().position(|k| *k == p.kind).unwrap_or(0);
            (kind * stages + p.stage.index()) * mbs + p.mb.index()
        };
        let mut counts = vec![0u32; PassKind::ALL.len() * stages * mbs];
        for rank in &self.program.ranks {
            for instr in &rank.instrs {
                for p in instr.passes() {
                    if p.stage.index() < stages && p.mb.index() < mbs {
                        counts[slot(p)] += 1;
                    }
                }
            }
        }
        for s in 0..stages {
            for m in 0..mbs {
                if !meta.on_route(Stage(s as u32), crate::Microbatch(m as u32)) {
                    continue;
                }
                let pass = |kind| Pass { kind, stage: crate::Stage(s as u32), mb: crate::Microbatch(m as u32) };
                let n = |kind| counts[slot(&pass(kind))];
                let backward = (n(PassKind::BW), n(PassKind::B), n(PassKind::W));
                if n(PassKind::F) != 1 {
                    self.error(None, None, format!("`{}` runs {} times, not once", pass(PassKind::F), n(PassKind::F)));
                }
                if n(PassKind::R) > 1 {
                    self.error(
                        None,
                        None,
                        format!("`{}` runs {} times, at most once", pass(PassKind::R), n(PassKind::R)),
                    );
                }
                if backward != (1, 0, 0) && backward != (0, 1, 1) {
                    self.error(
                        None,
                        None,
                        format!(
                            "s{s} mb{m} runs BW {} times, B {} times and W {} times: it needs one BW, or one B and one W",
                            backward.0, backward.1, backward.2
                        ),
                    );
                }
            }
        }
    }

    /// The (producer, consumer) ranks a buffer travels between, if it
    /// travels at all.
    fn transfer_route(&self, buffer: Buffer) -> Option<(Rank, Rank)> {
        let meta = &self.program.schedule;
        let chain = meta.chain();
        let consumer_stage = match buffer.kind {
            BufferKind::Act => chain.next(buffer.stage)?,
            BufferKind::Grad => chain.prev(buffer.stage)?,
            BufferKind::Stash => return None,
        };
        let from = meta.owner(buffer.stage)?;
        let to = meta.owner(consumer_stage)?;
        (from != to).then_some((from, to))
    }

    fn check_matching(&mut self) {
        // Per directed link, the buffers in posting order, with where each was posted.
        type Posts = Vec<(Buffer, usize)>;
        let mut sends: FastMap<(Rank, Rank), Posts> = FastMap::default();
        let mut recvs: FastMap<(Rank, Rank), Posts> = FastMap::default();
        for rank in &self.program.ranks {
            for (i, instr) in rank.instrs.iter().enumerate() {
                for t in instr.transfers() {
                    let posts = match t.dir {
                        Direction::Send => &mut sends,
                        Direction::Recv => &mut recvs,
                    };
                    posts.entry(t.link(rank.rank)).or_default().push((t.buffer, i));
                }
            }
        }
        let mut links: Vec<(Rank, Rank)> = sends.keys().chain(recvs.keys()).copied().collect();
        links.sort();
        links.dedup();
        let empty = Vec::new();
        for (from, to) in links {
            let s = sends.get(&(from, to)).unwrap_or(&empty);
            let r = recvs.get(&(from, to)).unwrap_or(&empty);
            let same = s.len() == r.len() && s.iter().zip(r).all(|(a, b)| a.0 == b.0);
            if same {
                continue;
            }
            let unmatched_before = self.errors.len();
            self.report_unmatched(s, r, from, to, "send", "receive on");
            self.report_unmatched(r, s, to, from, "recv", "send from");
            if self.errors.len() > unmatched_before {
                continue;
            }
            if let Some(k) = s.iter().zip(r).position(|(a, b)| a.0 != b.0) {
                self.error(
                    Some(to),
                    Some(r[k].1),
                    format!(
                        "on link {from}->{to} message {} is {} but the receiver expects {}: sends and receives must be posted in the same order",
                        k + 1,
                        s[k].0,
                        r[k].0
                    ),
                );
            }
        }
    }

    /// Reports each post in `mine` (on rank `me`) with no counterpart in `theirs`.
    fn report_unmatched(
        &mut self,
        mine: &[(Buffer, usize)],
        theirs: &[(Buffer, usize)],
        me: Rank,
        peer: Rank,
        what: &str,
        missing: &str,
    ) {
        let mut counts: FastMap<Buffer, i64> = FastMap::default();
        for (b, _) in theirs {
            *counts.entry(*b).or_default() += 1;
        }
        for (b, i) in mine {
            let c = counts.entry(*b).or_default();
            *c -= 1;
            if *c < 0 {
                self.error(Some(me), Some(*i), format!("{what} of {b} has no matching {missing} {peer}"));
            }
        }
    }
}

/// Why `pass` may not run: its microbatch's route does not pass its stage.
fn off_route(pass: &Pass, meta: &crate::ScheduleMeta) -> String {
    let stages: Vec<Stage> = meta.stages_of(pass.mb).collect();
    let (first, last) = (stages.first().copied().unwrap_or(Stage(0)), stages.last().copied().unwrap_or(Stage(0)));
    format!(
        "`{pass}`: {} flows through pipeline {} ({first}-{last}), not through {}",
        pass.mb,
        meta.route(pass.mb),
        pass.stage
    )
}

/// What is wrong with a compute's unit list, if anything: without tensor
/// parallelism there is none; with it, every pass's units appear in the
/// order `units_of` gives, with their collectives, and nothing else does.
fn unit_problem(c: &Compute, tp: u32) -> Option<String> {
    if tp <= 1 {
        return (!c.units.is_empty()).then(|| "units listed, but the program has no tensor parallelism".to_string());
    }
    if c.units.is_empty() {
        return Some(format!("with tensor parallelism (tp = {tp}) a compute lists its units"));
    }
    if let Some(u) = c.units.iter().find(|u| u.pass as usize >= c.passes.len()) {
        return Some(format!("unit of pass {} but there are {} passes", u.pass, c.passes.len()));
    }
    for (i, pass) in c.passes.iter().enumerate() {
        let mine: Vec<(Part, bool)> =
            c.units.iter().filter(|u| u.pass as usize == i).map(|u| (u.part, u.collective.is_some())).collect();
        let kinds: Vec<Collective> = c.units.iter().filter_map(|u| u.collective).collect();
        if kinds.windows(2).any(|w| w[0] != w[1]) {
            return Some("all-reduces and sequence-parallel collectives are mixed in one compute".to_string());
        }
        if mine.as_slice() != units_of(pass.kind) {
            let want: Vec<&str> = units_of(pass.kind).iter().map(|(p, _)| p.as_str()).collect();
            return Some(format!(
                "the units of `{pass}` must be {} in that order, each with its all-reduce",
                want.join(", ")
            ));
        }
    }
    None
}
