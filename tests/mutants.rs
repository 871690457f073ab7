//! Mutation testing of the checker against an independent reference.
//!
//! Valid schedules are mutated (two ops of a rank swapped, an op dropped,
//! an op duplicated) and handed to stpc's checker and lowering. A slow,
//! separately written reference decides whether each mutant is safe: every
//! pass exactly once where it belongs, and a run in which each rank
//! executes its ops in order, each op waiting for the passes it consumes,
//! finishes. stpc must accept exactly the mutants the reference finds safe,
//! never panic, and never produce a program that deadlocks under
//! rendezvous sends.

use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use stp_ir::simulate::{find_deadlock, Semantics};
use stp_ir::{Pass, PassKind};
use stpc::elab::{ComputeSchedule, ParamArgs};
use stpc::pipeline::{self, Request};
use stpc::syntax::span::SourceFile;

fn elaborate(source: &str, p: i64, m: i64, v: Option<i64>) -> ComputeSchedule {
    let file = SourceFile::new("base.sched", source);
    let request = Request {
        params: ParamArgs { ranks: Some(p), microbatches: Some(m), chunks: v, ..ParamArgs::default() },
        ..Request::default()
    };
    let mut s = pipeline::elaborate(&file, &request).unwrap_or_else(|_| panic!("base schedule elaborates"));
    // The reference judges dependencies, not memory: mutants may hold more.
    s.memory.budget = None;
    s
}

const SPLIT_BACKWARD: &str = "
schedule split(p: ranks, m: microbatches) {
  stages p;
  place s -> s;
  rank r {
    let warmup = min(p - 1 - r, m);
    for i in 0..warmup { F(i) }
    for i in 0..m - warmup { F(i + warmup); B(i); W(i) }
    for i in m - warmup..m { B(i); W(i) }
  }
}";

const V_SHAPE: &str = "
schedule v(p: ranks, m: microbatches) {
  stages 2 * p;
  place s -> if s < p { s } else { 2 * p - 1 - s };
  rank r {
    for i in 0..m { F(i, r) }
    for i in 0..m { F(i, 2 * p - 1 - r) }
    for i in 0..m { BW(i, 2 * p - 1 - r) }
    for i in 0..m { BW(i, r) }
  }
}";

fn bases() -> &'static [ComputeSchedule] {
    static BASES: std::sync::OnceLock<Vec<ComputeSchedule>> = std::sync::OnceLock::new();
    BASES.get_or_init(build_bases)
}

