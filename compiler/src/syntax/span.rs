//! Byte-offset spans into a source file.

use std::ops::Range;

/// A half-open byte range `start..end` into one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// The span `start..end`.
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }

    /// As a `Range`, for renderers.
    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

impl From<chumsky::span::SimpleSpan> for Span {
    fn from(s: chumsky::span::SimpleSpan) -> Span {
        Span::new(s.start, s.end)
    }
}

/// A source file: its name as the user gave it, and its text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path or stdlib name shown in diagnostics.
    pub name: String,
    /// The whole text.
    pub text: String,
}

impl SourceFile {
    /// A source file named `name`.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> SourceFile {
        SourceFile { name: name.into(), text: text.into() }
    }

    /// The 1-based line number that contains byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
    }
}
