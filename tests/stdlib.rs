//! The standard library: every schedule compiles at many parameters, runs
//! every pass exactly once on the right rank, lowers to IR that verifies,
//! and its IR text at two parameter sets is pinned by snapshots.

use std::collections::HashMap;
use stp_ir::{Instr, PassKind, Program};
use stpc::diag::render::render;
use stpc::elab::ParamArgs;
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

fn compile(name: &str, p: i64, m: i64, v: Option<i64>) -> Program {
    stp_tests::build_std(name, p, m, v).program
}

/// Parameter sets each schedule must accept.
fn instances() -> Vec<(&'static str, i64, i64, Option<i64>)> {
    let mut out = Vec::new();
    for p in [1, 2, 3, 4, 8] {
        for m in [1, 2, p, p + 1, 2 * p, 4 * p] {
            out.push(("gpipe", p, m, None));
            out.push(("1f1b", p, m, None));
        }
        for v in [2, 3] {
            for m in [p, 2 * p, 4 * p] {
                out.push(("interleaved-1f1b", p, m, Some(v)));
            }
        }
        for m in [1, p, 2 * p, 4 * p] {
            out.push(("zb-h1", p, m, None));
            out.push(("zb-h2", p, m, None));
        }
        for m in [3 * p - 1, 3 * p, 5 * p] {
            out.push(("stp", p, m, None));
        }
        for m in [2 * p - 1, 2 * p, 4 * p] {
            out.push(("zb-v", p, m, None));
        }
        for m in [2 * p, 2 * p + 1, 4 * p] {
            out.push(("dualpipe-v", p, m, None));
        }
    }
    out
}

#[test]
fn every_pass_runs_exactly_once_on_its_owner() {
    for (name, p, m, v) in instances() {
        let program = compile(name, p, m, v);
        let meta = &program.schedule;
        let mut seen: HashMap<(PassKind, u32, u32), usize> = HashMap::new();
        for rank in &program.ranks {
            for instr in &rank.instrs {
                if let Instr::Compute(c) = instr {
                    for pass in &c.passes {
                        assert_eq!(meta.owner(pass.stage), Some(rank.rank), "{name}: {pass} on {}", rank.rank);
                        *seen.entry((pass.kind, pass.stage.0, pass.mb.0)).or_default() += 1;
                    }
                }
            }
        }
        for stage in 0..meta.num_stages {
            for mb in 0..meta.num_microbatches {
                let count = |k| seen.get(&(k, stage, mb)).copied().unwrap_or(0);
                assert_eq!(count(PassKind::F), 1, "{name} p={p} m={m}: F s{stage} mb{mb}");
                let backward = (count(PassKind::BW), count(PassKind::B), count(PassKind::W));
                assert!(
                    backward == (1, 0, 0) || backward == (0, 1, 1),
                    "{name} p={p} m={m}: backward of s{stage} mb{mb}"
                );
            }
        }
        stp_ir::verify(&program).unwrap_or_else(|e| panic!("{name} p={p} m={m}: {e:?}"));
    }
}

