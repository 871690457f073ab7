//! Golden tests against ../shared/reference/schedules.md: the simulated
//! bubbles, makespans, exposed TP time and peak memory of the standard
//! schedules equal the published formulas.

use stp_ir::simulate::{simulate, CostModel, Timeline};
use stp_tests::{build_std, build_std_tp};
use stpc::pipeline::Build;

fn build(name: &str, p: i64, m: i64, v: Option<i64>) -> Build {
    build_std(name, p, m, v)
}

fn run(b: &Build, cost: &CostModel) -> Timeline {
    simulate(&b.program, cost).unwrap_or_else(|d| panic!("checked program deadlocked: {d}"))
}

fn unit() -> CostModel {
    CostModel::default()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The pipeline bubble as the table states it: idle time within the
/// makespan on the busiest-waiting rank (rank 0 for these schedules).
fn max_bubble(t: &Timeline) -> f64 {
    t.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max)
}

const PS: [i64; 3] = [2, 4, 8];

#[test]
fn one_f_one_b_bubble_is_p_minus_1_times_a_full_microbatch() {
    for cost in [unit(), CostModel { forward: 1.0, backward_input: 2.0, backward_weight: 1.5, ..unit() }] {
        let per_mb = cost.forward + cost.backward_input + cost.backward_weight;
        for p in PS {
            for m in [p, 2 * p, 3 * p, 4 * p] {
                let t = run(&build("1f1b", p, m, None), &cost);
                let expected = (p - 1) as f64 * per_mb;
                assert!(close(max_bubble(&t), expected), "p={p} m={m}: bubble {} != {expected}", max_bubble(&t));
                assert!(close(t.makespan, m as f64 * per_mb + expected), "p={p} m={m}: makespan {}", t.makespan);
                for r in &t.ranks {
                    assert!(close(t.makespan - r.busy, expected), "p={p} m={m} rank {}: idle", r.rank);
                }
                // Bubble ratio (p-1)/(m+p-1), independent of the costs.
                assert!(close(t.bubble_ratio(), (p - 1) as f64 / (m + p - 1) as f64), "p={p} m={m}");
            }
        }
    }
}

#[test]
fn gpipe_bubble_is_p_minus_1_times_a_full_microbatch() {
    for p in PS {
        for m in [p, 2 * p, 4 * p, 4 * p + 1] {
            let t = run(&build("gpipe", p, m, None), &unit());
            assert!(close(t.makespan, 3.0 * m as f64 + 3.0 * (p - 1) as f64), "p={p} m={m}: {}", t.makespan);
        }
    }
}

#[test]
fn zb_h1_bubble_is_p_minus_1_times_f_plus_b_minus_w() {
    for p in PS {
        for m in [p, 2 * p, 3 * p, 4 * p] {
            let b = build("zb-h1", p, m, None);
            let t = run(&b, &unit());
            let expected = (p - 1) as f64 * (1.0 + 1.0 - 1.0);
            assert!(close(max_bubble(&t), expected), "p={p} m={m}: bubble {}", max_bubble(&t));
            assert!(close(t.makespan, 3.0 * m as f64 + expected), "p={p} m={m}: makespan {}", t.makespan);
            // Same peak memory as 1F1B: p microbatches on rank 0.
            assert_eq!(b.checked.peaks()[0].units, p.min(m), "p={p} m={m}");
        }
    }
}

#[test]
fn stp_makespan_is_6m_plus_p_minus_1_and_peak_is_3p() {
    for p in PS {
        for m in [3 * p - 1, 3 * p, 4 * p, 6 * p] {
            let b = build("stp", p, m, None);
            let t = run(&b, &unit());
            assert!(close(t.makespan, (6 * m + p - 1) as f64), "p={p} m={m}: makespan {}", t.makespan);
            assert!(b.checked.peaks().iter().all(|peak| peak.units == 3 * p), "p={p} m={m}: {:?}", b.checked.peaks());
        }
    }
}

