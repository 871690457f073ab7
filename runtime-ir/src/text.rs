//! The IR text form: [`print_text`] writes it and [`parse_text`] reads it
//! back into the identical [`Program`].
//!
//! ```text
//! stp-ir 1
//! schedule "1f1b"
//! param p 2
//! param m 2
//! ranks 2
//! stages 2
//! microbatches 2
//! place r0 r1
//!
//! # with several pipelines, after `tp`:
//! # pipelines 2
//! # routes 0 1 0 1
//!
//! rank r0 {
//!   F s0 mb0
//!   send act.s0.mb0 -> r1
//!   group {
//!     send act.s0.mb1 -> r1
//!     recv grad.s1.mb0 <- r1
//!   }
//!   ...
//! }
//! ```
//!
//! Blank lines and lines starting with `#` are ignored by the reader.

use crate::ids::Rank;
use crate::program::{
    Collective, Compute, Instr, Param, Part, Pass, PassKind, Program, RankProgram, ScheduleMeta, Transfer, Unit,
    FORMAT_VERSION,
};
use std::fmt::{self, Write as _};

/// Why a text program could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong with it.
    pub message: String,
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TextError {}

/// Print `program` in the text form.
pub fn print_text(program: &Program) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_text(program, &mut out);
    out
}

fn write_text(program: &Program, out: &mut String) -> fmt::Result {
    let meta = &program.schedule;
    writeln!(out, "stp-ir {}", program.version)?;
    writeln!(out, "schedule {}", quote(&meta.name))?;
    for param in &meta.params {
        writeln!(out, "param {} {}", param.name, param.value)?;
    }
    writeln!(out, "ranks {}", meta.num_ranks)?;
    writeln!(out, "stages {}", meta.num_stages)?;
    writeln!(out, "microbatches {}", meta.num_microbatches)?;
    if meta.tp != 1 {
        writeln!(out, "tp {}", meta.tp)?;
    }
    if meta.pipelines != 1 {
        writeln!(out, "pipelines {}", meta.pipelines)?;
    }
    if !meta.routes.is_empty() {
        write!(out, "routes")?;
        for r in &meta.routes {
            write!(out, " {r}")?;
        }
        writeln!(out)?;
    }
    write!(out, "place")?;
    for rank in &meta.placement {
        write!(out, " {rank}")?;
    }
    writeln!(out)?;
    for rank in &program.ranks {
        writeln!(out, "\nrank {} {{", rank.rank)?;
        for instr in &rank.instrs {
            writeln!(out, "  {instr}")?;
        }
        writeln!(out, "}}")?;
    }
    Ok(())
}

fn quote(name: &str) -> String {
    serde_json::to_string(name).unwrap_or_else(|_| format!("{name:?}"))
}

