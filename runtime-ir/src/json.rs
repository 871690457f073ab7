//! The JSON form of a program, written directly: programs hold hundreds
//! of thousands of instructions, and this is several times faster than
//! serde's generic path. The output is exactly what `serde_json` produces
//! for the derived `Serialize` (a test compares the two), so
//! [`crate::load_json`] reads it back through serde.

use crate::ids::Buffer;
use crate::program::{Direction, Instr, Pass, Program};

/// Serialize `program` as compact JSON.
pub fn to_json(program: &Program) -> String {
    let instrs: usize = program.ranks.iter().map(|r| r.instrs.len()).sum();
    let mut out = String::with_capacity(256 + instrs * 64);
    let meta = &program.schedule;
    out.push_str("{\"version\":");
    number(&mut out, program.version);
    out.push_str(",\"schedule\":{\"name\":");
    out.push_str(&serde_json::to_string(&meta.name).unwrap_or_default());
    out.push_str(",\"params\":[");
    for (i, p) in meta.params.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        out.push_str(&serde_json::to_string(&p.name).unwrap_or_default());
        out.push_str(",\"value\":");
        out.push_str(&p.value.to_string());
        out.push('}');
    }
    out.push_str("],\"num_ranks\":");
    number(&mut out, meta.num_ranks);
    out.push_str(",\"num_stages\":");
    number(&mut out, meta.num_stages);
    out.push_str(",\"num_microbatches\":");
    number(&mut out, meta.num_microbatches);
    out.push_str(",\"placement\":[");
    for (i, r) in meta.placement.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        number(&mut out, r.0);
    }
    out.push(']');
    if meta.tp != 1 {
        out.push_str(",\"tp\":");
        number(&mut out, meta.tp);
    }
    if meta.pipelines != 1 {
        out.push_str(",\"pipelines\":");
        number(&mut out, meta.pipelines);
    }
    if !meta.routes.is_empty() {
        out.push_str(",\"routes\":[");
        for (i, r) in meta.routes.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            number(&mut out, *r);
        }
        out.push(']');
    }
    out.push_str("},\"ranks\":[");
    for (i, rank) in program.ranks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"rank\":");
        number(&mut out, rank.rank.0);
        out.push_str(",\"instrs\":[");
        for (k, instr) in rank.instrs.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            write_instr(&mut out, instr);
        }
        out.push_str("]}");
    }
    out.push_str("]}");
    out
}

fn write_instr(out: &mut String, instr: &Instr) {
    match instr {
        Instr::Compute(c) => {
            out.push_str("{\"compute\":{\"passes\":[");
            for (i, p) in c.passes.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_pass(out, p);
            }
            out.push(']');
            if !c.units.is_empty() {
                // Only tensor-parallel programs have units; serde's path is fine here.
                out.push_str(",\"units\":");
                out.push_str(&serde_json::to_string(&c.units).unwrap_or_default());
            }
            out.push_str("}}");
        }
        Instr::Comm(ops) => {
            out.push_str("{\"comm\":[");
            for (i, t) in ops.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(match t.dir {
                    Direction::Send => "{\"dir\":\"send\",\"buffer\":",
                    Direction::Recv => "{\"dir\":\"recv\",\"buffer\":",
                });
                write_buffer(out, t.buffer);
                out.push_str(",\"peer\":");
                number(out, t.peer.0);
                out.push('}');
            }
            out.push_str("]}");
        }
        Instr::Free { buffer } => {
            out.push_str("{\"free\":{\"buffer\":");
            write_buffer(out, *buffer);
            out.push_str("}}");
        }
        Instr::Reduce { stages } => {
            out.push_str("{\"reduce\":{\"stages\":[");
            for (i, s) in stages.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                number(out, s.0);
            }
            out.push_str("]}}");
        }
    }
}

fn write_pass(out: &mut String, p: &Pass) {
    out.push_str("{\"kind\":\"");
    out.push_str(p.kind.as_str());
    out.push_str("\",\"stage\":");
    number(out, p.stage.0);
    out.push_str(",\"mb\":");
    number(out, p.mb.0);
    out.push('}');
}

fn write_buffer(out: &mut String, b: Buffer) {
    out.push('"');
    out.push_str(b.kind.as_str());
    out.push_str(".s");
    number(out, b.stage.0);
    out.push_str(".mb");
    number(out, b.mb.0);
    out.push('"');
}

/// `n` in decimal, without the formatting machinery.
fn number(out: &mut String, n: u32) {
    out.push_str(std::str::from_utf8(crate::ids::decimal(n, &mut [0u8; 10])).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Microbatch, Rank, Stage};
    use crate::program::{Compute, Param, PassKind, RankProgram, ScheduleMeta, Transfer};

    #[test]
    fn matches_serde_exactly() {
        let pass = |kind, s, m| Pass { kind, stage: Stage(s), mb: Microbatch(m) };
        let program = Program {
            version: 1,
            schedule: ScheduleMeta {
                name: "a \"quoted\" name".into(),
                params: vec![Param { name: "p".into(), value: -3 }],
                num_ranks: 2,
                num_stages: 12,
                num_microbatches: 1234,
                placement: vec![Rank(0), Rank(1)],
                tp: 4,
                pipelines: 2,
                routes: vec![0, 1, 1],
            },
            ranks: vec![RankProgram {
                rank: Rank(0),
                instrs: vec![
                    Instr::Compute(Compute::single(pass(PassKind::F, 0, 1023))),
                    Instr::Compute({
                        let mut c = Compute {
                            passes: vec![pass(PassKind::F, 11, 0), pass(PassKind::BW, 10, 9)],
                            units: Vec::new(),
                        };
                        c.units = c.canonical_units();
                        c
                    }),
                    Instr::Comm(vec![
                        Transfer::send(Buffer::act(Stage(0), Microbatch(1023)), Rank(1)),
                        Transfer::recv(Buffer::grad(Stage(1), Microbatch(7)), Rank(1)),
                    ]),
                    Instr::Free { buffer: Buffer::stash(Stage(10), Microbatch(0)) },
                    Instr::Reduce { stages: vec![Stage(1), Stage(7)] },
                ],
            }],
        };
        assert_eq!(to_json(&program), serde_json::to_string(&program).unwrap_or_default());
    }
}
