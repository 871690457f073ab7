//! Mutants of what users hand to stp: `.sched` sources (token edits of the
//! standard schedules and the examples), compiled programs (structural
//! edits of the IR, and byte-level edits of its JSON and text forms) and
//! PyTorch schedule CSVs (cell edits). Each mutant is a pure function of
//! its random generator, so a case number reproduces it.

use crate::rng::Rng;
use stp_ir::{Instr, Program};

/// The sources mutated: every standard schedule and every example.
pub fn sources() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = stp_stdlib::ALL.iter().map(|s| s.source).collect();
    all.extend([
        include_str!("../../examples/auto_looped.sched"),
        include_str!("../../examples/first_schedule.sched"),
        include_str!("../../examples/floating_w.sched"),
        include_str!("../../examples/reorder_region.sched"),
        include_str!("../../examples/split_backward.sched"),
        include_str!("../../examples/v_shape.sched"),
        include_str!("../../tests/sched/ok/uneven_stage_costs.sched"),
        include_str!("../../tests/sched/ok/reversed_range.sched"),
        include_str!("../../tests/sched/err/per_rank_budget_exceeded.sched"),
    ]);
    all
}

/// Numbers that find off-by-one and overflow bugs.
const INTERESTING: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "-1",
    "255",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "4611686018427387904",
    "9223372036854775807",
    "1.5",
    "0.0",
    "1e9",
    "999999999999.5",
];

/// Inserted tokens: every operator and delimiter, and the keywords.
const PIECES: &[&str] = &[
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    ",",
    ";",
    "+",
    "-",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    "!",
    "=",
    "->",
    "..",
    "..=",
    "&",
    "&?",
    ":",
    "if",
    "else",
    "for",
    "in",
    "let",
    "rank",
    "stages",
    "place",
    "memory",
    "cost",
    "require",
    "check",
    "auto",
    "defer",
    "repeat",
    "reorder",
    "F",
    "B",
    "W",
    "BW",
    "fn",
    "\"",
    "///",
    "//",
    "stage:",
    "mb:",
    "p",
    "m",
    "v",
    "r",
    "s",
    "i",
    ".",
    "rev",
    ".rev()",
    "(0..m).rev()",
    "budget(r)",
    "activation(s)",
    "forward(s)",
    "2.5",
    "R",
    "R(i)",
    "recompute auto;",
    "recomputed",
    "recompute",
];

/// Splits source text into words, numbers, and single punctuation
/// characters, keeping the whitespace between them attached.
fn tokens(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let mut token = c.to_string();
        if c.is_alphanumeric() || c == '_' {
            while let Some(&n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                token.push(n);
                chars.next();
            }
        }
        out.push(token);
    }
    out
}

/// One to three token edits of a random source.
pub fn mutate_source(rng: &mut Rng) -> String {
    let all = sources();
    let source: &str = all[rng.range(0, all.len() - 1)];
    let mut toks = tokens(source);
    let words: Vec<String> =
        toks.iter().filter(|t| t.chars().all(|c| c.is_alphanumeric() || c == '_')).cloned().collect();
    for _ in 0..rng.range(1, 3) {
        if toks.is_empty() {
            break;
        }
        let at = rng.range(0, toks.len() - 1);
        match rng.range(0, 6) {
            0 => {
                toks.remove(at);
            }
            1 => {
                let t = toks[at].clone();
                toks.insert(at, t);
            }
            2 if at + 1 < toks.len() => toks.swap(at, at + 1),
            3 => toks[at] = rng.pick(INTERESTING).to_string(),
            4 if !words.is_empty() => toks[at] = rng.pick(&words).clone(),
            5 => toks.insert(at, format!(" {} ", rng.pick(PIECES))),
            _ => {
                // A run of tokens repeated: loops and blocks duplicated.
                let end = (at + rng.range(1, 40)).min(toks.len());
                let run: Vec<String> = toks[at..end].to_vec();
                toks.splice(at..at, run);
            }
        }
    }
    toks.concat()
}

/// Parameters to compile a mutant with: small, and sometimes zero.
pub fn params(rng: &mut Rng) -> (i64, i64, i64) {
    (rng.range(0, 6) as i64, rng.range(0, 9) as i64, rng.range(0, 3) as i64)
}

