//! Multi-process runs, launched the way the ecosystem launches them: one
//! process per pipeline rank, told who it is by `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` (as `torchrun` and Slurm
//! wrappers set them), meeting over TCP.
//!
//! The rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other
//! rank listens on a port of its own, connects to rank 0 and says who it
//! is, how large the world is, which program it runs (a fingerprint) and
//! where it listens. Rank 0 checks that everybody agrees and answers with
//! every rank's address (or with the reason it refuses, to everyone); then
//! each rank connects to the lower-numbered ones. Over the resulting mesh
//! (one TCP connection per pair of ranks) frames carry the CPU backend's
//! messages and acknowledgements, tagged with their tensor-parallel shard,
//! so the backend's threads see the same channels as in one process and
//! the program's rendezvous semantics are kept.
//!
//! The same mesh serves every backend: the CPU backend's threads, the
//! stream runner ([`crate::streams`]) staging its transfers through host
//! memory, and the CUDA backend over NCCL, whose unique ids rank 0 makes
//! and sends to every rank over the mesh before any frame moves (NCCL
//! then carries the transfers; the mesh stays open until every rank is
//! done, so no process leaves while a peer may still need it).

use crate::cpu::{self, CpuOptions, CpuReport, Ports};
use crate::device::Device;
use crate::model::{Model, Tensor};
use crate::streams::{self, Peers};
use crate::ExecError;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use stp_ir::{Buffer, BufferKind, Microbatch, Program, Rank, Stage};

/// Who this process is in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `RANK`: this process's pipeline rank.
    pub rank: usize,
    /// `WORLD_SIZE`: how many processes take part (one per pipeline rank).
    pub world_size: usize,
    /// `LOCAL_RANK`: its index on this machine (which GPU it would use).
    pub local_rank: usize,
    /// `MASTER_ADDR`: where rank 0 listens.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
}

impl Env {
    /// Reads the variables through `var` (`std::env::var` in the binary).
    /// `Ok(None)` when `WORLD_SIZE` is not set: a single-process run.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Env>, String> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, text: Option<String>| -> Result<usize, String> {
            let text = text.ok_or_else(|| format!("WORLD_SIZE is set, so {name} must be too (as torchrun sets it)"))?;
            text.trim().parse().map_err(|_| format!("{name}={text} is not a non-negative integer"))
        };
        let world_size = number("WORLD_SIZE", Some(world))?;
        let rank = number("RANK", var("RANK"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(text) => number("LOCAL_RANK", Some(text))?,
            None => rank,
        };
        if world_size == 0 || rank >= world_size {
            return Err(format!("RANK={rank} is not below WORLD_SIZE={world_size}"));
        }
        let master_addr = var("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or("WORLD_SIZE is set, so MASTER_ADDR must be too: the host rank 0 listens on")?;
        let port =
            var("MASTER_PORT").ok_or("WORLD_SIZE is set, so MASTER_PORT must be too: the port rank 0 listens on")?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("MASTER_PORT={port} is not a port number (1 to 65535)"))?;
        Ok(Some(Env { rank, world_size, local_rank, master_addr: master_addr.trim().to_string(), master_port }))
    }

    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// Runs this process's rank of `program` on the CPU backend: meets the
/// other processes (waiting up to `rendezvous` for them), then runs the
/// rank's shard threads with messages over TCP. The program is verified first.
pub fn run_process(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    env: &Env,
    rendezvous: Duration,
) -> Result<CpuReport, ExecError> {
    linked(program, model, options, env, rendezvous, None, |ports, _| {
        cpu::run_rank(program, model, options, env.rank, ports)
    })
}

/// Runs this process's rank of `program` with the stream runner on
/// `device`, its transfers staged through host memory over TCP (works on
/// any device and network; NCCL, where there is one, is faster:
/// `crate::cuda::run_process`).
pub fn run_process_on<D: Device>(
    device: &D,
    program: &Program,
    model: &Model,
    options: CpuOptions,
    env: &Env,
    rendezvous: Duration,
) -> Result<CpuReport, ExecError> {
    linked(program, model, options, env, rendezvous, None, |ports, _| {
        streams::execute(&[device], program, model, options, &[env.rank], Peers::Staged(ports))
    })
}

/// Makes the bytes rank 0 hands every rank at the rendezvous (NCCL's
/// unique ids), or says why it cannot.
pub(crate) type Secret<'a> = &'a (dyn Fn() -> Result<Vec<u8>, String> + Sync);