/// TP accounting at v = 2 with a collective shorter than any pass, so a
/// braid hides it completely: interleaved 1F1B exposes one collective per
/// forward (Megatron overlaps the backward's with its weight gradient):
/// 2m·T_AR per rank; STP exposes only its unbraided passes: (2p+1)·T_AR on
/// the ranks with a standalone forward in phase 3 (even r), 2p·T_AR on the
/// others.
#[test]
fn exposed_tensor_parallel_time_matches_the_stp_paper() {
    let t_ar = 0.125;
    let cost = CostModel { tp_collective: t_ar, ..unit() };
    for p in PS {
        for m in [p, 2 * p, 4 * p] {
            let t = run(&build("interleaved-1f1b", p, m, Some(2)), &cost);
            for r in &t.ranks {
                assert!(close(r.exposed_comm, 2.0 * m as f64 * t_ar), "interleaved p={p} m={m} rank {}", r.rank);
            }
        }
        for m in [3 * p - 1, 4 * p] {
            let t = run(&build("stp", p, m, None), &cost);
            for r in &t.ranks {
                let expected = if r.rank.0 % 2 == 0 { 2 * p + 1 } else { 2 * p } as f64 * t_ar;
                assert!(close(r.exposed_comm, expected), "stp p={p} m={m} rank {}: {}", r.rank, r.exposed_comm);
            }
            let worst = t.ranks.iter().map(|r| r.exposed_comm).fold(0.0, f64::max);
            assert!(close(worst, (2 * p + 1) as f64 * t_ar), "stp p={p} m={m}");
        }
    }
}

/// ZB-V at T_F = T_B = T_W: no idle time between any rank's first and
/// last op, 2p chunk activations at the peak (1F1B's memory), and with TP
/// every forward and input-gradient pass exposes its collective: 4m·T_AR.
#[test]
fn zb_v_has_zero_bubble_2p_memory_and_exposes_4m_collectives() {
    let t_ar = 0.125;
    for p in PS {
        for m in [2 * p - 1, 2 * p, 3 * p, 4 * p] {
            let b = build("zb-v", p, m, None);
            let t = run(&b, &unit());
            assert!(close(max_bubble(&t), 0.0), "p={p} m={m}: bubble {}", max_bubble(&t));
            assert!(b.checked.peaks().iter().all(|peak| peak.units == 2 * p), "p={p} m={m}: {:?}", b.checked.peaks());
            let t = run(&b, &CostModel { tp_collective: t_ar, ..unit() });
            for r in &t.ranks {
                assert!(
                    close(r.exposed_comm, 4.0 * m as f64 * t_ar),
                    "p={p} m={m} rank {}: {}",
                    r.rank,
                    r.exposed_comm
                );
            }
        }
    }
}

/// ZB-H2 at T_F = T_B = T_W: no idle time between any rank's first and
/// last op once m >= 2p - 1, with 2p - 1 microbatches held on rank 0.
#[test]
fn zb_h2_has_zero_bubble_and_2p_minus_1_memory() {
    for p in PS {
        for m in [2 * p - 1, 2 * p, 3 * p, 4 * p] {
            let b = build("zb-h2", p, m, None);
            let t = run(&b, &unit());
            assert!(close(max_bubble(&t), 0.0), "p={p} m={m}: bubble {}", max_bubble(&t));
            assert_eq!(b.checked.peaks()[0].units, 2 * p - 1, "p={p} m={m}");
        }
    }
}

/// Run unit by unit (`--tp`), a pass's first all-reduce stalls the next
/// unit of the same pass unless the braided partner's unit fills the gap;
/// its last one overlaps whatever comes next. So within ops 1F1B waits
/// T_AR/2 per forward (a full backward hides both behind its weight
/// gradients) and STP waits half of its per-pass exposure: (2p+1)·T_AR/2 on
/// even ranks.
#[test]
fn unit_level_execution_exposes_the_first_all_reduce_of_unbraided_passes() {
    let t_ar = 0.25;
    let cost = CostModel { tp_collective: t_ar, ..unit() };
    for p in PS {
        let m = 3 * p;
        let t = run(&build_std_tp("1f1b", p, m, None, 4), &cost);
        for r in &t.ranks {
            assert!(close(r.exposed_comm, m as f64 * t_ar / 2.0), "1f1b p={p} rank {}: {}", r.rank, r.exposed_comm);
        }
        let t = run(&build_std_tp("stp", p, m, None, 4), &cost);
        for r in &t.ranks {
            let passes = if r.rank.0 % 2 == 0 { 2 * p + 1 } else { 2 * p };
            assert!(close(r.exposed_comm, passes as f64 * t_ar / 2.0), "stp p={p} rank {}: {}", r.rank, r.exposed_comm);
        }
    }
}

