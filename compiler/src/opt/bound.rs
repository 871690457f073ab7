//! A lower bound on the makespan: no step ends before one microbatch has
//! gone down and back up the pipeline, and no rank before it has done its
//! work, none of it earlier than its dependencies and its memory budget
//! allow and each piece followed by what must come after it.

use crate::elab::{ComputeSchedule, MemoryModel};
use stp_ir::simulate::CostModel;

/// `max(one microbatch's forward and backward through every stage, with
/// their collectives and the transfers between ranks; per rank, the best
/// order of its passes cut into pieces)` — the latter is never below the
/// rank's total compute, nor below its earliest start plus that compute
/// plus its least tail.
pub fn lower_bound(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    if meta.pipelines > 1 {
        return pipelines_bound(s, cost);
    }
    let hops = meta.placement.windows(2).filter(|w| w[0] != w[1]).count() as f64;
    let down_and_up: f64 = (0..meta.num_stages)
        .map(|st| cost.stage(stp_ir::Stage(st)))
        .map(|t| t.forward + t.backward_input + 2.0 * t.tp_collective)
        .sum();
    let critical = down_and_up + 2.0 * hops * cost.p2p;
    critical.max(rank_floor(s, cost))
}

/// With several pipelines, the floors that hold whatever the order: one
/// microbatch's way down its pipeline and back (its longest route), and
/// per rank its compute, every pass one after another (collectives left
/// out: a braid may hide them), after the earliest its first forward can
/// start (the forwards of the stages before it on its pipeline, and their
/// transfers).
fn pipelines_bound(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    let chain = meta.chain();
    let len = chain.len;
    let hop = |a: stp_ir::Stage, b: stp_ir::Stage| if meta.owner(a) != meta.owner(b) { cost.p2p } else { 0.0 };
    let route = |j: u32| {
        let stages: Vec<stp_ir::Stage> = (j * len..(j + 1) * len).map(stp_ir::Stage).collect();
        let hops: f64 = stages.windows(2).map(|w| hop(w[0], w[1])).sum();
        let compute: f64 = stages.iter().map(|st| cost.stage(*st)).map(|t| t.forward + t.backward_input).sum();
        compute + 2.0 * hops
    };
    let used: std::collections::BTreeSet<u32> = meta.routes.iter().copied().collect();
    let critical = used.iter().copied().map(route).fold(0.0, f64::max);
    // When a microbatch can first reach each stage of a used pipeline.
    let mut head = vec![f64::INFINITY; meta.num_stages as usize];
    for j in used {
        let mut at = 0.0;
        for st in (j * len..(j + 1) * len).map(stp_ir::Stage) {
            if !chain.is_first(st) {
                at += cost.stage(stp_ir::Stage(st.0 - 1)).forward + hop(stp_ir::Stage(st.0 - 1), st);
            }
            head[st.index()] = at;
        }
    }
    let ranks = meta.num_ranks as usize;
    let mut busy = vec![0.0f64; ranks];
    let mut earliest = vec![f64::INFINITY; ranks];
    for (stage, _) in meta.pairs() {
        let t = cost.stage(stage);
        let r = meta.placement[stage.index()].index();
        busy[r] += t.forward + t.backward_input + t.backward_weight;
        earliest[r] = earliest[r].min(head[stage.index()]);
    }
    let rank_floor = (0..ranks).filter(|r| busy[*r] > 0.0).map(|r| earliest[r] + busy[r]).fold(0.0, f64::max);
    critical.max(rank_floor)
}

/// Per kind (F, B, W), per stage: a time in the bound's integer unit.
pub type PerStage = [Vec<i64>; 3];

/// Each stage's compute per kind and its TP collective, in the bound's
/// integer unit (`micro`).
pub fn stage_times(cost: &CostModel, stages: usize, micro: impl Fn(f64) -> i64) -> (PerStage, Vec<i64>) {
    let times: Vec<_> = (0..stages).map(|st| cost.stage(stp_ir::Stage(st as u32))).collect();
    let per_kind = |pick: fn(&stp_ir::simulate::StageTimes) -> f64| times.iter().map(|t| micro(pick(t))).collect();
    let dur = [per_kind(|t| t.forward), per_kind(|t| t.backward_input), per_kind(|t| t.backward_weight)];
    (dur, times.iter().map(|t| micro(t.tp_collective)).collect())
}

