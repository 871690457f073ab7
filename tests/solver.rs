//! The Z3 scheduler for `auto` schedules: its orders pass the checker, are
//! never slower than the greedy order, simulate to exactly the makespan it
//! claims, stay within the memory budget, and when it claims optimality
//! the claim agrees with the bounds.

use std::time::Duration;
use stp_ir::simulate::{simulate, CostModel};
use stpc::opt::{PlanReport, Solver};
use stpc::pipeline::{build, Build, Request};
use stpc::syntax::span::SourceFile;

const V_SHAPE: &str = "schedule v(p: ranks, m: microbatches) { stages 2 * p; place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 2 * p; } auto; }";
const LOOPED: &str = "schedule l(p: ranks, m: microbatches) { stages p; place s -> s; memory { budget = p; } auto; }";

/// Interleaved 1F1B's placement (v = 2) within its hand order's peak at
/// p = 4, m = 12 (11 units).
const INTERLEAVED_11: &str =
    "schedule il(p: ranks, m: microbatches) { stages 2 * p; place s -> s % p; memory { budget = 11; } auto; }";

/// The book's cost mix (b): T_B = 2, T_W = 0.5, T_AR = 0.25 (T_F = 1).
fn costs_b() -> CostModel {
    CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..CostModel::default() }
}

fn planned(source: &str, p: i64, m: i64, cost: CostModel, solver: Solver) -> (Build, PlanReport) {
    let file = SourceFile::new("auto.sched", source);
    let request = Request {
        params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
        cost: Some(cost),
        solver,
        ..Default::default()
    };
    let b = build(&file, &request).unwrap_or_else(|d| panic!("p={p} m={m} compiles: {d:?}"));
    let report = b.checked.schedule().plan.clone().expect("an auto schedule reports its plan");
    (b, report)
}

/// The Z3 scheduler with `effort` reference seconds of work and no
/// wall-clock cap: the same order on any machine under any load.
fn smt(effort: u64) -> Solver {
    Solver::Smt { effort: effort as f64, cap: None, progress: None }
}

/// Z3's whole model with 30 reference seconds of effort from an order of
/// makespan `upper`: the optimum, on the small instances it settles.
fn z3_settled(s: &stpc::elab::ComputeSchedule, upper: f64) -> stpc::opt::smt::SmtPlan {
    stpc::opt::smt::solve(s, upper, &mut stpc::opt::effort::Budget::new(30.0, None), 30.0, None, None)
}

fn simulated(b: &Build, cost: &CostModel) -> f64 {
    simulate(&b.program, cost).unwrap_or_else(|d| panic!("checked program deadlocked: {d}")).makespan
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Instances Z3 settles within seconds: uniform and skewed costs, with and
/// without transfer time, with and without a TP collective to hide
/// (braids and `BW`), both placements.
fn instances() -> Vec<(&'static str, i64, i64, CostModel)> {
    let unit = CostModel::default();
    let skewed = CostModel { forward: 1.0, backward_input: 3.0, backward_weight: 0.5, ..unit.clone() };
    let slow_links = CostModel { backward_input: 2.0, p2p: 0.5, ..unit.clone() };
    let tp = CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit.clone() };
    let tp_slow = CostModel { tp_collective: 0.5, p2p: 0.25, ..skewed.clone() };
    vec![
        (V_SHAPE, 2, 4, unit.clone()),
        (V_SHAPE, 2, 4, skewed.clone()),
        (LOOPED, 3, 4, CostModel { backward_input: 2.0, ..unit }),
        (LOOPED, 4, 6, slow_links.clone()),
        (LOOPED, 2, 4, skewed),
        (LOOPED, 3, 6, slow_links),
        (V_SHAPE, 2, 4, tp),
        (LOOPED, 3, 4, tp_slow),
    ]
}

#[test]
fn smt_orders_are_checked_never_slower_than_greedy_and_simulate_to_their_claim() {
    for (source, p, m, cost) in instances() {
        let (greedy_build, greedy) = planned(source, p, m, cost.clone(), Solver::Greedy);
        // No proof needed here: a short limit bounds the test's time.
        let (smt_build, found) = planned(source, p, m, cost.clone(), smt(3));
        let greedy_time = simulated(&greedy_build, &cost);
        let smt_time = simulated(&smt_build, &cost);
        assert!(close(greedy.makespan, greedy_time), "greedy claims {} simulates {greedy_time}", greedy.makespan);
        assert!(close(found.makespan, smt_time), "smt claims {} simulates {smt_time}", found.makespan);
        assert!(smt_time <= greedy_time + 1e-9, "p={p} m={m}: smt {smt_time} slower than greedy {greedy_time}");
        assert_eq!(found.greedy_makespan, greedy.greedy_makespan);
        assert!(close(greedy.makespan, greedy_time));
        let bound = stpc::opt::bound::lower_bound(smt_build.checked.schedule(), &cost);
        assert!(smt_time + 1e-9 >= bound, "p={p} m={m}: {smt_time} below the lower bound {bound}");
        let budget = smt_build.checked.schedule().memory.budget.expect("auto has a budget");
        assert!(smt_build.checked.peaks().iter().all(|peak| peak.units <= budget));
    }
}

/// Where the greedy order is not optimal the solver finds a shorter one
/// and proves that none is shorter still (small instances Z3 settles in
/// well under a second here).
#[test]
fn smt_beats_greedy_where_greedy_is_not_optimal_and_proves_it() {
    let unit = CostModel::default();
    for (p, m, cost) in [
        (2, 6, CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit.clone() }),
        (3, 4, CostModel { backward_input: 2.0, tp_collective: 0.25, p2p: 0.5, ..unit }),
    ] {
        let (_, greedy) = planned(LOOPED, p, m, cost.clone(), Solver::Greedy);
        let (b, found) = planned(LOOPED, p, m, cost.clone(), smt(60));
        assert_eq!(found.kept, "smt", "p={p} m={m}");
        assert!(found.optimal, "p={p} m={m}: Z3 settles this within a minute");
        assert!(found.makespan < greedy.makespan - 1e-9, "{} vs greedy {}", found.makespan, greedy.makespan);
        assert!(close(simulated(&b, &cost), found.makespan));
    }
}

/// With a TP collective to hide, `auto` braids and fuses passes where it
/// pays: on a V placement (DualPipeV's, budget 2p) the greedy braided
/// order is faster than the best order of single passes the greedy
/// scheduler finds.
#[test]
fn braided_auto_orders_hide_collectives() {
    let cost = costs_b();
    for (p, m) in [(2, 6), (4, 8)] {
        let (b, _) = planned(V_SHAPE, p, m, cost.clone(), Solver::Greedy);
        let s = b.checked.schedule();
        let mut unbraided = s.clone();
        unbraided.cost = cost.clone();
        let (_, single) = stpc::opt::greedy::schedule_single_passes(&unbraided).expect("an order of single passes");
        let braided = simulated(&b, &cost);
        assert!(braided < single - 1e-9, "p={p} m={m}: braided {braided} vs single passes {single}");
        assert!(fused_ops(&b) > 0, "p={p} m={m}: the order braids or fuses");
    }
}

/// Ops that hold two passes or a fused `BW`.
fn fused_ops(b: &Build) -> usize {
    let ops = b.checked.schedule().ranks.iter().flatten();
    ops.filter(|op| op.compute.passes.len() == 2 || op.compute.passes[0].kind == stp_ir::PassKind::BW).count()
}

/// Z3 chooses braids too (a Boolean per pair of passes that may share an
/// op): on small instances it finds a shorter order than greedy's, proves
/// that none is shorter, and the order it returns braids or fuses and
/// simulates to its claim.
#[test]
fn smt_chooses_braids_and_proves_the_order_optimal() {
    let cost = costs_b();
    let (p, m) = (2, 6);
    let (_, greedy) = planned(LOOPED, p, m, cost.clone(), Solver::Greedy);
    let (b, found) = planned(LOOPED, p, m, cost.clone(), smt(60));
    assert_eq!(found.kept, "smt", "p={p} m={m}: {found:?}");
    assert!(found.optimal, "p={p} m={m}: Z3 settles this within a minute");
    assert!(found.makespan < greedy.makespan - 1e-9, "{} vs greedy {}", found.makespan, greedy.makespan);
    assert!(fused_ops(&b) > 0, "p={p} m={m}: the optimal order braids or fuses");
    assert!(close(simulated(&b, &cost), found.makespan), "p={p} m={m}: the claim simulates");
}