fn auto_build(source: &str, p: i64, m: i64) -> Build {
    let file = stpc::syntax::span::SourceFile::new("auto.sched", source);
    let request = stpc::pipeline::Request {
        params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
        ..Default::default()
    };
    stpc::pipeline::build(&file, &request).unwrap_or_else(|_| panic!("auto p={p} m={m} compiles"))
}

/// `auto` on ZB-V's placement and memory finds a zero-bubble order at unit
/// costs (as fast as the hand-written ZB-V); on a looped placement with
/// 1F1B's memory it is at least as fast as 1F1B. Its schedules are checked,
/// lowered and simulated like any other.
#[test]
fn auto_schedules_match_the_hand_written_orders_at_unit_costs() {
    let v = "schedule v(p: ranks, m: microbatches) { stages 2 * p; place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 2 * p; } auto; }";
    let looped = "schedule l(p: ranks, m: microbatches) { stages p; place s -> s; memory { budget = p; } auto; }";
    for p in PS {
        for m in [2 * p, 4 * p] {
            let auto_v = run(&auto_build(v, p, m), &unit());
            let hand_v = run(&build("zb-v", p, m, None), &unit());
            assert!(
                close(auto_v.makespan, hand_v.makespan),
                "p={p} m={m}: auto {} vs zb-v {}",
                auto_v.makespan,
                hand_v.makespan
            );
            assert!(close(max_bubble(&auto_v), 0.0), "p={p} m={m}");
            let auto_l = run(&auto_build(looped, p, m), &unit());
            let one_f_one_b = run(&build("1f1b", p, m, None), &unit());
            assert!(
                auto_l.makespan <= one_f_one_b.makespan + 1e-9,
                "p={p} m={m}: {} vs 1f1b {}",
                auto_l.makespan,
                one_f_one_b.makespan
            );
        }
    }
}

/// No schedule beats the lower bound.
#[test]
fn every_standard_schedule_is_at_or_above_the_lower_bound() {
    let costs = [
        unit(),
        CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit() },
        CostModel { forward: 2.0, backward_input: 1.0, backward_weight: 3.0, p2p: 0.75, ..unit() },
    ];
    for (name, p, m, v) in [
        ("gpipe", 4, 8, None),
        ("zb-h2", 4, 8, None),
        ("1f1b", 4, 8, None),
        ("1f1b", 2, 3, None),
        ("zb-h1", 4, 8, None),
        ("zb-v", 4, 8, None),
        ("stp", 4, 12, None),
        ("dualpipe-v", 4, 8, None),
        ("interleaved-1f1b", 4, 8, Some(2)),
    ] {
        let b = build(name, p, m, v);
        for cost in &costs {
            let t = run(&b, cost);
            let bound = stpc::opt::bound::lower_bound(b.checked.schedule(), cost);
            assert!(t.makespan + 1e-9 >= bound, "{name}: makespan {} below bound {bound}", t.makespan);
        }
    }
}