#[test]
fn stage_counts_and_placements_match_the_papers() {
    let il = compile("interleaved-1f1b", 4, 8, Some(2));
    assert_eq!(il.schedule.num_stages, 8);
    let looped: Vec<u32> = il.schedule.placement.iter().map(|r| r.0).collect();
    assert_eq!(looped, [0, 1, 2, 3, 0, 1, 2, 3]);
    let one = compile("1f1b", 4, 8, None);
    assert_eq!(one.schedule.placement.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
}

/// 1F1B's defining property: rank r runs min(p-1-r, m) forwards before its
/// first backward, then never has more than p-r forwards outstanding.
#[test]
fn one_f_one_b_warms_up_with_p_minus_1_minus_r_forwards() {
    let (p, m) = (4u32, 8u32);
    let program = compile("1f1b", p.into(), m.into(), None);
    for rank in &program.ranks {
        let r = rank.rank.0;
        let kinds: Vec<PassKind> = rank
            .instrs
            .iter()
            .filter_map(|i| match i {
                Instr::Compute(c) => Some(c.passes[0].kind),
                _ => None,
            })
            .collect();
        let warmup = kinds.iter().take_while(|k| **k == PassKind::F).count() as u32;
        assert_eq!(warmup, (p - 1 - r).min(m) + 1, "rank {r}: forwards before the first backward");
        let mut outstanding = 0i32;
        let mut peak = 0;
        for k in kinds {
            outstanding += if k == PassKind::F { 1 } else { -1 };
            peak = peak.max(outstanding);
        }
        assert_eq!(peak as u32, p - r, "rank {r}: peak in-flight microbatches");
    }
}

/// Megatron's interleaved order: rank r warms up with 2(p-r-1) + (v-1)p
/// forwards (all of them when m == p), and forwards walk the chunks in
/// groups of p microbatches.
#[test]
fn interleaved_warmup_matches_megatron() {
    for (p, m, v) in [(4u32, 8u32, 2u32), (4, 4, 2), (2, 6, 3)] {
        let program = compile("interleaved-1f1b", p.into(), m.into(), Some(v.into()));
        for rank in &program.ranks {
            let r = rank.rank.0;
            let passes: Vec<stp_ir::Pass> = rank
                .instrs
                .iter()
                .filter_map(|i| match i {
                    Instr::Compute(c) => Some(c.passes[0]),
                    _ => None,
                })
                .collect();
            let warmup = passes.iter().take_while(|x| x.kind == PassKind::F).count() as u32;
            let total = m * v;
            let expected = if m == p { total } else { (2 * (p - r - 1) + (v - 1) * p).min(total) };
            // In the steady state the next forward precedes each backward.
            let expected = if expected < total { expected + 1 } else { expected };
            assert_eq!(warmup, expected, "p={p} m={m} v={v} rank {r}");
            let first_forwards: Vec<(u32, u32)> = passes
                .iter()
                .filter(|x| x.kind == PassKind::F)
                .take(p as usize + 1)
                .map(|x| (x.stage.0, x.mb.0))
                .collect();
            // The first p forwards are microbatches 0..p of chunk 0, then chunk 1 starts.
            for (k, (stage, mb)) in first_forwards.iter().enumerate().take(p as usize) {
                assert_eq!((*stage, *mb), (r, k as u32), "p={p} m={m} v={v} rank {r} forward {k}");
            }
            assert_eq!(first_forwards[p as usize], (p + r, 0), "p={p} m={m} v={v} rank {r}: chunk 1 starts");
        }
    }
}

#[test]
fn ir_snapshots() {
    let cases: [(&str, i64, i64, Option<i64>); 10] = [
        ("gpipe", 2, 3, None),
        ("gpipe", 4, 4, None),
        ("1f1b", 2, 3, None),
        ("1f1b", 4, 6, None),
        ("interleaved-1f1b", 2, 4, Some(2)),
        ("interleaved-1f1b", 4, 8, Some(2)),
        ("zb-h1", 3, 4, None),
        ("stp", 2, 5, None),
        ("stp", 3, 8, None),
        ("zb-v", 2, 3, None),
    ];
    for (name, p, m, v) in cases {
        let program = compile(name, p, m, v);
        let suffix = v.map_or(String::new(), |v| format!("_v{v}"));
        insta::assert_snapshot!(format!("{name}_p{p}_m{m}{suffix}"), stp_ir::print_text(&program));
    }
}

#[test]
fn ir_round_trips_through_text_and_json() {
    for (name, p, m, v) in instances() {
        let program = compile(name, p, m, v);
        let text = stp_ir::print_text(&program);
        assert_eq!(stp_ir::parse_text(&text).as_ref(), Ok(&program), "{name} p={p} m={m}: text round trip");
        let json = stp_ir::to_json(&program);
        assert_eq!(stp_ir::load_json(&json).ok().as_ref(), Some(&program), "{name} p={p} m={m}: JSON round trip");
        let compact = stp_ir::to_compact_json(&program);
        assert_eq!(stp_ir::load_json(&compact).ok().as_ref(), Some(&program), "{name} p={p} m={m}: compact round trip");
        let instrs: usize = program.ranks.iter().map(|r| r.instrs.len()).sum();
        if instrs >= 100 {
            // The header is the same in both forms; the instructions shrink.
            assert!(
                compact.len() * 3 < json.len(),
                "{name} p={p} m={m}: compact {} bytes, JSON {}",
                compact.len(),
                json.len()
            );
        }
    }
    // Units (tensor parallelism, both collectives) and reductions (several pipelines).
    for (name, tp, sequence_parallel) in [("stp", 2, false), ("zb-v", 4, true), ("dualpipe", 2, false)] {
        let mut program = stp_tests::build_std_tp(name, 4, 12, None, tp).program;
        if sequence_parallel {
            for rank in &mut program.ranks {
                for instr in &mut rank.instrs {
                    if let stp_ir::Instr::Compute(c) = instr {
                        for u in &mut c.units {
                            u.collective = u.collective.map(|_| stp_ir::Collective::ReduceScatterAllGather);
                        }
                    }
                }
            }
        }
        let compact = stp_ir::to_compact_json(&program);
        assert_eq!(stp_ir::load_json(&compact).ok().as_ref(), Some(&program), "{name} tp={tp}: compact round trip");
    }
}

#[test]
fn every_standard_schedule_passes_its_check_directives_over_50_instances() {
    for s in stp_stdlib::ALL {
        let file = SourceFile::new(s.path(), s.source);
        let sweep = pipeline::sweep(&file, &Request::default())
            .unwrap_or_else(|d| panic!("{}:\n{}", s.name, render(&d, &file, false)));
        assert!(sweep.passed >= 50, "{}: only {} instances", s.name, sweep.passed);
    }
}

fn peaks(name: &str, p: i64, m: i64, v: Option<i64>) -> Vec<i64> {
    let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("no stdlib schedule {name}"));
    let file = SourceFile::new(s.path(), s.source);
    let request = Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(m), chunks: v, ..ParamArgs::default() },
        ..Request::default()
    };
    let checked = pipeline::check(&file, &request).unwrap_or_else(|d| panic!("{}", render(&d, &file, false)));
    checked.peaks().iter().map(|peak| peak.units).collect()
}

