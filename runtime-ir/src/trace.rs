//! Chrome trace event files (they load in Perfetto and chrome://tracing)
//! of a program's run, simulated or measured: one process per rank, one
//! thread per stream (0 compute, 1 communication, 2 tensor-parallel
//! collectives when there are any). Transfers to different peers run on
//! streams of their own and may overlap; viewers draw only nested events
//! on one thread, so an overlapping transfer group goes to another
//! communication lane (threads 3, 4, ...). Each compute event
//! carries its passes' kinds, stages and microbatches, and the rank's live
//! activations after it: forwards run minus input-gradient (or full)
//! backwards run, in activations.

use crate::{Instr, PassKind, Program};
use serde_json::{json, Value};

/// Per rank, `(instruction index, start, end)` of what ran, in the cost
/// model's time unit (shown as seconds: a unit cost is one second on the
/// trace's axis).
pub type Spans = [Vec<(usize, f64, f64)>];

/// The trace of `program` given the spans of its instructions and of its
/// tensor-parallel collectives (tagged with the compute that issued them;
/// empty when there are none).
pub fn chrome_trace(program: &Program, spans: &Spans, collectives: &Spans) -> String {
    let mut events = Vec::new();
    for (r, rank_spans) in spans.iter().enumerate() {
        events.push(json!({ "name": "process_name", "ph": "M", "pid": r, "args": { "name": format!("rank {r}") } }));
        let rank_collectives = collectives.get(r).map_or(&[][..], Vec::as_slice);
        let comm_spans = rank_spans.iter().filter(|(i, _, _)| {
            matches!(program.ranks.get(r).and_then(|rank| rank.instrs.get(*i)), Some(Instr::Comm(_)))
        });
        let (lane_of, lanes) = comm_lanes(comm_spans.copied());
        let mut threads: Vec<(usize, String)> = vec![(0, "compute".into()), (1, "communication".into())];
        if !rank_collectives.is_empty() {
            threads.push((2, "tensor-parallel".into()));
        }
        threads.extend((1..lanes).map(|k| (lane_tid(k), format!("communication {}", k + 1))));
        for (tid, name) in threads {
            events.push(json!({ "name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": { "name": name } }));
        }
        let live = live_activations(program, r);
        for &(i, start, end) in rank_spans {
            let Some(instr) = program.ranks.get(r).and_then(|rank| rank.instrs.get(i)) else { continue };
            let (tid, args) = match instr {
                Instr::Compute(c) => (
                    0,
                    json!({
                        "passes": c.passes.iter().map(|p| json!({
                            "kind": p.kind.as_str(), "stage": p.stage.0, "microbatch": p.mb.0,
                        })).collect::<Vec<Value>>(),
                        "live_activations_after": live.get(i).copied().unwrap_or(0),
                    }),
                ),
                Instr::Comm(transfers) => {
                    (lane_tid(lane_of.get(&i).copied().unwrap_or(0)), json!({ "transfers": transfers.len() }))
                }
                Instr::Free { .. } => continue,
                Instr::Reduce { stages } => {
                    (lane_tid(0), json!({ "stages": stages.iter().map(|s| s.0).collect::<Vec<u32>>() }))
                }
            };
            events.push(json!({
                "name": instr.to_string().replace('\n', " "),
                "cat": if tid == 0 { "compute" } else { "comm" },
                "ph": "X",
                "pid": r,
                "tid": tid,
                "ts": start * 1e6,
                "dur": (end - start) * 1e6,
                "args": args,
            }));
        }
        for &(i, start, end) in rank_collectives {
            let Some(Instr::Compute(c)) = program.ranks.get(r).and_then(|rank| rank.instrs.get(i)) else { continue };
            events.push(json!({
                "name": format!("all-reduce of {c}"),
                "cat": "collective",
                "ph": "X",
                "pid": r,
                "tid": 2,
                "ts": start * 1e6,
                "dur": (end - start) * 1e6,
            }));
        }
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
}

/// The thread of communication lane `k`: the first is thread 1, the
/// others follow the tensor-parallel thread.
fn lane_tid(k: usize) -> usize {
    if k == 0 {
        1
    } else {
        k + 2
    }
}

/// Assigns each communication span to the first lane free at its start
/// (interval partitioning, in order of start): spans on one lane never
/// overlap. Returns instruction -> lane, and how many lanes were used.
fn comm_lanes(spans: impl Iterator<Item = (usize, f64, f64)>) -> (std::collections::HashMap<usize, usize>, usize) {
    let mut spans: Vec<(usize, f64, f64)> = spans.collect();
    spans.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut lane_ends: Vec<f64> = Vec::new();
    let mut lane_of = std::collections::HashMap::new();
    for (i, start, end) in spans {
        let lane = match lane_ends.iter().position(|e| *e <= start) {
            Some(k) => k,
            None => {
                lane_ends.push(f64::NEG_INFINITY);
                lane_ends.len() - 1
            }
        };
        lane_ends[lane] = end;
        lane_of.insert(i, lane);
    }
    (lane_of, lane_ends.len().max(1))
}

/// Per instruction of rank `r`: live activations after it (forwards run
/// minus input-gradient or full backwards run; a forward the rank later
/// recomputes holds none until its `R`).
pub fn live_activations(program: &Program, r: usize) -> Vec<i64> {
    let mut live = 0i64;
    let Some(rank) = program.ranks.get(r) else { return Vec::new() };
    let recomputed = rank.recomputed();
    rank.instrs
        .iter()
        .map(|instr| {
            if let Instr::Compute(c) = instr {
                for p in &c.passes {
                    live += match p.kind {
                        PassKind::F if recomputed.contains(&(p.stage, p.mb)) => 0,
                        PassKind::F | PassKind::R => 1,
                        PassKind::B | PassKind::BW => -1,
                        PassKind::W => 0,
                    };
                }
            }
            live
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::comm_lanes;

    #[test]
    fn overlapping_transfer_groups_get_lanes_of_their_own() {
        // 0 [0, 4) overlaps 1 [1, 3) and 2 [2, 5); 3 [4, 6) fits after 0.
        let (lane_of, lanes) = comm_lanes([(0, 0.0, 4.0), (1, 1.0, 3.0), (2, 2.0, 5.0), (3, 4.0, 6.0)].into_iter());
        assert_eq!(lanes, 3);
        assert_eq!([lane_of[&0], lane_of[&1], lane_of[&2], lane_of[&3]], [0, 1, 2, 0]);
    }
}