/// Read a program in the text form. The version line must name
/// [`FORMAT_VERSION`]. Structural invariants are not checked here: call
/// [`crate::verify`] for that.
pub fn parse_text(text: &str) -> Result<Program, TextError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .peekable();
    let mut reader = Reader { last_line: 0 };

    let version = reader.header(lines.next(), "stp-ir")?;
    let version: u32 = parse_number(version.1, version.0)?;
    if version != FORMAT_VERSION {
        return Err(TextError {
            line: version_line(text),
            message: format!(
                "this is IR format version {version}, but this reader understands only version {FORMAT_VERSION}"
            ),
        });
    }
    let (line, name) = reader.header(lines.next(), "schedule")?;
    let name: String = serde_json::from_str(name)
        .map_err(|_| err(line, format!("expected a quoted schedule name, found `{name}`")))?;

    let mut params = Vec::new();
    while let Some(&(line, l)) = lines.peek() {
        let Some(rest) = l.strip_prefix("param ") else { break };
        lines.next();
        let mut words = rest.split_whitespace();
        let (Some(pname), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(err(line, "expected `param NAME VALUE`"));
        };
        params.push(Param { name: pname.to_string(), value: parse_number(value, line)? });
    }
    let (line, v) = reader.header(lines.next(), "ranks")?;
    let num_ranks = parse_number(v, line)?;
    let (line, v) = reader.header(lines.next(), "stages")?;
    let num_stages = parse_number(v, line)?;
    let (line, v) = reader.header(lines.next(), "microbatches")?;
    let num_microbatches = parse_number(v, line)?;
    let mut tp = 1;
    if let Some(&(line, l)) = lines.peek() {
        if let Some(v) = l.strip_prefix("tp ") {
            lines.next();
            tp = parse_number(v.trim(), line)?;
        }
    }
    let mut pipelines = 1;
    if let Some(&(line, l)) = lines.peek() {
        if let Some(v) = l.strip_prefix("pipelines ") {
            lines.next();
            pipelines = parse_number(v.trim(), line)?;
        }
    }
    let mut routes = Vec::new();
    if let Some(&(line, l)) = lines.peek() {
        if let Some(v) = l.strip_prefix("routes ") {
            lines.next();
            routes = v.split_whitespace().map(|w| parse_number(w, line)).collect::<Result<_, _>>()?;
        }
    }
    let (line, v) = reader.header(lines.next(), "place")?;
    let placement = v.split_whitespace().map(|w| parse_id(w, line)).collect::<Result<_, _>>()?;

    let mut ranks = Vec::new();
    while let Some((line, l)) = lines.next() {
        reader.last_line = line;
        let rank_text = l
            .strip_prefix("rank ")
            .and_then(|r| r.strip_suffix('{'))
            .ok_or_else(|| err(line, format!("expected `rank rN {{`, found `{l}`")))?;
        let rank: Rank = parse_id(rank_text.trim(), line)?;
        let mut instrs = Vec::new();
        loop {
            let Some((line, l)) = lines.next() else {
                return Err(err(reader.last_line, format!("rank {rank} is not closed with `}}`")));
            };
            reader.last_line = line;
            if l == "}" {
                break;
            }
            if l == "group {" {
                instrs.push(parse_group(&mut lines, line, rank)?);
                continue;
            }
            instrs.push(parse_instr(l, line)?);
        }
        ranks.push(RankProgram { rank, instrs });
    }

    Ok(Program {
        version,
        schedule: ScheduleMeta {
            name,
            params,
            num_ranks,
            num_stages,
            num_microbatches,
            placement,
            tp,
            pipelines,
            routes,
        },
        ranks,
    })
}

fn version_line(text: &str) -> usize {
    text.lines().position(|l| l.trim().starts_with("stp-ir")).map_or(1, |i| i + 1)
}

struct Reader {
    last_line: usize,
}

impl Reader {
    /// Reads a `KEYWORD rest` line and returns `(line, rest)`.
    fn header<'a>(&mut self, next: Option<(usize, &'a str)>, keyword: &str) -> Result<(usize, &'a str), TextError> {
        let Some((line, l)) = next else {
            return Err(err(self.last_line.max(1), format!("unexpected end of input: expected `{keyword}`")));
        };
        self.last_line = line;
        match l.split_once(char::is_whitespace) {
            Some((word, rest)) if word == keyword => Ok((line, rest.trim())),
            _ if l == keyword => Ok((line, "")),
            _ => Err(err(line, format!("expected `{keyword} ...`, found `{l}`"))),
        }
    }
}

fn err(line: usize, message: impl Into<String>) -> TextError {
    TextError { line, message: message.into() }
}

fn parse_number<T: std::str::FromStr>(word: &str, line: usize) -> Result<T, TextError> {
    word.parse().map_err(|_| err(line, format!("expected a number, found `{word}`")))
}

fn parse_id<T>(word: &str, line: usize) -> Result<T, TextError>
where
    T: std::str::FromStr<Err = crate::ids::IdParseError>,
{
    word.parse().map_err(|e: crate::ids::IdParseError| err(line, e.to_string()))
}