/// At unit costs the greedy V order has no bubble beyond the pipeline's
/// fill: Z3 proves it optimal and keeps it.
#[test]
fn smt_keeps_a_greedy_order_it_proves_optimal() {
    let (_, found) = planned(V_SHAPE, 2, 4, CostModel::default(), smt(60));
    assert_eq!(found.kept, "greedy");
    assert!(found.optimal);
    assert_eq!(Some(found.makespan), found.greedy_makespan);
}

/// A solver with no effort left keeps the greedy order and says why.
#[test]
fn an_exhausted_solver_falls_back_to_greedy_and_says_so() {
    let cost = CostModel { backward_input: 2.0, p2p: 0.5, ..CostModel::default() };
    let tiny = Solver::Smt { effort: 1e-9, cap: None, progress: None };
    let (b, found) = planned(V_SHAPE, 4, 8, cost.clone(), tiny);
    assert_ne!(found.kept, "smt", "the order found before Z3 is kept");
    assert!(found.fallback.as_deref().is_some_and(|why| why.contains("--solver-effort")), "{found:?}");
    assert!(found.greedy_makespan.is_some_and(|greedy| found.makespan <= greedy + 1e-9));
    assert!(!found.capped, "effort, not the clock, stopped it");
    assert!(close(simulated(&b, &cost), found.makespan));
}

/// A wall-clock cap that binds is reported as such: only then may the
/// order depend on the machine.
#[test]
fn a_binding_wall_clock_cap_is_reported() {
    let cost = costs_b();
    let capped = Solver::Smt { effort: 1000.0, cap: Some(Duration::ZERO), progress: None };
    let (b, found) = planned(V_SHAPE, 4, 8, cost.clone(), capped);
    assert!(found.capped, "{found:?}");
    assert!(found.to_string().contains("stopped by --solver-timeout"), "{found}");
    assert!(close(simulated(&b, &cost), found.makespan));
}