/// Perfetto and chrome://tracing draw only nested events on one thread:
/// in the trace of every standard schedule, events of one thread nest or
/// follow each other (overlapping transfer groups get lanes of their own;
/// zb-v at p = 4, m = 8 had 47 overlaps on one thread before).
#[test]
fn trace_events_of_one_thread_never_overlap_without_nesting() {
    let cost = CostModel { backward_input: 2.0, backward_weight: 0.5, p2p: 0.5, ..CostModel::default() };
    for (name, m, v) in
        [("zb-v", 8, None), ("interleaved-1f1b", 8, Some(2)), ("stp", 12, None), ("dualpipe-v", 12, None)]
    {
        let b = stp_tests::build_std(name, 4, m, v);
        let timeline = stp_ir::simulate::simulate(&b.program, &cost).expect("runs");
        let spans: Vec<Vec<(usize, f64, f64)>> =
            timeline.ranks.iter().map(|r| r.spans.iter().map(|s| (s.instr, s.start, s.end)).collect()).collect();
        let trace: serde_json::Value =
            serde_json::from_str(&stp_ir::trace::chrome_trace(&b.program, &spans, &[])).expect("json");
        let mut by_thread: std::collections::BTreeMap<(u64, u64), Vec<(f64, f64)>> = Default::default();
        for e in trace["traceEvents"].as_array().expect("events").iter().filter(|e| e["ph"] == "X") {
            let (ts, dur) = (e["ts"].as_f64().expect("ts"), e["dur"].as_f64().expect("dur"));
            let key = (e["pid"].as_u64().expect("pid"), e["tid"].as_u64().expect("tid"));
            by_thread.entry(key).or_default().push((ts, ts + dur));
        }
        for (thread, mut events) in by_thread {
            events.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in events.windows(2) {
                let overlap = w[1].0 < w[0].1 - 1e-6 && w[1].1 > w[0].1 + 1e-6;
                assert!(!overlap, "{name}: thread {thread:?}: {:?} and {:?} overlap without nesting", w[0], w[1]);
            }
        }
    }
}

/// Per-stage times of `cost` as three vectors (F, B, W) by stage.
fn by_stage(cost: &CostModel, stages: i64) -> [Vec<f64>; 3] {
    let t: Vec<_> = (0..stages).map(|s| cost.stage(stp_ir::Stage(s as u32))).collect();
    [
        t.iter().map(|t| t.forward).collect(),
        t.iter().map(|t| t.backward_input).collect(),
        t.iter().map(|t| t.backward_weight).collect(),
    ]
}

/// Embedding and LM head: the first stage 1.3 times a middle one, the last 2.5 times.
fn uneven(p: i64) -> CostModel {
    let base = CostModel { forward: 1.0, backward_input: 2.0, backward_weight: 0.75, ..unit() };
    stp_tests::heavy_ends(&base, p as u32, 1.3, 2.5)
}

/// 1F1B with the heavy last stage as its bottleneck: microbatch 0
/// reaches it after the forwards of the stages before it, it then runs
/// its m forwards and full backwards back to back (the light stages keep
/// it fed), and the last backward walks back through the other stages.
#[test]
fn one_f_one_b_under_heavy_first_and_last_stages_takes_the_hand_derived_time() {
    for p in PS {
        for m in [p, 2 * p, 4 * p] {
            let cost = uneven(p);
            let [f, b, w] = by_stage(&cost, p);
            let last = (p - 1) as usize;
            let head: f64 = f[..last].iter().sum();
            let tail: f64 = (0..last).map(|s| b[s] + w[s]).sum();
            let expected = head + m as f64 * (f[last] + b[last] + w[last]) + tail;
            let t = run(&build("1f1b", p, m, None), &cost);
            assert!(close(t.makespan, expected), "p={p} m={m}: makespan {} != {expected}", t.makespan);
        }
    }
}

/// ZB-H1 under the same costs: the last stage runs F, B and (after its
/// first p - 1 microbatches) W back to back and leaves p weight gradients
/// for the end; rank s < p - 1 ends with the last B, which reaches it
/// through the stages after it, and 1 + s weight gradients.
#[test]
fn zb_h1_under_heavy_first_and_last_stages_takes_the_hand_derived_time() {
    for p in PS {
        for m in [p, 2 * p, 4 * p] {
            let cost = uneven(p);
            let [f, b, w] = by_stage(&cost, p);
            let last = (p - 1) as usize;
            let head: f64 = f[..last].iter().sum();
            let last_b = head + m as f64 * (f[last] + b[last]) + (m - p) as f64 * w[last];
            let last_rank_end = last_b + p as f64 * w[last];
            let other_end =
                (0..last).map(|s| last_b + b[s..last].iter().sum::<f64>() + (1 + s) as f64 * w[s]).fold(0.0, f64::max);
            let expected = last_rank_end.max(other_end);
            let t = run(&build("zb-h1", p, m, None), &cost);
            assert!(close(t.makespan, expected), "p={p} m={m}: makespan {} != {expected}", t.makespan);
        }
    }
}

