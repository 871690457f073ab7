//! Tokens -> AST (chumsky), recovering at statements, declarations, blocks
//! and items so that one typo does not hide the errors after it.

use super::ast::*;
use super::lexer::{CSpan, Keyword, Token};
use chumsky::{input::ValueInput, prelude::*};

type Err<'t, 's> = extra::Err<Rich<'t, Token<'s>, CSpan>>;

fn sp(span: CSpan) -> super::span::Span {
    super::span::Span::from(span)
}

fn ctrl<'t, 's: 't, I>(c: char) -> impl Parser<'t, I, Token<'s>, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    just(Token::Ctrl(c))
}

fn op<'t, 's: 't, I>(o: &'static str) -> impl Parser<'t, I, Token<'s>, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    just(Token::Op(o))
}

fn kw<'t, 's: 't, I>(k: Keyword) -> impl Parser<'t, I, Token<'s>, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    just(Token::Kw(k))
}

fn ident<'t, 's: 't, I>() -> impl Parser<'t, I, Ident, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    select! { Token::Ident(name) => name }
        .map_with(|name: &str, e| Ident { name: name.to_string(), sym: Symbol::default(), span: sp(e.span()) })
        .labelled("name")
}

/// An optional `;` after a statement or declaration.
fn semi<'t, 's: 't, I>() -> impl Parser<'t, I, (), Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    ctrl(';').or_not().ignored()
}

/// Skips a malformed statement or declaration: tokens up to the next `;`
/// (consumed) or the `}` that closes the enclosing block (not consumed),
/// stepping over whole `{...}` groups.
fn skip_to_terminator<'t, 's: 't, I>() -> impl Parser<'t, I, (), Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    let group = nested_delimiters(Token::Ctrl('{'), Token::Ctrl('}'), [(Token::Ctrl('('), Token::Ctrl(')'))], |_| ());
    choice((group, none_of([Token::Ctrl(';'), Token::Ctrl('}'), Token::Ctrl('{')]).ignored()))
        .repeated()
        .at_least(1)
        .then(ctrl(';').or_not())
        .ignored()
}

/// Expressions, by precedence: `||` < `&&` < comparisons < `+ -` < `* / %` < unary < atoms.
pub fn expr<'t, 's: 't, I>() -> impl Parser<'t, I, Expr, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    recursive(|expr| {
        let literal = select! {
            Token::Int(n) => ExprKind::Int(n),
            // Digits, a point, digits: always a finite number.
            Token::Decimal(text) => ExprKind::Real(text.parse().unwrap_or(f64::MAX)),
            Token::Kw(Keyword::True) => ExprKind::Bool(true),
            Token::Kw(Keyword::False) => ExprKind::Bool(false),
        };
        let call_args = expr
            .clone()
            .separated_by(ctrl(','))
            .allow_trailing()
            .collect::<Vec<_>>()
            .delimited_by(ctrl('('), ctrl(')'));
        let name_or_call = ident().then(call_args.or_not()).map(|(name, args)| match args {
            Some(args) => ExprKind::Call(name, args),
            None => ExprKind::Var(name),
        });
        let braced = expr.clone().delimited_by(ctrl('{'), ctrl('}'));
        // `else if` chains nest: the `else` branch is itself an `if` expression.
        let if_expr = recursive(|if_expr| {
            kw(Keyword::If)
                .ignore_then(expr.clone())
                .then(braced.clone())
                .then_ignore(kw(Keyword::Else))
                .then(braced.clone().or(if_expr.map_with(|kind, e| Expr { kind, span: sp(e.span()) })))
                .map(|((c, a), b)| ExprKind::If(Box::new(c), Box::new(a), Box::new(b)))
        });

        let atom = choice((literal, name_or_call, if_expr))
            .map_with(|kind, e| Expr { kind, span: sp(e.span()) })
            .or(expr.clone().delimited_by(ctrl('('), ctrl(')')))
            .recover_with(via_parser(nested_delimiters(
                Token::Ctrl('('),
                Token::Ctrl(')'),
                [(Token::Ctrl('{'), Token::Ctrl('}'))],
                |span: CSpan| Expr { kind: ExprKind::Error, span: sp(span) },
            )))
            .labelled("expression")
            .boxed();

        let unary_op = choice((op("-").to(UnOp::Neg), op("!").to(UnOp::Not)));
        let unary = unary_op
            .map_with(|o, e| (o, e.span()))
            .repeated()
            .foldr_with(atom, |(o, span): (UnOp, CSpan), rhs: Expr, _| Expr {
                span: super::span::Span::from(span).to(rhs.span),
                kind: ExprKind::Unary(o, Box::new(rhs)),
            })
            .boxed();

        let product = binary_level(unary, [("*", BinOp::Mul), ("/", BinOp::Div), ("%", BinOp::Rem)]);
        let sum = binary_level(product, [("+", BinOp::Add), ("-", BinOp::Sub)]);
        let compare = binary_level(
            sum,
            [
                ("==", BinOp::Eq),
                ("!=", BinOp::Ne),
                ("<=", BinOp::Le),
                (">=", BinOp::Ge),
                ("<", BinOp::Lt),
                (">", BinOp::Gt),
            ],
        );
        let and = binary_level(compare, [("&&", BinOp::And)]);
        binary_level(and, [("||", BinOp::Or)]).labelled("expression").as_context()
    })
}

