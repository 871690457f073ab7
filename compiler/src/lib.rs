//! stpc: the stp schedule compiler, as a library.
//!
//! The phases, each in its own module, each taking the previous one's
//! product: [`syntax`] (text -> AST), [`sema`] (names and types -> a
//! [`sema::Module`]), [`elab`] (a module at concrete parameters -> a
//! [`elab::ComputeSchedule`]), [`check`] (safety proofs -> a
//! [`check::CheckedSchedule`]), [`lower`] (checked schedule -> a verified
//! [`stp_ir::Program`]), [`emit`] (program -> files). [`diag`] holds the
//! diagnostics every phase returns and their one renderer; [`pipeline`]
//! chains the phases. Library code never prints.

pub mod check;
pub mod cost;
pub mod diag;
pub mod elab;
pub mod emit;
pub mod lower;
pub mod opt;
pub mod pipeline;
pub mod sema;
pub mod syntax;