/// Peak activations from the reference table: GPipe holds all m; 1F1B
/// holds min(p - r, m) on rank r (p on rank 0); interleaved 1F1B holds
/// (v-1)p + 2(p-1) + 1 chunk activations on rank 0, i.e. p + (p-1)/v whole
/// ranks' worth (Narayanan et al., SC'21).
#[test]
fn peak_memory_matches_the_formulas() {
    for p in [2i64, 4, 8] {
        for m in [p, 2 * p, 4 * p] {
            assert_eq!(peaks("gpipe", p, m, None), vec![m; p as usize], "gpipe p={p} m={m}");
            let expected: Vec<i64> = (0..p).map(|r| (p - r).min(m)).collect();
            assert_eq!(peaks("1f1b", p, m, None), expected, "1f1b p={p} m={m}");
            for v in [2i64, 3] {
                let rank0 = peaks("interleaved-1f1b", p, m, Some(v))[0];
                let expected = if m == p { v * p } else { (v - 1) * p + 2 * (p - 1) + 1 };
                assert_eq!(rank0, expected, "interleaved p={p} m={m} v={v}");
            }
        }
    }
}

/// The budgets the standard schedules declare are tight: one unit less fails.
#[test]
fn declared_budgets_are_tight() {
    for (name, p, m, v) in [("1f1b", 4, 8, None), ("interleaved-1f1b", 4, 8, Some(2))] {
        let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("no {name}"));
        let file = SourceFile::new(s.path(), s.source);
        let mut request = Request {
            params: ParamArgs { ranks: Some(p), microbatches: Some(m), chunks: v, ..ParamArgs::default() },
            ..Request::default()
        };
        let checked = pipeline::check(&file, &request).unwrap_or_else(|d| panic!("{}", render(&d, &file, false)));
        let budget = checked.schedule().memory.budget.unwrap_or_else(|| panic!("{name} declares a budget"));
        assert_eq!(checked.peaks().iter().map(|p| p.units).max(), Some(budget), "{name}");
        request.params.memory.push(("budget".into(), budget - 1));
        let errors = pipeline::check(&file, &request).err().unwrap_or_default();
        assert!(errors.iter().any(|d| d.code == stpc::diag::Code::MemoryBudget), "{name} with budget {}", budget - 1);
    }
}

