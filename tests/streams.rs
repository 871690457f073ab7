//! The stream runner — the CUDA backend's single-GPU mode, with its
//! compute and communication streams per rank and shard, its events and
//! device-to-device copies — run on the host device, which executes each
//! operation at once and checks that every read is ordered after its
//! write. Its gradients equal a sequential run's bit for bit, and a wait
//! left out is caught.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use stp_exec::cpu::{self, CpuOptions};
use stp_exec::device::{Device, DeviceResult, HostBuffer, HostDevice, HostStream};
use stp_exec::model::{sequential_gradients, Model};
use stp_exec::streams::{Fabric, Link};
use stp_exec::{streams, ExecError};
use stp_ir::simulate::Semantics;
use stp_ir::{Program, Rank};
use stp_tests::{build_std, build_std_tp};

fn model_for(program: &Program) -> Model {
    let meta = &program.schedule;
    Model::new(meta.parts() as usize, meta.num_microbatches as usize, 8, 4, meta.tp as usize, 42)
}

fn assert_streams_reproduce_the_sequential_gradients(program: &Program, options: CpuOptions, what: &str) {
    let model = model_for(program);
    let report = streams::run(&HostDevice::new(), program, &model, options).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(report.gradients, sequential_gradients(&model), "{what}: gradients differ");
    for (rank, spans) in report.ranks.iter().zip(&report.timeline) {
        assert_eq!(spans.len(), program.ranks[rank.index()].instrs.len(), "{what}: one span per instruction");
        assert!(spans.iter().all(|(_, start, end)| start <= end), "{what}: spans end after they start");
    }
}

#[test]
fn the_stream_runner_reproduces_the_sequential_gradients_bit_for_bit() {
    let cases: [(&str, i64, i64, Option<i64>, u32); 13] = [
        ("dualpipe", 4, 8, None, 1),
        ("dualpipe", 2, 4, None, 2),
        ("chimera", 4, 8, None, 1),
        ("1f1b", 4, 8, None, 1),
        ("gpipe", 3, 4, None, 1),
        ("interleaved-1f1b", 2, 4, Some(2), 1),
        ("zb-h1", 4, 6, None, 1),
        ("zb-v", 3, 6, None, 1),
        ("dualpipe-v", 4, 10, None, 1),
        ("stp", 4, 11, None, 1),
        ("1f1b", 2, 3, None, 2),
        ("stp", 2, 5, None, 4),
        ("interleaved-1f1b", 2, 4, Some(2), 2),
    ];
    for (name, p, m, v, tp) in cases {
        let program = build_std_tp(name, p, m, v, tp).program;
        let what = format!("{name} p={p} m={m} tp={tp}");
        assert_streams_reproduce_the_sequential_gradients(&program, CpuOptions::default(), &what);
    }
    let program = build_std("zb-v", 2, 4, None).program;
    let buffered = CpuOptions { semantics: Semantics::Buffered, ..CpuOptions::default() };
    assert_streams_reproduce_the_sequential_gradients(&program, buffered, "zb-v buffered");
}

#[test]
fn the_stream_runner_holds_the_stashes_the_cpu_backend_holds() {
    for (name, p, m, v) in [("1f1b", 4, 8, None), ("zb-v", 3, 7, None), ("interleaved-1f1b", 4, 8, Some(2))] {
        let program = build_std(name, p, m, v).program;
        let model = model_for(&program);
        let on_streams = streams::run(&HostDevice::new(), &program, &model, CpuOptions::default()).expect("runs");
        let on_threads = cpu::run(&program, &model, CpuOptions::default()).expect("runs");
        assert_eq!(on_streams.peak_stashes, on_threads.peak_stashes, "{name}");
    }
}