/// Per rank, the best it could do alone ([`preemptive_floor`]).
fn rank_floor(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    // Integer arithmetic (microunits) keeps the head/tail tables exact; the
    // unit grows where a step's whole work in microunits would come near
    // i64's range (costs up to CostModel::MAX_TIME over millions of passes).
    let per_microbatch: f64 = (0..meta.num_stages)
        .map(|st| cost.stage(stp_ir::Stage(st)))
        .map(|t| t.forward + t.backward_input + t.backward_weight + 2.0 * t.tp_collective + 2.0 * cost.p2p)
        .sum();
    let work = per_microbatch * mbs as f64;
    let scale = (1e6f64).min(2f64.powi(58) / work.max(f64::MIN_POSITIVE));
    let micro = |t: f64| (t * scale).round() as i64;
    let (dur, collective) = stage_times(cost, stages, micro);
    let lat = latencies(&dur, &collective);
    let owner = |stage: usize| meta.placement[stage].index();
    let hop = |a: usize, b: usize| if owner(a) != owner(b) { micro(cost.p2p) } else { 0 };
    // stpc's own orders never put two passes of one stage and kind in one
    // op; a hand order may (`F & F` of one stage).
    let apart = s.auto;
    // A recomputed forward holds less than its activation: the memory
    // floors, which count whole activations, would not bound such orders.
    let recomputes = s.recompute_auto
        || s.ranks.iter().flatten().any(|op| op.compute.passes.iter().any(|p| p.kind == stp_ir::PassKind::R));
    let memory = if recomputes {
        crate::elab::MemoryModel { budget: None, budgets: Vec::new(), ..s.memory.clone() }
    } else {
        s.memory.clone()
    };
    let floors = memory_floors(&meta.placement, &memory, &dur, &lat, apart, &hop, mbs);
    let (heads, tails, chains) = heads_and_tails(stages, mbs, &dur, &lat, apart, &hop, floors.as_deref());
    // In stpc's own orders a rank's first forward runs alone (every other
    // pass of the rank follows it: it is not braided with its own stage's
    // next forward), so its collective is exposed — unless, with `--tp`,
    // it overlaps the next op.
    let first_alone = if apart && s.tp_units.is_none() { collective.clone() } else { vec![0; stages] };
    let floor = preemptive_floor(&meta.placement, &heads, &tails, &dur, &first_alone);
    // Only stpc's own orders count every `B` without its `W` as deferred;
    // a hand order's cap covers only the `W`s it wrote `defer`.
    let drain = match s.memory.max_deferred {
        Some(cap) if s.auto => drain_floor(&meta.placement, &heads, &chains, &dur, &first_alone, cap),
        _ => 0,
    };
    let window = window_floor(&meta.placement, &memory, &heads, &dur, &first_alone);
    // Only stpc's own orders keep a stage's forwards in ops of their own;
    // recomputation adds partners the floor does not know.
    let warm_up = if apart && s.tp_units.is_none() && !recomputes {
        warm_up_floor(&meta.placement, &heads, &dur, &collective, &first_alone)
    } else {
        0
    };
    floor.max(drain).max(window).max(warm_up) as f64 / scale
}

