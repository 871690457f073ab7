//! The compact JSON form of a program: format version 2.
//!
//! The header (`schedule`) is the one of version 1; each rank's
//! instructions are one flat array of integers instead of an object per
//! instruction, about a fifth of the size (`stpc compile --emit compact`).
//! [`crate::load_json`] reads both versions; this module's reader checks
//! every integer it decodes, so a damaged file is refused with where, never
//! a panic. The book's chapter "The IR" documents the encoding:
//!
//! ```text
//! {"version":2,"schedule":{...as in version 1...},"ranks":[[CODE...], ...]}
//!
//! compute  0, n, (kind, stage, mb) x n, u, (pass, part, collective) x u
//! group    1, n, (dir, buffer kind, stage, mb, peer) x n
//! free     2, buffer kind, stage, mb
//! reduce   3, n, stage x n
//!
//! kind:        F 0, B 1, W 2, BW 3, R 4
//! buffer kind: act 0, grad 1, stash 2
//! dir:         send 0, recv 1
//! part:        attn 0, mlp 1, mlp-dgrad 2, attn-dgrad 3, mlp-wgrad 4, attn-wgrad 5
//! collective:  none 0, ar 1, rs-ag 2
//! ```

use crate::ids::{Buffer, BufferKind, Microbatch, Rank, Stage};
use crate::program::{Collective, Compute, Direction, Instr, Part, Pass, PassKind, Program, RankProgram, ScheduleMeta};
use crate::FORMAT_VERSION;

/// The version number of the compact form.
pub const COMPACT_VERSION: u32 = 2;

const COMPUTE: u32 = 0;
const GROUP: u32 = 1;
const FREE: u32 = 2;
const REDUCE: u32 = 3;

const PASS_KINDS: [PassKind; 5] = [PassKind::F, PassKind::B, PassKind::W, PassKind::BW, PassKind::R];
const BUFFER_KINDS: [BufferKind; 3] = [BufferKind::Act, BufferKind::Grad, BufferKind::Stash];
const PARTS: [Part; 6] =
    [Part::Attention, Part::Mlp, Part::MlpDgrad, Part::AttentionDgrad, Part::MlpWgrad, Part::AttentionWgrad];
const COLLECTIVES: [Option<Collective>; 3] =
    [None, Some(Collective::AllReduce), Some(Collective::ReduceScatterAllGather)];

fn code_of<T: PartialEq>(table: &[T], value: &T) -> u32 {
    table.iter().position(|t| t == value).expect("every value has a code") as u32
}

/// Serialize `program` in the compact form (version 2).
pub fn to_compact_json(program: &Program) -> String {
    let header = serde_json::to_string(&program.schedule).unwrap_or_default();
    let mut out = String::with_capacity(header.len() + 64);
    out.push_str("{\"version\":2,\"schedule\":");
    out.push_str(&header);
    out.push_str(",\"ranks\":[");
    // Ranks encode independently: two threads each write half of them.
    out.push_str(&crate::slots::on_rank_halves(&program.ranks, ranks_json).join(","));
    out.push_str("]}");
    out
}

/// `ranks` as comma-separated arrays of codes.
fn ranks_json(ranks: &[RankProgram]) -> String {
    let instrs: usize = ranks.iter().map(|r| r.instrs.len()).sum();
    let mut out = Vec::with_capacity(instrs * 16);
    for (i, rank) in ranks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        let mut codes = Codes { out: &mut out, first: true };
        for instr in &rank.instrs {
            codes.instr(instr);
        }
        out.push(b']');
    }
    // Only ASCII digits, commas and brackets were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes integers comma-separated.
struct Codes<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Codes<'_> {
    fn put(&mut self, n: u32) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        let mut digits = [0u8; 10];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&digits[at..]);
    }

    fn buffer(&mut self, b: Buffer) {
        self.put(code_of(&BUFFER_KINDS, &b.kind));
        self.put(b.stage.0);
        self.put(b.mb.0);
    }

    fn instr(&mut self, instr: &Instr) {
        match instr {
            Instr::Compute(c) => {
                self.put(COMPUTE);
                self.put(c.passes.len() as u32);
                for p in &c.passes {
                    self.put(code_of(&PASS_KINDS, &p.kind));
                    self.put(p.stage.0);
                    self.put(p.mb.0);
                }
                self.put(c.units.len() as u32);
                for u in &c.units {
                    self.put(u32::from(u.pass));
                    self.put(code_of(&PARTS, &u.part));
                    self.put(code_of(&COLLECTIVES, &u.collective));
                }
            }
            Instr::Comm(transfers) => {
                self.put(GROUP);
                self.put(transfers.len() as u32);
                for t in transfers {
                    self.put(match t.dir {
                        Direction::Send => 0,
                        Direction::Recv => 1,
                    });
                    self.buffer(t.buffer);
                    self.put(t.peer.0);
                }
            }
            Instr::Free { buffer } => {
                self.put(FREE);
                self.buffer(*buffer);
            }
            Instr::Reduce { stages } => {
                self.put(REDUCE);
                self.put(stages.len() as u32);
                for s in stages {
                    self.put(s.0);
                }
            }
        }
    }
}