#[test]
fn a_deadlock_on_streams_names_the_instruction_every_rank_is_stuck_at() {
    let mut program = build_std("1f1b", 2, 2, None).program;
    stp_tests::ungroup_transfers(&mut program);
    let options = CpuOptions { timeout: std::time::Duration::from_millis(300), ..CpuOptions::default() };
    match streams::run(&HostDevice::new(), &program, &model_for(&program), options) {
        Err(ExecError::Deadlock { blocked }) => {
            let text: Vec<String> = blocked.iter().map(|(r, _, t)| format!("{r}: {t}")).collect();
            assert_eq!(text, ["r0: send act.s0.mb1 -> r1", "r1: send grad.s1.mb0 -> r0"]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

/// The host device with a flaw: every wait dropped (what a stream runner
/// that forgot its events would do on a GPU), or a device that never
/// finishes anything (a transfer on the device whose peer never comes).
struct Flawed {
    host: HostDevice,
    drop_waits: bool,
    stalled: bool,
}

impl Device for Flawed {
    type Stream = <HostDevice as Device>::Stream;
    type Buffer = <HostDevice as Device>::Buffer;
    type Event = <HostDevice as Device>::Event;
    fn new_stream(&self, gemm: bool) -> DeviceResult<Self::Stream> {
        self.host.new_stream(gemm)
    }
    fn upload(&self, on: &Self::Stream, data: &[f32]) -> DeviceResult<Self::Buffer> {
        self.host.upload(on, data)
    }
    fn download(&self, on: &Self::Stream, buffer: &Self::Buffer) -> DeviceResult<Vec<f32>> {
        self.host.download(on, buffer)
    }
    fn gemm(
        &self,
        on: &Self::Stream,
        a: (&Self::Buffer, (usize, usize), bool),
        b: (&Self::Buffer, (usize, usize), bool),
    ) -> DeviceResult<Self::Buffer> {
        self.host.gemm(on, a, b)
    }
    fn tanh(&self, on: &Self::Stream, x: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer> {
        self.host.tanh(on, x, n)
    }
    fn tanh_grad(&self, on: &Self::Stream, g: &Self::Buffer, z: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer> {
        self.host.tanh_grad(on, g, z, n)
    }
    fn zeros(&self, on: &Self::Stream, n: usize) -> DeviceResult<Self::Buffer> {
        self.host.zeros(on, n)
    }
    fn add_into(&self, on: &Self::Stream, acc: &mut Self::Buffer, x: &Self::Buffer, n: usize) -> DeviceResult<()> {
        self.host.add_into(on, acc, x, n)
    }
    fn copy(&self, on: &Self::Stream, src: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer> {
        self.host.copy(on, src, n)
    }
    fn record(&self, on: &Self::Stream, timed: bool) -> DeviceResult<Self::Event> {
        self.host.record(on, timed)
    }
    fn wait(&self, on: &Self::Stream, event: &Self::Event) -> DeviceResult<()> {
        if self.drop_waits {
            return Ok(());
        }
        self.host.wait(on, event)
    }
    fn is_complete(&self, event: &Self::Event) -> DeviceResult<bool> {
        Ok(!self.stalled && self.host.is_complete(event)?)
    }
    fn synchronize(&self, on: &Self::Stream) -> DeviceResult<()> {
        self.host.synchronize(on)
    }
    fn seconds_between(&self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f64> {
        self.host.seconds_between(start, end)
    }
}

/// A device that stops finishing work is not waited for forever: each
/// rank names the first instruction the device has not finished.
#[test]
fn a_device_that_makes_no_progress_is_reported_where_it_stopped() {
    let program = build_std("1f1b", 2, 2, None).program;
    let options = CpuOptions { timeout: std::time::Duration::from_millis(300), ..CpuOptions::default() };
    let stalled = Flawed { host: HostDevice::new(), drop_waits: false, stalled: true };
    match streams::run(&stalled, &program, &model_for(&program), options) {
        Err(ExecError::Deadlock { blocked }) => {
            let at: Vec<(u32, usize)> = blocked.iter().map(|(r, i, _)| (r.0, *i)).collect();
            assert_eq!(at, [(0, 0), (1, 0)], "{blocked:?}");
        }
        other => panic!("expected the stall to be reported, got {other:?}"),
    }
}

/// Without its waits, the first cross-stream read is reported with the
/// rank and instruction: the check above could fail.
#[test]
fn a_read_not_ordered_after_its_write_is_reported() {
    for (name, m, tp) in [("1f1b", 3, 1), ("stp", 5, 2)] {
        let program = build_std_tp(name, 2, m, None, tp).program;
        let forgetful = Flawed { host: HostDevice::new(), drop_waits: true, stalled: false };
        match streams::run(&forgetful, &program, &model_for(&program), CpuOptions::default()) {
            Err(ExecError::Runtime { message, .. }) => {
                assert!(message.contains("without waiting for it"), "{name}: {message}")
            }
            other => panic!("{name}: expected an ordering error, got {other:?}"),
        }
    }
}

/// A device transport for the tests, standing in for NCCL: a group's sends
/// are copied to the host from the sender's communication stream and its
/// receives uploaded on the receiver's, matched in order per (sender,
/// receiver, shard) as NCCL matches them.
/// What is in flight from (sender, receiver, shard).
type Queues = HashMap<(Rank, Rank, usize), VecDeque<Vec<f32>>>;

/// Per (rank, how many sums before), each shard's part.
type Parts = HashMap<(Rank, usize), Vec<Option<Vec<f32>>>>;

#[derive(Default)]
struct Loopback {
    queues: Mutex<Queues>,
    arrived: Condvar,
    /// Fail every group with this message.
    down: Option<&'static str>,
    /// With `Some(tp)`, it also sums each rank's `tp` shards (each shard on
    /// a device of its own).
    shards: Option<usize>,
    parts: Mutex<Parts>,
}

struct LoopbackLink<'a> {
    fabric: &'a Loopback,
    rank: Rank,
    shard: usize,
    /// How many sums this shard has taken part in.
    sums: usize,
}

impl Fabric<HostDevice> for Loopback {
    fn carries_collectives(&self) -> bool {
        self.shards.is_some()
    }

    fn connect<'f>(
        &'f self,
        _: &HostDevice,
        rank: Rank,
        shard: usize,
        _: &HostStream,
    ) -> DeviceResult<Box<dyn Link<HostDevice> + 'f>> {
        Ok(Box::new(LoopbackLink { fabric: self, rank, shard, sums: 0 }))
    }
}

impl Link<HostDevice> for LoopbackLink<'_> {
    fn group(
        &mut self,
        device: &HostDevice,
        stream: &HostStream,
        sends: &[(Rank, &HostBuffer)],
        recvs: &[(Rank, usize)],
    ) -> DeviceResult<Vec<HostBuffer>> {
        if let Some(why) = self.fabric.down {
            return Err(why.into());
        }
        for (to, buffer) in sends {
            let data = device.download(stream, buffer)?;
            let mut queues = self.fabric.queues.lock().map_err(|_| "poisoned")?;
            queues.entry((self.rank, *to, self.shard)).or_default().push_back(data);
            self.fabric.arrived.notify_all();
        }
        let mut received = Vec::new();
        for (from, len) in recvs {
            let key = (*from, self.rank, self.shard);
            let queues = self.fabric.queues.lock().map_err(|_| "poisoned")?;
            let (mut queues, waited) = self
                .fabric
                .arrived
                .wait_timeout_while(queues, Duration::from_secs(10), |q| q.get(&key).is_none_or(VecDeque::is_empty))
                .map_err(|_| "poisoned")?;
            if waited.timed_out() {
                return Err(format!("nothing arrived from {from}"));
            }
            let data = queues.get_mut(&key).and_then(VecDeque::pop_front).ok_or("lost")?;
            if data.len() != *len {
                return Err(format!("a receive of {len} values, but {} were sent", data.len()));
            }
            received.push(device.upload(stream, &data)?);
        }
        Ok(received)
    }

    /// Sums in shard order, as the runner's own all-reduce and the
    /// sequential run do, so the gradients stay bit for bit.
    fn all_reduce(
        &mut self,
        device: &HostDevice,
        stream: &HostStream,
        part: &HostBuffer,
        len: usize,
    ) -> DeviceResult<HostBuffer> {
        let tp = self.fabric.shards.ok_or("no shards to sum")?;
        let key = (self.rank, self.sums);
        self.sums += 1;
        let data = device.download(stream, part)?;
        let mut parts = self.fabric.parts.lock().map_err(|_| "poisoned")?;
        parts.entry(key).or_insert_with(|| vec![None; tp])[self.shard] = Some(data);
        self.fabric.arrived.notify_all();
        let (parts, waited) = self
            .fabric
            .arrived
            .wait_timeout_while(parts, Duration::from_secs(10), |p| p[&key].iter().any(Option::is_none))
            .map_err(|_| "poisoned")?;
        if waited.timed_out() {
            return Err(format!("{} of {tp} shards came to the sum", parts[&key].iter().flatten().count()));
        }
        let mut sum = vec![0.0f32; len];
        for part in parts[&key].iter().flatten() {
            for (acc, x) in sum.iter_mut().zip(part) {
                *acc += x;
            }
        }
        device.upload(stream, &sum)
    }
}

#[test]
fn transfers_through_a_device_transport_reproduce_the_sequential_gradients() {
    let cases: [(&str, i64, i64, Option<i64>, u32); 5] = [
        ("1f1b", 4, 8, None, 1),
        ("zb-v", 3, 6, None, 1),
        ("dualpipe-v", 4, 10, None, 1),
        ("stp", 4, 11, None, 2),
        ("interleaved-1f1b", 2, 4, Some(2), 2),
    ];
    for (name, p, m, v, tp) in cases {
        let program = build_std_tp(name, p, m, v, tp).program;
        let model = model_for(&program);
        let fabric = Loopback::default();
        let report = streams::run_over(&[&HostDevice::new()], &program, &model, CpuOptions::default(), &fabric)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.gradients, sequential_gradients(&model), "{name} p={p} m={m} tp={tp}: gradients differ");
    }
}

/// Each tensor-parallel shard on a device of its own, the shards summing
/// through the transport (as NCCL all-reduces do across GPUs).
#[test]
fn shards_on_devices_of_their_own_sum_through_the_transport() {
    for (name, p, m, v, tp) in
        [("stp", 4, 11, None, 2), ("interleaved-1f1b", 2, 4, Some(2), 2), ("1f1b", 2, 3, None, 4)]
    {
        let program = build_std_tp(name, p, m, v, tp).program;
        let model = model_for(&program);
        let devices: Vec<HostDevice> = (0..tp).map(|_| HostDevice::new()).collect();
        let devices: Vec<&HostDevice> = devices.iter().collect();
        let fabric = Loopback { shards: Some(tp as usize), ..Loopback::default() };
        let report = streams::run_over(&devices, &program, &model, CpuOptions::default(), &fabric)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.gradients, sequential_gradients(&model), "{name} p={p} m={m} tp={tp}: gradients differ");
        assert!(!fabric.parts.lock().expect("not poisoned").is_empty(), "{name}: the shards summed through it");
    }
    // Devices of their own need a transport that sums the shards.
    let program = build_std_tp("stp", 2, 5, None, 2).program;
    let (a, b) = (HostDevice::new(), HostDevice::new());
    match streams::run_over(&[&a, &b], &program, &model_for(&program), CpuOptions::default(), &Loopback::default()) {
        Err(ExecError::Setup(message)) => assert!(message.contains("one per shard with a transport"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_failing_device_transport_is_named_with_the_instruction() {
    let program = build_std("1f1b", 2, 2, None).program;
    let model = model_for(&program);
    let fabric = Loopback { down: Some("link down"), ..Loopback::default() };
    match streams::run_over(&[&HostDevice::new()], &program, &model, CpuOptions::default(), &fabric) {
        Err(ExecError::Runtime { rank, instr, message }) => {
            assert!(message.contains("link down"), "{message}");
            let text = program.ranks[rank.index()].instrs[instr].to_string();
            assert!(text.starts_with("send") || text.starts_with("recv"), "names a transfer: {text}");
        }
        other => panic!("expected the transport's error, got {other:?}"),
    }
}