/// Until a rank can start any pass but its first stage's forwards (`h`,
/// the earliest head of any other), each of its ops is one such forward
/// alone — stpc's orders never put two passes of one stage and kind in
/// one op — so each takes its compute and its whole collective: by `h`
/// the rank has done at most `⌊(h − start) / (F + AR)⌋` of them and part
/// of the next. The rest of its work follows `h`. On the interleaved
/// placement rank 0's second chunk starts only after the first microbatch
/// has crossed every rank, and its memory lets it fill that time with
/// forwards whose collectives nothing can hide.
fn warm_up_floor(
    placement: &[stp_ir::Rank],
    heads: &PerPass,
    dur: &PerStage,
    collective: &[i64],
    first_alone: &[i64],
) -> i64 {
    worst_rank(placement, |r| {
        let first = placement.iter().position(|rank| rank.index() == r)?;
        let jobs: Vec<(usize, usize, i64, i64)> = rank_passes(placement, r, heads, dur, first_alone)
            .map(|(k, st, _, head, time)| (k, st, head, time))
            .collect();
        let alone = |&(k, st, _, _): &(usize, usize, i64, i64)| (k, st) == (0, first);
        let h = jobs.iter().filter(|j| !alone(j)).map(|j| j.2).min()?;
        let start = jobs.iter().filter(|j| alone(j)).map(|j| j.2).min()?;
        let (f, ar) = (dur[0][first], collective[first]);
        if ar <= 0 || h <= start {
            return None;
        }
        let total: i64 = jobs.iter().map(|j| j.3).sum();
        let elapsed = h - start;
        let whole = elapsed / (f + ar);
        let lone = whole * f + f.min(elapsed - whole * (f + ar)) + first_alone[first];
        // Nor more than the forwards that can have started by `h`, each
        // as far as it got.
        let started: i64 = jobs.iter().filter(|j| alone(j)).map(|j| j.3.min((h - j.2).max(0))).sum();
        Some(h + total - lone.min(started))
    })
}

/// A rank's work before a time `t` is limited by what can run by then:
/// passes not before their heads, and its k-th forward (of whichever
/// stage) not before `k·activation − budget` units can have been released
/// (a braided partner's release included). The rest of its work follows
/// `t`. This sees what the per-forward floors cannot: a rank holding
/// several stages fills its budget with forwards of any of them, then
/// waits for its first backward.
fn window_floor(
    placement: &[stp_ir::Rank],
    memory: &MemoryModel,
    heads: &PerPass,
    dur: &PerStage,
    first_alone: &[i64],
) -> i64 {
    if !memory.is_bounded() {
        return 0;
    }
    worst_rank(placement, |r| {
        let owned = owned_by(placement, r);
        let budget = Budget::of(memory, r, &owned)?;
        let released = ReleaseCurve::new(&owned, heads, dur, &budget);
        let jobs: Vec<(usize, i64, i64)> =
            rank_passes(placement, r, heads, dur, first_alone).map(|(k, _, _, head, time)| (k, head, time)).collect();
        let total: i64 = jobs.iter().map(|j| j.2).sum();
        let start = jobs.iter().map(|j| j.1).min().unwrap_or(0);
        // The k-th forward to start starts no earlier than the k-th
        // smallest head, nor before `k·activation − budget` units can
        // have been released.
        // Which forward starts k-th is unknown, and where stages differ so
        // do their times: the longest times go with the earliest starts,
        // the pairing that does the most work by any time (min(time, t −
        // start) is supermodular), so the work counted is never less than
        // a real order's.
        let mut forwards: Vec<(i64, i64)> = jobs.iter().filter(|j| j.0 == 0).map(|j| (j.1, j.2)).collect();
        forwards.sort_unstable();
        let mut longest_first: Vec<i64> = forwards.iter().map(|f| f.1).collect();
        longest_first.sort_unstable_by(|a, b| b.cmp(a));
        for (k, (forward, time)) in forwards.iter_mut().zip(longest_first).enumerate() {
            forward.0 = forward.0.max(budget.kth_forward(&released, k as i64 + 1));
            forward.1 = time;
        }
        let mut earliest = forwards;
        earliest.extend(jobs.iter().filter(|j| j.0 != 0).map(|j| (j.1, j.2)));
        // Times where the bound can change: where a backward or
        // weight gradient may start, or releases become possible.
        let mut times: Vec<i64> = jobs.iter().filter(|j| j.0 != 0).map(|j| j.1).collect();
        times.extend(released.points.iter().map(|p| p.0));
        times.sort_unstable();
        times.dedup();
        let work = work_by(earliest, &times);
        times.iter().zip(work).map(|(&t, work)| t + total - (t - start).max(0).min(work)).max()
    })
}