/// The compact form as serde reads it, before its codes are decoded.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CompactProgram {
    #[allow(dead_code)]
    version: u32,
    schedule: ScheduleMeta,
    ranks: Vec<Vec<u64>>,
}

/// Decodes the instruction codes of a compact program.
pub(crate) fn decode(compact: CompactProgram) -> Result<Program, String> {
    let ranks = compact
        .ranks
        .iter()
        .enumerate()
        .map(|(r, codes)| {
            let mut reader = Reader { codes, at: 0, rank: r };
            let mut instrs = Vec::new();
            while reader.at < codes.len() {
                instrs.push(reader.instr()?);
            }
            Ok(RankProgram { rank: Rank(r as u32), instrs })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Program { version: FORMAT_VERSION, schedule: compact.schedule, ranks })
}

/// Reads one rank's codes, refusing anything out of range.
struct Reader<'a> {
    codes: &'a [u64],
    at: usize,
    rank: usize,
}

impl Reader<'_> {
    fn fail(&self, what: &str) -> String {
        format!("rank {}, code {}: {what}", self.rank, self.at)
    }

    fn next(&mut self, what: &str) -> Result<u32, String> {
        let code = *self.codes.get(self.at).ok_or_else(|| self.fail(&format!("the codes end where {what} was due")))?;
        let value = u32::try_from(code).map_err(|_| self.fail(&format!("{what} {code} is out of range")))?;
        self.at += 1;
        Ok(value)
    }

    fn pick<T: Copy>(&mut self, table: &[T], what: &str) -> Result<T, String> {
        let code = self.next(what)?;
        table.get(code as usize).copied().ok_or_else(|| {
            self.at -= 1;
            self.fail(&format!("{code} is no {what} (0..{})", table.len()))
        })
    }

    /// A count of items of `width` codes each, no more than the codes left.
    fn count(&mut self, what: &str, width: usize) -> Result<usize, String> {
        let n = self.next(what)? as usize;
        if n.saturating_mul(width) > self.codes.len() - self.at {
            self.at -= 1;
            return Err(self.fail(&format!("{n} {what} do not fit in the codes left")));
        }
        Ok(n)
    }

    fn buffer(&mut self) -> Result<Buffer, String> {
        let kind = self.pick(&BUFFER_KINDS, "buffer kind")?;
        Ok(Buffer { kind, stage: Stage(self.next("stage")?), mb: Microbatch(self.next("microbatch")?) })
    }

    fn instr(&mut self) -> Result<Instr, String> {
        match self.next("an instruction")? {
            COMPUTE => {
                let n = self.count("passes", 3)?;
                let mut passes = Vec::with_capacity(n);
                for _ in 0..n {
                    let kind = self.pick(&PASS_KINDS, "pass kind")?;
                    passes.push(Pass {
                        kind,
                        stage: Stage(self.next("stage")?),
                        mb: Microbatch(self.next("microbatch")?),
                    });
                }
                let u = self.count("units", 3)?;
                let mut units = Vec::with_capacity(u);
                for _ in 0..u {
                    let pass =
                        u8::try_from(self.next("unit pass")?).map_err(|_| self.fail("unit pass out of range"))?;
                    let part = self.pick(&PARTS, "unit part")?;
                    let collective = self.pick(&COLLECTIVES, "collective")?;
                    units.push(crate::program::Unit { pass, part, collective });
                }
                Ok(Instr::Compute(Compute { passes, units }))
            }
            GROUP => {
                let n = self.count("transfers", 5)?;
                let mut transfers = Vec::with_capacity(n);
                for _ in 0..n {
                    let dir = self.pick(&[Direction::Send, Direction::Recv], "direction")?;
                    let buffer = self.buffer()?;
                    transfers.push(crate::program::Transfer { dir, buffer, peer: Rank(self.next("peer")?) });
                }
                Ok(Instr::Comm(transfers))
            }
            FREE => Ok(Instr::Free { buffer: self.buffer()? }),
            REDUCE => {
                let n = self.count("stages", 1)?;
                let stages = (0..n).map(|_| self.next("stage").map(Stage)).collect::<Result<_, _>>()?;
                Ok(Instr::Reduce { stages })
            }
            other => {
                self.at -= 1;
                Err(self.fail(&format!("{other} is no instruction (0 compute, 1 group, 2 free, 3 reduce)")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn damaged_codes_are_refused_with_where() {
        let header = r#"{"version":2,"schedule":{"name":"s","params":[],"num_ranks":1,"num_stages":1,"num_microbatches":1,"placement":[0]},"ranks":"#;
        let load =
            |codes: &str| crate::load_json(&format!("{header}[{codes}]}}")).map(|_| ()).map_err(|e| e.to_string());
        assert!(load("[0,1,0,0,0,0]").is_ok());
        assert!(load("[0,1,9,0,0,0]").expect_err("refused").contains("rank 0, code 2: 9 is no pass kind"));
        assert!(load("[0,4000000000,0]").expect_err("refused").contains("do not fit"));
        assert!(load("[7]").expect_err("refused").contains("7 is no instruction"));
        assert!(load("[0,1,0,0,0]").expect_err("refused").contains("the codes end"));
        assert!(load("[2,0,0,99999999999]").expect_err("refused").contains("out of range"));
    }
}
