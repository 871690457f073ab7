//! Multi-process runs (`stp_exec::launch`): every pipeline rank in its own
//! "process" (here a thread each, with nothing shared but TCP sockets on
//! localhost), meeting at MASTER_ADDR:MASTER_PORT — on the CPU backend and
//! on the stream runner staging its transfers through host memory. The
//! gradients still equal a sequential run's bit for bit, and a broken
//! setup is named.

use std::time::Duration;
use stp_exec::cpu::{self, CpuOptions, CpuReport};
use stp_exec::device::HostDevice;
use stp_exec::launch::{run_process, run_process_on, Env};
use stp_exec::model::{sequential_gradients, Model};
use stp_exec::ExecError;
use stp_ir::Program;
use stp_tests::build_std_tp;

fn model_for(program: &Program) -> Model {
    let meta = &program.schedule;
    Model::new(meta.parts() as usize, meta.num_microbatches as usize, 8, 4, meta.tp as usize, 7)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn env(rank: usize, world: usize, port: u16) -> Env {
    Env { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

/// How one process runs its rank.
type Runner = fn(&Program, &Model, CpuOptions, &Env, Duration) -> Result<CpuReport, ExecError>;

fn on_streams(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    env: &Env,
    rendezvous: Duration,
) -> Result<CpuReport, ExecError> {
    run_process_on(&HostDevice::new(), program, model, options, env, rendezvous)
}

/// Runs `programs[r]` as rank r of a world of `world`, each on its own
/// thread with its own model, meeting over TCP, on the CPU backend.
fn run_world(
    programs: &[Program],
    world: usize,
    options: CpuOptions,
    rendezvous: Duration,
) -> Vec<Result<CpuReport, ExecError>> {
    run_world_with(run_process, programs, world, options, rendezvous)
}

fn run_world_with(
    runner: Runner,
    programs: &[Program],
    world: usize,
    options: CpuOptions,
    rendezvous: Duration,
) -> Vec<Result<CpuReport, ExecError>> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = programs
            .iter()
            .enumerate()
            .map(|(r, program)| {
                s.spawn(move || runner(program, &model_for(program), options, &env(r, world, port), rendezvous))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(ExecError::Panicked))).collect()
    })
}

#[test]
fn ranks_in_separate_processes_reproduce_the_sequential_gradients() {
    assert_processes_reproduce_the_sequential_gradients(run_process, "cpu");
}

#[test]
fn stream_runners_in_separate_processes_reproduce_the_sequential_gradients() {
    assert_processes_reproduce_the_sequential_gradients(on_streams, "streams");
}

fn assert_processes_reproduce_the_sequential_gradients(runner: Runner, backend: &str) {
    // DualPipe and Chimera: every rank ends with its parts' whole gradient
    // only through the reductions between the model copies, over TCP.
    for (name, p, m, v, tp) in [
        ("1f1b", 4, 8, None, 1),
        ("stp", 2, 5, None, 2),
        ("interleaved-1f1b", 2, 4, Some(2), 1),
        ("dualpipe", 4, 8, None, 1),
        ("chimera", 2, 4, None, 2),
    ] {
        let program = build_std_tp(name, p, m, v, tp).program;
        let expected = sequential_gradients(&model_for(&program));
        let single = cpu::run(&program, &model_for(&program), CpuOptions::default()).expect("one process");
        let world = p as usize;
        let programs = vec![program.clone(); world];
        let reports = run_world_with(runner, &programs, world, CpuOptions::default(), Duration::from_secs(20));
        for (r, report) in reports.into_iter().enumerate() {
            let name = format!("{backend}: {name}");
            let report = report.unwrap_or_else(|e| panic!("{name} rank {r}: {e}"));
            assert_eq!(report.ranks, [stp_ir::Rank(r as u32)]);
            let owned = program.schedule.placement.iter().enumerate().filter(|(_, o)| o.index() == r);
            for (s, _) in owned {
                let part = program.schedule.chain().part(stp_ir::Stage(s as u32)) as usize;
                assert_eq!(report.gradients[part], expected[part], "{name} rank {r} stage {s}: gradients differ");
            }
            assert_eq!(report.peak_stashes, [single.peak_stashes[r]], "{name} rank {r}: peak stashes");
        }
    }
}

#[test]
fn processes_running_different_programs_are_stopped_at_the_rendezvous() {
    let a = build_std_tp("1f1b", 2, 4, None, 1).program;
    let b = build_std_tp("gpipe", 2, 4, None, 1).program;
    let reports = run_world(&[a, b], 2, CpuOptions::default(), Duration::from_secs(20));
    for (r, report) in reports.into_iter().enumerate() {
        match report {
            Err(ExecError::Setup(message)) => {
                assert!(
                    message.contains("rank 1 runs a different program or transport than rank 0"),
                    "rank {r}: {message}"
                )
            }
            other => panic!("rank {r}: expected a refused rendezvous, got {other:?}"),
        }
    }
}