fn binary_level<'t, 's: 't, I, P, const N: usize>(
    operand: P,
    ops: [(&'static str, BinOp); N],
) -> impl Parser<'t, I, Expr, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
    P: Parser<'t, I, Expr, Err<'t, 's>> + Clone + 't,
{
    let operator = choice(ops.map(|(text, o)| op(text).to(o)));
    operand
        .clone()
        .foldl_with(operator.then(operand).repeated(), |a: Expr, (o, b): (BinOp, Expr), _| Expr {
            span: a.span.to(b.span),
            kind: ExprKind::Binary(o, Box::new(a), Box::new(b)),
        })
        .boxed()
}

fn block<'t, 's: 't, I, S>(stmt: S) -> impl Parser<'t, I, Block, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
    S: Parser<'t, I, Stmt, Err<'t, 's>> + Clone + 't,
{
    stmt.repeated()
        .collect::<Vec<_>>()
        .delimited_by(ctrl('{'), ctrl('}'))
        .recover_with(via_parser(nested_delimiters(
            Token::Ctrl('{'),
            Token::Ctrl('}'),
            [(Token::Ctrl('('), Token::Ctrl(')'))],
            |span: CSpan| vec![Stmt { kind: StmtKind::Error, span: sp(span) }],
        )))
        .labelled("block")
}

/// Statements of a rank body.
pub fn stmt<'t, 's: 't, I>() -> impl Parser<'t, I, Stmt, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    recursive(|stmt| {
        let body = block(stmt.clone());

        let let_stmt = kw(Keyword::Let)
            .ignore_then(ident())
            .then_ignore(op("="))
            .then(expr())
            .map(|(name, value)| StmtKind::Let(name, value));

        let range_op = choice((op("..=").to(true), op("..").to(false)));
        let range = expr().then(range_op).then(expr());
        // `(A..B).rev()`: B-1 down to A. Tried first; `(m - 1)..0` is not
        // one (no range inside the parentheses) and parses as a plain range.
        let reversed = range
            .clone()
            .delimited_by(ctrl('('), ctrl(')'))
            .then_ignore(op("."))
            .then_ignore(ident().filter(|name: &Ident| name.name == "rev").labelled("`rev`"))
            .then_ignore(ctrl('(').then(ctrl(')')))
            .map(|r| (r, true));
        let for_stmt = kw(Keyword::For)
            .ignore_then(ident())
            .then_ignore(kw(Keyword::In))
            .then(choice((reversed, range.map(|r| (r, false)))))
            .then(body.clone())
            .map(|((var, (((start, inclusive), end), reversed)), body)| StmtKind::For {
                var,
                start,
                end,
                inclusive,
                reversed,
                body,
            });

        let if_stmt = recursive(|if_stmt| {
            kw(Keyword::If)
                .ignore_then(expr())
                .then(body.clone())
                .then(
                    kw(Keyword::Else)
                        .ignore_then(
                            body.clone().or(if_stmt.map_with(|kind, e| vec![Stmt { kind, span: sp(e.span()) }])),
                        )
                        .or_not(),
                )
                .map(|((cond, then), otherwise)| StmtKind::If { cond, then, otherwise: otherwise.unwrap_or_default() })
        });

        let arg = ident().then_ignore(op(":")).or_not().then(expr()).map(|(name, value)| Arg { name, value });
        let op_call = ident()
            .then(
                arg.separated_by(ctrl(','))
                    .allow_trailing()
                    .collect::<Vec<_>>()
                    .delimited_by(ctrl('('), ctrl(')'))
                    .or_not(),
            )
            .then(kw(Keyword::Defer).ignore_then(kw(Keyword::Auto).or_not()).or_not())
            .map_with(|((name, args), defer), e| OpCall {
                name,
                args,
                defer: defer.is_some(),
                defer_auto: defer.is_some_and(|a| a.is_some()),
                maybe_braided: false,
                span: sp(e.span()),
            })
            .labelled("op");
        // `&` braids two passes; `&?` lets stpc decide whether braiding pays.
        let joiner = op("&?").to(true).or(op("&").to(false));
        let op_stmt = op_call.clone().then(joiner.then(op_call).repeated().collect::<Vec<_>>()).map(|(first, rest)| {
            let maybe = rest.iter().any(|(maybe, _)| *maybe);
            let calls = std::iter::once(first).chain(rest.into_iter().map(|(_, call)| call));
            StmtKind::Op(calls.map(|call| OpCall { maybe_braided: maybe, ..call }).collect())
        });

        let repeat_stmt = kw(Keyword::Repeat)
            .ignore_then(expr())
            .then(body.clone())
            .map(|(count, body)| StmtKind::Repeat { count, body });

        let reorder_stmt = kw(Keyword::Reorder).ignore_then(body.clone()).map(StmtKind::Reorder);

        choice((let_stmt, for_stmt, repeat_stmt, if_stmt, reorder_stmt, op_stmt))
            .map_with(|kind, e| Stmt { kind, span: sp(e.span()) })
            .then_ignore(semi())
            .labelled("statement")
            .recover_with(via_parser(
                skip_to_terminator().map_with(|_, e| Stmt { kind: StmtKind::Error, span: sp(e.span()) }),
            ))
    })
}

