//! Diagnostics are data: every phase returns [`Diagnostic`] values with
//! spans and notes, and [`render`] alone turns them into text.

mod codes;
pub mod render;

pub use codes::{Code, CodeInfo};

use crate::syntax::span::Span;

/// One error, pointing into the source file being compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The stable error code (`E0001`, ...); `stpc explain CODE` describes it.
    pub code: Code,
    /// One sentence saying what is wrong.
    pub message: String,
    /// Places in the source; the first is the primary one.
    pub labels: Vec<Label>,
    /// Context: parameter values, loop iterations, what was found.
    pub notes: Vec<String>,
    /// How to fix it, when there is an obvious way.
    pub help: Option<String>,
}

/// A message attached to a span of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Where.
    pub span: Span,
    /// What to say there.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic with a code and a message, and no location yet.
    pub fn new(code: Code, message: impl Into<String>) -> Diagnostic {
        Diagnostic { code, message: message.into(), labels: Vec::new(), notes: Vec::new(), help: None }
    }

    /// Adds a label; the first label added is the primary location.
    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label { span, message: message.into() });
        self
    }

    /// Adds a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// Sets the help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// The primary span, if the diagnostic has a location.
    pub fn primary_span(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }
}

/// How many diagnostics one run reports before summarising the rest.
pub const MAX_REPORTED: usize = 20;

/// Merges diagnostics that differ only in their message (same code, same
/// labelled spans) into the first, noting the others: the same faulty line
/// evaluated for many ranks or microbatches is one problem.
pub fn collapse_repeats(diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    const SHOWN: usize = 3;
    let mut out: Vec<Diagnostic> = Vec::new();
    let mut repeats: Vec<Vec<String>> = Vec::new();
    for d in diagnostics {
        let same =
            |o: &Diagnostic| o.code == d.code && o.labels.iter().map(|l| l.span).eq(d.labels.iter().map(|l| l.span));
        match out.iter().position(same) {
            Some(i) => repeats[i].push(d.message),
            None => {
                out.push(d);
                repeats.push(Vec::new());
            }
        }
    }
    for (d, more) in out.iter_mut().zip(repeats) {
        for m in more.iter().take(SHOWN) {
            d.notes.push(format!("the same line also gives: {m}"));
        }
        if more.len() > SHOWN {
            d.notes.push(format!("and {} more like it", more.len() - SHOWN));
        }
    }
    out
}
