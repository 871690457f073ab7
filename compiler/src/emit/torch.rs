//! PyTorch pipelining's schedule CSV (`torch.distributed.pipelining`,
//! `_PipelineScheduleRuntime`): one row per rank, one action per cell,
//! written `{stage}{type}{microbatch}` — `F` forward, `I` input gradient,
//! `W` weight gradient, `B` full backward, `SEND_F`/`RECV_F`/`SEND_B`/
//! `RECV_B` transfers (with `--comms`) — and a braided forward/backward
//! as `({f};{b})OVERLAP_F_B`. Stage numbers are global.

use stp_ir::{BufferKind, Direction, Instr, Pass, PassKind, Program};

/// The CSV text and notes about what the format could not express.
pub struct TorchCsv {
    /// One line per rank.
    pub text: String,
    /// What was approximated (for the user to read).
    pub notes: Vec<String>,
}

/// Writes `program` as PyTorch's CSV; with `comms`, its transfers too.
/// In that form (`compute_comms`) torch 2.9's runtime runs every cell as
/// written and cannot run an `OVERLAP_F_B` (its own lowering splits them
/// when it reads the compute-only form), so a braided forward and backward
/// is written as its two actions, forward first, and a note says so.
pub fn torch_csv(program: &Program, comms: bool) -> TorchCsv {
    let mut notes = Vec::new();
    let mut split_braids = 0usize;
    let mut split_overlaps = 0usize;
    let mut recomputes = 0usize;
    let mut text = String::new();
    for rank in &program.ranks {
        let mut row: Vec<String> = Vec::new();
        for instr in &rank.instrs {
            match instr {
                Instr::Compute(c) => {
                    // The format has no recompute: torch recomputes inside
                    // the backward of a checkpointed module.
                    let passes: Vec<Pass> = c.passes.iter().copied().filter(|p| p.kind != PassKind::R).collect();
                    recomputes += c.passes.len() - passes.len();
                    match forward_and_backward(&passes) {
                        Some((f, b)) if comms => {
                            split_overlaps += 1;
                            row.extend([action(f), action(b)]);
                        }
                        Some((f, b)) => row.push(format!("({};{})OVERLAP_F_B", action(f), action(b))),
                        None => {
                            split_braids += usize::from(passes.len() > 1);
                            row.extend(passes.iter().map(action));
                        }
                    }
                }
                Instr::Comm(transfers) if comms => {
                    row.extend(transfers.iter().map(|t| {
                        let (b, mb) = (t.buffer, t.buffer.mb.0);
                        let s = b.stage.0;
                        match (b.kind, t.dir) {
                            (BufferKind::Act, Direction::Send) => format!("{s}SEND_F{mb}"),
                            (BufferKind::Act, Direction::Recv) => format!("{}RECV_F{mb}", s + 1),
                            (BufferKind::Grad, Direction::Send) => format!("{s}SEND_B{mb}"),
                            (BufferKind::Grad, Direction::Recv) => format!("{}RECV_B{mb}", s.saturating_sub(1)),
                            (BufferKind::Stash, _) => format!("{s}STASH{mb}"),
                        }
                    }));
                }
                Instr::Comm(_) | Instr::Free { .. } | Instr::Reduce { .. } => {}
            }
        }
        text.push_str(&row.join(","));
        text.push('\n');
    }
    if split_overlaps > 0 {
        notes.push(format!(
            "{split_overlaps} braided forward/backward pair(s) written as their two actions, forward first: torch \
             2.9's runtime runs the compute_comms form as written and cannot run OVERLAP_F_B there (export without \
             --comms keeps them; torch then splits them itself). Either way torch runs the two passes one after \
             the other: the braid's overlap of TP collectives is lost"
        ));
    }
    if recomputes > 0 {
        notes.push(format!(
            "{recomputes} recompute pass(es) R left out: PyTorch's format has no recompute action; wrap the stage \
             modules in torch.utils.checkpoint, which recomputes inside each backward (the step then runs each R \
             at its backward, not where the schedule puts it)"
        ));
    }
    if split_braids > 0 {
        notes.push(format!(
            "{split_braids} braided op(s) other than a forward with a backward were written as consecutive actions: \
             PyTorch's format braids only OVERLAP_F_B"
        ));
    }
    TorchCsv { text, notes }
}