/// In a V placement a link carries two logical streams (rank 1 sends both
/// chunk 1's activations and chunk 0's gradients to rank 0). Lowering
/// receives them in the order they are sent; receiving them in the order
/// they are needed instead would hand one stream's tensor to the other, and
/// `verify` refuses that program.
#[test]
fn v_shape_links_carry_two_streams_received_in_send_order() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/v_shape.sched");
    let text = std::fs::read_to_string(&path).expect("examples/v_shape.sched");
    let file = SourceFile::new("v_shape.sched", text);
    let request = Request {
        params: ParamArgs { ranks: Some(2), microbatches: Some(2), ..ParamArgs::default() },
        ..Request::default()
    };
    let mut program = pipeline::compile(&file, &request).unwrap_or_else(|d| panic!("{}", render(&d, &file, false)));
    let (r0, r1) = (stp_ir::Rank(0), stp_ir::Rank(1));
    let recvs: Vec<(usize, stp_ir::Buffer)> = program.ranks[0]
        .instrs
        .iter()
        .enumerate()
        .flat_map(|(i, instr)| instr.transfers().iter().map(move |t| (i, *t)))
        .filter(|(_, t)| t.dir == stp_ir::Direction::Recv && t.link(r0) == (r1, r0))
        .map(|(i, t)| (i, t.buffer))
        .collect();
    let kinds: std::collections::HashSet<stp_ir::BufferKind> = recvs.iter().map(|(_, b)| b.kind).collect();
    assert_eq!(kinds.len(), 2, "the link r1 -> r0 carries activations and gradients: {recvs:?}");
    // Swap the first activation and the first gradient received on the link.
    let act = recvs.iter().find(|(_, b)| b.kind == stp_ir::BufferKind::Act).map(|r| r.0);
    let grad = recvs.iter().find(|(_, b)| b.kind == stp_ir::BufferKind::Grad).map(|r| r.0);
    let (Some(a), Some(g)) = (act, grad) else { panic!("both streams present") };
    program.ranks[0].instrs.swap(a, g);
    let errors = stp_ir::verify(&program).expect_err("out-of-order receives must be refused");
    assert!(errors.iter().any(|e| e.message.contains("must be posted in the same order")), "{errors:?}");
}

/// With tensor parallelism every compute lists its units; a braided pair
/// alternates its passes' units so each all-reduce runs under the other
/// pass's compute. Pinned as IR text.
#[test]
fn tensor_parallel_ir_snapshot() {
    let s = stp_stdlib::get("stp").unwrap_or_else(|| panic!("stp"));
    let file = SourceFile::new(s.path(), s.source);
    let mut request = Request {
        params: ParamArgs { ranks: Some(2), microbatches: Some(5), ..ParamArgs::default() },
        ..Request::default()
    };
    request.lower.tp = 4;
    let program = pipeline::compile(&file, &request).unwrap_or_else(|d| panic!("{}", render(&d, &file, false)));
    insta::assert_snapshot!("stp_p2_m5_tp4", stp_ir::print_text(&program));
}
