//! Chrome trace event files (they load in Perfetto and chrome://tracing)
//! of a program's run, simulated or measured: one process per rank, one
//! thread per stream (0 compute, 1 communication, 2 tensor-parallel
//! collectives when there are any). Each compute event
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
        let threads: &[(u32, &str)] = if rank_collectives.is_empty() {
            &[(0, "compute"), (1, "communication")]
        } else {
            &[(0, "compute"), (1, "communication"), (2, "tensor-parallel")]
        };
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
                Instr::Comm(transfers) => (1, json!({ "transfers": transfers.len() })),
                Instr::Free { .. } => continue,
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

/// Per instruction of rank `r`: live activations after it (forwards run
/// minus input-gradient or full backwards run).
pub fn live_activations(program: &Program, r: usize) -> Vec<i64> {
    let mut live = 0i64;
    let Some(rank) = program.ranks.get(r) else { return Vec::new() };
    rank.instrs
        .iter()
        .map(|instr| {
            if let Instr::Compute(c) = instr {
                for p in &c.passes {
                    live += match p.kind {
                        PassKind::F => 1,
                        PassKind::B | PassKind::BW => -1,
                        PassKind::W => 0,
                    };
                }
            }
            live
        })
        .collect()
}