/// Meets the other processes, hands every rank `secret`'s bytes if given,
/// and runs `body` with this rank's per-shard channels over TCP; returns
/// once every peer is done with this process.
pub(crate) fn linked(
    program: &Program,
    model: &Model,
    options: CpuOptions,
    env: &Env,
    rendezvous: Duration,
    secret: Option<Secret>,
    body: impl FnOnce(Vec<Ports>, Vec<u8>) -> Result<CpuReport, ExecError>,
) -> Result<CpuReport, ExecError> {
    cpu::prepare(program, model)?;
    let ranks = program.ranks.len();
    if env.world_size != ranks {
        return Err(ExecError::Setup(format!(
            "WORLD_SIZE is {} but the program has {ranks} pipeline ranks: every backend runs one process per \
             pipeline rank (its tensor-parallel shards are threads)",
            env.world_size
        )));
    }
    // Both ends must agree on the transport as on the program.
    let fingerprint = fingerprint(program) ^ u64::from(secret.is_some());
    let deadline = Instant::now() + rendezvous;
    let mut peers = connect_mesh(env, fingerprint, rendezvous).map_err(ExecError::Setup)?;
    let shared = match secret {
        Some(make) => share_secret(&mut peers, env.rank, make, deadline).map_err(ExecError::Setup)?,
        None => Vec::new(),
    };
    let tp = program.schedule.tp as usize;
    let (ports, bridge) =
        Bridge::start(peers, tp).map_err(|e| ExecError::Setup(format!("cannot set up links: {e}")))?;
    let report = body(ports, shared);
    bridge.finish(options.timeout);
    report
}

/// Rank 0 makes the secret and sends it (or why it has none) to every
/// rank; the others read it from rank 0.
fn share_secret(mesh: &mut Mesh, rank: usize, make: Secret, deadline: Instant) -> Result<Vec<u8>, String> {
    if rank == 0 {
        let made = make();
        for stream in mesh.iter_mut().flatten() {
            let sent = match &made {
                Ok(bytes) => stream
                    .write_all(&[0])
                    .and_then(|()| write_u32(stream, bytes.len() as u32))
                    .and_then(|()| stream.write_all(bytes)),
                Err(why) => refuse(stream, why),
            };
            sent.and_then(|()| stream.flush())
                .map_err(|e| format!("rank 0 lost a rank while handing out the transport's ids: {e}"))?;
        }
        return made.map_err(|why| format!("rank 0 cannot set up the transport: {why}"));
    }
    let master = mesh.first_mut().and_then(Option::as_mut).ok_or("no connection to rank 0")?;
    set_deadline(master, deadline)?;
    let lost = |e: io::Error| format!("rank {rank} waited for the transport's ids from rank 0: {e}");
    match read_array::<1>(master).map_err(lost)?[0] {
        0 => {
            let len = read_u32(master).map_err(lost)? as usize;
            if len > MAX_SECRET {
                return Err(format!("rank 0 sent {len} bytes of transport ids (at most {MAX_SECRET} expected)"));
            }
            let mut bytes = vec![0; len];
            master.read_exact(&mut bytes).map_err(lost)?;
            Ok(bytes)
        }
        1 => Err(format!("rank 0 cannot set up the transport: {}", read_str(master).map_err(lost)?)),
        other => Err(format!("rank 0 answered {other} instead of the transport's ids")),
    }
}

/// The most bytes of transport ids a rank accepts (NCCL's take 128 per
/// tensor-parallel shard).
const MAX_SECRET: usize = 1 << 16;