/// Structural edits of a valid program: an instruction removed,
/// duplicated or moved; a transfer's peer, buffer or direction changed; a
/// header field changed.
pub fn mutate_program(program: &mut Program, rng: &mut Rng) {
    for _ in 0..rng.range(1, 2) {
        let r = rng.range(0, program.ranks.len() - 1);
        let instrs = &mut program.ranks[r].instrs;
        if instrs.is_empty() {
            continue;
        }
        let at = rng.range(0, instrs.len() - 1);
        match rng.range(0, 7) {
            0 => {
                instrs.remove(at);
            }
            1 => {
                let i = instrs[at].clone();
                instrs.insert(at, i);
            }
            2 => {
                let to = rng.range(0, instrs.len() - 1);
                let i = instrs.remove(at);
                instrs.insert(to, i);
            }
            3 => {
                if let Instr::Comm(ops) = &mut instrs[at] {
                    let k = rng.range(0, ops.len() - 1);
                    ops[k].peer.0 = rng.range(0, program.schedule.num_ranks as usize) as u32;
                }
            }
            4 => {
                if let Instr::Comm(ops) = &mut instrs[at] {
                    let k = rng.range(0, ops.len() - 1);
                    ops[k].buffer.mb.0 ^= 1;
                }
            }
            5 => {
                // Merge a group with the next instruction's, or split one.
                let (here, next) = (instrs[at].clone(), instrs.get(at + 1).cloned());
                match (here, next) {
                    (Instr::Comm(mut ops), Some(Instr::Comm(more))) => {
                        ops.extend(more);
                        instrs[at] = Instr::Comm(ops);
                        instrs.remove(at + 1);
                    }
                    (Instr::Comm(mut ops), _) if ops.len() > 1 => {
                        if let Some(last) = ops.pop() {
                            instrs[at] = Instr::Comm(ops);
                            instrs.insert(at + 1, Instr::Comm(vec![last]));
                        }
                    }
                    _ => {}
                }
            }
            6 => program.schedule.num_microbatches = rng.range(0, 9) as u32,
            _ => program.schedule.tp = rng.range(0, 3) as u32,
        }
    }
}

/// Byte-level edits of a serialized form: digits changed, a slice deleted
/// or repeated.
pub fn mutate_text(text: &str, rng: &mut Rng) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..rng.range(1, 3) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.range(0, bytes.len() - 1);
        match rng.range(0, 3) {
            0 => {
                let digits: Vec<usize> = (0..bytes.len()).filter(|i| bytes[*i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = *rng.pick(&digits);
                    bytes[i] = b'0' + rng.range(0, 9) as u8;
                }
            }
            1 => {
                let end = (at + rng.range(1, 20)).min(bytes.len());
                bytes.drain(at..end);
            }
            2 => {
                let end = (at + rng.range(1, 60)).min(bytes.len());
                let run = bytes[at..end].to_vec();
                bytes.splice(at..at, run);
            }
            _ => {
                let digits = rng.pick(INTERESTING).as_bytes().to_vec();
                bytes.splice(at..at, digits);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Cell edits of a PyTorch CSV: a cell removed, duplicated, moved to
/// another row, or its numbers replaced.
pub fn mutate_csv(csv: &str, rng: &mut Rng) -> String {
    let mut rows: Vec<Vec<String>> = csv.lines().map(|l| l.split(',').map(str::to_string).collect()).collect();
    for _ in 0..rng.range(1, 3) {
        let r = rng.range(0, rows.len() - 1);
        if rows[r].is_empty() {
            continue;
        }
        let c = rng.range(0, rows[r].len() - 1);
        match rng.range(0, 4) {
            0 => {
                rows[r].remove(c);
            }
            1 => {
                let cell = rows[r][c].clone();
                rows[r].insert(c, cell);
            }
            2 => {
                let cell = rows[r].remove(c);
                let to = rng.range(0, rows.len() - 1);
                let at = rng.range(0, rows[to].len());
                rows[to].insert(at, cell);
            }
            3 => {
                let cell = &rows[r][c];
                let kind_at = cell.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(0);
                rows[r][c] = format!("{}{}", rng.pick(INTERESTING), &cell[kind_at..]);
            }
            _ => rows.push(vec![rows[r][c].clone()]),
        }
    }
    rows.iter().map(|r| r.join(",")).collect::<Vec<_>>().join("\n")
}
