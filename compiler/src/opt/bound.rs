//! A lower bound on the makespan: no step ends before one microbatch has
//! gone down and back up the pipeline, and no rank before it has done its
//! work, none of it earlier than its dependencies allow and each piece
//! followed by what must come after it.

use crate::elab::ComputeSchedule;
use stp_ir::simulate::CostModel;

/// `max(one microbatch's forward and backward through every stage, with
/// their collectives and the transfers between ranks; per rank, the best
/// order of its passes cut into pieces)` — the latter is never below the
/// rank's total compute, nor below its earliest start plus that compute
/// plus its least tail.
pub fn lower_bound(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    let hops = meta.placement.windows(2).filter(|w| w[0] != w[1]).count() as f64;
    let critical = f64::from(meta.num_stages) * (cost.forward + cost.backward_input + 2.0 * cost.tp_collective)
        + 2.0 * hops * cost.p2p;
    critical.max(rank_floor(s, cost))
}

/// Per rank, the best it could do alone ([`preemptive_floor`]).
fn rank_floor(s: &ComputeSchedule, cost: &CostModel) -> f64 {
    let meta = &s.meta;
    let (stages, mbs) = (meta.num_stages as usize, meta.num_microbatches as usize);
    // Integer arithmetic (microunits) keeps the head/tail tables exact.
    let micro = |t: f64| (t * 1e6).round() as i64;
    let dur = [micro(cost.forward), micro(cost.backward_input), micro(cost.backward_weight)];
    let lat = latencies(dur, micro(cost.tp_collective));
    let owner = |stage: usize| meta.placement[stage].index();
    let hop = |a: usize, b: usize| if owner(a) != owner(b) { micro(cost.p2p) } else { 0 };
    // Any order counts here, hand-written ones braiding `F & F` too.
    let (heads, tails) = heads_and_tails(stages, mbs, dur, lat, false, &hop);
    preemptive_floor(&meta.placement, &heads, &tails, dur) as f64 / 1e6
}

/// Per kind (F, B, W), the least time from the start of an op holding a
/// pass to its output: `F` and `B` end with a TP collective, `W` has none.
pub fn latencies(dur: [i64; 3], collective: i64) -> [i64; 3] {
    [dur[0] + collective, dur[1] + collective, dur[2]]
}

/// The largest, over ranks, of the best makespan the rank could reach if
/// its passes could be cut into pieces: each pass's work after its head,
/// followed by its tail. Jackson's preemptive rule (always run the ready
/// pass with the longest tail) reaches that best exactly, so it is a lower
/// bound for real, uncut orders. It sees what the window bound does not:
/// a rank whose late passes arrive late, or whose passes with long tails
/// cannot all go first.
pub fn preemptive_floor(placement: &[stp_ir::Rank], heads: &PerPass, tails: &PerPass, dur: [i64; 3]) -> i64 {
    let mbs = heads.first().and_then(|h| h.first()).map_or(0, Vec::len);
    let ranks = placement.iter().map(|r| r.index() + 1).max().unwrap_or(0);
    (0..ranks)
        .map(|r| {
            let jobs: Vec<(i64, i64, i64)> = (0..placement.len())
                .filter(|st| placement[*st].index() == r)
                .flat_map(|st| (0..3).flat_map(move |k| (0..mbs).map(move |i| (k, st, i))))
                .filter(|&(k, _, _)| dur[k] > 0)
                .map(|(k, st, i)| (heads[k][st][i], dur[k], tails[k][st][i]))
                .collect();
            jackson_preemptive(jobs)
        })
        .max()
        .unwrap_or(0)
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
/// one stage and kind, and a `B` and its `W`, never share an op (the Z3
/// model's rule), so each waits for the other's compute; without it they
/// may (a hand order braids `F & F` of one stage, or fuses `BW`), so only
/// their order counts. Microbatches of a stage run in order: any order
/// can be relabelled to one that does, no slower.
pub fn heads_and_tails(
    stages: usize,
    mbs: usize,
    dur: [i64; 3],
    lat: [i64; 3],
    apart: bool,
    hop: &dyn Fn(usize, usize) -> i64,
) -> (PerPass, PerPass) {
    let gap = if apart { dur } else { [0; 3] };
    let mut head = vec![vec![vec![0i64; mbs]; stages]; 3];
    for i in 0..mbs {
        for st in 0..stages {
            let mut t = if st > 0 { head[0][st - 1][i] + lat[0] + hop(st - 1, st) } else { 0 };
            if i > 0 {
                t = t.max(head[0][st][i - 1] + gap[0]);
            }
            head[0][st][i] = t;
        }
        for st in (0..stages).rev() {
            let mut t = head[0][st][i] + lat[0];
            if st + 1 < stages {
                t = t.max(head[1][st + 1][i] + lat[1] + hop(st + 1, st));
            }
            if i > 0 {
                t = t.max(head[1][st][i - 1] + gap[1]);
            }
            head[1][st][i] = t;
        }
        for st in 0..stages {
            let mut t = head[1][st][i] + gap[1];
            if i > 0 {
                t = t.max(head[2][st][i - 1] + gap[2]);
            }
            head[2][st][i] = t;
        }
    }
    let mut tail = vec![vec![vec![0i64; mbs]; stages]; 3];
    for i in (0..mbs).rev() {
        for st in 0..stages {
            tail[2][st][i] = if i + 1 < mbs { gap[2] + tail[2][st][i + 1] } else { 0 };
        }
        for st in 0..stages {
            let mut t = gap[2] + tail[2][st][i];
            if st > 0 {
                t = t.max(hop(st, st - 1) + lat[1] + tail[1][st - 1][i]);
            }
            if i + 1 < mbs {
                t = t.max(gap[1] + tail[1][st][i + 1]);
            }
            tail[1][st][i] = t;
        }
        for st in (0..stages).rev() {
            let mut t = lat[1] + tail[1][st][i];
            if st + 1 < stages {
                t = t.max(hop(st, st + 1) + lat[0] + tail[0][st + 1][i]);
            }
            if i + 1 < mbs {
                t = t.max(gap[0] + tail[0][st][i + 1]);
            }
            tail[0][st][i] = t;
        }
    }
    (head, tail)
}