/// FNV-1a over the program's JSON: processes must run the same program.
fn fingerprint(program: &Program) -> u64 {
    stp_ir::to_json(program)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

const MAGIC: &[u8; 4] = b"STP1";

/// How long a new connection to rank 0 has to say that it is a rank.
const GREETING_TIME: Duration = Duration::from_secs(2);

/// The connection to every other rank (`None` at this rank's own index).
type Mesh = Vec<Option<TcpStream>>;

fn connect_mesh(env: &Env, fingerprint: u64, timeout: Duration) -> Result<Mesh, String> {
    let deadline = Instant::now() + timeout;
    let mut mesh: Mesh = (0..env.world_size).map(|_| None).collect();
    if env.world_size == 1 {
        return Ok(mesh);
    }
    if env.rank == 0 {
        gather_at_master(env, fingerprint, deadline, &mut mesh)?;
        return Ok(mesh);
    }
    let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| format!("rank {} cannot listen: {e}", env.rank))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut master = connect_until(&env.master(), deadline)
        .map_err(|e| format!("rank {} could not reach rank 0 at {}: {e}", env.rank, env.master()))?;
    let hello = (|| -> io::Result<()> {
        master.write_all(MAGIC)?;
        write_u32(&mut master, env.rank as u32)?;
        write_u32(&mut master, env.world_size as u32)?;
        master.write_all(&fingerprint.to_le_bytes())?;
        master.write_all(&port.to_le_bytes())?;
        master.flush()
    })();
    hello.map_err(|e| format!("rank {} lost rank 0 during the rendezvous: {e}", env.rank))?;
    let table = read_table(&mut master, deadline).map_err(|e| format!("rank {}: {e}", env.rank))?;
    if table.len() != env.world_size {
        return Err(format!(
            "rank {}: rank 0 sent {} addresses for a world of {}",
            env.rank,
            table.len(),
            env.world_size
        ));
    }
    mesh[0] = Some(master);
    // Connect to every lower rank but 0, accept every higher one.
    for (peer, addr) in table.iter().enumerate().take(env.rank).skip(1) {
        let mut stream = connect_until(&addr.to_string(), deadline)
            .map_err(|e| format!("rank {} could not reach rank {peer} at {addr}: {e}", env.rank))?;
        stream.write_all(MAGIC).and_then(|()| write_u32(&mut stream, env.rank as u32)).map_err(|e| e.to_string())?;
        mesh[peer] = Some(stream);
    }
    let higher = env.world_size - 1 - env.rank;
    for _ in 0..higher {
        let mut stream = accept_until(&listener, deadline).map_err(|e| {
            let missing: Vec<String> =
                (env.rank + 1..env.world_size).filter(|r| mesh[*r].is_none()).map(|r| r.to_string()).collect();
            format!("rank {} waited for ranks {} to connect: {e}", env.rank, missing.join(", "))
        })?;
        let peer = read_greeting(&mut stream, deadline).map_err(|e| format!("rank {}: {e}", env.rank))?;
        if peer <= env.rank || peer >= env.world_size || mesh[peer].is_some() {
            return Err(format!("rank {}: an unexpected connection claims to be rank {peer}", env.rank));
        }
        mesh[peer] = Some(stream);
    }
    Ok(mesh)
}

/// Rank 0's side: accept every other rank, check they agree, send them
/// the address table (or the reason to stop).
fn gather_at_master(env: &Env, fingerprint: u64, deadline: Instant, mesh: &mut Mesh) -> Result<(), String> {
    let listener = TcpListener::bind(env.master())
        .map_err(|e| format!("rank 0 cannot listen on {} (MASTER_ADDR:MASTER_PORT): {e}", env.master()))?;
    let mut table: Vec<Option<SocketAddr>> = vec![None; env.world_size];
    let mut problem: Option<String> = None;
    let mut heard = 0;
    let mut strays = 0;
    while heard + 1 < env.world_size {
        let mut stream = accept_until(&listener, deadline).map_err(|e| {
            let missing: Vec<String> =
                (1..env.world_size).filter(|r| table[*r].is_none()).map(|r| r.to_string()).collect();
            let strays = if strays > 0 {
                format!(" ({strays} other connection(s) were not stp-exec ranks and were ignored)")
            } else {
                String::new()
            };
            format!("rank 0 waited on {} for ranks {} to connect: {e}{strays}", env.master(), missing.join(", "))
        })?;
        // Something else on the port (a health check, a scanner) is
        // ignored; a rank introduces itself at once.
        let greeting = deadline.min(Instant::now() + GREETING_TIME);
        let Ok(hello) = read_hello(&mut stream, greeting) else {
            strays += 1;
            continue;
        };
        heard += 1;
        let ip = stream.peer_addr().map_err(|e| e.to_string())?.ip();
        let trouble = if hello.world != env.world_size {
            Some(format!("rank {} has WORLD_SIZE={}, rank 0 has {}", hello.rank, hello.world, env.world_size))
        } else if hello.rank == 0 || hello.rank >= env.world_size || table[hello.rank].is_some() {
            Some(format!("two processes claim RANK={}", hello.rank))
        } else if hello.fingerprint != fingerprint {
            Some(format!("rank {} runs a different program or transport than rank 0 (give every process the same file and backend)", hello.rank))
        } else {
            None
        };
        if let Some(trouble) = trouble {
            problem.get_or_insert(trouble);
        } else {
            table[hello.rank] = Some(SocketAddr::new(ip, hello.port));
            mesh[hello.rank] = Some(stream);
            continue;
        }
        // Tell the offender at once; the others hear it below.
        let _ = refuse(&mut stream, problem.as_deref().unwrap_or_default());
    }
    let peers: Vec<&mut TcpStream> = mesh.iter_mut().flatten().collect();
    if let Some(problem) = problem {
        for stream in peers {
            let _ = refuse(stream, &problem);
        }
        return Err(format!("the rendezvous failed: {problem}"));
    }
    for stream in peers {
        let sent = (|| -> io::Result<()> {
            stream.write_all(&[0])?;
            write_u32(stream, (env.world_size - 1) as u32)?;
            for addr in table.iter().skip(1).flatten() {
                write_str(stream, &addr.ip().to_string())?;
                stream.write_all(&addr.port().to_le_bytes())?;
            }
            stream.flush()
        })();
        sent.map_err(|e| format!("rank 0 lost a rank during the rendezvous: {e}"))?;
    }
    Ok(())
}