/// A braided forward and backward, in either order (PyTorch writes the
/// forward first).
fn forward_and_backward(passes: &[Pass]) -> Option<(&Pass, &Pass)> {
    let is_backward = |p: &Pass| matches!(p.kind, PassKind::B | PassKind::BW);
    match passes {
        [f, b] | [b, f] if f.kind == PassKind::F && is_backward(b) => Some((f, b)),
        _ => None,
    }
}

fn action(p: &Pass) -> String {
    let kind = match p.kind {
        PassKind::F => "F",
        PassKind::B => "I",
        PassKind::W => "W",
        PassKind::BW => "B",
        // Left out by `torch_csv`; PyTorch has no such action.
        PassKind::R => "R",
    };
    format!("{}{kind}{}", p.stage.0, p.mb.0)
}

/// A PyTorch schedule CSV that cannot be read, with where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    /// 1-based line (= rank + 1).
    pub line: usize,
    /// 1-based cell within the line.
    pub cell: usize,
    /// The cell's text.
    pub text: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, cell {} (`{}`): {}", self.line, self.cell, self.text, self.message)
    }
}

/// One compute action of a CSV cell: (stp op name, stage, microbatch).
type Op = (&'static str, u32, u32);

/// Turns PyTorch's CSV (one row per rank) into a `.sched` schedule named
/// `name` for exactly that many ranks, stages and microbatches, whose
/// rank programs run the rows' compute actions in order, so stpc can check
/// it. Transfer actions are skipped: stpc derives its own; so are FSDP's
/// `UNSHARD`, `RESHARD` and `REDUCE_GRAD` (counted in [`Imported::skipped`]).
pub fn import_torch_csv(text: &str, name: &str) -> Result<Imported, ImportError> {
    let mut rows: Vec<Vec<(Vec<Op>, usize)>> = Vec::new();
    let mut skipped = std::collections::BTreeMap::new();
    for (line_no, line) in text.lines().enumerate() {
        let mut row = Vec::new();
        for (cell_no, cell) in line.split(',').map(str::trim).enumerate().filter(|(_, c)| !c.is_empty()) {
            let at = |message: &str| ImportError {
                line: line_no + 1,
                cell: cell_no + 1,
                text: cell.to_string(),
                message: message.to_string(),
            };
            if let Some(inner) = cell.strip_prefix('(').and_then(|c| c.strip_suffix(")OVERLAP_F_B")) {
                let ops: Option<Vec<Op>> = inner.split(';').map(parse_compute).collect();
                match ops {
                    Some(ops) if ops.len() == 2 => row.push((ops, cell_no + 1)),
                    _ => return Err(at("an OVERLAP_F_B holds two compute actions, `(0F1;3B0)OVERLAP_F_B`")),
                }
            } else if is_transfer(cell) {
                continue;
            } else if let Some(kind) = fsdp_action(cell) {
                *skipped.entry(kind).or_insert(0) += 1;
            } else {
                let op = parse_compute(cell).ok_or_else(|| {
                    at("not a PyTorch action: expected {stage}{F|I|W|B}{microbatch}, a transfer, or an OVERLAP_F_B")
                })?;
                row.push((vec![op], cell_no + 1));
            }
        }
        rows.push(row);
    }
    while rows.last().is_some_and(Vec::is_empty) {
        rows.pop();
    }
    let ops = || rows.iter().flatten().flat_map(|(ops, _)| ops.iter());
    refuse_indices_beyond_the_actions(&rows)?;
    let stages = ops().map(|o| o.1 + 1).max().unwrap_or(0);
    let microbatches = ops().map(|o| o.2 + 1).max().unwrap_or(0);
    let mut owner: Vec<Option<usize>> = vec![None; stages as usize];
    for (r, row) in rows.iter().enumerate() {
        for (ops, cell) in row {
            for op in ops {
                match owner[op.1 as usize] {
                    Some(o) if o != r => {
                        return Err(ImportError {
                            line: r + 1,
                            cell: *cell,
                            text: format!("stage {}", op.1),
                            message: format!("stage {} also runs on rank {o}: a stage lives on one rank", op.1),
                        })
                    }
                    _ => owner[op.1 as usize] = Some(r),
                }
            }
        }
    }
    let owners: Vec<usize> = owner.iter().map(|o| o.unwrap_or(0)).collect();
    let place = placement_expression(&owners);
    let mut out = format!(
        "/// Imported from a PyTorch pipelining schedule CSV: {} ranks, {stages} stages, {microbatches} microbatches.\n\
         schedule {name}(p: ranks, m: microbatches) {{\n  require p == {} : \"the CSV has {} rows\";\n  \
         require m == {microbatches} : \"the CSV runs {microbatches} microbatches\";\n  stages {stages};\n  place s -> {place};\n  rank r {{\n",
        rows.len(),
        rows.len(),
        rows.len()
    );
    for (r, row) in rows.iter().enumerate() {
        out.push_str(&format!("    if r == {r} {{\n"));
        for (ops, cell) in row {
            let calls: Vec<String> = ops.iter().map(|(op, s, mb)| format!("{op}({mb}, {s})")).collect();
            out.push_str(&format!("      {}  // line {}, cell {cell}\n", calls.join(" & "), r + 1));
        }
        out.push_str("    }\n");
    }
    out.push_str("  }\n}\n");
    Ok(Imported {
        source: out,
        ranks: rows.len() as i64,
        microbatches: i64::from(microbatches),
        skipped: skipped.into_iter().collect(),
    })
}

/// Refuses a stage or microbatch index that no schedule of these actions
/// can reach: every (stage, microbatch) needs at least two compute actions,
/// so both indices stay below the number of actions. Keeps what the import
/// allocates proportional to the CSV (`4294967295F0` is one cell).
fn refuse_indices_beyond_the_actions(rows: &[Vec<(Vec<Op>, usize)>]) -> Result<(), ImportError> {
    let actions: usize = rows.iter().flatten().map(|(ops, _)| ops.len()).sum();
    for (r, row) in rows.iter().enumerate() {
        for (ops, cell) in row {
            if let Some(op) = ops.iter().find(|o| o.1 as usize >= actions || o.2 as usize >= actions) {
                return Err(ImportError {
                    line: r + 1,
                    cell: *cell,
                    text: format!("{}{}{}", op.1, op.0, op.2),
                    message: format!(
                        "stage {} or microbatch {} is beyond what {actions} compute actions can cover \
                         (each stage and microbatch needs a forward and a backward)",
                        op.1, op.2
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `place`'s expression for `owners[s]`: a constant per run of stages on
/// one rank, chosen by a balanced tree of comparisons, so the nesting
/// grows with the logarithm of the runs (a chain of `if s == k` as deep
/// as the stages would overflow the parser's stack). Any generator of
/// `.sched` source that tabulates a placement writes it with this.
pub fn placement_expression(owners: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (first stage, rank)
    for (s, &r) in owners.iter().enumerate() {
        if runs.last().is_none_or(|&(_, last)| last != r) {
            runs.push((s, r));
        }
    }
    fn tree(runs: &[(usize, usize)]) -> String {
        match runs {
            [] => "0".to_string(),
            [(_, r)] => r.to_string(),
            _ => {
                let mid = runs.len() / 2;
                format!("if s < {} {{ {} }} else {{ {} }}", runs[mid].0, tree(&runs[..mid]), tree(&runs[mid..]))
            }
        }
    }
    tree(&runs)
}

/// A schedule read from PyTorch's CSV.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Its `.sched` source.
    pub source: String,
    /// The CSV's rows: the value its `ranks` parameter requires.
    pub ranks: i64,
    /// The value its `microbatches` parameter requires.
    pub microbatches: i64,
    /// FSDP actions the import left out (`UNSHARD`, `RESHARD`,
    /// `REDUCE_GRAD`) and how many of each: stp schedules do not shard
    /// weights, and these actions do not change which order is valid.
    pub skipped: Vec<(&'static str, usize)>,
}

fn is_transfer(cell: &str) -> bool {
    ["SEND_F", "RECV_F", "SEND_B", "RECV_B"].iter().any(|t| cell.contains(t))
}

/// `UNSHARD`, `RESHARD` or `REDUCE_GRAD` for a cell like `0UNSHARD`.
fn fsdp_action(cell: &str) -> Option<&'static str> {
    let rest = cell.trim_start_matches(|c: char| c.is_ascii_digit());
    if rest.len() == cell.len() {
        return None;
    }
    ["UNSHARD", "RESHARD", "REDUCE_GRAD"].into_iter().find(|a| *a == rest)
}

fn parse_compute(cell: &str) -> Option<Op> {
    let kind_at = cell.find(|c: char| !c.is_ascii_digit())?;
    let (stage, rest) = cell.split_at(kind_at);
    let mut chars = rest.chars();
    let op = match chars.next()? {
        'F' => "F",
        'I' => "B",
        'W' => "W",
        'B' => "BW",
        _ => return None,
    };
    let mb = chars.as_str();
    if stage.is_empty() || mb.is_empty() || !mb.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((op, stage.parse().ok()?, mb.parse().ok()?))
}