/// The same effort gives the same order, whatever the machine's load:
/// the budget is counted in work (greedy passes placed, ops re-timed, Z3's
/// resource counter), never on the clock. The second run competes with
/// two threads that keep both cores busy.
#[test]
fn the_same_effort_gives_the_same_order_under_any_load() {
    let cost = costs_b();
    let (first, report) = planned(INTERLEAVED_11, 3, 6, cost.clone(), smt(3));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let (second, again) = planned(INTERLEAVED_11, 3, 6, cost, smt(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spinners.into_iter().for_each(|t| t.join().expect("spinner"));
    assert_eq!(report, again, "the same report");
    assert!(report.effort_spent > 0.0 && report.effort_spent <= 3.0 + 1e-9, "{report:?}");
    assert_eq!(first.program, second.program, "the same program");
}

/// The local search after the greedy scheduler moves ops and changes
/// braids (splits them, braids neighbours, fuses `BW`); on these small
/// instances it reaches the optimum Z3 then proves.
#[test]
fn the_local_search_improves_greedy_orders_and_z3_proves_them_optimal() {
    let cost = costs_b();
    for (p, m) in [(2, 4), (3, 4)] {
        let (b, found) = planned(LOOPED, p, m, cost.clone(), smt(60));
        assert_eq!(found.kept, "local search", "p={p} m={m}: {found:?}");
        assert!(found.optimal, "p={p} m={m}: {found:?}");
        assert!(found.greedy_makespan.is_some_and(|greedy| found.makespan < greedy - 1e-9), "{found:?}");
        assert!(close(simulated(&b, &cost), found.makespan), "p={p} m={m}: the claim simulates");
    }
}

/// On 1F1B's placement at `budget = p` with the model-derived costs of
/// the book's table (c), the bottleneck is rank 0 once the first backward
/// has climbed back: a rank that starts another forward while that
/// backward is on its way delays every rank-0 pass after it. The
/// critical-path rules wait for it, and the default scheduler's order
/// lands within 2.5% of the lower bound (the earliest-start rules alone:
/// 3.4%).
#[test]
fn the_critical_path_rules_keep_the_bottleneck_rank_fed() {
    let cost = CostModel {
        backward_input: 1.09,
        backward_weight: 0.91,
        tp_collective: 0.05,
        p2p: 0.065,
        ..CostModel::default()
    };
    let (b, found) = planned(LOOPED, 4, 12, cost.clone(), Solver::Greedy);
    assert!(found.makespan <= 1.025 * found.lower_bound, "{found:?}");
    assert!(close(simulated(&b, &cost), found.makespan), "the claim simulates");
}

/// A braid hides two collectives but lengthens both passes; on the first
/// backward's way up an interleaved pipeline under skewed costs it delays
/// the busiest rank's first input gradient (one braid per stage on the
/// way: 2.25 in all). Policies that run a pass alone when its start plus
/// what it holds up reaches the lower bound find a greedy order 4.2% above
/// the bound (93.50 against 89.75); without them the best is 5.0% (94.25).
#[test]
fn braids_that_would_delay_the_critical_path_are_spared() {
    let cost = costs_b();
    let (b, found) = planned(INTERLEAVED_11, 4, 12, cost.clone(), Solver::Greedy);
    assert!(found.makespan <= 1.045 * found.lower_bound, "{found}");
    assert!(close(simulated(&b, &cost), found.makespan), "the claim simulates");
}

/// The portfolio's policies break near-ties one way. Restarts with every
/// pass's criticality jittered by up to 10% and a policy drawn at random
/// break them either way: on interleaved 1F1B under (b) at p = 4, m = 12
/// a few thousand find a shorter order than the whole portfolio (92.25
/// against 93.50, the bound 89.75; without the jitter, 93.50), the same
/// one each time (the draws come from a fixed seed), and the solver keeps
/// what they find.
#[test]
fn randomized_restarts_find_orders_the_portfolio_misses() {
    let cost = costs_b();
    let (b, _) = planned(INTERLEAVED_11, 4, 12, cost.clone(), Solver::Greedy);
    let s = b.checked.schedule();
    let portfolio = stpc::opt::greedy::finalists(s).expect("greedy orders it")[0].1;
    let restarted = stpc::opt::greedy::restarts(s, 2000, 2, &mut || false);
    assert!(restarted[0].1 < portfolio - 0.5, "restarts {} against the portfolio's {portfolio}", restarted[0].1);
    assert!(restarted.windows(2).all(|w| w[0].1 <= w[1].1 && w[0].0 != w[1].0), "distinct, fastest first");
    let again = stpc::opt::greedy::restarts(s, 2000, 2, &mut || false);
    assert!(again[0].0 == restarted[0].0, "the same draws give the same order");
    let (b, found) = planned(INTERLEAVED_11, 4, 12, cost.clone(), smt(3));
    assert!(found.makespan <= restarted[0].1 + 1e-9, "{found}");
    assert!(close(simulated(&b, &cost), found.makespan), "the claim simulates");
}

/// Late acceptance leaves the local optimum the polishing search stops
/// at: from the greedy (polished) interleaved 1F1B order under (b) at
/// p = 4, m = 12 (93.00; bound 89.75), a fixed number of its random moves
/// finds a shorter order that fits the budget and times as claimed (with
/// the blended comparison: 92.25; by makespan then sum of op ends alone,
/// none in two million moves); the same moves find the same order.
#[test]
fn late_acceptance_shortens_the_polished_greedy_order() {
    use stpc::opt::late_acceptance::{search, Acceptance};
    let cost = costs_b();
    let (b, greedy) = planned(INTERLEAVED_11, 4, 12, cost, Solver::Greedy);
    let s = b.checked.schedule();
    let limits = (400_000, greedy.lower_bound);
    let (found, _) =
        search(s, s.ranks.clone(), greedy.makespan, limits, Acceptance::Blended { weight: 0.02 }, &mut || false);
    let (order, makespan) = found.expect("a shorter order");
    assert!(makespan < greedy.makespan - 0.2, "{makespan} against {}", greedy.makespan);
    assert!(close(stpc::opt::order_makespan(s, &order), makespan), "timed as claimed");
    let (again, _) =
        search(s, s.ranks.clone(), greedy.makespan, limits, Acceptance::Blended { weight: 0.02 }, &mut || false);
    assert!(again.is_some_and(|(o, _)| o == order), "the same moves give the same order");
    // Through the checker: the order, written back, fits the budget and runs.
    let mut auto = s.clone();
    auto.ranks = order;
    let budget = auto.memory.budget.expect("auto has a budget");
    let checked = stpc::check::check(auto).unwrap_or_else(|d| panic!("the checker refuses it: {d:?}"));
    assert!(checked.peaks().iter().all(|peak| peak.units <= budget));
}

/// The greedy scheduler must not fill a rank with forwards whose
/// backwards can never run (it once did on V placements with slow links):
/// every feasible instance gets an order within the budget.
#[test]
fn greedy_orders_fit_the_budget_on_every_cost_mix() {
    let unit = CostModel::default();
    let costs = [
        unit.clone(),
        CostModel { backward_input: 2.0, p2p: 0.5, ..unit.clone() },
        CostModel { forward: 2.0, backward_input: 1.0, backward_weight: 3.0, p2p: 1.5, ..unit.clone() },
        CostModel { forward: 1.0, backward_input: 3.0, backward_weight: 0.5, tp_collective: 0.5, ..unit },
    ];
    for source in [V_SHAPE, LOOPED] {
        for p in [2, 4, 8] {
            for m in [p, 2 * p, 3 * p] {
                for cost in costs.clone() {
                    let (b, _) = planned(source, p, m, cost, Solver::Greedy);
                    let budget = b.checked.schedule().memory.budget.expect("auto has a budget");
                    assert!(b.checked.peaks().iter().all(|peak| peak.units <= budget), "p={p} m={m}");
                }
            }
        }
    }
    // Tight budgets, where the bolder admission caps run too (down to the
    // least budget any order fits: two units on a V rank). The planner
    // times transfers without queueing them on their link, so with slow
    // links its claim may be short of the simulator's, never over it.
    for budget in 2..=6 {
        let source = V_SHAPE.replace("budget = 2 * p", &format!("budget = {budget}"));
        for cost in costs.clone() {
            let (b, report) = planned(&source, 4, 12, cost.clone(), Solver::Greedy);
            assert!(b.checked.peaks().iter().all(|peak| peak.units <= budget), "budget {budget}");
            let simulated = simulated(&b, &cost);
            let exact = cost.p2p == 0.0;
            assert!(
                if exact { close(simulated, report.makespan) } else { report.makespan <= simulated + 1e-9 },
                "budget {budget} {cost:?}: {report} simulates {simulated}"
            );
        }
    }
}

/// A budget below what one microbatch needs on a rank (a V rank holds two
/// stages: two units) fits no order, and stpc says so at once, with the
/// reason, whichever solver was asked (Z3 once spent its whole time limit
/// failing to prove it at p = 4, m = 12); the minimum itself fits.
#[test]
fn a_budget_below_one_microbatch_is_refused_at_once_and_the_minimum_fits() {
    let file = SourceFile::new("auto.sched", V_SHAPE);
    let request = |p: i64, m: i64, budget: i64, solver: Solver| Request {
        params: stpc::elab::ParamArgs {
            ranks: Some(p),
            microbatches: Some(m),
            memory: vec![("budget".to_string(), budget)],
            ..Default::default()
        },
        solver,
        ..Default::default()
    };
    for (p, m, solver) in [(2, 4, Solver::Greedy), (2, 4, smt(60)), (4, 12, smt(60))] {
        let Err(errors) = build(&file, &request(p, m, 1, solver)) else { panic!("budget 1 on a V fits no order") };
        assert_eq!(errors[0].code, stpc::diag::Code::MemoryBudget);
        assert!(
            errors[0].message.contains("rank 0's memory budget of 1: it needs at least 2"),
            "{}",
            errors[0].message
        );
        assert!(errors[0].notes.iter().any(|n| n.contains("rank 0 holds stages 0, ")), "{:?}", errors[0].notes);
    }
    let b = build(&file, &request(2, 4, 2, Solver::Greedy)).expect("two units carry one microbatch at a time");
    assert!(b.checked.peaks().iter().all(|peak| peak.units <= 2));
}

const INTERLEAVED: &str =
    "schedule i(p: ranks, m: microbatches) { stages 2 * p; place s -> s % p; memory { budget = 3 * p; } auto; }";

/// Large instances: an order that meets the lower bound is proved optimal
/// without building a model; one that does not, on an instance too large
/// for the exact model, is kept with the reason. At p = 8, m = 64, v = 2
/// with skewed costs the braided greedy order is within 5% of the bound
/// (the target for this size).
#[test]
fn large_instances_are_proved_by_the_bound_or_left_to_greedy_with_a_reason() {
    let (_, proved) = planned(INTERLEAVED, 8, 64, CostModel::default(), smt(600));
    assert!(proved.optimal && proved.kept == "greedy", "{proved:?}");
    let skewed = costs_b();
    let (_, kept) = planned(INTERLEAVED, 8, 64, skewed, smt(600));
    assert_eq!(kept.kept, "greedy");
    assert!(kept.makespan < 1.05 * kept.lower_bound, "{kept:?}");
    let slow_links = CostModel { backward_input: 2.0, backward_weight: 0.5, p2p: 0.25, ..CostModel::default() };
    let (_, kept) = planned(INTERLEAVED, 8, 64, slow_links, smt(600));
    assert_eq!(kept.kept, "greedy");
    assert!(kept.fallback.as_deref().is_some_and(|why| why.contains("too large")), "{kept:?}");
}

/// 1F1B's order with every weight gradient left to stpc (`defer auto`),
/// and the same order with every `W` run at the end of the rank.
fn floating_w_source(at_end: bool) -> String {
    let defer = if at_end { "defer" } else { "defer auto" };
    let tail = if at_end { "for i in 0..m { W }" } else { "" };
    format!(
        "schedule f(p: ranks, m: microbatches) {{ stages p; place s -> s; memory {{ budget = p; }}
           rank r {{ let warmup = min(p - 1 - r, m);
             for i in 0..warmup {{ F(i) }}
             for i in 0..m - warmup {{ F(i + warmup) B(i) {defer} }}
             for i in m - warmup..m {{ B(i) {defer} }}
             {tail} }} }}"
    )
}

fn hand_built(source: &str, p: i64, m: i64, cost: CostModel) -> Build {
    let file = SourceFile::new("floating.sched", source);
    let request = Request {
        params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
        cost: Some(cost),
        ..Default::default()
    };
    build(&file, &request).unwrap_or_else(|d| panic!("p={p} m={m} compiles: {d:?}"))
}

/// At unit costs, placing 1F1B's weight gradients into its idle time
/// gives ZB-H1's makespan at 1F1B's memory.
#[test]
fn floating_weight_gradients_turn_1f1b_into_zb_h1_at_unit_costs() {
    let unit = CostModel::default();
    for p in [2, 4, 8] {
        for m in [p, 2 * p, 4 * p] {
            let floating = hand_built(&floating_w_source(false), p, m, unit.clone());
            let zb_h1 = stp_tests::build_std("zb-h1", p, m, None);
            let one_f_one_b = stp_tests::build_std("1f1b", p, m, None);
            assert!(close(simulated(&floating, &unit), simulated(&zb_h1, &unit)), "p={p} m={m}");
            let peaks = |b: &Build| b.checked.peaks().iter().map(|x| x.units).collect::<Vec<_>>();
            assert_eq!(peaks(&floating), peaks(&one_f_one_b), "p={p} m={m}: 1F1B's memory");
        }
    }
}

