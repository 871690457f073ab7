//! The `stpc` binary as a user runs it: exit codes, outputs, messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stpc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stpc")).args(args).env("NO_COLOR", "1").output().expect("stpc runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stpc-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write fixture");
    path.to_string_lossy().into_owned()
}

#[test]
fn list_names_every_standard_schedule() {
    let out = stpc(&["list"]);
    assert!(out.status.success());
    for s in stp_stdlib::ALL {
        assert!(stdout(&out).lines().any(|l| l.starts_with(s.name) && l.len() > s.name.len() + 5), "{}", s.name);
    }
}

#[test]
fn compile_writes_a_verified_program_and_its_text_form() {
    let dir = scratch("compile");
    let out_dir = dir.join("out");
    let out = stpc(&[
        "compile",
        "1f1b",
        "-p",
        "4",
        "-m",
        "8",
        "-o",
        out_dir.to_str().unwrap_or_default(),
        "--emit",
        "json",
        "--emit",
        "text",
        "--emit",
        "compact",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = std::fs::read_to_string(out_dir.join("program.json")).expect("program.json written");
    let program = stp_ir::load_json(&json).expect("program.json loads");
    stp_ir::verify(&program).expect("program verifies");
    assert_eq!(program.ranks.len(), 4);
    let text = std::fs::read_to_string(out_dir.join("program.txt")).expect("program.txt written");
    assert_eq!(stp_ir::parse_text(&text).ok().as_ref(), Some(&program));
    let compact = std::fs::read_to_string(out_dir.join("program.compact.json")).expect("program.compact.json written");
    assert!(compact.starts_with("{\"version\":2,"), "{compact}");
    assert!(compact.len() * 3 < json.len(), "compact {} bytes, JSON {}", compact.len(), json.len());
    assert_eq!(stp_ir::load_json(&compact).ok(), Some(program));
    let leftovers: Vec<_> =
        std::fs::read_dir(&out_dir).expect("read out dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 3, "only the three outputs, no temporary files: {leftovers:?}");
}

#[test]
fn compile_without_out_dir_prints_the_text_form() {
    let out = stpc(&["compile", "gpipe", "-p", "2", "-m", "2", "--emit", "text"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("stp-ir 1\nschedule \"gpipe\"\n"), "{}", stdout(&out));
}

#[test]
fn a_failing_compile_exits_1_and_leaves_earlier_output_untouched() {
    let dir = scratch("failing");
    let out_dir = dir.join("out");
    let out_dir_str = out_dir.to_str().unwrap_or_default();
    assert!(stpc(&["compile", "1f1b", "-p", "2", "-m", "2", "-o", out_dir_str]).status.success());
    let before = std::fs::read(out_dir.join("program.json")).expect("first output");
    let bad = write(&dir, "bad.sched", "schedule s(p: ranks, m: microbatches) {\n  stages p;\n  place s -> s;\n  rank r { for i in 0..m+1 { F(i) } }\n}\n");
    let out = stpc(&["compile", &bad, "-p", "2", "-m", "2", "-o", out_dir_str]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("[E0015]") && err.contains("bad.sched:4:"), "{err}");
    assert_eq!(std::fs::read(out_dir.join("program.json")).expect("still there"), before);
}

#[test]
fn usage_errors_exit_2_and_user_errors_exit_1() {
    assert_eq!(stpc(&["compile", "1f1b", "--bogus"]).status.code(), Some(2));
    assert_eq!(stpc(&["compile", "1f1b", "-p", "four"]).status.code(), Some(2));
    let missing_m = stpc(&["check", "1f1b", "-p", "4"]);
    assert_eq!(missing_m.status.code(), Some(1));
    assert!(stderr(&missing_m).contains("pass -m N"), "{}", stderr(&missing_m));
    let unknown = stpc(&["check", "1f1c", "-p", "4", "-m", "4"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("neither a file nor a standard schedule"));
    let no_file = stpc(&["check", "missing.sched", "-p", "4", "-m", "4"]);
    assert_eq!(no_file.status.code(), Some(1));
    assert!(stderr(&no_file).contains("cannot read missing.sched"));
}

#[test]
fn check_reports_the_instance_and_a_failing_require() {
    let ok = stpc(&["check", "interleaved-1f1b", "-p", "4", "-m", "8", "-v", "2"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("4 ranks, 8 stages, 8 microbatches, 128 ops"), "{}", stdout(&ok));
    // PyTorch's sizes: m = 6 is one round of 6; m = 9 is two rounds of 4.5.
    let six = stpc(&["check", "interleaved-1f1b", "-p", "4", "-m", "6", "-v", "2"]);
    assert!(six.status.success(), "{}", stderr(&six));
    let bad = stpc(&["check", "interleaved-1f1b", "-p", "4", "-m", "9", "-v", "2"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(err.contains("[E0011]") && err.contains("equal rounds") && err.contains("m = 9, p = 4"), "{err}");
}

#[test]
fn a_huge_instance_is_refused_with_a_limit_error() {
    let out = stpc(&["check", "1f1b", "-p", "4", "-m", "1000000000", "--max-ops", "10000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("[E0016]"), "{}", stderr(&out));
}

#[test]
fn explain_describes_every_code() {
    let all = stpc(&["explain"]);
    assert!(all.status.success());
    for code in stpc::diag::Code::ALL {
        assert!(stdout(&all).contains(code.as_str()), "{code}");
        let one = stpc(&["explain", code.as_str()]);
        assert!(one.status.success());
        assert!(stdout(&one).len() > 60, "{code}: {}", stdout(&one));
    }
    assert_eq!(stpc(&["explain", "E9999"]).status.code(), Some(1));
}

#[test]
fn simulate_reports_the_makespan_and_per_rank_numbers() {
    let out = stpc(&["simulate", "stp", "-p", "4", "-m", "11"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // 6m + p - 1 at unit costs.
    assert!(stdout(&out).contains("makespan 69.000"), "{}", stdout(&out));
    let json = stpc(&["simulate", "1f1b", "-p", "4", "-m", "8", "--t-b", "2", "--json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("--json prints JSON");
    // (m + p - 1)(T_F + T_B + T_W) with T_B = 2.
    assert_eq!(report["makespan"].as_f64(), Some(44.0));
    assert_eq!(report["ranks"].as_array().map(Vec::len), Some(4));
    assert_eq!(report["ranks"][0]["peak_memory"].as_i64(), Some(4));
}

#[test]
fn simulate_reads_a_cost_file_and_refuses_a_bad_one() {
    let dir = scratch("cost");
    let good = write(&dir, "cost.json", r#"{"forward": 2, "backward_input": 2, "backward_weight": 2}"#);
    let out = stpc(&["simulate", "gpipe", "-p", "2", "-m", "2", "--cost", &good]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("makespan 18.000"), "{}", stdout(&out));
    let bad = write(&dir, "bad.json", r#"{"forward": "fast"}"#);
    let out = stpc(&["simulate", "gpipe", "-p", "2", "-m", "2", "--cost", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not a cost model"), "{}", stderr(&out));
    let negative = stpc(&["simulate", "gpipe", "-p", "2", "-m", "2", "--t-f=-1"]);
    assert_eq!(negative.status.code(), Some(1));
}

#[test]
fn a_closed_standard_output_ends_quietly_instead_of_panicking() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_stpc"))
        .args(["compile", "1f1b", "-p", "8", "-m", "256", "--emit", "text"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stpc starts");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("stpc ends");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn simulate_derives_times_from_model_dimensions() {
    let dir = scratch("model");
    let model = write(
        &dir,
        "model.json",
        r#"{"model": {"hidden": 4096, "ffn": 22016, "layers": 32, "seq_len": 4096, "micro_batch": 1}}"#,
    );
    let out = stpc(&["simulate", "stp", "-p", "4", "-m", "12", "--model", &model, "--tp", "4", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let cost = &report["cost"];
    // 4 layers per chunk (32 layers, 4 ranks, 2 chunks), TP 4: forward
    // 4·(2·4096·P + 4·4096²·4096) / (312e12 · 0.5 · 4) with P = 4h² + 3hf.
    let p = 4.0 * 4096.0f64.powi(2) + 3.0 * 4096.0 * 22016.0;
    let forward = 4.0 * (2.0 * 4096.0 * p + 4.0 * 4096.0f64.powi(3)) / (312e12 * 0.5 * 4.0);
    let got = cost["forward"].as_f64().unwrap_or_default();
    assert!((got - forward).abs() < 1e-12, "{got} vs {forward}");
}

#[test]
fn tensor_parallel_programs_list_units_with_all_reduces() {
    let out = stpc(&["compile", "stp", "-p", "2", "-m", "5", "--tp", "4", "--emit", "text"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("\ntp 4\n"), "{text}");
    // A braided forward and full backward alternate their units.
    assert!(
        text.contains("[0.attn ar, 1.mlp-dgrad ar, 0.mlp ar, 1.mlp-wgrad, 1.attn-dgrad ar, 1.attn-wgrad]"),
        "{text}"
    );
    let program = stp_ir::parse_text(&text).expect("round trip");
    assert_eq!(program.schedule.tp, 4);
    assert_eq!(stp_ir::parse_text(&stp_ir::print_text(&program)).ok(), Some(program));
    assert_eq!(stpc(&["compile", "stp", "-p", "2", "-m", "5", "--tp", "0"]).status.code(), Some(2));
    let sp = stpc(&["compile", "stp", "-p", "2", "-m", "5", "--tp", "2", "--sequence-parallel", "--emit", "text"]);
    let text = stdout(&sp);
    assert!(text.contains("[0.attn rs-ag, 1.mlp-wgrad, 0.mlp rs-ag, 1.attn-wgrad]"), "{text}");
    let program = stp_ir::parse_text(&text).expect("sequence-parallel program parses");
    stp_ir::verify(&program).expect("and verifies");
    assert_eq!(stp_ir::load_json(&stp_ir::to_json(&program)).ok(), Some(program));
}

#[test]
fn simulate_starts_from_the_schedules_cost_block() {
    let dir = scratch("costblock");
    let file = write(
        &dir,
        "costed.sched",
        "schedule s(p: ranks, m: microbatches) {\n  stages p;\n  place s -> s;\n  cost { forward = 2; backward_input = 3; backward_weight = 1; }\n  rank r {\n    let w = min(p - 1 - r, m);\n    for i in 0..w { F(i) }\n    for i in 0..m - w { F(i + w); BW(i) }\n    for i in m - w..m { BW(i) }\n  }\n}\n",
    );
    // 1F1B: (m + p - 1)(T_F + T_B + T_W) = 3 · 6.
    let out = stpc(&["simulate", &file, "-p", "2", "-m", "2"]);
    assert!(stdout(&out).contains("makespan 18.000"), "{}{}", stdout(&out), stderr(&out));
    // Flags override the block: 3 · (2 + 1 + 1).
    let out = stpc(&["simulate", &file, "-p", "2", "-m", "2", "--t-b", "1"]);
    assert!(stdout(&out).contains("makespan 12.000"), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_cost_block_prices_the_gradient_reduction_of_several_pipelines() {
    let dir = scratch("reducecost");
    let body = "schedule s(p: ranks, m: microbatches) {\n  stages 2 * p;\n  pipelines 2;\n  route i -> i % 2;\n  place s -> if s < p { s } else { 2 * p - 1 - s };\n  COST\n  rank r {\n    repeat m / 2 { F(stage: r); F(stage: 2 * p - 1 - r) }\n    repeat m / 2 { BW(stage: 2 * p - 1 - r); BW(stage: r) }\n  }\n}\n";
    let free = write(&dir, "free.sched", &body.replace("COST", ""));
    let priced = write(&dir, "priced.sched", &body.replace("COST", "cost { reduce = 1.5; }"));
    let makespan = |file: &str| {
        let out = stpc(&["simulate", file, "-p", "2", "-m", "4"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let value = text.split("makespan ").nth(1).and_then(|t| t.split_whitespace().next()).map(str::to_string);
        (value.and_then(|v| v.parse::<f64>().ok()).expect("a makespan"), text)
    };
    let (before, _) = makespan(&free);
    let (after, text) = makespan(&priced);
    // Each rank holds a copy of both parts: two reductions, one after the other.
    assert_eq!(after, before + 3.0, "{text}");
    assert!(text.contains("reduce=1.5"), "{text}");
}

#[test]
fn verify_accepts_compiled_programs_and_shows_where_a_bad_one_blocks() {
    let dir = scratch("verify");
    let out_dir = dir.join("out");
    let out_dir_str = out_dir.to_str().unwrap_or_default();
    assert!(stpc(&["compile", "1f1b", "-p", "2", "-m", "2", "-o", out_dir_str, "--emit", "json", "--emit", "text"])
        .status
        .success());
    for name in ["program.json", "program.txt"] {
        let path = out_dir.join(name);
        let out = stpc(&["verify", path.to_str().unwrap_or_default()]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(stdout(&out).contains("runs to completion with rendezvous sends"), "{}", stdout(&out));
    }
    // Undo the grouping of 1F1B's steady state: the classic send/send deadlock.
    let text = std::fs::read_to_string(out_dir.join("program.txt")).expect("text form");
    let ungrouped = text.replace("  group {\n", "").replace("    send", "  send").replace("    recv", "  recv");
    let ungrouped: String =
        ungrouped.lines().filter(|l| l.trim() != "}" || !l.starts_with("  ")).collect::<Vec<_>>().join("\n");
    let bad = write(&dir, "ungrouped.txt", &ungrouped);
    let out = stpc(&["verify", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("deadlock under rendezvous") && err.contains("r0 is at: send act.s0.mb1 -> r1"), "{err}");
    assert!(stpc(&["verify", &bad, "--comm", "buffered"]).status.success());
}

#[test]
fn the_solver_flags_plan_auto_schedules_and_say_what_was_kept() {
    let auto = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/auto_looped.sched");
    let common = ["simulate", auto, "-p", "3", "-m", "4", "--t-b", "2", "--t-p2p", "0.5", "--t-ar", "0.25", "--json"];
    let greedy = stpc(&common);
    assert!(greedy.status.success(), "{}", stderr(&greedy));
    assert!(stderr(&greedy).contains("note: auto: local search order"), "{}", stderr(&greedy));
    let smt = stpc(&[&common[..], &["--solver", "smt", "--solver-effort", "60"]].concat());
    assert!(smt.status.success(), "{}", stderr(&smt));
    let report: serde_json::Value = serde_json::from_str(&stdout(&smt)).expect("--json prints JSON");
    assert_eq!(report["plan"]["kept"], "smt", "{report}");
    assert_eq!(report["plan"]["optimal"], true);
    // The solver's claim is what the simulator measured.
    assert_eq!(report["plan"]["makespan"].as_f64(), report["makespan"].as_f64());
    assert!(report["makespan"].as_f64() < report["plan"]["greedy_makespan"].as_f64());
    // Counted in work, not cut short by a clock.
    assert!(report["plan"]["effort_spent"].as_f64().is_some_and(|e| e > 0.0 && e <= 60.0), "{report}");
    assert_eq!(report["plan"]["stopped_by_timeout"], false);
    // A hand-written schedule has no plan.
    let hand = stpc(&["simulate", "1f1b", "-p", "2", "-m", "4", "--json", "--solver", "smt"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&hand)).expect("--json prints JSON");
    assert!(report["plan"].is_null());
    // A budget no order fits: `simulate` (which first reads the schedule's
    // shape, then plans) gives the planner's reason, as `check` does.
    let dir = scratch("auto-budget");
    let v = write(
        &dir,
        "v.sched",
        "schedule v(p: ranks, m: microbatches) { stages 2 * p; \
         place s -> if s < p { s } else { 2 * p - 1 - s }; memory { budget = 1; } auto; }",
    );
    let none = stpc(&["simulate", &v, "-p", "2", "-m", "4", "--solver", "smt"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("rank 0's memory budget of 1: it needs at least 2"), "{}", stderr(&none));
    // A nonsensical time limit or effort is a usage error.
    let bad = stpc(&["check", auto, "--solver", "smt", "--solver-timeout", "0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("seconds"), "{}", stderr(&bad));
    let bad = stpc(&["check", auto, "--solver", "smt", "--solver-effort", "nan"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("not an effort"), "{}", stderr(&bad));
    // A wall-clock cap that binds says so: only then may the order differ
    // between machines.
    let capped = stpc(&[&common[..], &["--solver", "smt", "--solver-timeout", "0.000001"]].concat());
    assert!(capped.status.success(), "{}", stderr(&capped));
    assert!(stderr(&capped).contains("stopped by --solver-timeout"), "{}", stderr(&capped));
}

#[test]
fn trace_writes_a_chrome_trace_of_the_simulated_run() {
    let dir = scratch("trace");
    let path = dir.join("trace.json");
    let path = path.to_string_lossy();
    let out = stpc(&["trace", "1f1b", "-p", "4", "-m", "8", "--t-b", "2", "--t-p2p", "0.5", "-o", &path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&*path).expect("trace written")).expect("trace is JSON");
    let events: Vec<&serde_json::Value> =
        trace["traceEvents"].as_array().expect("traceEvents").iter().filter(|e| e["ph"] == "X").collect();
    // One process per rank; every compute and transfer group is an event.
    let pids: std::collections::BTreeSet<i64> = events.iter().filter_map(|e| e["pid"].as_i64()).collect();
    assert_eq!(pids.len(), 4);
    let computes = events.iter().filter(|e| e["tid"] == 0).count();
    assert_eq!(computes, 4 * 8 * 2, "an F and a BW per rank and microbatch");
    assert!(events.iter().any(|e| e["tid"] == 1), "transfers on the communication thread");
    // The last event ends at the simulated makespan, (m + p - 1)(T_F + T_B + T_W) plus transfers.
    let end =
        events.iter().map(|e| e["ts"].as_f64().unwrap_or(0.0) + e["dur"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    let simulated = stpc(&["simulate", "1f1b", "-p", "4", "-m", "8", "--t-b", "2", "--t-p2p", "0.5", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&simulated)).expect("--json prints JSON");
    assert!((end / 1e6 - report["makespan"].as_f64().unwrap_or(0.0)).abs() < 1e-6);
    // Rank 0 holds p activations at its peak, as the checker says.
    let live = events.iter().filter(|e| e["pid"] == 0).filter_map(|e| e["args"]["live_activations_after"].as_i64());
    assert_eq!(live.max(), Some(4));
    // An unwritable path is a clear error, exit 1.
    let bad = stpc(&["trace", "1f1b", "-p", "2", "-m", "2", "-o", "/nonexistent-dir/t.json"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("cannot write"), "{}", stderr(&bad));
}

#[test]
fn export_writes_pytorch_pipelining_csv() {
    // PyTorch's Schedule1F1B at 2 stages and 2 microbatches, by hand:
    // rank 0 warms up with both forwards, rank 1 alternates.
    let out = stpc(&["export", "1f1b", "-p", "2", "-m", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim_end(), "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1");
    // With transfers: every send has its receive on the next stage, and
    // split backwards are written I and W.
    let out = stpc(&["export", "zb-h1", "-p", "4", "-m", "8", "--comms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let cells: Vec<&str> = text.lines().flat_map(|l| l.split(',')).collect();
    for cell in &cells {
        if let Some((stage, mb)) = cell.split_once("SEND_F") {
            let stage: u32 = stage.parse().expect("stage number");
            assert!(cells.contains(&format!("{}RECV_F{mb}", stage + 1).as_str()), "{cell} has no receive");
        }
    }
    assert!(cells.iter().any(|c| c.contains('I')) && cells.iter().any(|c| c.contains('W')));
    // STP's braids become OVERLAP_F_B actions; braids PyTorch cannot
    // express are written in sequence, and stpc says so.
    let out = stpc(&["export", "stp", "-p", "2", "-m", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("(3F1;3I0)OVERLAP_F_B"), "{}", stdout(&out));
    assert!(stderr(&out).contains("consecutive actions"), "{}", stderr(&out));
    // With transfers (the compute_comms form torch runs as written), a
    // braid is its two actions, forward first, and stpc says so.
    let out = stpc(&["export", "stp", "-p", "2", "-m", "5", "--comms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("OVERLAP_F_B"), "{}", stdout(&out));
    assert!(stdout(&out).contains("3F1,3I0"), "{}", stdout(&out));
    assert!(stderr(&out).contains("written as their two actions"), "{}", stderr(&out));
}

#[test]
fn import_writes_and_checks_a_schedule_from_a_pytorch_csv() {
    let dir = scratch("import");
    let good = write(&dir, "good.csv", "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n");
    let sched = dir.join("good.sched");
    let out = stpc(&["import", &good, "-o", &sched.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("ok:"), "{}", stderr(&out));
    // The written schedule compiles on its own with the CSV's shape.
    let again = stpc(&["check", &sched.to_string_lossy(), "-p", "2", "-m", "2"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let bad = write(&dir, "bad.csv", "0F0,0F1\n1F0,1X0\n");
    let out = stpc(&["import", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 2, cell 2"), "{}", stderr(&out));
    let wrong = write(&dir, "wrong.csv", "0F0,0F1,0B0,0B1\n1B0,1F0,1F1,1B1\n");
    let out = stpc(&["import", &wrong, "--color", "never"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("E0019") || stderr(&out).contains("E0020"), "{}", stderr(&out));
}

#[test]
fn diff_compares_two_schedules_under_one_cost_model() {
    let out = stpc(&["diff", "1f1b", "zb-h1", "-p", "4", "-m", "8", "--t-b", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // 1F1B: m(T_F + T_B + T_W) + (p - 1)(T_F + T_B + T_W) = 32 + 12; ZB-H1's
    // bubble is (p - 1)(T_F + T_B - T_W) = 6: 44 against 38.
    let makespan = text.lines().find(|l| l.starts_with("makespan")).unwrap_or_default();
    assert!(makespan.contains("44.0000") && makespan.contains("38.0000"), "{text}");
    assert!(text.contains("zb_h1 is faster"), "{text}");
    // -v applies to the schedule that takes it and is dropped for the other.
    let out = stpc(&["diff", "interleaved-1f1b", "zb-v", "-p", "4", "-m", "8", "-v", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn viz_and_trace_show_tensor_parallel_collectives() {
    let dir = scratch("viz-tp");
    let svg_path = dir.join("stp.svg");
    let out =
        stpc(&["viz", "stp", "-p", "2", "-m", "6", "--tp", "2", "--t-ar", "0.5", "-o", &svg_path.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&svg_path).expect("svg written");
    // Every F and every input-gradient pass all-reduces twice (attention
    // and MLP): 4 stages x 6 microbatches x 2 passes x 2.
    assert_eq!(svg.matches("<title>all-reduce:").count(), 4 * 6 * 2 * 2);
    assert!(svg.contains("TP all-reduce") && svg.contains("stp (p=2 m=6 tp=2)"), "legend and title");
    let trace_path = dir.join("stp.json");
    let out = stpc(&[
        "trace",
        "stp",
        "-p",
        "2",
        "-m",
        "6",
        "--tp",
        "2",
        "--t-ar",
        "0.5",
        "-o",
        &trace_path.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).expect("trace written")).expect("JSON");
    let collectives =
        trace["traceEvents"].as_array().expect("events").iter().filter(|e| e["ph"] == "X" && e["tid"] == 2);
    assert_eq!(collectives.count(), 4 * 6 * 2 * 2, "one event per all-reduce on the tensor-parallel thread");
    // Without --tp the papers' per-pass accounting applies: a standalone F
    // exposes all of T_AR (a dark tail on its box), a BW hides it behind
    // its weight gradient.
    let plain = dir.join("1f1b.svg");
    let out = stpc(&["viz", "1f1b", "-p", "2", "-m", "3", "--t-ar", "0.5", "-o", &plain.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&plain).expect("svg written");
    assert_eq!(svg.matches("<title>exposed collective: 0.500</title>").count(), 2 * 3, "one per F");
    assert!(!svg.contains("TP all-reduce"), "no collective lane without --tp");
}

#[test]
fn viz_memory_lane_steps_to_each_ranks_peak() {
    let dir = scratch("viz-memory");
    let path = dir.join("m.svg");
    let out = stpc(&["viz", "1f1b", "-p", "4", "-m", "8", "--memory", "-o", &path.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&path).expect("svg written");
    // One step line per rank; 1F1B holds p - r activations on rank r at its peak.
    assert_eq!(svg.matches(r#"<path class="memory""#).count(), 4);
    for (r, peak) in [4, 3, 2, 1].into_iter().enumerate() {
        let title = format!("<title>live activations (peak {peak})</title>");
        assert!(svg.contains(&title), "rank {r}: {title}");
    }
    assert!(svg.contains("live activations</text>"), "legend entry");
    let plain = dir.join("p.svg");
    let out = stpc(&["viz", "1f1b", "-p", "4", "-m", "8", "-o", &plain.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!std::fs::read_to_string(&plain).expect("svg").contains("class=\"memory\""), "only when asked for");
}

#[test]
fn viz_draws_one_box_per_pass_with_title_and_summary() {
    let dir = scratch("viz");
    let path = dir.join("s.svg");
    let out = stpc(&["viz", "zb-h1", "-p", "4", "-m", "8", "--t-p2p", "0.5", "-o", &path.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&path).expect("svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Every pass is a box with a tooltip: F, B and W for 4 stages x 8
    // microbatches, each with the live activations after it.
    assert_eq!(svg.matches("<title>").count(), 3 * 4 * 8);
    assert_eq!(svg.matches("activations live after</title>").count(), 3 * 4 * 8);
    assert!(svg.contains("zb_h1 (p=4 m=8)"));
    assert!(svg.contains("makespan"));
    // Transfers take time here, so the transfer lane (7 px high) is drawn;
    // without transfer time it is not.
    assert!(svg.contains(r#"height="7""#));
    let plain = dir.join("plain.svg");
    let out = stpc(&["viz", "zb-h1", "-p", "4", "-m", "8", "-o", &plain.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg = std::fs::read_to_string(&plain).expect("svg written");
    assert!(!svg.contains(r#"height="7""#));
    // --unit draws unit steps whatever the schedule declares; --format html
    // wraps the picture in a page.
    let dir_path = dir.to_string_lossy().into_owned();
    let costly = write(
        &dir,
        "costly.sched",
        "schedule c(p: ranks, m: microbatches) { stages p; place s -> s; cost { backward_input = 3; }
           rank r { for i in 0..m { F(i) } for i in 0..m { BW(i) } } }",
    );
    let page = format!("{dir_path}/c.html");
    let out = stpc(&["viz", &costly, "-p", "2", "-m", "2", "--unit", "--format", "html", "-o", &page]);
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(&page).expect("html written");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg"));
    // GPipe at p = 2, m = 2 in unit steps: (m + p - 1) x 3 = 9.
    assert!(html.contains("makespan 9.00"), "{html}");
}

/// Each input an adversarial campaign found to hang, crash or be silently
/// misread ends at once with exit 1 and a message naming the cause.
#[test]
fn hostile_inputs_end_with_a_clear_error() {
    let dir = scratch("hostile");
    let huge_stage = write(&dir, "huge_stage.csv", "4294967295F0,4294967295B0");
    let deep_stage = write(&dir, "deep_stage.csv", "40000F0,40000B0");
    let misspelled = write(&dir, "misspelled.json", r#"{"forwad": 5}"#);
    let model = write(
        &dir,
        "model.json",
        r#"{"model":{"hidden":1024,"ffn":4096,"layers":8,"seq_len":1024,"micro_batch":1},"tp":4}"#,
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["import", &huge_stage], "beyond what 2 compute actions can cover"),
        (vec!["import", &deep_stage], "beyond what 2 compute actions can cover"),
        (vec!["simulate", "1f1b", "-p", "2", "-m", "2", "--t-b", "1e308"], "every time must be a number from 0 to 1e9"),
        (vec!["simulate", "1f1b", "-p", "2", "-m", "2", "--t-b", "1e15"], "every time must be a number from 0 to 1e9"),
        (vec!["simulate", "1f1b", "-p", "2", "-m", "2", "--cost", &misspelled], "unknown field `forwad`"),
        (vec!["simulate", "1f1b", "-p", "4", "-m", "8", "--model", &model, "--tp", "2"], "says tp = 4, but --tp is 2"),
        (vec!["check", "1f1b", "-p", "1000000", "-m", "4"], "needs at least 8000000 ops"),
        (
            vec![
                "check",
                "1f1b",
                "-p",
                "4",
                "-m",
                "8",
                "--mem",
                "activation=4611686018427387904",
                "--mem",
                "budget=4611686018427387904",
            ],
            "memory settings too large",
        ),
    ];
    for (args, expected) in cases {
        let o = stpc(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn simulate_under_buffered_sends_simulates_buffered_sends() {
    for name in ["zb-v", "zb-h2", "dualpipe-v"] {
        let o = stpc(&["simulate", name, "-p", "4", "-m", "8", "--comm", "buffered"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert!(stdout(&o).contains("makespan"), "{name}");
    }
}

#[test]
fn outputs_of_one_command_land_together_or_not_at_all() {
    let dir = scratch("together");
    // program.txt cannot be written: then program.json must not be either.
    std::fs::create_dir_all(dir.join("program.txt")).expect("mkdir");
    let out = dir.to_string_lossy().into_owned();
    let o = stpc(&["compile", "1f1b", "-p", "2", "-m", "2", "--emit", "json", "--emit", "text", "-o", &out]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing written"), "{}", stderr(&o));
    let left: Vec<String> =
        std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec!["program.txt".to_string()], "no program.json, no temporaries");
}

#[test]
fn the_smt_solver_says_when_there_is_nothing_to_solve() {
    let o = stpc(&["simulate", "1f1b", "-p", "2", "-m", "2", "--solver", "smt"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("--solver smt has nothing to decide"), "{}", stderr(&o));
}

/// Per-stage times from a `--cost` file: listed by stage, used by the
/// simulation, and a file for another stage count is refused with both
/// counts; `diff` of schedules that cut the model differently says how it
/// compares them.
#[test]
fn per_stage_costs_are_listed_checked_and_compared_fairly() {
    let dir = scratch("per-stage-costs");
    let stage = |f: f64| {
        format!(r#"{{"forward": {f}, "backward_input": {}, "backward_weight": 1, "tp_collective": 0}}"#, 2.0 * f)
    };
    let four = write(
        &dir,
        "four.json",
        &format!(r#"{{"stages": [{}, {}, {}, {}]}}"#, stage(1.3), stage(1.0), stage(1.0), stage(2.5)),
    );
    let out = stpc(&["simulate", "1f1b", "-p", "4", "-m", "8", "--cost", &four]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("T_F=[1.3 1 1 2.5] T_B=[2.6 2 2 5]"), "{}", stdout(&out));
    // The last stage is the bottleneck: microbatch 0 reaches it at 3.3, it
    // runs 8 x (2.5 + 5 + 1), and the last backward walks back through
    // the others, 3 + 3 + 3.6 (tests/golden.rs holds the formula).
    assert!(stdout(&out).contains("makespan 80.900"), "{}", stdout(&out));
    let wrong = stpc(&["simulate", "1f1b", "-p", "2", "-m", "4", "--cost", &four]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("gives times for 4 stages, but this program has 2"), "{}", stderr(&wrong));
    let diff = stpc(&["diff", "1f1b", "interleaved-1f1b", "-p", "4", "-m", "8", "-v", "2"]);
    assert!(diff.status.success(), "{}", stderr(&diff));
    assert!(stdout(&diff).contains("cuts the model into 4 parts, interleaved_1f1b into 8"), "{}", stdout(&diff));
    assert!(stdout(&diff).contains("interleaved_1f1b is faster"), "{}", stdout(&diff));
    // DualPipe's 8 stages are two copies of 4 parts: times given per part
    // hold for both copies, and a diff with 1F1B re-divides nothing.
    let dual = stpc(&["simulate", "dualpipe", "-p", "4", "-m", "8", "--cost", &four]);
    assert!(dual.status.success(), "{}", stderr(&dual));
    assert!(stdout(&dual).contains("T_F=[1.3 1 1 2.5 1.3 1 1 2.5]"), "{}", stdout(&dual));
    let diff = stpc(&["diff", "1f1b", "dualpipe", "-p", "4", "-m", "8", "--cost", &four]);
    assert!(diff.status.success(), "{}", stderr(&diff));
    assert!(!stdout(&diff).contains("cuts the model"), "{}", stdout(&diff));
    let text = stdout(&diff);
    let makespans: Vec<&str> =
        text.lines().find(|l| l.starts_with("makespan")).expect("a makespan row").split_whitespace().collect();
    assert_eq!(makespans[1..3], ["80.9000", "54.0000"], "{}", stdout(&diff));
}
