//! # stp-exec: running stp programs
//!
//! Executors consume the IR ([`stp_ir::Program`]) and nothing else. Every
//! backend verifies a program before running it. The CPU backend
//! ([`cpu`]) is the semantic reference: it trains a small model
//! ([`model`]) with real arithmetic, one thread per pipeline rank and
//! tensor-parallel shard, and its weight gradients must equal a sequential
//! run's bit for bit. The stream runner ([`streams`]) runs programs the
//! way a GPU does — compute and communication streams per rank and shard,
//! ordered by events — over a [`device::Device`]: the host device, which
//! checks that every read waits for its write, or one GPU (module `cuda`,
//! feature `cuda`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod launch;
pub mod measure;
pub mod model;
pub mod streams;
mod threads;

use std::fmt;
use stp_ir::{Rank, VerifyError};

/// Why a run failed.
#[derive(Debug)]
pub enum ExecError {
    /// The program fails verification; nothing ran.
    Invalid(Vec<VerifyError>),
    /// The ranks stopped making progress: where each unfinished one was.
    Deadlock {
        /// (rank, instruction index, instruction) of every rank still running.
        blocked: Vec<(Rank, usize, String)>,
    },
    /// An instruction could not run.
    Runtime {
        /// The rank.
        rank: Rank,
        /// The instruction index.
        instr: usize,
        /// What went wrong.
        message: String,
    },
    /// A rank gave up because the run is stuck (reported as [`ExecError::Deadlock`]).
    Stuck,
    /// The run cannot be set up (e.g. the model does not fit the program).
    Setup(String),
    /// A rank's thread panicked (a bug in the executor).
    Panicked,
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Invalid(errors) => {
                writeln!(f, "the program is not valid; nothing ran:")?;
                for e in errors.iter().take(20) {
                    writeln!(f, "  {e}")?;
                }
                Ok(())
            }
            ExecError::Deadlock { blocked } => {
                writeln!(f, "deadlock: no rank can proceed")?;
                for (rank, instr, text) in blocked {
                    writeln!(f, "  {rank} is blocked at instruction {instr}: {text}")?;
                }
                Ok(())
            }
            ExecError::Runtime { rank, instr, message } => write!(f, "{rank} instruction {instr}: {message}"),
            ExecError::Stuck => write!(f, "the run is stuck"),
            ExecError::Setup(message) => f.write_str(message),
            ExecError::Panicked => write!(f, "an executor thread panicked"),
        }
    }
}

impl std::error::Error for ExecError {}