/// Placing a `W` never delays anything: the order with floating weight
/// gradients is never slower than the same order with them all at the end,
/// and never needs more memory.
#[test]
fn floating_weight_gradients_never_lose_to_running_them_last() {
    let unit = CostModel::default();
    let costs = [
        unit.clone(),
        CostModel { backward_input: 2.0, backward_weight: 0.5, ..unit.clone() },
        CostModel { forward: 2.0, backward_input: 1.0, backward_weight: 3.0, ..unit.clone() },
        CostModel { backward_input: 2.0, backward_weight: 0.5, p2p: 0.5, tp_collective: 0.25, ..unit },
    ];
    for cost in costs {
        for (p, m) in [(2, 5), (4, 8), (4, 12)] {
            let floating = hand_built(&floating_w_source(false), p, m, cost.clone());
            let last = hand_built(&floating_w_source(true), p, m, cost.clone());
            let (f, l) = (simulated(&floating, &cost), simulated(&last, &cost));
            assert!(f <= l + 1e-9, "p={p} m={m} {cost:?}: floating {f} vs at the end {l}");
            for (a, b) in floating.checked.peaks().iter().zip(last.checked.peaks()) {
                assert!(a.units <= b.units);
            }
        }
    }
}

/// STP with every braid written `&?`: stpc keeps a pair braided unless
/// splitting it shortens the schedule.
fn stp_with_optional_braids() -> String {
    let stp = stp_stdlib::get("stp").expect("stdlib has stp");
    let source = stp.source.replace(" & ", " &? ");
    assert!(source.contains("&?"), "stp.sched braids with ` & `");
    source
}

/// Splitting a pair is kept only when it pays, so the result is never
/// slower than the all-braided schedule and never needs more memory; at
/// unit costs nothing is split; with T_B = 2 T_F (where the fixed STP order
/// loses most against its formula) splitting pays.
#[test]
fn optional_braids_are_split_only_when_it_pays() {
    let source = stp_with_optional_braids();
    let unit = CostModel::default();
    let costs = [
        unit.clone(),
        CostModel { tp_collective: 0.25, ..unit.clone() },
        CostModel { backward_input: 2.0, ..unit.clone() },
        CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit.clone() },
        CostModel { forward: 2.0, backward_input: 1.0, backward_weight: 3.0, p2p: 0.5, ..unit.clone() },
    ];
    for cost in costs {
        for (p, m) in [(2, 6), (4, 12)] {
            let maybe = hand_built(&source, p, m, cost.clone());
            let braided = stp_tests::build_std("stp", p, m, None);
            let (t_maybe, t_braided) = (simulated(&maybe, &cost), simulated(&braided, &cost));
            assert!(t_maybe <= t_braided + 1e-9, "p={p} m={m} {cost:?}: {t_maybe} vs {t_braided}");
            for (a, b) in maybe.checked.peaks().iter().zip(braided.checked.peaks()) {
                assert!(a.units <= b.units, "p={p} m={m} {cost:?}: memory");
            }
            if cost == unit {
                assert_eq!(maybe.program, braided.program, "p={p} m={m}: nothing split at unit costs");
            }
        }
    }
    let skewed = CostModel { backward_input: 2.0, ..unit };
    let maybe = simulated(&hand_built(&source, 4, 12, skewed.clone()), &skewed);
    let braided = simulated(&stp_tests::build_std("stp", 4, 12, None), &skewed);
    assert!(maybe < braided - 1e-9, "T_B = 2: {maybe} vs {braided}");
}

fn reorder_example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/reorder_region.sched"))
        .expect("examples/reorder_region.sched exists")
}

/// 1F1B's steady state written backward-first inside `reorder`: the last
/// rank's written order cannot run at all; the search repairs it and
/// recovers 1F1B's makespan within 1F1B's budget.
#[test]
fn reorder_repairs_an_unrunnable_order_and_recovers_1f1b() {
    let source = reorder_example();
    let unit = CostModel::default();
    for cost in [unit.clone(), CostModel { backward_input: 2.0, ..unit }] {
        for (p, m) in [(2, 4), (4, 8)] {
            let reordered = hand_built(&source, p, m, cost.clone());
            let one_f_one_b = stp_tests::build_std("1f1b", p, m, None);
            assert!(close(simulated(&reordered, &cost), simulated(&one_f_one_b, &cost)), "p={p} m={m} {cost:?}");
            let budget = p;
            assert!(reordered.checked.peaks().iter().all(|peak| peak.units <= budget));
        }
    }
}

/// GPipe's order in one region per rank with 1F1B's budget: as written it
/// is over budget (the checker would refuse it); the search moves
/// backwards earlier until every rank fits.
#[test]
fn reorder_brings_an_order_within_the_memory_budget() {
    let source = "schedule g(p: ranks, m: microbatches) { stages p; place s -> s; memory { budget = p; }
        rank r { reorder { for i in 0..m { F(i) } for i in 0..m { BW(i) } } } }";
    for (p, m) in [(2, 4), (4, 8)] {
        let b = hand_built(source, p, m, CostModel::default());
        assert!(b.checked.peaks().iter().all(|peak| peak.units <= p), "p={p} m={m}");
    }
}

/// Around an order that already runs within budget, `reorder` never makes
/// the schedule slower.
#[test]
fn reorder_never_slows_a_valid_order() {
    let source = "schedule o(p: ranks, m: microbatches) { stages p; place s -> s; memory { budget = p; }
        rank r { let warmup = min(p - 1 - r, m); for i in 0..warmup { F(i) }
          for i in 0..m - warmup { reorder { F(i + warmup) BW(i) } }
          for i in m - warmup..m { BW(i) } } }";
    let unit = CostModel::default();
    for cost in [unit.clone(), CostModel { forward: 2.0, backward_input: 1.0, backward_weight: 3.0, p2p: 0.5, ..unit }]
    {
        let b = hand_built(source, 4, 8, cost.clone());
        let one_f_one_b = stp_tests::build_std("1f1b", 4, 8, None);
        assert!(simulated(&b, &cost) <= simulated(&one_f_one_b, &cost) + 1e-9, "{cost:?}");
    }
}

/// The lower bound — busiest rank, critical path with each pass's TP
/// collective, and per rank the best cut-into-pieces order (Jackson's
/// rule) with forwards held back by the memory budget — never exceeds the
/// makespan of a real order: every standard schedule, per pass and unit
/// by unit (`--tp 2`), with and without the tightest budget it meets,
/// under costs with collectives to hide and slow links.
#[test]
fn the_lower_bound_never_exceeds_a_real_orders_makespan() {
    let unit = CostModel::default();
    let costs = [
        unit.clone(),
        CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..unit.clone() },
        CostModel { backward_input: 1.5, backward_weight: 0.25, tp_collective: 0.75, p2p: 0.3, ..unit },
        CostModel {
            forward: 1.0,
            backward_input: 3.0,
            backward_weight: 2.0,
            tp_collective: 1.5,
            p2p: 0.1,
            ..CostModel::default()
        },
    ];
    let cases: [(&str, i64, i64, Option<i64>); 9] = [
        ("gpipe", 3, 5, None),
        ("1f1b", 4, 8, None),
        ("zb-h1", 4, 8, None),
        ("zb-h2", 3, 6, None),
        ("interleaved-1f1b", 2, 6, Some(2)),
        ("zb-v", 4, 8, None),
        ("dualpipe-v", 4, 10, None),
        ("stp", 4, 11, None),
        ("stp", 2, 6, None),
    ];
    for (name, p, m, v) in cases {
        for tp in [1, 2] {
            let b = stp_tests::build_std_tp(name, p, m, v, tp);
            // The tightest budget the order meets, so that memory binds.
            let mut tight = b.checked.schedule().clone();
            tight.memory.budget = b.checked.peaks().iter().map(|peak| peak.units).max();
            let stages = b.checked.schedule().meta.num_stages;
            let uneven = costs.iter().map(|c| stp_tests::heavy_ends(c, stages, 1.3, 2.5));
            for cost in &costs.iter().cloned().chain(uneven).collect::<Vec<_>>() {
                let makespan = simulated(&b, cost);
                for s in [b.checked.schedule(), &tight] {
                    let bound = stpc::opt::bound::lower_bound(s, cost);
                    let budget = s.memory.budget;
                    assert!(
                        bound <= makespan + 1e-9,
                        "{name} p={p} m={m} tp={tp} budget {budget:?} {cost:?}: bound {bound} > {makespan}"
                    );
                }
            }
        }
    }
}