fn refuse(stream: &mut TcpStream, why: &str) -> io::Result<()> {
    stream.write_all(&[1])?;
    write_str(stream, why)
}

struct Hello {
    rank: usize,
    world: usize,
    fingerprint: u64,
    port: u16,
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> Result<Hello, String> {
    set_deadline(stream, deadline)?;
    let mut read = || -> io::Result<Hello> {
        expect_magic(stream)?;
        let rank = read_u32(stream)? as usize;
        let world = read_u32(stream)? as usize;
        let fingerprint = u64::from_le_bytes(read_array(stream)?);
        let port = u16::from_le_bytes(read_array(stream)?);
        Ok(Hello { rank, world, fingerprint, port })
    };
    read().map_err(|e| format!("a process on MASTER_PORT did not introduce itself as an stp-exec rank: {e}"))
}

fn read_greeting(stream: &mut TcpStream, deadline: Instant) -> Result<usize, String> {
    set_deadline(stream, deadline)?;
    let mut read = || -> io::Result<usize> {
        expect_magic(stream)?;
        Ok(read_u32(stream)? as usize)
    };
    read().map_err(|e| format!("a peer did not introduce itself: {e}"))
}

/// Rank 0's answer: every rank's address (index 0 unused), or its refusal.
fn read_table(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
    set_deadline(stream, deadline)?;
    let status = read_array::<1>(stream).map_err(|e| format!("no answer from rank 0: {e}"))?;
    if status[0] != 0 {
        let why = read_str(stream).unwrap_or_else(|e| e.to_string());
        return Err(format!("rank 0 stopped the rendezvous: {why}"));
    }
    let mut read = || -> io::Result<Vec<SocketAddr>> {
        let count = read_u32(stream)? as usize;
        let mut table = vec![SocketAddr::from(([0, 0, 0, 0], 0))];
        for _ in 0..count.min(1 << 16) {
            let ip = read_str(stream)?;
            let port = u16::from_le_bytes(read_array(stream)?);
            let ip: IpAddr =
                ip.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad address {ip}")))?;
            table.push(SocketAddr::new(ip, port));
        }
        Ok(table)
    };
    let table = read().map_err(|e| format!("rank 0 sent a broken address table: {e}"))?;
    Ok(table)
}

fn set_deadline(stream: &TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())
}

fn connect_until(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "timed out");
    while Instant::now() < deadline {
        let addrs = match addr.to_socket_addrs() {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => return Err(e),
        };
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("gave up at the rendezvous timeout ({last})")))
}

fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "gave up at the rendezvous timeout"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn expect_magic(stream: &mut impl Read) -> io::Result<()> {
    if &read_array::<4>(stream)? == MAGIC {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "wrong greeting"))
    }
}

fn read_array<const N: usize>(stream: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0; N];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_u32(stream: &mut impl Read) -> io::Result<u32> {
    Ok(u32::from_le_bytes(read_array(stream)?))
}

fn write_u32(stream: &mut impl Write, value: u32) -> io::Result<()> {
    stream.write_all(&value.to_le_bytes())
}

fn write_str(stream: &mut impl Write, text: &str) -> io::Result<()> {
    write_u32(stream, text.len() as u32)?;
    stream.write_all(text.as_bytes())
}