fn build_bases() -> Vec<ComputeSchedule> {
    let std = |name: &str| stp_stdlib::get(name).map(|s| s.source).unwrap_or_default();
    vec![
        elaborate(std("1f1b"), 3, 4, None),
        elaborate(std("1f1b"), 4, 6, None),
        elaborate(std("gpipe"), 3, 3, None),
        elaborate(std("interleaved-1f1b"), 2, 4, Some(2)),
        elaborate(SPLIT_BACKWARD, 3, 4, None),
        elaborate(V_SHAPE, 2, 3, None),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    Swap { rank: usize, a: usize, b: usize },
    Drop { rank: usize, at: usize },
    Duplicate { rank: usize, from: usize, to: usize },
}

fn apply(s: &mut ComputeSchedule, m: Mutation) {
    let ranks = s.ranks.len();
    match m {
        Mutation::Swap { rank, a, b } => {
            let ops = &mut s.ranks[rank % ranks];
            if !ops.is_empty() {
                let n = ops.len();
                ops.swap(a % n, b % n);
            }
        }
        Mutation::Drop { rank, at } => {
            let ops = &mut s.ranks[rank % ranks];
            if !ops.is_empty() {
                let n = ops.len();
                ops.remove(at % n);
            }
        }
        Mutation::Duplicate { rank, from, to } => {
            let ops = &mut s.ranks[rank % ranks];
            if !ops.is_empty() {
                let n = ops.len();
                let op = ops[from % n].clone();
                ops.insert(to % (n + 1), op);
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..8usize, 0..64usize, 0..64usize).prop_map(|(rank, a, b)| Mutation::Swap { rank, a, b }),
        (0..8usize, 0..64usize).prop_map(|(rank, at)| Mutation::Drop { rank, at }),
        (0..8usize, 0..64usize, 0..64usize).prop_map(|(rank, from, to)| Mutation::Duplicate { rank, from, to }),
    ]
}

/// The reference: written from the definitions, not from stpc's code.
fn reference_is_safe(s: &ComputeSchedule) -> bool {
    let mut count: HashMap<(PassKind, u32, u32), usize> = HashMap::new();
    for ops in &s.ranks {
        for op in ops {
            for p in &op.compute.passes {
                *count.entry((p.kind, p.stage.0, p.mb.0)).or_default() += 1;
            }
        }
    }
    let n = |k, st, mb| count.get(&(k, st, mb)).copied().unwrap_or(0);
    for st in 0..s.meta.num_stages {
        for mb in 0..s.meta.num_microbatches {
            let split = n(PassKind::B, st, mb) == 1 && n(PassKind::W, st, mb) == 1 && n(PassKind::BW, st, mb) == 0;
            let full = n(PassKind::BW, st, mb) == 1 && n(PassKind::B, st, mb) == 0 && n(PassKind::W, st, mb) == 0;
            if n(PassKind::F, st, mb) != 1 || !(split || full) || n(PassKind::R, st, mb) > 1 {
                return false;
            }
        }
    }
    // Run: each rank executes its next op when everything it needs has run.
    let needs = |p: &Pass| -> Vec<(PassKind, u32, u32)> {
        let (st, mb) = (p.stage.0, p.mb.0);
        let backward = |st: u32| if n(PassKind::BW, st, mb) == 1 { PassKind::BW } else { PassKind::B };
        match p.kind {
            PassKind::F if st > 0 => vec![(PassKind::F, st - 1, mb)],
            PassKind::F => vec![],
            PassKind::B | PassKind::BW => {
                // A recomputed pair's backward needs its `R`, which needs the `F`.
                let restored = if n(PassKind::R, st, mb) == 1 { PassKind::R } else { PassKind::F };
                let mut v = vec![(restored, st, mb)];
                if st + 1 < s.meta.num_stages {
                    v.push((backward(st + 1), st + 1, mb));
                }
                v
            }
            PassKind::W => vec![(PassKind::B, st, mb)],
            PassKind::R => vec![(PassKind::F, st, mb)],
        }
    };
    let mut done: HashSet<(PassKind, u32, u32)> = HashSet::new();
    let mut pc = vec![0usize; s.ranks.len()];
    loop {
        let mut progressed = false;
        for (r, ops) in s.ranks.iter().enumerate() {
            while let Some(op) = ops.get(pc[r]) {
                let ready = op.compute.passes.iter().all(|p| needs(p).iter().all(|d| done.contains(d)));
                if !ready {
                    break;
                }
                for p in &op.compute.passes {
                    done.insert((p.kind, p.stage.0, p.mb.0));
                }
                pc[r] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    pc.iter().zip(&s.ranks).all(|(pc, ops)| *pc == ops.len())
}

/// stpc's verdict: checked, lowered, verified, and deadlock-free under rendezvous.
fn stpc_accepts(s: ComputeSchedule) -> bool {
    let Ok(checked) = stpc::check::check(s) else { return false };
    let lowered = stpc::lower::lower(&checked, Default::default(), Semantics::Rendezvous)
        .unwrap_or_else(|e| panic!("lowering a checked schedule failed: {e}"));
    if lowered.deadlock.is_some() {
        return false;
    }
    assert_eq!(find_deadlock(&lowered.program, Semantics::Rendezvous), Ok(()), "accepted program deadlocks");
    assert_eq!(find_deadlock(&lowered.program, Semantics::Buffered), Ok(()), "accepted program deadlocks");
    true
}

#[test]
fn the_unmutated_bases_are_safe_and_accepted() {
    for base in bases() {
        assert!(reference_is_safe(base), "{}", base.meta.name);
        assert!(stpc_accepts(base.clone()), "{}", base.meta.name);
    }
}

/// Both verdicts must be common, or the property says little.
#[test]
fn mutants_are_both_safe_and_unsafe() {
    let (mut safe, mut unsafe_) = (0, 0);
    for k in 0..200usize {
        let mut s = bases()[k % bases().len()].clone();
        let m = match k % 3 {
            0 => Mutation::Swap { rank: k, a: k / 3, b: k / 3 + 1 + k % 5 },
            1 => Mutation::Drop { rank: k, at: k },
            _ => Mutation::Duplicate { rank: k, from: k, to: k / 2 },
        };
        apply(&mut s, m);
        if reference_is_safe(&s) {
            safe += 1;
        } else {
            unsafe_ += 1;
        }
    }
    assert!(safe >= 20 && unsafe_ >= 20, "safe {safe}, unsafe {unsafe_}");
}

proptest! {
    // MUTANT_CASES=100000 for a longer campaign.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MUTANT_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(768),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn stpc_accepts_exactly_the_mutants_the_reference_finds_safe(
        base in 0..6usize,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut s = bases()[base].clone();
        for m in &mutations {
            apply(&mut s, *m);
        }
        let expected = reference_is_safe(&s);
        let got = stpc_accepts(s);
        prop_assert_eq!(got, expected, "mutations {:?} of base {}", mutations, base);
    }
}
