//! Source text -> AST: the lexer, the parser, the tree and its spans.

pub mod ast;
mod delimiters;
mod intern;
pub mod lexer;
pub mod nesting;
mod parser;
pub mod span;

use crate::diag::{Code, Diagnostic};
use chumsky::error::{Rich, RichPattern, RichReason};
use chumsky::prelude::*;
use span::{SourceFile, Span};

/// Parses a whole file. Always returns a tree (with error nodes where the
/// text could not be parsed) and every syntax error found.
pub fn parse(file: &SourceFile) -> (ast::File, Vec<Diagnostic>) {
    let src = file.text.as_str();
    let (tokens, lex_errors) = lexer::lexer().parse(src).into_output_errors();
    let mut diagnostics: Vec<Diagnostic> = lex_errors.iter().map(|e| syntax_diagnostic(e)).collect();
    let tokens = lexer::keep_item_docs(tokens.unwrap_or_default());
    if let Some(too_deep) = nesting::check(&tokens) {
        // Parsing on would only exhaust the stack.
        diagnostics.push(too_deep);
        return (ast::File::default(), diagnostics);
    }
    let unbalanced = delimiters::check(&tokens, file);
    if !unbalanced.is_empty() {
        // The parser would only report the same problem later and worse.
        diagnostics.extend(unbalanced);
        return (ast::File::default(), diagnostics);
    }
    let eoi = SimpleSpan::from(src.len()..src.len());
    let (tree, parse_errors) = parser::file().parse(tokens.as_slice().map(eoi, |(t, s)| (t, s))).into_output_errors();
    diagnostics.extend(parse_errors.iter().map(|e| syntax_diagnostic(e)));
    let mut tree = tree.unwrap_or_default();
    intern::intern(&mut tree);
    (tree, diagnostics)
}

fn syntax_diagnostic<T: std::fmt::Display>(e: &Rich<'_, T, SimpleSpan>) -> Diagnostic {
    let span = Span::from(*e.span());
    let (message, label) = match e.reason() {
        RichReason::ExpectedFound { expected, found } => {
            let found = found.as_ref().map_or("end of input".to_string(), |t| format!("`{}`", &**t));
            let expected = describe_expected(expected);
            (format!("unexpected {found}"), format!("expected {expected}"))
        }
        RichReason::Custom(msg) => (msg.clone(), msg.clone()),
    };
    let mut d = Diagnostic::new(Code::Syntax, message).with_label(span, label);
    for (context, ctx_span) in e.contexts() {
        d = d.with_label(Span::from(*ctx_span), format!("in this {context}"));
    }
    d
}

fn describe_expected<T: std::fmt::Display>(expected: &[RichPattern<'_, T>]) -> String {
    let mut items: Vec<String> = expected
        .iter()
        .map(|p| match p {
            RichPattern::Token(t) => format!("`{}`", &**t),
            RichPattern::Label(l) => l.to_string(),
            RichPattern::EndOfInput => "end of input".to_string(),
            other => other.to_string(),
        })
        .collect();
    items.sort();
    items.dedup();
    match items.len() {
        0 => "something else".to_string(),
        1 => items.remove(0),
        _ => {
            let last = items.pop().unwrap_or_default();
            format!("{} or {last}", items.join(", "))
        }
    }
}