fn read_str(stream: &mut impl Read) -> io::Result<String> {
    let len = read_u32(stream)? as usize;
    if len > 1 << 16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "string too long"));
    }
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// A message on the wire: a tensor for a shard, or a shard's acknowledgement.
enum Frame {
    Data(usize, Buffer, Tensor),
    Ack(usize, Buffer),
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let (kind, shard, buffer, tensor) = match self {
            Frame::Data(shard, buffer, tensor) => (0u8, *shard, buffer, Some(tensor)),
            Frame::Ack(shard, buffer) => (1u8, *shard, buffer, None),
        };
        let mut bytes = vec![kind];
        let buffer_kind: u32 = match buffer.kind {
            BufferKind::Act => 0,
            BufferKind::Grad => 1,
            BufferKind::Stash => 2,
        };
        for word in [shard as u32, buffer_kind, buffer.stage.0, buffer.mb.0] {
            bytes.extend(word.to_le_bytes());
        }
        if let Some(t) = tensor {
            bytes.extend((t.rows as u32).to_le_bytes());
            bytes.extend((t.cols as u32).to_le_bytes());
            for v in &t.data {
                bytes.extend(v.to_le_bytes());
            }
        }
        bytes
    }

    fn decode(stream: &mut impl Read) -> io::Result<Frame> {
        let [kind] = read_array::<1>(stream)?;
        let shard = read_u32(stream)? as usize;
        let buffer_kind = match read_u32(stream)? {
            0 => BufferKind::Act,
            1 => BufferKind::Grad,
            2 => BufferKind::Stash,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad buffer kind")),
        };
        let buffer = Buffer { kind: buffer_kind, stage: Stage(read_u32(stream)?), mb: Microbatch(read_u32(stream)?) };
        if kind == 1 {
            return Ok(Frame::Ack(shard, buffer));
        }
        let rows = read_u32(stream)? as usize;
        let cols = read_u32(stream)? as usize;
        let len = rows.checked_mul(cols).filter(|n| *n <= 1 << 28).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("a {rows}x{cols} tensor is too large"))
        })?;
        let mut raw = vec![0u8; len * 4];
        stream.read_exact(&mut raw)?;
        let data = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Frame::Data(shard, buffer, Tensor { rows, cols, data }))
    }
}

/// The threads that move frames between the backend's channels and the
/// sockets: per peer, one reader, and one forwarder per shard and kind.
struct Bridge {
    streams: Vec<TcpStream>,
    forwarders: Vec<JoinHandle<()>>,
    readers_done: Vec<Arc<AtomicBool>>,
}

impl Bridge {
    fn start(mesh: Mesh, tp: usize) -> io::Result<(Vec<Ports>, Bridge)> {
        let mut ports: Vec<Ports> = (0..tp).map(|_| Ports::default()).collect();
        let mut bridge = Bridge { streams: Vec::new(), forwarders: Vec::new(), readers_done: Vec::new() };
        for (peer, stream) in mesh.into_iter().enumerate() {
            let Some(stream) = stream else { continue };
            stream.set_read_timeout(None)?;
            let peer = Rank(peer as u32);
            let writer = Arc::new(Mutex::new(BufWriter::new(stream.try_clone()?)));
            let mut data_in = Vec::new();
            let mut ack_in = Vec::new();
            for (shard, port) in ports.iter_mut().enumerate() {
                let (tx, rx) = mpsc::channel::<(Buffer, Tensor)>();
                port.data_out.insert(peer, tx);
                bridge.forwarders.push(forward(rx, Arc::clone(&writer), move |(b, t)| Frame::Data(shard, b, t)));
                let (tx, rx) = mpsc::channel::<Buffer>();
                port.ack_out.insert(peer, tx);
                bridge.forwarders.push(forward(rx, Arc::clone(&writer), move |b| Frame::Ack(shard, b)));
                let (tx, rx) = mpsc::channel();
                port.data_in.insert(peer, rx);
                data_in.push(tx);
                let (tx, rx) = mpsc::channel();
                port.ack_in.insert(peer, rx);
                ack_in.push(tx);
            }
            let done = Arc::new(AtomicBool::new(false));
            let reader = BufReader::new(stream.try_clone()?);
            let flag = Arc::clone(&done);
            std::thread::spawn(move || {
                read_frames(reader, &data_in, &ack_in);
                flag.store(true, Ordering::SeqCst);
            });
            bridge.readers_done.push(done);
            bridge.streams.push(stream);
        }
        Ok((ports, bridge))
    }