#[test]
fn a_process_that_never_comes_is_named() {
    let program = build_std_tp("1f1b", 3, 4, None, 1).program;
    // Only ranks 0 and 1 of 3 start.
    let reports = run_world(&[program.clone(), program], 3, CpuOptions::default(), Duration::from_millis(800));
    match &reports[0] {
        Err(ExecError::Setup(message)) => assert!(message.contains("for ranks 2 to connect"), "{message}"),
        other => panic!("expected rank 0 to give up waiting, got {other:?}"),
    }
    assert!(reports[1].is_err(), "rank 1 cannot run without rank 2 either");
}

#[test]
fn a_deadlock_across_processes_names_where_each_rank_is_stuck() {
    // Both ranks send before they receive (1F1B's grouping undone).
    let mut program = build_std_tp("1f1b", 2, 2, None, 1).program;
    stp_tests::ungroup_transfers(&mut program);
    let options = CpuOptions { timeout: Duration::from_millis(400), ..CpuOptions::default() };
    for (runner, backend) in [(run_process as Runner, "cpu"), (on_streams, "streams")] {
        let programs = [program.clone(), program.clone()];
        let reports = run_world_with(runner, &programs, 2, options, Duration::from_secs(20));
        let blocked: Vec<String> = reports
            .into_iter()
            .flat_map(|r| match r {
                Err(ExecError::Deadlock { blocked }) => {
                    blocked.into_iter().map(|(r, _, t)| format!("{r}: {t}")).collect::<Vec<_>>()
                }
                other => panic!("{backend}: expected a deadlock, got {other:?}"),
            })
            .collect();
        assert_eq!(blocked, ["r0: send act.s0.mb1 -> r1", "r1: send grad.s1.mb0 -> r0"], "{backend}");
    }
}

#[test]
fn the_launch_variables_are_read_as_torchrun_sets_them() {
    let vars = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_vars(move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    };
    assert_eq!(vars(&[]), Ok(None), "no WORLD_SIZE: one process runs every rank");
    let full = [("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];
    assert_eq!(
        vars(&full),
        Ok(Some(Env { rank: 1, world_size: 4, local_rank: 1, master_addr: "node0".into(), master_port: 29500 }))
    );
    let error = |pairs: &[(&str, &str)]| vars(pairs).expect_err("refused");
    assert!(error(&[("WORLD_SIZE", "4")]).contains("RANK must be too"));
    assert!(
        error(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]).contains("not below")
    );
    assert!(error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR"));
    assert!(error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "x")])
        .contains("MASTER_PORT=x"));
    assert!(error(&[("RANK", "one"), ("WORLD_SIZE", "2")]).contains("RANK=one"));
}

#[test]
fn a_world_size_that_does_not_match_the_program_is_refused() {
    let program = build_std_tp("1f1b", 2, 2, None, 1).program;
    let model = model_for(&program);
    match run_process(&program, &model, CpuOptions::default(), &env(0, 3, free_port()), Duration::from_secs(1)) {
        Err(ExecError::Setup(message)) => {
            assert!(message.contains("WORLD_SIZE is 3 but the program has 2"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A stray connection to MASTER_PORT (a health check, a port scanner) is
/// ignored: the ranks still meet and run.
#[test]
fn a_stray_connection_to_the_master_port_is_ignored() {
    use std::io::Write;
    let program = build_std_tp("1f1b", 2, 2, None, 1).program;
    let port = free_port();
    let results: Vec<Result<CpuReport, ExecError>> = std::thread::scope(|s| {
        let rank0 = s.spawn(|| {
            run_process(
                &program,
                &model_for(&program),
                CpuOptions::default(),
                &env(0, 2, port),
                Duration::from_secs(20),
            )
        });
        // Knock first, with something that is not a greeting.
        let mut knocked = false;
        for _ in 0..200 {
            if let Ok(mut stray) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = stray.write_all(b"GET / HTTP/1.0\r\n\r\n");
                knocked = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(knocked, "rank 0 listens");
        let rank1 = s.spawn(|| {
            run_process(
                &program,
                &model_for(&program),
                CpuOptions::default(),
                &env(1, 2, port),
                Duration::from_secs(20),
            )
        });
        vec![rank0.join().unwrap_or(Err(ExecError::Panicked)), rank1.join().unwrap_or(Err(ExecError::Panicked))]
    });
    for (r, result) in results.into_iter().enumerate() {
        assert!(result.is_ok(), "rank {r}: {:?}", result.err());
    }
}