/// For each of `times` (ascending), the most work jobs `(earliest start,
/// time)` can have done by then: each `min(time, t − start)` if it has
/// started. One sweep: a job's work grows by one per unit of time from
/// its start to its end.
fn work_by(mut jobs: Vec<(i64, i64)>, times: &[i64]) -> Vec<i64> {
    let mut ends: Vec<(i64, i64, i64)> = jobs.iter().map(|&(from, time)| (from + time, from, time)).collect();
    jobs.sort_unstable();
    ends.sort_unstable();
    let (mut started, mut ended) = (jobs.iter().peekable(), ends.iter().peekable());
    // Jobs under way: how many, the sum of their starts; work of those done.
    let (mut running, mut starts, mut done) = (0i64, 0i64, 0i64);
    times
        .iter()
        .map(|&t| {
            while let Some(&&(from, _)) = started.peek().filter(|job| job.0 < t) {
                (running, starts) = (running + 1, starts + from);
                started.next();
            }
            while let Some(&&(_, from, time)) = ended.peek().filter(|job| job.0 <= t) {
                (running, starts, done) = (running - 1, starts - from, done + time);
                ended.next();
            }
            done + running * t - starts
        })
        .collect()
}

/// The largest of `floor` over the ranks of `placement` (0 if none has one).
fn worst_rank(placement: &[stp_ir::Rank], floor: impl FnMut(usize) -> Option<i64>) -> i64 {
    let ranks = placement.iter().map(|r| r.index() + 1).max().unwrap_or(0);
    (0..ranks).filter_map(floor).max().unwrap_or(0)
}

/// With at most `cap` weight gradients deferred at once, a rank cannot
/// keep its weight gradients for the drain: once the op holding its last
/// `B` ends, at most `cap` `W`s are left, and what must follow that `B`
/// (the input gradients of the stages before, on other ranks) still has
/// to run. The last `B` is one of its first stage's (every other `B` of
/// the rank feeds one of those); so the rank needs the time to do all its
/// work but `cap` `W`s, from when it can, plus the least tail of those.
fn drain_floor(
    placement: &[stp_ir::Rank],
    heads: &PerPass,
    chains: &[Vec<i64>],
    dur: &PerStage,
    first_alone: &[i64],
    cap: i64,
) -> i64 {
    worst_rank(placement, |r| {
        let first = placement.iter().position(|rank| rank.index() == r)?;
        // Its own `W` is in the work below (fused or not): only what the
        // stages before must still do follows.
        let tail = chains[first].iter().copied().min()?;
        // (head, time on the rank, is a W) of every pass of the rank.
        let mut jobs: Vec<(i64, i64, bool)> = rank_passes(placement, r, heads, dur, first_alone)
            .map(|(k, _, _, head, time)| (head, time, k == 2))
            .collect();
        jobs.sort_unstable_by_key(|job| std::cmp::Reverse(job.0));
        // The longest `W` of the rank stands for each one left: leaving
        // shorter ones leaves less work out, so the bound stays sound.
        let w = owned_by(placement, r).iter().map(|st| dur[2][*st]).max().unwrap_or(0);
        Some(work_but_deferred(&jobs, cap, w) + tail)
    })
}

/// The earliest one machine can have done every job of `latest_first`
/// ((head, compute, is a W), heads descending) but `cap` of the `W`s,
/// whichever it leaves: the largest, over heads, of that head plus the
/// work of the jobs from it on less `cap` `W`s among them (fewer if there
/// are fewer). Whatever it leaves, each term is at least that, so the
/// largest is a bound.
fn work_but_deferred(latest_first: &[(i64, i64, bool)], cap: i64, w: i64) -> i64 {
    let (mut work, mut ws, mut best) = (0i64, 0i64, 0i64);
    for &(head, compute, is_w) in latest_first {
        work += compute;
        ws += i64::from(is_w);
        best = best.max(head + work - ws.min(cap) * w);
    }
    best
}

/// A memory budget as the bound counts it: the units a rank may hold,
/// one forward's activation, and what a pass of each kind (F, B, W)
/// releases alone and as a forward's partner (a `B` may run fused with
/// its `W`, `BW`, beside the forward).
struct Budget {
    units: i64,
    activation: i64,
    release: [i64; 3],
    partner: [i64; 3],
}