    /// After the rank's threads ended (dropping their channels): flush
    /// what is still going out, close the sending side, and wait (up to
    /// `timeout`) for every peer to close its side, so no process leaves
    /// while a peer may still need it.
    fn finish(self, timeout: Duration) {
        for forwarder in self.forwarders {
            let _ = forwarder.join();
        }
        for stream in &self.streams {
            let _ = stream.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.readers_done.iter().all(|d| d.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn forward<T: Send + 'static>(
    rx: Receiver<T>,
    writer: Arc<Mutex<BufWriter<TcpStream>>>,
    frame: impl Fn(T) -> Frame + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for item in rx {
            let bytes = frame(item).encode();
            let Ok(mut w) = writer.lock() else { return };
            if w.write_all(&bytes).and_then(|()| w.flush()).is_err() {
                return;
            }
        }
    })
}

/// Dispatches incoming frames to the shard threads until the peer closes
/// the connection; then the threads' receivers see it disconnected.
fn read_frames(mut reader: impl Read, data_in: &[Sender<(Buffer, Tensor)>], ack_in: &[Sender<Buffer>]) {
    while let Ok(frame) = Frame::decode(&mut reader) {
        let delivered = match frame {
            Frame::Data(shard, buffer, tensor) => data_in.get(shard).map(|tx| tx.send((buffer, tensor)).is_ok()),
            Frame::Ack(shard, buffer) => ack_in.get(shard).map(|tx| tx.send(buffer).is_ok()),
        };
        if delivered.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> io::Result<Frame> {
        Frame::decode(&mut &bytes[..])
    }

    /// Every rank of a world of 3 meets the others and receives what rank
    /// 0's `make` gives (as NCCL's unique ids travel), or rank 0's reason.
    fn share(make: Secret) -> Vec<Result<Vec<u8>, String>> {
        let port = TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).expect("a free port").port();
        let timeout = Duration::from_secs(20);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let env = Env {
                            rank,
                            world_size: 3,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                        };
                        let mut mesh = connect_mesh(&env, 7, timeout)?;
                        share_secret(&mut mesh, rank, make, Instant::now() + timeout)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect()
        })
    }

    #[test]
    fn rank_0_hands_every_rank_the_transports_ids() {
        let ids: Vec<u8> = (0..=255).cycle().take(256).collect();
        let expected = ids.clone();
        let make = move || Ok(ids.clone());
        for (rank, got) in share(&make).into_iter().enumerate() {
            assert_eq!(got.as_deref(), Ok(&expected[..]), "rank {rank}");
        }
        let broken = || Err("NCCL is not on the library path".to_string());
        for (rank, got) in share(&broken).into_iter().enumerate() {
            let message = got.expect_err("refused");
            assert!(message.contains("rank 0 cannot set up the transport: NCCL is not on"), "rank {rank}: {message}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let buffer = Buffer { kind: BufferKind::Grad, stage: Stage(3), mb: Microbatch(7) };
        let tensor = Tensor { rows: 2, cols: 3, data: vec![1.0, -2.5, 0.0, 3.25, f32::MIN_POSITIVE, 1e30] };
        match decode(&Frame::Data(1, buffer, tensor.clone()).encode()) {
            Ok(Frame::Data(1, b, t)) => assert_eq!((b, t), (buffer, tensor)),
            _ => panic!("a data frame comes back as sent"),
        }
        match decode(&Frame::Ack(2, buffer).encode()) {
            Ok(Frame::Ack(2, b)) => assert_eq!(b, buffer),
            _ => panic!("an acknowledgement comes back as sent"),
        }
    }

    #[test]
    fn broken_frames_are_refused() {
        let buffer = Buffer { kind: BufferKind::Act, stage: Stage(0), mb: Microbatch(0) };
        let mut bad_kind = Frame::Ack(0, buffer).encode();
        bad_kind[5] = 9; // the buffer kind's first byte
        assert!(decode(&bad_kind).is_err());
        let mut huge = Frame::Data(0, buffer, Tensor { rows: 1, cols: 1, data: vec![0.0] }).encode();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes()); // rows
        huge[21..25].copy_from_slice(&u32::MAX.to_le_bytes()); // cols
        assert!(decode(&huge).is_err(), "a tensor too large is refused before allocating it");
        let truncated = Frame::Data(0, buffer, Tensor { rows: 1, cols: 2, data: vec![1.0, 2.0] }).encode();
        assert!(decode(&truncated[..truncated.len() - 1]).is_err());
    }
}
