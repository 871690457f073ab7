//! What the two thread-per-shard runners — the CPU backend ([`crate::cpu`])
//! and the stream runner ([`crate::streams`]) — share: the board the
//! deadlock watchdog reads, waiting in short slices with a timeout, and
//! assembling the report from the threads' results.

use crate::cpu::CpuReport;
use crate::model::{self, Model, ShardGrads, Tensor};
use crate::ExecError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use stp_ir::{Program, Rank};

/// Where every thread is, for the watchdog's report; and whether the run
/// has been declared stuck.
pub(crate) struct Board {
    at: Mutex<Vec<Option<usize>>>,
    stuck: AtomicBool,
}

impl Board {
    pub(crate) fn new(threads: usize) -> Board {
        Board { at: Mutex::new(vec![Some(0); threads]), stuck: AtomicBool::new(false) }
    }

    /// Thread `thread` is at instruction `instr`.
    pub(crate) fn enter(&self, thread: usize, instr: usize) {
        if let Ok(mut at) = self.at.lock() {
            at[thread] = Some(instr);
        }
    }

    /// Thread `thread` has run its last instruction.
    pub(crate) fn finish(&self, thread: usize) {
        if let Ok(mut at) = self.at.lock() {
            at[thread] = None;
        }
    }

    /// Declares the run stuck: every waiting thread gives up.
    pub(crate) fn stop(&self) -> ExecError {
        self.stuck.store(true, Ordering::SeqCst);
        ExecError::Stuck
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stuck.load(Ordering::SeqCst)
    }

    /// Waits on `poll` in short slices until it yields, the run is declared
    /// stuck elsewhere, or this thread has waited past `timeout`.
    pub(crate) fn wait<T>(
        &self,
        timeout: Duration,
        mut poll: impl FnMut() -> Option<Result<T, RecvTimeoutError>>,
    ) -> Result<T, ExecError> {
        let started = Instant::now();
        loop {
            match poll() {
                Some(Ok(value)) => return Ok(value),
                Some(Err(RecvTimeoutError::Timeout)) => {}
                Some(Err(RecvTimeoutError::Disconnected)) | None => return Err(self.stop()),
            }
            if self.stopped() || started.elapsed() > timeout {
                return Err(self.stop());
            }
        }
    }

    /// Whether a thread that started waiting at `started` should give up.
    pub(crate) fn gives_up(&self, started: Instant, timeout: Duration) -> bool {
        if self.stopped() || started.elapsed() > timeout {
            self.stop();
            return true;
        }
        false
    }
}

/// How long one slice of a wait lasts.
pub(crate) fn slice() -> Duration {
    Duration::from_millis(20)
}

/// What one shard thread produced.
pub(crate) struct ThreadResult {
    /// ((stage, microbatch), this shard's weight gradients).
    pub(crate) grads: Vec<((usize, usize), ShardGrads)>,
    pub(crate) peak_stashes: usize,
    /// (instruction, start, end) in seconds since the run began.
    pub(crate) timeline: Vec<(usize, f64, f64)>,
}

/// The report of a run of `ranks`' shard threads (thread `t` being shard
/// `t % tp` of `ranks[t / tp]`), or the error that stopped it: a thread's
/// own failure first, else the deadlock the board shows.
pub(crate) fn report(
    program: &Program,
    model: &Model,
    ranks: &[usize],
    board: &Board,
    results: Vec<Result<ThreadResult, ExecError>>,
) -> Result<CpuReport, ExecError> {
    let tp = program.schedule.tp as usize;
    // A thread that failed outright stopped the others; its error is the news.
    if let Some(i) = results
        .iter()
        .position(|r| matches!(r, Err(ExecError::Runtime { .. } | ExecError::Panicked | ExecError::Setup(_))))
    {
        return Err(results.into_iter().nth(i).and_then(Result::err).unwrap_or(ExecError::Panicked));
    }
    if board.stopped() {
        let at = board.at.lock().map(|v| v.clone()).unwrap_or_default();
        let blocked = at
            .iter()
            .enumerate()
            .filter(|(t, _)| t % tp == 0)
            .filter_map(|(t, i)| {
                let i = (*i)?;
                let rank = ranks[t / tp];
                let instr = program.ranks[rank].instrs.get(i)?;
                Some((Rank(rank as u32), i, instr.to_string().replace('\n', " ")))
            })
            .collect();
        return Err(ExecError::Deadlock { blocked });
    }
    let (stages, mbs) = (program.schedule.num_stages as usize, program.schedule.num_microbatches as usize);
    // grads[mb][stage][shard]
    let mut grads: Vec<Vec<Vec<ShardGrads>>> = vec![vec![vec![ShardGrads::default(); tp]; stages]; mbs];
    let mut peak_stashes = vec![0; ranks.len()];
    let mut timeline = vec![Vec::new(); ranks.len()];
    for (t, result) in results.into_iter().enumerate() {
        let result = result?;
        for ((stage, mb), g) in result.grads {
            let slot = &mut grads[mb][stage][t % tp];
            for (mine, part) in [(&mut slot.a1, g.a1), (&mut slot.b1, g.b1), (&mut slot.a2, g.a2), (&mut slot.b2, g.b2)]
            {
                if part.is_some() {
                    *mine = part;
                }
            }
        }
        if t % tp == 0 {
            peak_stashes[t / tp] = result.peak_stashes;
            timeline[t / tp] = result.timeline;
        }
    }
    // Summed in microbatch order, so the floats do not depend on the schedule.
    let mut gradients: Vec<Vec<Tensor>> = model.zero_gradients();
    for per_stage in &grads {
        for (s, shards) in per_stage.iter().enumerate() {
            for (k, g) in shards.iter().enumerate() {
                model::accumulate(&mut gradients[s], tp, k, g);
            }
        }
    }
    Ok(CpuReport { ranks: ranks.iter().map(|r| Rank(*r as u32)).collect(), gradients, peak_stashes, timeline })
}