/// Recomputation (Megatron's full and selective): every backward of
/// 1F1B is preceded by its recompute. A recompute needs no gradient, so
/// the first ranks run theirs while they wait; the last rank runs all m
/// on the critical path: the makespan grows by exactly m·T_R, T_R being
/// the `recompute` fraction of T_F. Peak memory falls from p activations
/// to one (full), or to p·(activation − recomputed) + recomputed
/// (selective, where a forward keeps what recompute does not restore).
#[test]
fn recompute_adds_m_recomputes_to_1f1b_and_holds_one_activation() {
    for p in PS {
        for m in [p, 2 * p, 4 * p] {
            for (cost, fraction) in [(unit(), 1.0), (CostModel { backward_input: 2.0, ..unit() }, 0.25)] {
                let cost = CostModel { recompute: fraction, ..cost };
                let plain = run(&build("1f1b", p, m, None), &cost).makespan;
                let with = build("1f1b-recompute", p, m, None);
                let t = run(&with, &cost);
                let expected = plain + m as f64 * fraction * cost.forward;
                assert!(close(t.makespan, expected), "p={p} m={m} {cost:?}: {} != {expected}", t.makespan);
                assert!(with.checked.peaks().iter().all(|peak| peak.units == 1), "p={p} m={m}: full recompute");
            }
            // Selective: 4 units per activation, 3 of them recomputed.
            let s = stp_stdlib::get("1f1b-recompute").expect("stdlib");
            let file = stpc::syntax::span::SourceFile::new(s.path(), s.source);
            let request = stpc::pipeline::Request {
                params: stpc::elab::ParamArgs {
                    ranks: Some(p),
                    microbatches: Some(m),
                    memory: vec![("activation".into(), 4), ("recomputed".into(), 3), ("budget".into(), 1 << 20)],
                    ..Default::default()
                },
                ..Default::default()
            };
            let checked = stpc::pipeline::check(&file, &request).expect("checks");
            assert_eq!(checked.peaks()[0].units, p.min(m) + 3, "p={p} m={m}: selective");
        }
    }
}

/// Looped BFS (Lamy-Poirier, MLSys 2023): the forwards sweep every chunk
/// in turn, then the backwards in reverse; from m >= p no rank waits
/// between chunks, so the makespan is (v m + p - 1)(T_F + T_B + T_W) of a
/// chunk — the bubble ratio (p-1)/(v m + p - 1) — and every rank holds all
/// v m chunk activations.
#[test]
fn looped_bfs_takes_v_m_plus_p_minus_1_full_chunk_passes() {
    for cost in [unit(), CostModel { forward: 1.0, backward_input: 2.0, backward_weight: 0.5, ..unit() }] {
        let per_mb = cost.forward + cost.backward_input + cost.backward_weight;
        for p in PS {
            for v in [1, 2, 3] {
                for m in [p, 2 * p] {
                    let b = build("looped-bfs", p, m, Some(v));
                    let t = run(&b, &cost);
                    let expected = (v * m + p - 1) as f64 * per_mb;
                    assert!(close(t.makespan, expected), "p={p} v={v} m={m}: {} != {expected}", t.makespan);
                    assert!(b.checked.peaks().iter().all(|peak| peak.units == v * m), "p={p} v={v} m={m}");
                }
            }
        }
    }
}

/// Interleaved zero bubble (PyTorch's ScheduleInterleavedZeroBubble, ZB-1p
/// on the looped placement): one forward per hop of warm-up, input
/// gradients racing back, weight gradients filling the drain. The bubble
/// is ZB-H1's, (p-1)(T_F + T_B - T_W), in the times of one chunk; rank 0
/// holds v·p chunk activations ((v-1)p warm-up forwards of the other
/// chunks, p - 1 of its own, and the one that starts the steady state).
#[test]
fn interleaved_zb_bubble_is_p_minus_1_times_f_plus_b_minus_w_of_a_chunk() {
    for cost in [unit(), CostModel { backward_input: 2.0, backward_weight: 0.5, ..unit() }] {
        let per_mb = cost.forward + cost.backward_input + cost.backward_weight;
        let bubble = cost.forward + cost.backward_input - cost.backward_weight;
        for p in PS {
            for v in [2, 3] {
                for m in [p, 2 * p, 4 * p] {
                    let b = build("interleaved-zb", p, m, Some(v));
                    let t = run(&b, &cost);
                    let expected = (m * v) as f64 * per_mb + (p - 1) as f64 * bubble;
                    assert!(close(t.makespan, expected), "p={p} v={v} m={m}: {} != {expected}", t.makespan);
                    assert_eq!(b.checked.peaks()[0].units, v * p, "p={p} v={v} m={m}");
                }
            }
        }
    }
}