impl Budget {
    /// Rank `r`'s budget over its stages `owned`; `None` without one, or
    /// with one below a single activation. Where stages differ, a forward
    /// counts as the smallest activation and a pass releases as much as the
    /// most generous stage's: the bound stays below every real order.
    fn of(memory: &MemoryModel, r: usize, owned: &[usize]) -> Option<Budget> {
        let units = memory.budget_of(r)?;
        let stages: Vec<_> = owned.iter().map(|st| memory.stage(stp_ir::Stage(*st as u32))).collect();
        let a = stages.iter().map(|m| m.activation).min()?;
        let most = |f: &dyn Fn(&crate::elab::StageMemory) -> i64| stages.iter().map(f).max().unwrap_or(0);
        let (b_release, full, stash) =
            (most(&|m| m.activation - m.weight_stash), most(&|m| m.activation), most(&|m| m.weight_stash));
        (a > 0 && units >= a).then_some(Budget {
            units,
            activation: a,
            release: [0, b_release, stash],
            partner: [0, full, stash],
        })
    }

    /// The earliest a rank's `k`-th forward can start: once its earlier
    /// ops can have released `k·activation − budget` units.
    fn kth_forward(&self, released: &ReleaseCurve, k: i64) -> i64 {
        released.earliest(k * self.activation - self.units)
    }
}

/// The stages rank `r` holds, in order.
fn owned_by(placement: &[stp_ir::Rank], r: usize) -> Vec<usize> {
    (0..placement.len()).filter(|st| placement[*st].index() == r).collect()
}

/// Per forward (`[stage][mb]`), the earliest it can start under the
/// memory budget, or `None` without one.
///
/// Before a rank starts its k-th forward, its earlier ops must have
/// released at least `k·activation − budget` units (an op's passes count
/// together, so the forward's own partner may supply one release, a `BW`
/// the whole activation). A pass releases no earlier than its head plus
/// its compute (a partner: at its head), so the k-th forward starts no
/// earlier than the first time the releases possible by then add up. The forward of microbatch `i` of a
/// rank's `j`-th stage is at least its `j·(i+1)`-th: the forwards of the
/// rank's earlier stages up to `i` precede it, as do its own stage's.
/// Later forwards start later, which delays other ranks' releases; the
/// floors are raised until nothing moves.
fn memory_floors(
    placement: &[stp_ir::Rank],
    memory: &MemoryModel,
    dur: &PerStage,
    lat: &PerStage,
    apart: bool,
    hop: &dyn Fn(usize, usize) -> i64,
    mbs: usize,
) -> Option<Vec<Vec<i64>>> {
    if !memory.is_bounded() {
        return None;
    }
    let stages = placement.len();
    let ranks = placement.iter().map(|r| r.index() + 1).max().unwrap_or(0);
    let mut floors = vec![vec![0i64; mbs]; stages];
    // Each round raises some floor by at least one microunit; the bound
    // stays valid at every round, so stopping early only loosens it.
    for _ in 0..64 {
        let (heads, _, _) = heads_and_tails(stages, mbs, dur, lat, apart, hop, Some(&floors));
        let mut moved = false;
        for r in 0..ranks {
            let owned = owned_by(placement, r);
            let Some(budget) = Budget::of(memory, r, &owned) else { continue };
            let released = ReleaseCurve::new(&owned, &heads, dur, &budget);
            for (j, &st) in owned.iter().enumerate() {
                for (i, floor) in floors[st].iter_mut().enumerate() {
                    let t = budget.kth_forward(&released, ((j + 1) * (i + 1)) as i64);
                    if t > *floor {
                        *floor = t;
                        moved = true;
                    }
                }
            }
        }
        if !moved {
            break;
        }
    }
    Some(floors)
}

/// When a rank's releases can have happened: at each candidate time, the
/// units released by passes that can have ended, plus what the forward's
/// own partner can release in its op. A partner is any pass whose head
/// has come: one that cannot have ended yet adds all it releases — a `B`
/// fused with its `W` into `BW` releases the whole activation — and one
/// already counted as ended adds what it would release beyond that.
struct ReleaseCurve {
    /// (time, units available by then), times ascending, units nondecreasing.
    points: Vec<(i64, i64)>,
}

