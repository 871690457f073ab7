//! Lowering: a [`CheckedSchedule`] -> a verified [`Program`], one pass per file:
//!
//! 1. `insert_transfers`: compute ops become instructions, with a send after
//!    each op whose output another rank consumes and receives before each op
//!    that consumes another rank's output, posted in each link's send order.
//! 2. `insert_frees`: a free after each buffer's last use on its rank.
//!
//! The result is verified with [`stp_ir::verify`] after the last pass, or
//! after every pass with [`LowerOptions::verify_each`]. A verification
//! failure here is a compiler bug, reported as such.

mod insert_frees;
mod insert_transfers;

use crate::check::CheckedSchedule;
use stp_ir::{verify, Program, VerifyError};

/// Knobs for lowering.
#[derive(Debug, Clone, Copy, Default)]
pub struct LowerOptions {
    /// Verify the IR after every pass, not only after the last.
    pub verify_each: bool,
}

/// A lowering pass produced IR that fails verification: a compiler bug.
#[derive(Debug, Clone)]
pub struct LowerError {
    /// The pass after which verification failed.
    pub pass: &'static str,
    /// What failed.
    pub errors: Vec<VerifyError>,
}

impl std::fmt::Display for LowerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "internal compiler error: the IR after pass `{}` fails verification:", self.pass)?;
        for e in self.errors.iter().take(10) {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LowerError {}

/// Lowers a checked schedule to rank programs.
pub fn lower(checked: &CheckedSchedule, options: LowerOptions) -> Result<Program, LowerError> {
    let schedule = checked.schedule();
    let mut program = insert_transfers::run(schedule);
    if options.verify_each {
        // Buffers are not freed yet, so only leaks may be reported here.
        verify_ignoring_leaks(&program, "insert_transfers")?;
    }
    insert_frees::run(&mut program);
    verify(&program).map_err(|errors| LowerError { pass: "insert_frees", errors })?;
    Ok(program)
}

fn verify_ignoring_leaks(program: &Program, pass: &'static str) -> Result<(), LowerError> {
    match verify(program) {
        Ok(()) => Ok(()),
        Err(errors) => {
            let real: Vec<VerifyError> =
                errors.into_iter().filter(|e| !e.message.ends_with("is never freed")).collect();
            if real.is_empty() {
                Ok(())
            } else {
                Err(LowerError { pass, errors: real })
            }
        }
    }
}