/// Interleaved 1F1B with full recompute: `R` before every chunk backward.
/// The bottleneck rank runs all m·v recomputes on its critical path (the
/// others hide theirs while they wait for gradients): the makespan is
/// interleaved 1F1B's plus m·v·T_R, and every rank holds one chunk
/// activation at its peak.
#[test]
fn interleaved_recompute_adds_m_v_recomputes_and_holds_one_activation() {
    for (cost, fraction) in [(unit(), 1.0), (CostModel { backward_input: 2.0, ..unit() }, 0.25)] {
        let cost = CostModel { recompute: fraction, ..cost };
        for p in PS {
            for v in [2, 3] {
                for m in [p, 2 * p] {
                    let plain = run(&build("interleaved-1f1b", p, m, Some(v)), &cost).makespan;
                    let with = build("interleaved-1f1b-recompute", p, m, Some(v));
                    let t = run(&with, &cost);
                    let expected = plain + (m * v) as f64 * fraction * cost.forward;
                    assert!(close(t.makespan, expected), "p={p} v={v} m={m}: {} != {expected}", t.makespan);
                    assert!(with.checked.peaks().iter().all(|peak| peak.units == 1), "p={p} v={v} m={m}");
                }
            }
        }
    }
}

/// DualPipe (DeepSeek-V3 report, Table 2): every rank idles
/// (p/2 − 1)(T_F&B + T_B+T_W − 3T_W) per step, with F&B the braided pair
/// (T_F + T_B + T_W here: without TP nothing of it hides). The table's
/// figure is exact where T_F = T_B; elsewhere it approximates (measured at
/// p = 4-8: 1 below the simulated step at T_B = 2T_F, p/2 − 1 above it at
/// T_F = 2T_B — the middle ranks start their steady state unbraided).
#[test]
fn dualpipe_bubble_is_the_deepseek_formula() {
    for (f, b, w) in [(1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (2.0, 2.0, 0.5)] {
        let cost = CostModel { forward: f, backward_input: b, backward_weight: w, ..unit() };
        for p in [2, 4, 6, 8] {
            for m in [2 * p, 3 * p + p % 4, 4 * p + 2] {
                let t = run(&build("dualpipe", p, m, None), &cost);
                let bubble = (p / 2 - 1) as f64 * ((f + b + w) + (b + w) - 3.0 * w);
                for r in &t.ranks {
                    assert!(close(r.busy, m as f64 * (f + b + w)), "p={p} m={m}: rank {} busy {}", r.rank, r.busy);
                }
                assert!(close(t.makespan, m as f64 * (f + b + w) + bubble), "p={p} m={m} {cost:?}: {}", t.makespan);
            }
        }
    }
}

/// DualPipeV is DualPipe folded in half: at any costs DualPipe on 2p ranks
/// with 2m microbatches takes exactly as long as DualPipeV on p ranks with
/// m (the repository derives one from the other) — without transfer time,
/// since DualPipeV turns around on one rank where DualPipe crosses to the
/// next. A check of the order that does not rest on the formula's regime.
#[test]
fn dualpipe_on_twice_the_ranks_times_like_dualpipe_v() {
    let costs = [
        unit(),
        CostModel { backward_input: 2.0, ..unit() },
        CostModel { forward: 2.0, ..unit() },
        CostModel { backward_input: 1.5, backward_weight: 0.7, ..unit() },
    ];
    for cost in &costs {
        for p in [2, 4] {
            for m in [2 * p, 3 * p, 4 * p] {
                let folded = run(&build("dualpipe-v", p, m, None), cost).makespan;
                let full = run(&build("dualpipe", 2 * p, 2 * m, None), cost).makespan;
                assert!(close(full, folded), "p={p} m={m} {cost:?}: dualpipe {full}, dualpipe-v {folded}");
            }
        }
    }
}

/// DualPipeV's bubble is the DualPipe README's formula with PP = the
/// number of stages (2p, the ranks of the unfolded DualPipe):
/// (p − 1)(T_F&B + T_B + T_W − 3T_W) per rank at T_F = T_B, on top of
/// 2m(T_F + T_B + T_W) of work. The shared reference table writes
/// (p/2 − 1) with p = DualPipeV's ranks, which the order does not meet.
#[test]
fn dualpipe_v_bubble_is_the_deepseek_formula_over_its_stages() {
    for (f, b, w) in [(1.0, 1.0, 1.0), (1.0, 1.0, 0.5), (2.0, 2.0, 0.5)] {
        let cost = CostModel { forward: f, backward_input: b, backward_weight: w, ..unit() };
        for p in [2, 3, 4, 8] {
            for m in [2 * p, 3 * p, 4 * p + 1] {
                let t = run(&build("dualpipe-v", p, m, None), &cost);
                let work = 2.0 * m as f64 * (f + b + w);
                let bubble = (p - 1) as f64 * ((f + b + w) + (b + w) - 3.0 * w);
                assert!(close(t.makespan, work + bubble), "p={p} m={m} {cost:?}: {}", t.makespan);
            }
        }
    }
}

/// A gradient reduction starts once every owner of the part has drained
/// its compute, and a rank's reductions run one after another: in DualPipe
/// and Chimera each rank pairs with rank p − 1 − r for both its parts, so
/// a reduction time T adds exactly 2T to the step.
#[test]
fn gradient_reductions_add_their_time_after_the_drain() {
    for name in ["dualpipe", "chimera"] {
        for p in [2, 4, 6] {
            let b = build(name, p, 2 * p, None);
            let without = run(&b, &unit()).makespan;
            let with = run(&b, &CostModel { reduce: 2.5, ..unit() }).makespan;
            assert!(close(with, without + 5.0), "{name} p={p}: {without} -> {with}");
        }
    }
}

/// Activation memory of the bidirectional schedules, against their
/// papers: DualPipe holds at most PP + 1 microbatches' activations per
/// rank (the DualPipe README's table; here p + 1 on the middle ranks, p
/// at the ends), Chimera between D/2 + 1 and D (Li & Hoefler, Table 2):
/// p/2 + 1 at the ends, one more per hop towards the middle.
#[test]
fn dualpipe_and_chimera_peak_memory_is_the_papers() {
    for p in [2_i64, 4, 6, 8] {
        for m in [2 * p, 4 * p] {
            let peaks: Vec<i64> = build("dualpipe", p, m, None).checked.peaks().iter().map(|k| k.units).collect();
            assert_eq!(peaks.iter().max(), Some(&(p + 1)), "dualpipe p={p} m={m}: {peaks:?}");
            assert!(peaks.iter().all(|k| *k >= p), "dualpipe p={p} m={m}: {peaks:?}");
            let peaks: Vec<i64> = build("chimera", p, m, None).checked.peaks().iter().map(|k| k.units).collect();
            let expected: Vec<i64> = (0..p).map(|r| p / 2 + 1 + r.min(p - 1 - r)).collect();
            assert_eq!(peaks, expected, "chimera p={p} m={m}");
        }
    }
}

/// Chimera (Li & Hoefler, SC'21): a basic unit of m = p microbatches takes
/// 3p − 2 slots of one forward (a full backward as long as a forward), so
/// every rank idles p − 2 of them: bubble ratio (D−2)/(2N+D−2) at N = D.
#[test]
fn chimera_bubble_is_p_minus_2_slots() {
    let cost = CostModel { forward: 1.0, backward_input: 0.5, backward_weight: 0.5, ..unit() };
    for p in [2, 4, 6, 8] {
        let t = run(&build("chimera", p, p, None), &cost);
        assert!(close(t.makespan, (3 * p - 2) as f64), "p={p}: makespan {}", t.makespan);
        for r in &t.ranks {
            assert!(close(t.makespan - r.busy, (p - 2) as f64), "p={p} rank {}: idle {}", r.rank, t.makespan - r.busy);
        }
        assert!(close(t.bubble_ratio(), (p - 2) as f64 / (3 * p - 2) as f64), "p={p}");
    }
}
