//! The `stp-exec` binary as a user runs it: one process for every rank,
//! one process per rank through `launch` (torchrun's variables and a TCP
//! rendezvous), measured against simulated makespan, and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stp_exec(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stp-exec"));
    command.args(args);
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        command.env_remove(var);
    }
    command.envs(vars.iter().copied()).output().expect("stp-exec runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stp-exec-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Compiles a standard schedule to `dir/program.json`, as `stpc compile` does.
fn compile(dir: &Path, name: &str, p: i64, m: i64, tp: u32) -> String {
    let s = stp_stdlib::get(name).unwrap_or_else(|| panic!("no {name}"));
    let file = stpc::syntax::span::SourceFile::new(s.path(), s.source);
    let mut request = stpc::pipeline::Request {
        params: stpc::elab::ParamArgs { ranks: Some(p), microbatches: Some(m), ..Default::default() },
        ..Default::default()
    };
    request.lower.tp = tp;
    let build = stpc::pipeline::build(&file, &request).unwrap_or_else(|_| panic!("{name} builds"));
    let path = dir.join("program.json");
    std::fs::write(&path, stp_ir::to_json(&build.program)).expect("write program");
    path.to_string_lossy().into_owned()
}

#[test]
fn run_checks_gradients_and_compares_with_the_simulator() {
    let dir = scratch("run");
    let program = compile(&dir, "zb-h1", 3, 6, 1);
    let out = stp_exec(&["run", &program, "--check", "--hidden", "8", "--rows", "4"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("weight gradients of stages [0, 1, 2] equal a sequential run's, bit for bit"), "{stdout}");
    // Measured against simulated, under the pass times of this very run.
    let line = stdout.lines().find(|l| l.starts_with("makespan: measured")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("under the pass times measured in this run"), "{line}");
    // Under a given cost model (milliseconds), that model is simulated:
    // ZB-H1 at p=3, m=6 with unit costs: m·3 of work per rank plus a
    // bubble of (p - 1)(T_F + T_B - T_W): 18 + 2 = 20 units.
    let cost = dir.join("cost.json");
    std::fs::write(&cost, r#"{"forward": 1, "backward_input": 1, "backward_weight": 1}"#).expect("write cost");
    let out = stp_exec(&["run", &program, "--cost", &cost.to_string_lossy(), "--hidden", "8", "--rows", "4"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("simulated 20.000 ms under the given cost model"), "{}", text(&out.stdout));
}

#[test]
fn launch_runs_one_process_per_rank_and_each_checks_its_stages() {
    let dir = scratch("launch");
    let program = compile(&dir, "stp", 2, 5, 2);
    let trace = dir.join("trace.json");
    let out = stp_exec(
        &["launch", &program, "--check", "--hidden", "8", "--rows", "4", "--trace", &trace.to_string_lossy()],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // STP at p = 2 puts stages 0 and 3 on rank 0, 1 and 2 on rank 1.
    assert!(stdout.contains("[rank 0] weight gradients of stages [0, 3] equal"), "{stdout}");
    assert!(stdout.contains("[rank 1] weight gradients of stages [1, 2] equal"), "{stdout}");
    assert!(stdout.contains("all 2 processes finished"), "{stdout}");
    for r in 0..2 {
        assert!(dir.join(format!("trace.rank{r}.json")).exists(), "one trace per process");
    }
}

#[test]
fn torchrun_variables_that_do_not_fit_are_explained() {
    let dir = scratch("vars");
    let program = compile(&dir, "1f1b", 2, 2, 1);
    let out = stp_exec(&["run", &program], &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("MASTER_PORT must be too"), "{}", text(&out.stderr));
    let out = stp_exec(
        &["run", &program],
        &[("WORLD_SIZE", "3"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("WORLD_SIZE is 3 but the program has 2 pipeline ranks"),
        "{}",
        text(&out.stderr)
    );
    let out = stp_exec(&["launch", &program, "--nproc", "3"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--nproc 3, but the program has 2 pipeline ranks"), "{}", text(&out.stderr));
    // Every process on one GPU over NCCL fails inside NCCL (seen on an
    // H200 as "ncclInvalidUsage"): refused before anything starts.
    let out = stp_exec(&["launch", &program, "--backend", "cuda", "--device", "0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--device 0 puts all 2 processes on GPU 0, and NCCL refuses two ranks on one GPU"),
        "{}",
        text(&out.stderr)
    );
}

/// When one process fails (here rank 0 cannot listen: the port is taken),
/// `launch` stops the others instead of letting them wait for it until
/// the rendezvous timeout, and says what happened to each.
#[test]
fn launch_stops_the_other_ranks_when_one_fails() {
    let dir = scratch("launch-fail");
    let program = compile(&dir, "1f1b", 3, 3, 1);
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a port");
    let port = taken.local_addr().expect("address").port().to_string();
    let out = stp_exec(&["launch", &program, "--master-port", &port], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("error: rank 0 cannot listen"), "{stderr}");
    assert!(stderr.contains("rank 1 (stopped after another rank failed)"), "{stderr}");
    drop(taken);
}

/// The CUDA backend's stream logic runs on the host without a GPU and
/// checks its gradients; the GPU itself, where absent, is a clear error.
#[test]
fn the_streams_backend_runs_anywhere_and_a_missing_gpu_is_explained() {
    let dir = scratch("streams");
    let program = compile(&dir, "stp", 2, 5, 2);
    let out = stp_exec(&["run", &program, "--backend", "streams", "--check", "--hidden", "8", "--rows", "4"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("equal a sequential run's, bit for bit"), "{}", text(&out.stdout));
    let out = stp_exec(&["run", &program, "--backend", "cuda"], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--features cuda") || stderr.contains("no CUDA driver"), "{stderr}");
    let vars = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")];
    let out = stp_exec(&["run", &program, "--backend", "cuda"], &vars);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--features cuda") || stderr.contains("no CUDA driver"), "{stderr}");
    let out = stp_exec(&["run", &program, "--backend", "streams", "--transport", "nccl"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--transport nccl needs --backend cuda"), "{}", text(&out.stderr));
    let out = stp_exec(&["run", &program, "--backend", "cuda", "--gpu-per-shard"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--gpu-per-shard is for multi-process cuda runs"), "{}", text(&out.stderr));
}

/// One stream runner per process, staging transfers through host memory
/// over TCP, each checking its own stages.
#[test]
fn launch_runs_the_stream_runner_one_process_per_rank() {
    let dir = scratch("launch-streams");
    let program = compile(&dir, "stp", 2, 5, 2);
    let out = stp_exec(&["launch", &program, "--backend", "streams", "--check", "--hidden", "8", "--rows", "4"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("[rank 0] weight gradients of stages [0, 3] equal"), "{stdout}");
    assert!(stdout.contains("[rank 1] weight gradients of stages [1, 2] equal"), "{stdout}");
}

/// `--model` sizes every stage as a model shape file does (the one `stpc
/// simulate --model` reads): hidden size, MLP width, tokens per microbatch.
#[test]
fn a_model_shape_file_sizes_the_stages() {
    let dir = scratch("model");
    let program = compile(&dir, "stp", 2, 5, 2);
    let shape = dir.join("shape.json");
    std::fs::write(&shape, r#"{"model": {"hidden": 8, "ffn": 24, "layers": 4, "seq_len": 3, "micro_batch": 2}}"#)
        .expect("write");
    let shape = shape.to_string_lossy().to_string();
    let out = stp_exec(&["run", &program, "--model", &shape, "--check"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("equal a sequential run's, bit for bit"), "{}", text(&out.stdout));
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"model": {"hidden": 8, "seq_len": 3, "micro_batch": 2}}"#).expect("write");
    let out = stp_exec(&["run", &program, "--model", &broken.to_string_lossy()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("model.ffn is missing"), "{}", text(&out.stderr));
    let out = stp_exec(&["run", &program, "--model", &shape, "--hidden", "16"], &[]);
    assert!(!out.status.success(), "--model and --hidden cannot both size the stages");
}

/// A small file claiming billions of microbatches is refused by
/// verification before anything of that size is allocated.
#[test]
fn a_program_claiming_more_than_it_holds_is_refused_before_allocating() {
    let dir = scratch("claims");
    let path = compile(&dir, "1f1b", 2, 2, 1);
    let json = std::fs::read_to_string(&path).expect("program");
    let lying = json.replace("\"num_microbatches\":2", "\"num_microbatches\":4000000000");
    assert_ne!(json, lying);
    let big = dir.join("big.json");
    std::fs::write(&big, lying).expect("write");
    let o = stp_exec(&["run", &big.to_string_lossy(), "--check"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("need at least 8000000000 forwards"), "{}", text(&o.stderr));
}
