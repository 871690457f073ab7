//! The standard schedules of stp, written in the `.sched` language and
//! compiled into this crate as source text.
//!
//! Each file opens with a doc comment: its first line is the summary
//! `stpc list` shows; the rest names the source paper, the valid range and
//! the expected bubble and memory.

/// One standard schedule.
#[derive(Debug, Clone, Copy)]
pub struct StdSchedule {
    /// The name users type: `stpc compile 1f1b ...`.
    pub name: &'static str,
    /// The `.sched` source.
    pub source: &'static str,
}

impl StdSchedule {
    /// The path shown in diagnostics.
    pub fn path(&self) -> String {
        format!("stdlib/{}.sched", self.name)
    }
}

/// Every standard schedule, in the order `stpc list` shows them.
pub const ALL: &[StdSchedule] = &[
    StdSchedule { name: "gpipe", source: include_str!("../gpipe.sched") },
    StdSchedule { name: "1f1b", source: include_str!("../1f1b.sched") },
    StdSchedule { name: "1f1b-recompute", source: include_str!("../1f1b-recompute.sched") },
    StdSchedule { name: "interleaved-1f1b", source: include_str!("../interleaved-1f1b.sched") },
    StdSchedule { name: "interleaved-1f1b-recompute", source: include_str!("../interleaved-1f1b-recompute.sched") },
    StdSchedule { name: "looped-bfs", source: include_str!("../looped-bfs.sched") },
    StdSchedule { name: "interleaved-zb", source: include_str!("../interleaved-zb.sched") },
    StdSchedule { name: "zb-h1", source: include_str!("../zb-h1.sched") },
    StdSchedule { name: "zb-h2", source: include_str!("../zb-h2.sched") },
    StdSchedule { name: "zb-v", source: include_str!("../zb-v.sched") },
    StdSchedule { name: "chimera", source: include_str!("../chimera.sched") },
    StdSchedule { name: "dualpipe", source: include_str!("../dualpipe.sched") },
    StdSchedule { name: "dualpipe-v", source: include_str!("../dualpipe-v.sched") },
    StdSchedule { name: "stp", source: include_str!("../stp.sched") },
];

/// The standard schedule called `name`.
pub fn get(name: &str) -> Option<&'static StdSchedule> {
    ALL.iter().find(|s| s.name == name)
}