impl ReleaseCurve {
    /// The releases of the passes of stages `owned` (one rank's) under
    /// `budget`'s accounting.
    fn new(owned: &[usize], heads: &PerPass, dur: &PerStage, budget: &Budget) -> ReleaseCurve {
        let (release, partner) = (budget.release, budget.partner);
        // (time, 1 = ends / 0 = starts, kind): at one time, starts before ends.
        let mut events: Vec<(i64, u8, usize)> = Vec::new();
        for &st in owned {
            for k in 1..3 {
                if partner[k] <= 0 {
                    continue;
                }
                for &head in &heads[k][st] {
                    events.push((head, 0, k));
                    events.push((head + dur[k][st], 1, k));
                }
            }
        }
        events.sort_unstable();
        let mut ended = 0i64;
        // Partners that cannot have ended, by what they release; and the
        // most an ended one adds as a partner.
        let mut running: std::collections::BTreeMap<i64, usize> = std::collections::BTreeMap::new();
        let mut ended_bonus = 0i64;
        let mut points: Vec<(i64, i64)> = Vec::with_capacity(events.len());
        for (t, ends, k) in events {
            if ends == 0 {
                *running.entry(partner[k]).or_default() += 1;
            } else {
                ended += release[k];
                ended_bonus = ended_bonus.max(partner[k] - release[k]);
                if let Some(n) = running.get_mut(&partner[k]) {
                    *n -= 1;
                    if *n == 0 {
                        running.remove(&partner[k]);
                    }
                }
            }
            // An ending pass moves what it releases into `ended` and keeps
            // the rest as a possible partner: the sum never drops.
            let best_partner = running.keys().next_back().copied().unwrap_or(0).max(ended_bonus);
            let available = ended + best_partner;
            match points.last_mut() {
                Some(last) if last.0 == t => last.1 = available,
                _ => points.push((t, available)),
            }
        }
        ReleaseCurve { points }
    }

    /// The first time `need` units can have been released (0 if none are
    /// needed; far in the future if they never can).
    fn earliest(&self, need: i64) -> i64 {
        if need <= 0 {
            return 0;
        }
        let i = self.points.partition_point(|p| p.1 < need);
        self.points.get(i).map_or(i64::MAX / 4, |p| p.0)
    }
}

/// Per kind (F, B, W) and stage, the least time from the start of an op
/// holding a pass to its output: `F` and `B` end with the stage's TP
/// collective, `W` has none.
pub fn latencies(dur: &PerStage, collective: &[i64]) -> PerStage {
    let with_collective = |k: usize| dur[k].iter().zip(collective).map(|(d, c)| d + c).collect();
    [with_collective(0), with_collective(1), dur[2].clone()]
}

/// The largest, over ranks, of the best makespan the rank could reach if
/// its passes could be cut into pieces: each pass's work after its head,
/// followed by its tail. Jackson's preemptive rule (always run the ready
/// pass with the longest tail) reaches that best exactly, so it is a lower
/// bound for real, uncut orders. It sees what the window bound does not:
/// a rank whose late passes arrive late, or whose passes with long tails
/// cannot all go first. `first_alone` is added to the time of each rank's
/// first forward (of its first stage, microbatch 0) where that pass
/// always runs alone, exposing its collective.
pub fn preemptive_floor(
    placement: &[stp_ir::Rank],
    heads: &PerPass,
    tails: &PerPass,
    dur: &PerStage,
    first_alone: &[i64],
) -> i64 {
    worst_rank(placement, |r| {
        let jobs = rank_passes(placement, r, heads, dur, first_alone)
            .map(|(k, st, i, head, compute)| (head, compute, tails[k][st][i]))
            .collect();
        Some(jackson_preemptive(jobs))
    })
}

/// Every pass of rank `r` that takes time, as (kind, stage, microbatch,
/// head, time on the rank): its compute, plus `first_alone` (of its
/// stage) for the rank's first forward.
fn rank_passes<'a>(
    placement: &'a [stp_ir::Rank],
    r: usize,
    heads: &'a PerPass,
    dur: &'a PerStage,
    first_alone: &'a [i64],
) -> impl Iterator<Item = (usize, usize, usize, i64, i64)> + 'a {
    let mbs = heads.first().and_then(|h| h.first()).map_or(0, Vec::len);
    let first = placement.iter().position(|rank| rank.index() == r);
    (0..placement.len())
        .filter(move |st| placement[*st].index() == r)
        .flat_map(move |st| (0..3).flat_map(move |k| (0..mbs).map(move |i| (k, st, i))))
        .filter(move |&(k, st, _)| dur[k][st] > 0)
        .map(move |(k, st, i)| {
            let alone = if (k, Some(st), i) == (0, first, 0) { first_alone[st] } else { 0 };
            (k, st, i, heads[k][st][i], dur[k][st] + alone)
        })
}