/// Where the whole Z3 model neither proves nor improves in its share of
/// the time, windows of the best order are re-solved with everything
/// else kept (a rolling horizon): the order found is shorter than the
/// local search's, passes the checker and simulates to its claim.
#[test]
fn the_rolling_horizon_shortens_an_order_the_whole_model_cannot() {
    let source = "schedule v(p: ranks, m: microbatches) { stages 2 * p; \
                  place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 3 * p; max_deferred = 2 * (p - 1); } auto; }";
    let cost = costs_b();
    let (_, greedy) = planned(source, 3, 6, cost.clone(), Solver::Greedy);
    let (b, report) = planned(source, 3, 6, cost.clone(), smt(10));
    assert_eq!(report.kept, "smt, rolling horizon", "{report}");
    assert!(report.makespan < greedy.makespan - 1e-9, "{report} vs {greedy}");
    assert!(close(simulated(&b, &cost), report.makespan), "{report}");
}

/// The target: on STP's placement, within STP's memory (its peak
/// and its `max_deferred`), under T_B = 2, T_W = 0.5, T_AR = 0.25 at
/// p = 4, m = 12, the solver's order is at least 5% faster than the hand
/// order. (20 s rather than the default 10 leaves room for a loaded
/// machine; the book's table, measured with 10 s, has 6.0%.)
#[test]
fn the_solver_beats_the_stp_order_by_five_percent_under_skewed_costs() {
    let cost = costs_b();
    let hand = stp_tests::build_std("stp", 4, 12, None);
    let hand_makespan = simulated(&hand, &cost);
    let mut auto = hand.checked.schedule().clone();
    auto.auto = true;
    auto.cost = cost;
    auto.memory.budget = hand.checked.peaks().iter().map(|peak| peak.units).max();
    let (_, report) = stpc::opt::plan(&auto, smt(20)).expect("an order within STP's memory");
    assert!(report.makespan <= 0.95 * hand_makespan, "{report} vs the hand order's {hand_makespan}");
}

/// With `--tp` the program runs unit by unit, each all-reduce on the
/// rank's tensor-parallel stream (a braided pair's alternating); the
/// planner times orders that way too, so the order it keeps is the one
/// the simulator times, at the makespan it claims — greedy and Z3 alike,
/// with transfer time too (links carry one message at a time in both;
/// lowering places receives so that a pair's shared stream costs
/// nothing).
#[test]
fn with_tp_the_plan_is_timed_unit_by_unit_as_the_simulator_times_it() {
    let cost = costs_b();
    let slow = CostModel { p2p: 0.3, ..cost.clone() };
    for (source, p, m, cost, solver) in [
        (V_SHAPE, 4, 12, cost.clone(), Solver::Greedy),
        (V_SHAPE, 4, 12, slow, Solver::Greedy),
        (LOOPED, 4, 12, cost.clone(), Solver::Greedy),
        (V_SHAPE, 3, 6, cost, smt(3)),
    ] {
        let file = SourceFile::new("auto.sched", source);
        let mut request = Request {
            params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
            cost: Some(cost.clone()),
            solver,
            ..Default::default()
        };
        request.lower.tp = 2;
        let b = build(&file, &request).unwrap_or_else(|d| panic!("p={p} m={m} compiles: {d:?}"));
        let report = b.checked.schedule().plan.clone().expect("a plan");
        assert!(!report.optimal || report.makespan <= report.lower_bound + 1e-9, "no per-pass proof under --tp");
        let simulated = simulated(&b, &cost);
        assert!(
            close(report.makespan, simulated),
            "p={p} m={m} {cost:?}: claims {} simulates {simulated}",
            report.makespan
        );
    }
}

/// The 12.1B model's costs at TP 4, PP 4, two chunks, in units of `T_F`
/// (p2p = 6.5% of a forward).
fn paper_costs() -> CostModel {
    use stpc::cost::{model::cost_model, Hardware, ModelShape, Parallelism};
    let qwen =
        ModelShape { hidden: 4096.0, ffn: 22016.0, layers: 34.0, seq_len: 4096.0, micro_batch: 1.0, vocab: None };
    let c = cost_model(&qwen, &Hardware::a800(), &Parallelism { tp: 4, pp: 4, chunks: 2 });
    CostModel {
        forward: 1.0,
        backward_input: c.backward_input / c.forward,
        backward_weight: c.backward_weight / c.forward,
        tp_collective: c.tp_collective / c.forward,
        p2p: c.p2p / c.forward,
        stages: Vec::new(),
        recompute: 1.0,
        reduce: 0.0,
    }
}

/// A standard schedule's placement at p = 4, m = 12 under `cost`, as an
/// `auto` schedule within the hand order's peak memory.
fn auto_on_placement_of(name: &str, cost: CostModel) -> (stpc::elab::ComputeSchedule, Request) {
    let std = stp_stdlib::get(name).expect("a standard schedule");
    let file = SourceFile::new(std.path(), std.source);
    let request = Request {
        params: stpc::elab::ParamArgs { ranks: Some(4), microbatches: Some(12), ..Default::default() },
        cost: Some(cost),
        ..Default::default()
    };
    let hand = build(&file, &request).unwrap_or_else(|d| panic!("{name} compiles: {d:?}"));
    let mut auto = hand.checked.schedule().clone();
    auto.auto = true;
    auto.memory.budget = hand.checked.peaks().iter().map(|peak| peak.units).max();
    (auto, request)
}

/// The simulated makespan of `order`, lowered with or without receives
/// placed.
fn lowered_makespan(
    auto: &stpc::elab::ComputeSchedule,
    request: &Request,
    order: Vec<Vec<stpc::elab::ScheduledOp>>,
    place_receives: bool,
) -> f64 {
    let checked = stpc::check::check(stpc::elab::ComputeSchedule { ranks: order, ..auto.clone() }).expect("checks");
    let options = stpc::lower::LowerOptions { place_receives, ..request.lower };
    let lowered = stpc::lower::lower(&checked, options, stp_ir::simulate::Semantics::Rendezvous).expect("lowers");
    simulate(&lowered.program, request.cost.as_ref().expect("costs")).expect("runs").makespan
}