fn decl<'t, 's: 't, I>() -> impl Parser<'t, I, Option<Decl>, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    let stages =
        kw(Keyword::Stages).ignore_then(expr()).map_with(|count, e| Decl::Stages { count, span: sp(e.span()) });
    let place = kw(Keyword::Place)
        .ignore_then(ident())
        .then_ignore(op("->"))
        .then(expr())
        .map_with(|(var, rank), e| Decl::Place { var, rank, span: sp(e.span()) });
    let message = op(":").ignore_then(select! { Token::Str(s) => s.to_string() }.labelled("message string"));
    let require = kw(Keyword::Require)
        .ignore_then(expr())
        .then(message.or_not())
        .map_with(|(cond, message), e| Decl::Require { cond, message, span: sp(e.span()) });
    let rank = kw(Keyword::Rank).ignore_then(ident()).then(block(stmt())).map_with(|(var, body), e| Decl::Rank {
        var,
        body,
        span: sp(e.span()),
    });

    let index = ident().delimited_by(ctrl('('), ctrl(')')).or_not();
    let field = ident()
        .then(index)
        .then_ignore(op("="))
        .then(expr())
        .then_ignore(semi())
        .map(|((name, index), value)| Setting { name, index, value });
    let fields = field.repeated().collect::<Vec<_>>().delimited_by(ctrl('{'), ctrl('}'));
    let memory = kw(Keyword::Memory)
        .ignore_then(fields.clone())
        .map_with(|fields, e| Decl::Memory { fields, span: sp(e.span()) });
    let cost = kw(Keyword::Cost).ignore_then(fields).map_with(|fields, e| Decl::Cost { fields, span: sp(e.span()) });
    let range_op = choice((op("..=").to(true), op("..").to(false)));
    let values = choice((
        expr().then(range_op).then(expr()).map(|((start, inclusive), end)| CheckValues::Range {
            start,
            end,
            inclusive,
        }),
        expr()
            .separated_by(ctrl(','))
            .allow_trailing()
            .at_least(1)
            .collect::<Vec<_>>()
            .delimited_by(ctrl('['), ctrl(']'))
            .map(CheckValues::List),
    ));
    let axis = ident().then_ignore(kw(Keyword::In)).then(values).map(|(name, values)| CheckAxis { name, values });
    let check = kw(Keyword::Check)
        .ignore_then(axis.separated_by(ctrl(',')).at_least(1).collect::<Vec<_>>())
        .map_with(|axes, e| Decl::Check { axes, span: sp(e.span()) });

    let auto = kw(Keyword::Auto).map_with(|_, e| Decl::Auto { span: sp(e.span()) });
    // `recompute` stays an identifier (it names a cost setting too).
    let recompute_auto = ident()
        .filter(|name: &Ident| name.name == "recompute")
        .then(kw(Keyword::Auto))
        .map_with(|_, e| Decl::RecomputeAuto { span: sp(e.span()) });

    // `pipelines` and `route` stay identifiers too: no schedule that names
    // a variable so breaks.
    let pipelines = ident()
        .filter(|name: &Ident| name.name == "pipelines")
        .ignore_then(expr())
        .map_with(|count, e| Decl::Pipelines { count, span: sp(e.span()) });
    let route = ident()
        .filter(|name: &Ident| name.name == "route")
        .ignore_then(ident())
        .then_ignore(op("->"))
        .then(expr())
        .map_with(|(var, pipeline), e| Decl::Route { var, pipeline, span: sp(e.span()) });

    choice((stages, place, require, memory, cost, check, auto, recompute_auto, pipelines, route, rank))
        .then_ignore(semi())
        .map(Some)
        .labelled(
            "declaration (stages, place, pipelines, route, require, memory, cost, check, rank, auto or recompute auto)",
        )
        .recover_with(via_parser(skip_to_terminator().to(None)))
}