/// The optimal preemptive makespan (latest end plus tail) of one machine
/// with jobs `(release, duration, tail)`.
fn jackson_preemptive(mut jobs: Vec<(i64, i64, i64)>) -> i64 {
    jobs.sort_unstable();
    let mut left: Vec<i64> = jobs.iter().map(|j| j.1).collect();
    let mut ready = std::collections::BinaryHeap::new();
    let (mut now, mut next, mut best) = (0i64, 0usize, 0i64);
    loop {
        if ready.is_empty() {
            let Some(job) = jobs.get(next) else { break };
            now = now.max(job.0);
        }
        while let Some(job) = jobs.get(next).filter(|j| j.0 <= now) {
            ready.push((job.2, next));
            next += 1;
        }
        let Some((tail, j)) = ready.pop() else { continue };
        let until = jobs.get(next).map_or(i64::MAX, |job| job.0);
        let run = left[j].min(until - now);
        now += run;
        left[j] -= run;
        if left[j] == 0 {
            best = best.max(now + tail);
        } else {
            ready.push((tail, j));
        }
    }
    best
}

/// Per pass (`[kind][stage][mb]`, kinds F, B, W): the earliest its op can
/// start, and the least time that must follow its op's end, from the
/// dependencies alone.
pub type PerPass = Vec<Vec<Vec<i64>>>;