/// Transfers with one peer share a stream in the simulator (as NCCL's do),
/// which planning does not model: lowering moves receives between groups
/// where the step then runs faster. Under the 12.1B model's costs, on
/// STP's placement every greedy finalist runs exactly as planned with
/// receives placed (one, 76.82, only since a receive may join a later
/// receive's group on its link, just ahead of it: 76.93 before); on
/// ZB-V's, the order `plan` keeps does, and of the others some run slower
/// than planned with receives where the earlier passes put them (78.05
/// planned, 78.51 simulated), placing them wins back most of it (78.25:
/// what is left is a receive that waits on its peer's stream behind a
/// transfer that no single move of a receive frees).
#[test]
fn receives_are_placed_so_that_the_step_runs_as_planned() {
    let cost = paper_costs();
    assert!(cost.p2p > 0.05, "the model's transfers take time: {cost:?}");
    // Each greedy finalist's (planned, placed, unplaced) makespans.
    let outcomes = |auto: &stpc::elab::ComputeSchedule, request: &Request| -> Vec<(f64, f64, f64)> {
        let finalists = stpc::opt::greedy::finalists(auto).expect("greedy orders it");
        let simulated = |order: &Vec<_>, place| lowered_makespan(auto, request, order.clone(), place);
        finalists.iter().map(|(order, planned)| (*planned, simulated(order, true), simulated(order, false))).collect()
    };
    let (stp, request) = auto_on_placement_of("stp", cost.clone());
    let mut placed_exactly = 0;
    for (planned, placed, unplaced) in outcomes(&stp, &request) {
        assert!(close(placed, planned), "STP's placement: planned {planned}, simulated {placed}");
        placed_exactly += usize::from(unplaced > planned + 0.1);
    }
    assert!(placed_exactly > 0, "no STP order needs its receives placed: the test no longer tests placement");
    let (zbv, request) = auto_on_placement_of("zb-v", cost);
    let (kept, report) = stpc::opt::plan(&zbv, Solver::Greedy).expect("greedy orders it");
    assert!(close(report.makespan, lowered_makespan(&zbv, &request, kept, true)), "{report}");
    let mut helped = 0;
    for (planned, placed, unplaced) in outcomes(&zbv, &request) {
        assert!(placed <= unplaced + 1e-9, "placing receives slowed the step: {placed} vs {unplaced}");
        assert!(placed >= planned - 1e-9, "simulated {placed} below the plan's {planned}");
        if unplaced > planned + 0.1 {
            let (excess, left) = (unplaced - planned, placed - planned);
            assert!(left < excess / 2.0, "planned {planned}: {unplaced} unplaced, {placed} placed");
            helped += 1;
        }
    }
    assert!(helped > 0, "no ZB-V order needs its receives placed: the test no longer tests placement");
}

/// Effort Z3 has left after its search goes to the bound: makespans below
/// the order's are refuted a step at a time. The bound it proves rises
/// above the combinatorial one and never above the optimum Z3 proves on
/// the same instance (p = 2, m = 6 on 1F1B's placement, braids: optimum
/// 25, combinatorial bound 23.75, local search 25.5).
#[test]
fn z3_raises_the_lower_bound_but_never_above_the_optimum() {
    // The budget is counted in work, so these are the same on every
    // machine at any load.
    const OPTIMUM: f64 = 25.0;
    let cost = costs_b();
    let (b, found) = planned(LOOPED, 2, 6, cost.clone(), smt(60));
    assert!(found.optimal && close(found.makespan, OPTIMUM), "{found:?}");
    assert!(found.effort_spent < 60.0, "settled before its effort ran out: {found:?}");
    let s = b.checked.schedule();
    let bound = stpc::opt::bound::lower_bound(s, &cost);
    assert!(close(bound, 23.75), "the combinatorial bound {bound}");
    let mut budget = stpc::opt::effort::Budget::new(20.0, None);
    let raised = stpc::opt::raise_bound(s, bound, 25.5, &mut budget, 10.0);
    assert!(raised.optimal && close(raised.bound, OPTIMUM), "proved optimal at {}", raised.bound);
    // On p = 3, m = 8 the search leaves effort over and Z3 spends it
    // raising the bound (33.875 against the combinatorial 33.25), below
    // the order it keeps (35.75); the note says so. (Before the tails
    // let a `W` fused with its `B` run during the `B`'s collective, Z3's
    // model was narrower than the orders it claims to cover: it kept 35.25
    // and "proved" 35.0 from a combinatorial 33.5.)
    let (b, found) = planned(LOOPED, 3, 8, cost.clone(), smt(20));
    let combinatorial = stpc::opt::bound::lower_bound(b.checked.schedule(), &cost);
    assert!(!found.optimal && found.bound_by_z3, "{found:?}");
    assert!(found.lower_bound > combinatorial + 1e-9 && found.lower_bound <= found.makespan + 1e-9, "{found:?}");
    assert!(close(found.makespan, 35.75) && close(found.lower_bound, 33.875), "{found:?}");
    assert!(found.to_string().contains("proved by Z3"), "{found}");
}

/// Placing receives never slows a standard schedule and keeps every
/// program valid (the pass verifies what it keeps; this holds it to it),
/// with transfers slow enough for the pair streams to queue.
#[test]
fn placing_receives_never_slows_a_standard_schedule() {
    let cost = CostModel { backward_input: 2.0, backward_weight: 0.5, p2p: 0.3, ..CostModel::default() };
    let mut moved_somewhere = false;
    for name in ["1f1b", "zb-h1", "zb-v", "dualpipe-v", "stp", "interleaved-1f1b"] {
        let s = stp_stdlib::get(name).expect("a standard schedule");
        let file = SourceFile::new(s.path(), s.source);
        let chunks = (name == "interleaved-1f1b").then_some(2);
        let mut makespans = Vec::new();
        for place_receives in [false, true] {
            let mut request = Request {
                params: stpc::elab::ParamArgs { ranks: Some(4), microbatches: Some(12), chunks, ..Default::default() },
                cost: Some(cost.clone()),
                ..Default::default()
            };
            request.lower.place_receives = place_receives;
            let b = build(&file, &request).unwrap_or_else(|d| panic!("{name} compiles: {d:?}"));
            stp_ir::verify(&b.program).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            makespans.push(simulated(&b, &cost));
        }
        assert!(makespans[1] <= makespans[0] + 1e-9, "{name}: {makespans:?}");
        moved_somewhere |= makespans[1] < makespans[0] - 1e-9;
    }
    assert!(moved_somewhere, "some standard schedule queues on its links at p2p = 0.3");
}

/// With `max_deferred`, a rank cannot keep every weight gradient for the
/// drain: the bound charges the input gradients that must follow its last
/// `B` (bound.rs, `drain_floor`). It rises above the bound without the
/// cap and stays at or below the optimum Z3 proves, on both placements
/// (instances Z3 settles in a second or two; the bounds of `auto`
/// schedules also space a stage's passes of one kind by their compute and
/// charge each rank's first forward its collective, so this holds those
/// against the optimum too). With heavy weight gradients
/// the bound is close enough to the optimum that leaving out the `W`s a
/// rank may still run after its last `B` would pass it.
#[test]
fn the_deferred_cap_raises_the_bound_but_never_above_the_optimum() {
    let light = costs_b();
    let heavy_w = CostModel { backward_weight: 1.5, ..light.clone() };
    let capped = |source: &str, cap: i64| {
        source.replace("memory { budget = ", &format!("memory {{ max_deferred = {cap}; budget = "))
    };
    let mut raised = 0;
    for cost in [light.clone(), heavy_w] {
        for (source, p, m, caps) in [(LOOPED, 2, 4, 0..=2), (LOOPED, 3, 4, 0..=2), (V_SHAPE, 2, 4, 0..=0)] {
            let uncapped = planned(source, p, m, cost.clone(), Solver::Greedy).0;
            let free = stpc::opt::bound::lower_bound(uncapped.checked.schedule(), &cost);
            for cap in caps {
                let (b, found) = planned(&capped(source, cap), p, m, cost.clone(), Solver::Greedy);
                let s = b.checked.schedule();
                assert_eq!(s.memory.max_deferred, Some(cap), "the cap is declared");
                let bound = stpc::opt::bound::lower_bound(s, &cost);
                let case = format!("{cost:?} p={p} m={m} cap={cap}");
                assert!(bound >= free - 1e-9, "{case}: {bound} below the uncapped {free}");
                raised += usize::from(bound > free + 1e-9);
                // Z3 settles the optimum; its model knows nothing of these bounds.
                let z3 = z3_settled(s, found.makespan);
                assert!(z3.optimal, "{case}: Z3 settles it");
                assert!(bound <= z3.makespan + 1e-9, "{case}: bound {bound} above the optimum {}", z3.makespan);
            }
        }
    }
    assert!(raised >= 10, "the cap raised the bound in only {raised} of 14 cases");
}