fn docs<'t, 's: 't, I>() -> impl Parser<'t, I, Vec<String>, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    select! { Token::Doc(text) => text.strip_prefix(' ').unwrap_or(text).trim_end().to_string() }.repeated().collect()
}

fn type_name<'t, 's: 't, I>() -> impl Parser<'t, I, Type, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    ident().validate(|name, e, emitter| match name.name.as_str() {
        "int" => Type::Int,
        "bool" => Type::Bool,
        other => {
            emitter.emit(Rich::custom(e.span(), format!("unknown type `{other}`; the types are `int` and `bool`")));
            Type::Int
        }
    })
}

fn param_decl<'t, 's: 't, I>() -> impl Parser<'t, I, ParamDecl, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    let kind = ident().validate(|kind, e, emitter| match kind.name.as_str() {
        "ranks" => ParamKind::Ranks,
        "microbatches" => ParamKind::Microbatches,
        "chunks" => ParamKind::Chunks,
        "int" => ParamKind::Int,
        other => {
            emitter.emit(Rich::custom(
                e.span(),
                format!("unknown parameter kind `{other}`; expected ranks, microbatches, chunks or int"),
            ));
            ParamKind::Int
        }
    });
    ident()
        .then_ignore(op(":"))
        .then(kind)
        .map_with(|(name, kind), e| ParamDecl { name, kind, span: sp(e.span()) })
        .labelled("parameter")
}

fn item<'t, 's: 't, I>() -> impl Parser<'t, I, Item, Err<'t, 's>> + Clone
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    let schedule = docs()
        .then_ignore(kw(Keyword::Schedule))
        .then(ident())
        .then(
            param_decl()
                .separated_by(ctrl(','))
                .allow_trailing()
                .collect::<Vec<_>>()
                .delimited_by(ctrl('('), ctrl(')')),
        )
        .then(decl().repeated().collect::<Vec<_>>().delimited_by(ctrl('{'), ctrl('}')).recover_with(via_parser(
            nested_delimiters(Token::Ctrl('{'), Token::Ctrl('}'), [(Token::Ctrl('('), Token::Ctrl(')'))], |_| {
                Vec::new()
            }),
        )))
        .map_with(|(((doc, name), params), decls), e| {
            Item::Schedule(Schedule {
                doc,
                name,
                params,
                decls: decls.into_iter().flatten().collect(),
                span: sp(e.span()),
            })
        })
        .labelled("schedule");

    let fn_param = ident().then_ignore(op(":")).then(type_name());
    let function = docs()
        .then_ignore(kw(Keyword::Fn))
        .then(ident())
        .then(fn_param.separated_by(ctrl(',')).allow_trailing().collect::<Vec<_>>().delimited_by(ctrl('('), ctrl(')')))
        .then_ignore(op("->"))
        .then(type_name())
        .then(expr().delimited_by(ctrl('{'), ctrl('}')).recover_with(via_parser(nested_delimiters(
            Token::Ctrl('{'),
            Token::Ctrl('}'),
            [(Token::Ctrl('('), Token::Ctrl(')'))],
            |span: CSpan| Expr { kind: ExprKind::Error, span: sp(span) },
        ))))
        .map_with(|((((doc, name), params), ret), body), e| {
            Item::Function(Function { doc, name, params, ret, body, span: sp(e.span()) })
        })
        .labelled("function");

    choice((schedule, function))
}

/// The whole file: items until the end, skipping garbage between items.
pub fn file<'t, 's: 't, I>() -> impl Parser<'t, I, File, Err<'t, 's>>
where
    I: ValueInput<'t, Token = Token<'s>, Span = CSpan>,
{
    let item_start = choice((kw(Keyword::Schedule), kw(Keyword::Fn), select! { Token::Doc(d) => Token::Doc(d) }));
    let garbage = any().and_is(item_start.not()).repeated().at_least(1).to(None);
    item()
        .map(Some)
        .recover_with(via_parser(garbage))
        .repeated()
        .collect::<Vec<_>>()
        .then_ignore(end())
        .map(|items| File { items: items.into_iter().flatten().collect() })
}
