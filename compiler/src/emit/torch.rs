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
pub fn torch_csv(program: &Program, comms: bool) -> TorchCsv {
    let mut notes = Vec::new();
    let mut split_braids = 0usize;
    let mut text = String::new();
    for rank in &program.ranks {
        let mut row: Vec<String> = Vec::new();
        for instr in &rank.instrs {
            match instr {
                Instr::Compute(c) => match c.passes.as_slice() {
                    [f, b] if f.kind == PassKind::F && is_backward(b) => {
                        row.push(format!("({};{})OVERLAP_F_B", action(f), action(b)));
                    }
                    [b, f] if f.kind == PassKind::F && is_backward(b) => {
                        row.push(format!("({};{})OVERLAP_F_B", action(f), action(b)));
                    }
                    passes => {
                        split_braids += usize::from(passes.len() > 1);
                        row.extend(passes.iter().map(action));
                    }
                },
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
                Instr::Comm(_) | Instr::Free { .. } => {}
            }
        }
        text.push_str(&row.join(","));
        text.push('\n');
    }
    if split_braids > 0 {
        notes.push(format!(
            "{split_braids} braided op(s) other than a forward with a backward were written as consecutive actions: \
             PyTorch's format braids only OVERLAP_F_B"
        ));
    }
    TorchCsv { text, notes }
}

fn is_backward(p: &Pass) -> bool {
    matches!(p.kind, PassKind::B | PassKind::BW)
}

fn action(p: &Pass) -> String {
    let kind = match p.kind {
        PassKind::F => "F",
        PassKind::B => "I",
        PassKind::W => "W",
        PassKind::BW => "B",
    };
    format!("{}{kind}{}", p.stage.0, p.mb.0)
}