/// A rank holding several stages can fill its budget with forwards of
/// any of them and must then wait for its first backward (bound.rs,
/// `window_floor`). On ZB-V's placement at its own budget (2p = 8) under
/// skewed costs, rank 3 starts at 3.75, can run 8 forwards (8.25 with the
/// first one's collective) before its first backward can start at 16.75,
/// and has 84.25 to do in all: 16.75 + 84.25 - 8.25 = 92.75. The bound
/// stays at or below the optimum Z3 proves without it, and at unit costs
/// it proves the greedy order optimal.
#[test]
fn a_full_budget_holds_a_rank_until_its_first_backward_and_the_bound_knows() {
    let skewed = costs_b();
    let budget = |b: i64| V_SHAPE.replace("budget = 2 * p;", &format!("budget = {b};"));
    let (b, _) = planned(V_SHAPE, 4, 12, skewed.clone(), Solver::Greedy);
    assert!(close(stpc::opt::bound::lower_bound(b.checked.schedule(), &skewed), 92.75));
    let (_, unit_order) = planned(&budget(2), 2, 4, CostModel::default(), Solver::Greedy);
    assert!(unit_order.optimal && close(unit_order.makespan, 27.0), "{unit_order}");
    for (cost, p, m, b) in [(skewed, 2, 4, 3), (CostModel::default(), 2, 4, 2), (CostModel::default(), 3, 4, 3)] {
        let (built, found) = planned(&budget(b), p, m, cost.clone(), Solver::Greedy);
        let s = built.checked.schedule();
        let bound = stpc::opt::bound::lower_bound(s, &cost);
        let z3 = z3_settled(s, found.makespan);
        assert!(z3.optimal, "p={p} m={m} budget {b}: Z3 settles it");
        assert!(bound <= z3.makespan + 1e-9, "p={p} m={m} budget {b}: bound {bound} above the optimum {}", z3.makespan);
    }
}

/// Under heavy first and last stages (embedding 1.3x, LM head 2.5x) on the
/// 1F1B placement within 1F1B's memory, the solver's order passes the
/// checker, simulates to the makespan it claims, never falls below the
/// lower bound, and beats ZB-H1 (the best hand order there).
#[test]
fn under_uneven_stage_costs_the_solver_beats_the_hand_orders_and_respects_the_bound() {
    let base = CostModel { backward_input: 2.0, backward_weight: 0.5, ..CostModel::default() };
    let (p, m) = (4, 12);
    let cost = stp_tests::heavy_ends(&base, p as u32, 1.3, 2.5);
    let hand = ["1f1b", "zb-h1"].map(|name| simulated(&stp_tests::build_std(name, p, m, None), &cost));
    let (b, report) = planned(LOOPED, p, m, cost.clone(), smt(10));
    let makespan = simulated(&b, &cost);
    assert!(close(makespan, report.makespan), "{report}: simulates to {makespan}");
    assert!(report.lower_bound <= makespan + 1e-9, "{report}");
    let best_hand = hand.iter().copied().fold(f64::MAX, f64::min);
    assert!(makespan < best_hand - 1e-9, "{report} vs hand orders {hand:?}");
}

/// DualPipe's placement and routes (two mirrored model copies, the first
/// half of the microbatches down one, the rest down the other), its order
/// left to stpc.
const DUAL: &str = "schedule d(p: ranks, m: microbatches) { stages 2 * p; pipelines 2; \
                    route i -> if i < m / 2 { 0 } else { 1 }; \
                    place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = p + 1; } auto; }";

/// Chimera's: the second copy runs the ranks the other way.
const CHIMERA: &str = "schedule c(p: ranks, m: microbatches) { stages 2 * p; pipelines 2; route i -> i % 2; \
                       place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = p + 1; } auto; }";

/// `auto` over several pipelines: the order the greedy scheduler (and
/// `--solver smt`, which has no Z3 model of several pipelines and says
/// so) finds runs every pass of every route once (the checker), fits the
/// budget, simulates to its claim, never beats the lower bound, and under
/// uneven stages (first 1.3x, last 2.5x) beats the hand-written DualPipe
/// and Chimera orders of the same model — at unit costs too.
#[test]
fn auto_orders_several_pipelines_and_beats_the_hand_orders() {
    let skewed = CostModel { backward_input: 2.0, backward_weight: 0.5, tp_collective: 0.25, ..CostModel::default() };
    let (p, m) = (4, 12);
    let uneven = stp_tests::heavy_ends(&skewed, p as u32, 1.3, 2.5).per_copy(p as u32, 2);
    for cost in [CostModel::default().per_copy(p as u32, 2), uneven] {
        let hand = ["dualpipe", "chimera"].map(|name| simulated(&stp_tests::build_std(name, p, m, None), &cost));
        for source in [DUAL, CHIMERA] {
            for solver in [Solver::Greedy, smt(1)] {
                let is_smt = matches!(solver, Solver::Smt { .. });
                let (b, report) = planned(source, p, m, cost.clone(), solver);
                let makespan = simulated(&b, &cost);
                assert!(close(makespan, report.makespan), "{report}: simulates to {makespan}");
                assert!(report.lower_bound <= makespan + 1e-9, "{report}");
                for (r, peak) in b.checked.peaks().iter().enumerate() {
                    assert!(peak.units <= p + 1, "rank {r} holds {} units, over the budget of {}", peak.units, p + 1);
                }
                assert!(makespan < hand[0].min(hand[1]) - 1e-9, "{report} vs dualpipe and chimera {hand:?}");
                if is_smt && !report.optimal {
                    assert!(report.fallback.as_deref().is_some_and(|f| f.contains("one pipeline")), "{report}");
                }
            }
        }
    }
}

/// Per-stage activations (the last stage's 3 units, the LM head's
/// logits) and per-rank budgets (rank 0, holding the first and last
/// stage on the V, gets more): greedy and Z3 orders stay within every
/// rank's own budget, simulate to their claim, and the lower bound stays
/// below them and below the hand orders.
#[test]
fn per_stage_activations_and_per_rank_budgets_bind_every_scheduler() {
    let source = "schedule v(p: ranks, m: microbatches) { stages 2 * p; \
                  place s -> if s < p { s } else { 2 * p - 1 - s }; \
                  memory { activation(s) = if s == 2 * p - 1 { 3 } else { 1 }; \
                           budget(r) = if r == 0 { 2 * p + 2 } else { BUDGET }; } auto; }";
    let cost = costs_b();
    for (p, m) in [(2, 6), (4, 8)] {
        for rest in ["p", "p + 1", "2 * p"] {
            let source = source.replace("BUDGET", rest);
            // Z3 on the small instance only: the large one takes seconds.
            let solvers = if p == 2 { vec![Solver::Greedy, smt(1)] } else { vec![Solver::Greedy] };
            for solver in solvers {
                let (b, report) = planned(&source, p, m, cost.clone(), solver);
                let s = b.checked.schedule();
                for (r, peak) in b.checked.peaks().iter().enumerate() {
                    let budget = s.memory.budget_of(r).expect("every rank has a budget");
                    assert!(peak.units <= budget, "p={p} m={m} rest={rest} rank {r}: peak {} > {budget}", peak.units);
                }
                let makespan = simulated(&b, &cost);
                assert!(close(makespan, report.makespan), "p={p} m={m} rest={rest}: {report} simulates {makespan}");
                assert!(report.lower_bound <= makespan + 1e-9, "p={p} m={m} rest={rest}: {report}");
            }
        }
    }
}

/// Each of `stages` stages with its own F, B, W (and, with `collectives`,
/// T_AR) drawn from `draw`.
fn random_stage_times(
    draw: &mut impl FnMut(f64, f64) -> f64,
    stages: u32,
    collectives: bool,
) -> Vec<stp_ir::simulate::StageTimes> {
    (0..stages)
        .map(|_| stp_ir::simulate::StageTimes {
            forward: draw(0.3, 1.5),
            backward_input: draw(0.3, 3.0),
            backward_weight: draw(0.0, 1.5),
            tp_collective: if collectives { draw(0.0, 0.5) } else { 0.0 },
        })
        .collect()
}