// Passes are addressed as (kind, stage, microbatch) in parallel tables.
#[allow(clippy::needless_range_loop)]
///
/// `dur` is each kind's compute, what it occupies its rank for; `lat` the
/// least time from the start of an op holding the pass to its output: its
/// compute and its TP collective, which braiding hides from the rank but
/// not from the pass's consumers (a braided op ends no earlier than either
/// pass's compute plus its collective). With `apart`, consecutive passes of
/// one stage and kind never share an op (stpc's orders), so each waits for
/// the other's compute, and a `W` follows its `B`'s compute — in an op of
/// its own after the `B`'s op, or fused with it into `BW`, where it runs
/// while the `B`'s collective is in flight; without `apart` passes may
/// share an op (a hand order braids `F & F` of one stage), so only their
/// order counts. Microbatches of a stage run in order: any order can be
/// relabelled to one that does, no slower. `floors`, if given, are
/// earliest starts of the forwards (`[stage][mb]`) known otherwise. Also
/// returned, per `B` (`[stage][mb]`): the least time that must follow its
/// output apart from its own `W` (the stage before's `B`, its stage's next
/// `B`).
pub fn heads_and_tails(
    stages: usize,
    mbs: usize,
    dur: &PerStage,
    lat: &PerStage,
    apart: bool,
    hop: &dyn Fn(usize, usize) -> i64,
    floors: Option<&[Vec<i64>]>,
) -> (PerPass, PerPass, Vec<Vec<i64>>) {
    let none = [vec![0; stages], vec![0; stages], vec![0; stages]];
    let gap = if apart { dur } else { &none };
    let mut head = vec![vec![vec![0i64; mbs]; stages]; 3];
    for i in 0..mbs {
        for st in 0..stages {
            let mut t = if st > 0 { head[0][st - 1][i] + lat[0][st - 1] + hop(st - 1, st) } else { 0 };
            if i > 0 {
                t = t.max(head[0][st][i - 1] + gap[0][st]);
            }
            if let Some(floors) = floors {
                t = t.max(floors[st][i]);
            }
            head[0][st][i] = t;
        }
        for st in (0..stages).rev() {
            let mut t = head[0][st][i] + lat[0][st];
            if st + 1 < stages {
                t = t.max(head[1][st + 1][i] + lat[1][st + 1] + hop(st + 1, st));
            }
            if i > 0 {
                t = t.max(head[1][st][i - 1] + gap[1][st]);
            }
            head[1][st][i] = t;
        }
        for st in 0..stages {
            let mut t = head[1][st][i] + gap[1][st];
            if i > 0 {
                t = t.max(head[2][st][i - 1] + gap[2][st]);
            }
            head[2][st][i] = t;
        }
    }
    // From the start of an op holding a stage's `B` to the end of its own
    // `W`: fused into `BW` (stpc's orders fuse them), the `W` runs while
    // the `B`'s collective is in flight, so it need not wait for the `B`'s
    // output; without `apart` only the order counts.
    let fused: Vec<i64> = (0..stages)
        .map(|st| {
            let collective = lat[1][st] - dur[1][st];
            if apart {
                dur[1][st] + dur[2][st] + (collective - dur[2][st]).max(0)
            } else {
                lat[1][st]
            }
        })
        .collect();
    let mut tail = vec![vec![vec![0i64; mbs]; stages]; 3];
    // Per `B` ([stage][mb]): what follows its output (the stage before's
    // `B`, its next microbatch's `B`), without its own `W`.
    let mut chains = vec![vec![0i64; mbs]; stages];
    // The least time from the start of the op holding `B` (stage, mb) to the end.
    let from_start = |st: usize, after: i64, w_tail: i64| (lat[1][st] + after).max(fused[st] + w_tail);
    for i in (0..mbs).rev() {
        for st in 0..stages {
            tail[2][st][i] = if i + 1 < mbs { gap[2][st] + tail[2][st][i + 1] } else { 0 };
        }
        for st in 0..stages {
            let mut after = 0;
            if st > 0 {
                after = after.max(hop(st, st - 1) + from_start(st - 1, chains[st - 1][i], tail[2][st - 1][i]));
            }
            if i + 1 < mbs {
                after = after.max(gap[1][st] + tail[1][st][i + 1]);
            }
            chains[st][i] = after;
            tail[1][st][i] = after.max(gap[2][st] + tail[2][st][i]);
        }
        for st in (0..stages).rev() {
            let mut t = from_start(st, chains[st][i], tail[2][st][i]);
            if st + 1 < stages {
                t = t.max(hop(st, st + 1) + lat[0][st + 1] + tail[0][st + 1][i]);
            }
            if i + 1 < mbs {
                t = t.max(gap[0][st] + tail[0][st][i + 1]);
            }
            tail[0][st][i] = t;
        }
    }
    (head, tail, chains)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stage on the rank, two microbatches: `B` heads 10 and 14
    /// (compute 2) release 3 units each, `W` heads 12 and 16 (compute 1)
    /// release 1 each (activation 4, weight stash 1); a `B` fused with its
    /// `W` releases 4.
    fn curve() -> ReleaseCurve {
        let heads: PerPass = vec![vec![vec![0, 0]], vec![vec![10, 14]], vec![vec![12, 16]]];
        let budget = Budget { units: 0, activation: 4, release: [0, 3, 1], partner: [0, 4, 1] };
        ReleaseCurve::new(&[0], &heads, &[vec![1], vec![2], vec![1]], &budget)
    }

    #[test]
    fn the_sweep_counts_work_as_each_job_would_alone() {
        let jobs = vec![(0, 3), (2, 1), (2, 4), (5, 2), (9, 1), (1, 1)];
        let times: Vec<i64> = (-1..14).collect();
        let direct: Vec<i64> =
            times.iter().map(|&t| jobs.iter().map(|&(from, time)| time.min(t - from).max(0)).sum()).collect();
        assert_eq!(work_by(jobs, &times), direct);
    }

    #[test]
    fn a_forward_may_start_with_the_release_it_is_braided_with() {
        let c = curve();
        assert_eq!(c.earliest(0), 0, "nothing needed: no wait");
        // Braided with the first B fused with its W, the forward starts at that B's head.
        assert_eq!(c.earliest(4), 10);
        // 5 units: not at 12 (the first B as BW is 4, or ended with the
        // first W as partner, 3 + 1), but once the first W has ended too.
        assert_eq!(c.earliest(5), 13);
        // 7: the first B has ended, the second (as BW) is the partner at its head.
        assert_eq!(c.earliest(7), 14);
        // 8: the first B and W have ended (13), the second B as BW (14).
        assert_eq!(c.earliest(8), 14);
        // Past all 8 units (the count may include a partner's share twice,
        // which only loosens the bound), never.
        assert!(c.earliest(10) > 1_000_000, "more than is ever released: never");
    }
}
