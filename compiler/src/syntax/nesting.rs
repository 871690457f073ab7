//! Refuses, before parsing, sources whose trees would be deep enough to
//! exhaust the stack of the recursive phases (the parser, name
//! resolution, evaluation): blocks and parentheses nested past
//! [`MAX_NESTING`], or one expression with more than [`MAX_OPERATORS`]
//! operators (a chain of `+` or of unary `-` is a tree as deep as it is
//! long). Real schedules stay far below both.

use super::lexer::{Spanned, Token};
use super::span::Span;
use crate::diag::{Code, Diagnostic};

/// The deepest nesting of `(`, `{` and `[` accepted.
pub const MAX_NESTING: usize = 256;

/// The most operators accepted between two statement boundaries (`;`, `{`, `}`).
pub const MAX_OPERATORS: usize = 2_000;

/// The first place the source goes past either limit, if it does.
pub fn check(tokens: &[Spanned<Token<'_>>]) -> Option<Diagnostic> {
    let (mut depth, mut operators) = (0usize, 0usize);
    let mut statement_start = None;
    for (token, span) in tokens {
        let span = Span::from(*span);
        statement_start.get_or_insert(span);
        match token {
            Token::Ctrl('(' | '{' | '[') => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(too_deep(span));
                }
            }
            Token::Ctrl(')' | '}' | ']') => depth = depth.saturating_sub(1),
            Token::Op(_) => {
                operators += 1;
                if operators > MAX_OPERATORS {
                    return Some(too_long(statement_start.unwrap_or(span), span));
                }
            }
            _ => {}
        }
        if matches!(token, Token::Ctrl(';' | '{' | '}')) {
            operators = 0;
            statement_start = None;
        }
    }
    None
}

fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::new(Code::Limit, format!("blocks and parentheses are nested more than {MAX_NESTING} levels deep"))
        .with_label(span, format!("level {} opens here", MAX_NESTING + 1))
        .with_help("flatten the nesting: a `let`, a function, or `if ... else if ...` chains")
}

fn too_long(start: Span, at: Span) -> Diagnostic {
    Diagnostic::new(Code::Limit, format!("one expression has more than {MAX_OPERATORS} operators"))
        .with_label(Span { start: start.start, end: at.end.max(start.end) }, "this expression")
        .with_help("split it with `let` bindings or a function")
}
