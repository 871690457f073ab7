//! A dense table keyed by [`Buffer`], for passes that track per-buffer
//! state on one rank at a time without hashing.

use crate::ids::{Buffer, BufferKind};
use crate::program::RankProgram;

/// A value per buffer of a pipeline with `num_stages` stages and
/// `num_microbatches` microbatches. [`BufferSlots::reset`] restores the
/// default in time proportional to the entries set since the last reset,
/// so one table serves every rank in turn.
#[derive(Debug, Clone)]
pub struct BufferSlots<T> {
    num_stages: usize,
    num_microbatches: usize,
    values: Vec<T>,
    touched: Vec<usize>,
}

impl<T: Copy + Default + PartialEq> BufferSlots<T> {
    /// A table with every entry at `T::default()`.
    pub fn new(num_stages: u32, num_microbatches: u32) -> BufferSlots<T> {
        let (s, m) = (num_stages as usize, num_microbatches as usize);
        BufferSlots { num_stages: s, num_microbatches: m, values: vec![T::default(); 3 * s * m], touched: Vec::new() }
    }

    /// The dense index of `buffer`, or `None` when its stage or microbatch is out of range.
    fn index(&self, buffer: Buffer) -> Option<usize> {
        let (stage, mb) = (buffer.stage.index(), buffer.mb.index());
        if stage >= self.num_stages || mb >= self.num_microbatches {
            return None;
        }
        let kind = match buffer.kind {
            BufferKind::Act => 0,
            BufferKind::Grad => 1,
            BufferKind::Stash => 2,
        };
        Some((kind * self.num_stages + stage) * self.num_microbatches + mb)
    }

    /// The value for `buffer` (the default for buffers out of range).
    pub fn get(&self, buffer: Buffer) -> T {
        self.index(buffer).map_or_else(T::default, |i| self.values[i])
    }

    /// Sets the value for `buffer`; buffers out of range are ignored.
    pub fn set(&mut self, buffer: Buffer, value: T) {
        if let Some(i) = self.index(buffer) {
            if self.values[i] == T::default() {
                self.touched.push(i);
            }
            self.values[i] = value;
        }
    }

    /// Every buffer whose value is not the default, with its value, in no
    /// particular order.
    pub fn entries(&self) -> impl Iterator<Item = (Buffer, T)> + '_ {
        let mut seen = self.touched.clone();
        seen.sort_unstable();
        seen.dedup();
        seen.into_iter()
            .filter(move |i| self.values[*i] != T::default())
            .map(move |i| (self.buffer_at(i), self.values[i]))
    }

    fn buffer_at(&self, i: usize) -> Buffer {
        let per_kind = self.num_stages * self.num_microbatches;
        let kind = match i / per_kind {
            0 => BufferKind::Act,
            1 => BufferKind::Grad,
            _ => BufferKind::Stash,
        };
        let rest = i % per_kind;
        Buffer {
            kind,
            stage: crate::Stage((rest / self.num_microbatches) as u32),
            mb: crate::Microbatch((rest % self.num_microbatches) as u32),
        }
    }

    /// Restores every entry to the default.
    pub fn reset(&mut self) {
        for i in self.touched.drain(..) {
            self.values[i] = T::default();
        }
    }
}

/// A hash map for keys the program itself chose (ranks, links, buffers):
/// a fast fixed hash instead of SipHash's flooding resistance, which keys
/// of this kind do not need, and the same iteration order on every run.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

/// Above this many instructions, passes that treat each rank's program on
/// its own run on two threads; below it a thread costs more than it saves.
const PARALLEL_FROM: usize = 20_000;

/// Where to cut a list of rank programs so that two threads get as much
/// work each, or `None` where one thread should do it all (a small
/// program, one rank, or one core).
fn two_way_split(ranks: &[RankProgram]) -> Option<usize> {
    let total: usize = ranks.iter().map(|r| r.instrs.len()).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 || total < PARALLEL_FROM || ranks.len() < 2 {
        return None;
    }
    let mut seen = 0;
    let half = ranks.iter().take_while(|r| {
        seen += r.instrs.len();
        2 * seen < total
    });
    Some((half.count() + 1).clamp(1, ranks.len() - 1))
}

/// `work` over the rank programs, on two threads where they are large
/// (each gets a contiguous half): for passes that treat each rank's
/// program on its own. The results come in rank order, one or two.
pub fn on_rank_halves<T: Send>(ranks: &[RankProgram], work: impl Fn(&[RankProgram]) -> T + Sync) -> Vec<T> {
    let Some(split) = two_way_split(ranks) else { return vec![work(ranks)] };
    let (first, second) = ranks.split_at(split);
    std::thread::scope(|scope| {
        let later = scope.spawn(|| work(second));
        let first = work(first);
        vec![first, later.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))]
    })
}

/// [`on_rank_halves`] for passes that rewrite each rank's program.
pub fn on_rank_halves_mut(ranks: &mut [RankProgram], work: impl Fn(&mut [RankProgram]) + Sync) {
    let Some(split) = two_way_split(ranks) else { return work(ranks) };
    let (first, second) = ranks.split_at_mut(split);
    std::thread::scope(|scope| {
        scope.spawn(|| work(second));
        work(first);
    });
}