/// Reads the transfers of a `group {` block up to its closing `}`.
fn parse_group<'a>(
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
    open_line: usize,
    rank: Rank,
) -> Result<Instr, TextError> {
    let mut ops = Vec::new();
    for (line, l) in lines {
        if l == "}" {
            if ops.is_empty() {
                return Err(err(open_line, "a group holds at least one transfer"));
            }
            return Ok(Instr::Comm(ops));
        }
        ops.push(
            parse_transfer(l, line)?
                .ok_or_else(|| err(line, format!("expected a send or recv in a group, found `{l}`")))?,
        );
    }
    Err(err(open_line, format!("the group in rank {rank} is not closed with `}}`")))
}

/// A `send BUF -> rN` or `recv BUF <- rN` line; `None` for anything else.
fn parse_transfer(l: &str, line: usize) -> Result<Option<Transfer>, TextError> {
    let words: Vec<&str> = l.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["send", buffer, "->", to] => Some(Transfer::send(parse_id(buffer, line)?, parse_id(to, line)?)),
        ["recv", buffer, "<-", from] => Some(Transfer::recv(parse_id(buffer, line)?, parse_id(from, line)?)),
        _ => None,
    })
}

fn parse_instr(l: &str, line: usize) -> Result<Instr, TextError> {
    if let Some(transfer) = parse_transfer(l, line)? {
        return Ok(Instr::Comm(vec![transfer]));
    }
    let words: Vec<&str> = l.split_whitespace().collect();
    match words.as_slice() {
        ["free", buffer] => Ok(Instr::Free { buffer: parse_id(buffer, line)? }),
        ["reduce", stages @ ..] if !stages.is_empty() => {
            Ok(Instr::Reduce { stages: stages.iter().map(|s| parse_id(s, line)).collect::<Result<_, _>>()? })
        }
        _ => {
            let (passes_text, units) = match l.split_once('[') {
                Some((passes, units)) => (passes, parse_units(units, line)?),
                None => (l, Vec::new()),
            };
            let passes = passes_text.split('&').map(|p| parse_pass(p.trim(), line)).collect::<Result<_, _>>()?;
            Ok(Instr::Compute(Compute { passes, units }))
        }
    }
}

/// `0.attn ar, 1.mlp-dgrad ar, 0.mlp]`: the units after a compute's `[`.
fn parse_units(text: &str, line: usize) -> Result<Vec<Unit>, TextError> {
    let inner =
        text.trim().strip_suffix(']').ok_or_else(|| err(line, "the unit list of a compute must end with `]`"))?;
    inner
        .split(',')
        .map(|u| {
            let words: Vec<&str> = u.split_whitespace().collect();
            let (unit, collective) = match words.as_slice() {
                [unit] => (*unit, None),
                [unit, collective] => match Collective::from_name(collective) {
                    Some(c) => (*unit, Some(c)),
                    None => return Err(err(line, format!("unknown collective `{collective}`; expected ar or rs-ag"))),
                },
                _ => return Err(err(line, format!("expected a unit like `0.attn ar`, found `{}`", u.trim()))),
            };
            let bad = || err(line, format!("expected a unit like `0.attn`, found `{unit}`"));
            let (pass, part) = unit.split_once('.').ok_or_else(bad)?;
            Ok(Unit {
                pass: pass.parse().map_err(|_| bad())?,
                part: Part::from_name(part).ok_or_else(bad)?,
                collective,
            })
        })
        .collect()
}

fn parse_pass(text: &str, line: usize) -> Result<Pass, TextError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [kind, stage, mb] = words.as_slice() else {
        return Err(err(
            line,
            format!("expected an instruction (`F s0 mb0`, `send ...`, `recv ...`, `free ...`), found `{text}`"),
        ));
    };
    let kind = PassKind::from_name(kind)
        .ok_or_else(|| err(line, format!("unknown pass kind `{kind}`; expected F, B, W or BW")))?;
    Ok(Pass { kind, stage: parse_id(stage, line)?, mb: parse_id(mb, line)? })
}
