//! Source text -> tokens (chumsky over `&str`).

use chumsky::prelude::*;
use std::fmt;

/// A span as chumsky produces it (byte offsets).
pub type CSpan = SimpleSpan;

/// A token and where it is.
pub type Spanned<T> = (T, CSpan);

/// The keywords of the language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyword {
    /// `schedule`
    Schedule,
    /// `fn`
    Fn,
    /// `stages`
    Stages,
    /// `place`
    Place,
    /// `require`
    Require,
    /// `rank`
    Rank,
    /// `let`
    Let,
    /// `for`
    For,
    /// `in`
    In,
    /// `if`
    If,
    /// `else`
    Else,
    /// `true`
    True,
    /// `false`
    False,
    /// `repeat`
    Repeat,
    /// `defer`
    Defer,
    /// `memory`
    Memory,
    /// `check`
    Check,
    /// `cost`
    Cost,
    /// `auto`
    Auto,
    Reorder,
}

impl Keyword {
    fn from_word(word: &str) -> Option<Keyword> {
        Some(match word {
            "schedule" => Keyword::Schedule,
            "fn" => Keyword::Fn,
            "stages" => Keyword::Stages,
            "place" => Keyword::Place,
            "require" => Keyword::Require,
            "rank" => Keyword::Rank,
            "let" => Keyword::Let,
            "for" => Keyword::For,
            "in" => Keyword::In,
            "if" => Keyword::If,
            "else" => Keyword::Else,
            "true" => Keyword::True,
            "false" => Keyword::False,
            "repeat" => Keyword::Repeat,
            "defer" => Keyword::Defer,
            "memory" => Keyword::Memory,
            "check" => Keyword::Check,
            "cost" => Keyword::Cost,
            "auto" => Keyword::Auto,
            "reorder" => Keyword::Reorder,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Keyword::Schedule => "schedule",
            Keyword::Fn => "fn",
            Keyword::Stages => "stages",
            Keyword::Place => "place",
            Keyword::Require => "require",
            Keyword::Rank => "rank",
            Keyword::Let => "let",
            Keyword::For => "for",
            Keyword::In => "in",
            Keyword::If => "if",
            Keyword::Else => "else",
            Keyword::True => "true",
            Keyword::False => "false",
            Keyword::Repeat => "repeat",
            Keyword::Defer => "defer",
            Keyword::Memory => "memory",
            Keyword::Check => "check",
            Keyword::Cost => "cost",
            Keyword::Auto => "auto",
            Keyword::Reorder => "reorder",
        }
    }
}

/// A token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Token<'src> {
    /// An integer literal (already range-checked).
    Int(i64),
    /// A decimal literal (`2.5`: digits, a point, digits), as written.
    Decimal(&'src str),
    /// A name.
    Ident(&'src str),
    /// A string literal, without its quotes.
    Str(&'src str),
    /// One `///` doc comment line, without the slashes.
    Doc(&'src str),
    /// A keyword.
    Kw(Keyword),
    /// An operator: `+ - * / % == != < <= > >= && || ! = -> .. ..= & :`.
    Op(&'static str),
    /// A delimiter: `( ) { } [ ] , ;`.
    Ctrl(char),
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Int(n) => write!(f, "{n}"),
            Token::Decimal(s) => write!(f, "{s}"),
            Token::Ident(s) => write!(f, "{s}"),
            Token::Str(s) => write!(f, "\"{s}\""),
            Token::Doc(_) => write!(f, "doc comment"),
            Token::Kw(k) => write!(f, "{}", k.as_str()),
            Token::Op(s) => write!(f, "{s}"),
            Token::Ctrl(c) => write!(f, "{c}"),
        }
    }
}

// Longest first: `..=` before `..` before `.` (a reversed range's `.rev()`).
const OPERATORS: [&str; 22] = [
    "..=", "==", "!=", "<=", ">=", "&&", "&?", "||", "->", "..", "+", "-", "*", "/", "%", "<", ">", "!", "=", "&", ":",
    ".",
];

/// The lexer: the whole source to a token list, recovering from bad
/// characters by skipping them.
pub fn lexer<'src>() -> impl Parser<'src, &'src str, Vec<Spanned<Token<'src>>>, extra::Err<Rich<'src, char, CSpan>>> {
    let int = text::int(10).to_slice().validate(|digits: &str, e, emitter| {
        digits.parse::<i64>().unwrap_or_else(|_| {
            emitter.emit(Rich::custom(e.span(), format!("integer literal `{digits}` does not fit in 64 bits")));
            0
        })
    });
    let int = int.map(Token::Int);
    // `1.5`, never `0..m`: a digit must follow the point.
    let decimal = text::digits(10)
        .then(just('.'))
        .then(text::digits(10))
        .to_slice()
        .map(Token::Decimal)
        .labelled("decimal number");

    let string = just('"')
        .ignore_then(none_of("\"\n").repeated().to_slice())
        .then_ignore(just('"'))
        .map(Token::Str)
        .labelled("string");

    let op = choice(OPERATORS.map(|o| just(o).to(Token::Op(o))));

    let ctrl = one_of("(){}[],;").map(Token::Ctrl);

    let word = text::ascii::ident().map(|w: &str| Keyword::from_word(w).map_or(Token::Ident(w), Token::Kw));

    let doc = just("///").ignore_then(any().and_is(just('\n').not()).repeated().to_slice()).map(Token::Doc);

    let token = choice((doc, decimal, int, string, op, ctrl, word));

    let comment = just("//").and_is(just("///").not()).then(any().and_is(just('\n').not()).repeated()).ignored();
    let trivia = choice((comment, text::whitespace().at_least(1))).repeated();

    trivia.ignore_then(
        token
            .map_with(|tok, e| (tok, e.span()))
            .then_ignore(trivia)
            .recover_with(skip_then_retry_until(any().ignored(), end()))
            .repeated()
            .collect(),
    )
}

/// Drops doc comments that do not introduce a schedule or function, so a
/// `///` inside a body reads as an ordinary comment.
pub fn keep_item_docs(tokens: Vec<Spanned<Token<'_>>>) -> Vec<Spanned<Token<'_>>> {
    let mut keep = vec![true; tokens.len()];
    let mut i = 0;
    while i < tokens.len() {
        if matches!(tokens[i].0, Token::Doc(_)) {
            let start = i;
            while i < tokens.len() && matches!(tokens[i].0, Token::Doc(_)) {
                i += 1;
            }
            let introduces_item =
                matches!(tokens.get(i).map(|t| &t.0), Some(Token::Kw(Keyword::Schedule | Keyword::Fn)));
            if !introduces_item {
                keep[start..i].iter_mut().for_each(|k| *k = false);
            }
        } else {
            i += 1;
        }
    }
    tokens.into_iter().zip(keep).filter(|(_, k)| *k).map(|(t, _)| t).collect()
}
