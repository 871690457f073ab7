//! Finds unbalanced `(`/`)` and `{`/`}` before parsing, so a missing brace
//! is reported at the brace the user forgot to close, not at the end of the
//! file where the parser notices.

use super::lexer::{Spanned, Token};
use super::span::{SourceFile, Span};
use crate::diag::{Code, Diagnostic};

struct Open {
    delimiter: char,
    span: Span,
    indent: usize,
}

/// Every unbalanced delimiter. A closing brace indented less than the line
/// of the innermost open brace means that brace was left open (the usual
/// way a brace goes missing), so that brace is blamed.
pub fn check(tokens: &[Spanned<Token<'_>>], file: &SourceFile) -> Vec<Diagnostic> {
    let mut stack: Vec<Open> = Vec::new();
    let mut errors = Vec::new();
    for (token, span) in tokens {
        let Token::Ctrl(c) = token else { continue };
        let span = Span::from(*span);
        match c {
            '(' | '{' => stack.push(Open { delimiter: *c, span, indent: indent_of(file, span.start) }),
            ')' | '}' => {
                let opener = if *c == ')' { '(' } else { '{' };
                if *c == '}' {
                    let indent = indent_of(file, span.start);
                    while stack
                        .last()
                        .is_some_and(|o| o.delimiter == '{' && o.indent > indent && first_on_line(file, span.start))
                    {
                        if let Some(open) = stack.pop() {
                            errors.push(unclosed(&open));
                        }
                    }
                }
                match stack.last() {
                    Some(open) if open.delimiter == opener => {
                        stack.pop();
                    }
                    Some(open) => {
                        errors.push(
                            Diagnostic::new(Code::Syntax, format!("mismatched `{c}`"))
                                .with_label(span, format!("this `{c}` does not close the `{}`", open.delimiter))
                                .with_label(open.span, "opened here"),
                        );
                        return errors;
                    }
                    None => {
                        errors.push(
                            Diagnostic::new(Code::Syntax, format!("unexpected `{c}`"))
                                .with_label(span, "nothing is open here to close"),
                        );
                        return errors;
                    }
                }
            }
            _ => {}
        }
    }
    errors.extend(stack.iter().rev().map(unclosed));
    errors
}

fn unclosed(open: &Open) -> Diagnostic {
    let close = if open.delimiter == '(' { ')' } else { '}' };
    Diagnostic::new(Code::Syntax, format!("unclosed `{}`", open.delimiter))
        .with_label(open.span, format!("this `{}` is never closed", open.delimiter))
        .with_help(format!("add the matching `{close}`"))
}

fn line_start(file: &SourceFile, offset: usize) -> usize {
    file.text[..offset.min(file.text.len())].rfind('\n').map_or(0, |i| i + 1)
}

fn indent_of(file: &SourceFile, offset: usize) -> usize {
    let start = line_start(file, offset);
    file.text[start..].bytes().take_while(|b| *b == b' ' || *b == b'\t').count()
}

fn first_on_line(file: &SourceFile, offset: usize) -> bool {
    file.text[line_start(file, offset)..offset].trim().is_empty()
}
