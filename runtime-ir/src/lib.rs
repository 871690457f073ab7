//! # stp-ir: the runtime IR of stp
//!
//! A [`Program`] is what the `stpc` compiler produces and what executors run:
//! one [`RankProgram`] per pipeline rank, each an ordered list of [`Instr`].
//! Everything a runtime needs to know is here; executors never depend on the
//! compiler.
//!
//! ## Execution model
//!
//! - **Issue order.** One host thread per rank issues its instructions in
//!   order. A [`Instr::Compute`] runs on the rank's *compute stream*;
//!   [`Instr::Comm`] runs on its *communication stream*. Instructions on
//!   one stream execute in issue order.
//! - **Groups.** An [`Instr::Comm`] posts its [`Transfer`]s together, as an
//!   NCCL group (`ncclGroupStart`/`ncclGroupEnd`): none of them waits for
//!   another, and the instruction completes when all have. This is how a
//!   rank sends one tensor while receiving another without deadlocking
//!   (Megatron's `send_forward_recv_backward`).
//! - **Buffers order the streams.** Buffers are named by what they hold
//!   ([`Buffer`]: kind, stage, microbatch). An instruction that reads a buffer
//!   waits until the instruction that made it live has finished, whichever
//!   stream that was on: a compute waits for the receive of its input, and a
//!   send waits for the compute that produced what it sends. Which buffers a
//!   pass reads and writes is fixed by [`Pass::reads`] and [`Pass::writes`].
//! - **Buffer lifetime.** A buffer becomes live when the compute that writes
//!   it or the receive that fills it completes, and stays live until its
//!   [`Instr::Free`], which takes effect once every earlier instruction of
//!   the rank that uses the buffer (including an in-flight send) is done. On
//!   one rank a buffer is made live at most once and freed exactly once.
//! - **Send/receive matching.** A send of buffer `b` from rank `a` to rank
//!   `c` matches the receive of `b` on `c` from `a`. On each directed link
//!   (`a` to `c`) messages match in posting order (within a group, in the
//!   order the group lists them), as NCCL point-to-point operations do: the
//!   k-th send on the link pairs with the k-th receive, and [`verify()`]
//!   requires that they name the same buffer.
//! - **Blocking.** Under *rendezvous* semantics (NCCL's) a send completes
//!   only together with its matching receive, once both are posted; under
//!   *buffered* semantics it completes at once. A correct program is
//!   deadlock-free under both; [`simulate::find_deadlock`] checks either.
//! - **Braided passes.** A compute with two passes (STP's `F & B`) runs both;
//!   a runtime may interleave their units so that one pass's tensor-parallel
//!   collectives overlap the other's compute.
//!
//! ## Formats
//!
//! JSON via serde ([`to_json`], [`load_json`]) and a line-oriented text form
//! ([`print_text`], [`parse_text`]) that round-trips exactly. Both carry
//! [`FORMAT_VERSION`], and both readers refuse any other version.
#![deny(missing_docs)]

mod compact;
mod ids;
mod json;
mod program;
pub mod simulate;
mod slots;
mod text;
pub mod trace;
mod verify;

pub use compact::{to_compact_json, COMPACT_VERSION};
pub use ids::{Buffer, BufferKind, IdParseError, Microbatch, Rank, Stage};
pub use program::{
    units_of, Chain, Collective, Compute, Direction, Instr, Param, Part, Pass, PassKind, Program, RankProgram,
    ScheduleMeta, Transfer, Unit, FORMAT_VERSION,
};
pub use slots::{on_rank_halves, on_rank_halves_mut, BufferSlots, FastMap};
pub use text::{parse_text, print_text, TextError};
pub use verify::{verify, VerifyError};

/// Why a JSON program could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The text is not JSON, or not a program of this format.
    Json(serde_json::Error),
    /// The program declares a format version this crate does not read.
    Version {
        /// The version the file declares (`None` when it declares none).
        found: Option<u64>,
    },
    /// A compact (version 2) program whose codes do not decode: which rank,
    /// which code, and what is wrong.
    Compact(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Json(e) => write!(f, "not a valid stp-ir program: {e}"),
            LoadError::Version { found: Some(v) } => write!(
                f,
                "this is IR format version {v}, but this reader understands only versions {FORMAT_VERSION} and \
                 {COMPACT_VERSION} (compact)"
            ),
            LoadError::Compact(e) => write!(f, "not a valid compact stp-ir program: {e}"),
            LoadError::Version { found: None } => {
                write!(f, "not an stp-ir program: it has no `version` field")
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// Serialize `program` as compact JSON (programs are large; read the text
/// form, or pipe the JSON through a pretty-printer).
pub fn to_json(program: &Program) -> String {
    json::to_json(program)
}

/// Load a JSON program: version 1 ([`FORMAT_VERSION`], [`to_json`]) or
/// the compact version 2 ([`COMPACT_VERSION`], [`to_compact_json`]),
/// refusing any other. Structural invariants are not checked here: call
/// [`verify()`] for that.
pub fn load_json(text: &str) -> Result<Program, LoadError> {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        version: Option<u64>,
    }
    let header: VersionOnly = serde_json::from_str(text).map_err(LoadError::Json)?;
    match header.version {
        Some(v) if v == u64::from(FORMAT_VERSION) => serde_json::from_str(text).map_err(LoadError::Json),
        Some(v) if v == u64::from(COMPACT_VERSION) => {
            let codes = serde_json::from_str(text).map_err(|e| LoadError::Compact(e.to_string()))?;
            compact::decode(codes).map_err(LoadError::Compact)
        }
        found => Err(LoadError::Version { found }),
    }
}