/// The lower bound under per-stage costs: on random stage times (each
/// stage's F, B, W and T_AR drawn apart), V and looped placements and
/// budgets from tight to loose, no order the schedulers find — a real,
/// checked order — is shorter than the bound. (A bound that paired the
/// k-th forward's memory wait with the wrong stage's time once claimed
/// 74.25 where 73.5 was possible.)
#[test]
fn the_lower_bound_holds_under_random_per_stage_costs() {
    let mut state = 0x5eed_u64;
    let mut draw = |lo: f64, hi: f64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        lo + (hi - lo) * ((state % 1000) as f64 / 1000.0)
    };
    for case in 0..32 {
        let (source, p) = if case % 2 == 0 { (V_SHAPE, 2 + case % 3) } else { (LOOPED, 2 + case % 3) };
        let stages = if case % 2 == 0 { 2 * p } else { p };
        let times = random_stage_times(&mut draw, stages, case % 4 >= 2);
        let cost = CostModel { stages: times, ..CostModel::default() };
        let budget = if case % 2 == 0 { 2 + case as i64 % (2 * p as i64) } else { 1 + case as i64 % p as i64 };
        let source = source
            .replace("budget = 2 * p", &format!("budget = {budget}"))
            .replace("budget = p", &format!("budget = {budget}"));
        let m = 2 * p as i64 + case as i64 % 3;
        let solvers = if case % 16 == 0 { vec![Solver::Greedy, smt(1)] } else { vec![Solver::Greedy] };
        for solver in solvers {
            let file = SourceFile::new("auto.sched", source.clone());
            let request = Request {
                params: stpc::elab::ParamArgs { ranks: Some(p as i64), microbatches: Some(m), ..Default::default() },
                cost: Some(cost.clone()),
                solver,
                ..Default::default()
            };
            let Ok(b) = build(&file, &request) else { continue };
            let makespan = simulated(&b, &cost);
            let bound = stpc::opt::bound::lower_bound(b.checked.schedule(), &cost);
            assert!(bound <= makespan + 1e-9, "case {case}: p={p} m={m} budget {budget}: bound {bound} > {makespan}");
        }
    }
    // Several pipelines: DualPipe's and Chimera's placements, each stage
    // (copies too) with its own times, budgets from 2 units to p + 1.
    for case in 0..16u32 {
        let (source, p) = (if case % 2 == 0 { DUAL } else { CHIMERA }, 2 + 2 * (case / 2 % 2));
        let times = random_stage_times(&mut draw, 2 * p, case % 4 >= 2);
        let cost = CostModel { stages: times, p2p: if case % 8 < 4 { 0.0 } else { 0.2 }, ..CostModel::default() };
        let budget = 2 + case % p;
        let source = source.replace("budget = p + 1", &format!("budget = {budget}"));
        let m = 2 * p as i64 + 2 * (case as i64 % 2);
        let (b, report) = planned(&source, p as i64, m, cost.clone(), Solver::Greedy);
        let makespan = simulated(&b, &cost);
        assert!(report.lower_bound <= makespan + 1e-9, "pipelines case {case}: p={p} m={m} budget {budget}: {report}");
    }
}

/// Until a rank can start anything but its first stage's forwards, each
/// of its ops is one such forward alone, collective exposed (bound.rs,
/// `warm_up_floor`). On the interleaved placement at p = 2, m = 8 under
/// (b): rank 1 holds stages 1 and 3; its first forward can start at 1.25
/// and nothing else before stage 3's first forward at 3.75, so by then it
/// has run two lone forwards (1.25 each; the first one's collective is in
/// its total of 2 · 8 · 3.5 + 0.25 = 56.25): 3.75 + 56.25 − 2.25 = 57.75
/// (57.50 counting only compute). The bound stays at or below the optimum
/// Z3 proves on small interleaved and V placements, even and uneven.
#[test]
fn lone_warm_up_forwards_raise_the_bound_but_never_above_the_optimum() {
    const INTERLEAVED: &str =
        "schedule il(p: ranks, m: microbatches) { stages 2 * p; place s -> s % p; memory { budget = 3 * p; } auto; }";
    let (b, _) = planned(INTERLEAVED, 2, 8, costs_b(), Solver::Greedy);
    let bound = stpc::opt::bound::lower_bound(b.checked.schedule(), &costs_b());
    assert!(close(bound, 57.75), "{bound}");
    // At p = 2, m = 3 the same count gives 3.75 + (2 · 3 · 3.5 + 0.25) − 2.25
    // = 22.75, the bound there; Z3 proves 24.5.
    for (source, p, m) in [(INTERLEAVED, 2, 2), (INTERLEAVED, 2, 3), (INTERLEAVED, 3, 2), (V_SHAPE, 3, 3)] {
        for cost in [costs_b(), stp_tests::heavy_ends(&costs_b(), 2 * p as u32, 1.3, 2.5)] {
            let (built, found) = planned(source, p, m, cost.clone(), Solver::Greedy);
            let s = built.checked.schedule();
            let bound = stpc::opt::bound::lower_bound(s, &cost);
            let z3 = z3_settled(s, found.makespan);
            let case = format!("{source} p={p} m={m} {cost:?}");
            assert!(z3.optimal, "{case}: Z3 settles it");
            if (source, p, m, cost.is_uniform()) == (INTERLEAVED, 2, 3, true) {
                assert!(close(bound, 22.75) && close(z3.makespan, 24.5), "{case}: {bound} {}", z3.makespan);
            }
            assert!(bound <= z3.makespan + 1e-9, "{case}: bound {bound} above the optimum {}", z3.makespan);
        }
    }
}

/// The bound never exceeds the makespan of stpc's own order on random
/// placements (1 to 3 stages per rank, per-stage costs with a heavy
/// stage, some with a cap on deferred weight gradients, half within a
/// budget that binds) with TP
/// collectives to hide, where its floors that assume stpc's orders (each
/// rank's first forward alone, its warm-up forwards alone, a `B` fused
/// with its `W` hiding its collective) apply. Seed 3 found the bound
/// charging a `B`'s collective before its own `W` although `BW` hides it
/// (19.1 against an order of 18.7).
#[test]
fn the_lower_bound_never_exceeds_an_auto_order_on_random_placements() {
    use stp_fuzz::rng::Rng;
    for seed in 0..150u64 {
        let case = stp_fuzz::valid::random_auto_schedule(&mut Rng::new(seed));
        // A third of them cap the weight gradients a rank may defer.
        let mut source = match seed % 3 {
            0 => case.source.clone(),
            cap => case.source.replace("memory { ", &format!("memory {{ max_deferred = {}; ", cap - 1)),
        };
        // Half of them within a budget that binds: a rank holds one
        // microbatch's activations on all its stages, and a little more.
        if seed % 2 == 1 {
            let loose = format!("budget = {};", case.stages * case.m);
            source = source.replace(&loose, &format!("budget = {};", case.stages));
        }
        let file = SourceFile::new("auto.sched", source.as_str());
        let params = stpc::elab::ParamArgs {
            ranks: Some(case.p as i64),
            microbatches: Some(case.m as i64),
            ..Default::default()
        };
        let request = Request { params, ..Default::default() };
        let written = stpc::pipeline::elaborate_unplanned(&file, &request).expect("elaborates");
        let mut cost = written.cost.clone();
        let collective = 0.1 * (1 + seed % 5) as f64;
        cost.tp_collective = collective;
        cost.stages.iter_mut().for_each(|t| t.tp_collective = collective);
        let b = build(&file, &Request { cost: Some(cost.clone()), ..request })
            .unwrap_or_else(|d| panic!("seed {seed} compiles: {d:?}"));
        let bound = stpc::opt::bound::lower_bound(b.checked.schedule(), &cost);
        let makespan = simulated(&b, &cost);
        assert!(bound <= makespan + 1e-9, "seed {seed}: bound {bound} > {makespan}\n{source}");
    }
}
