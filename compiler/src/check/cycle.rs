//! Invariant 3: the ops' waits — program order on each rank plus the data
//! dependencies between passes — form no cycle. A cycle is a deadlock on
//! any runtime; it is reported as the shortest chain of waits.

use super::{describe, grid, producers, PassIndex, Position};
use crate::diag::{Code, Diagnostic};
use crate::elab::ComputeSchedule;
use std::collections::VecDeque;
use stp_ir::{Pass, Rank};

/// Most breadth-first searches run looking for the shortest cycle; on
/// huge schedules the shortest among those searched is reported.
const MAX_SEARCHES: usize = 256;

/// Dense node ids: ops numbered rank by rank. Data-dependency
/// predecessors are stored flat (CSR): node v's are
/// `preds[pred_start[v]..pred_start[v + 1]]`.
struct Graph {
    /// First node id of each rank, and the total at the end.
    offsets: Vec<usize>,
    pred_start: Vec<usize>,
    /// (producer node, producer pass, consumer pass).
    preds: Vec<(usize, Pass, Pass)>,
}

impl Graph {
    fn build(s: &ComputeSchedule, index: &PassIndex) -> Graph {
        let mut offsets = Vec::with_capacity(s.ranks.len() + 1);
        let mut total = 0;
        for ops in &s.ranks {
            offsets.push(total);
            total += ops.len();
        }
        offsets.push(total);
        let mut pred_start = Vec::with_capacity(total + 1);
        let mut preds = Vec::with_capacity(total * 2);
        for ops in &s.ranks {
            for op in ops {
                pred_start.push(preds.len());
                for &pass in &op.compute.passes {
                    for producer in producers(pass, s.meta.chain(), index) {
                        if let Some(at) = index.first(producer) {
                            preds.push((offsets[at.rank.index()] + at.index, producer, pass));
                        }
                    }
                }
            }
        }
        pred_start.push(preds.len());
        Graph { offsets, pred_start, preds }
    }

    fn data_preds(&self, v: usize) -> &[(usize, Pass, Pass)] {
        &self.preds[self.pred_start[v]..self.pred_start[v + 1]]
    }

    fn position(&self, node: usize) -> Position {
        let r = self.offsets.partition_point(|&o| o <= node) - 1;
        Position { rank: Rank(r as u32), index: node - self.offsets[r] }
    }

    fn len(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// Whether `node` is the first op of its rank.
    fn first_on_rank(&self, node: usize) -> bool {
        self.offsets.binary_search(&node).is_ok()
    }
}

pub(super) fn check(s: &ComputeSchedule, index: &PassIndex) -> Vec<Diagnostic> {
    let graph = Graph::build(s, index);
    let Some(stuck) = nodes_on_or_after_cycles(&graph) else { return Vec::new() };
    match shortest_cycle(&graph, &stuck) {
        Some(cycle) => vec![report(s, &graph, &cycle)],
        None => Vec::new(),
    }
}

/// Kahn's algorithm; the nodes never freed sit on a cycle or wait for one.
fn nodes_on_or_after_cycles(g: &Graph) -> Option<Vec<bool>> {
    let n = g.len();
    // Successors in CSR form: data successors, plus the next op on the rank.
    let mut indegree = vec![0usize; n];
    let mut succ_count = vec![0usize; n + 1];
    for &(u, _, _) in &g.preds {
        succ_count[u] += 1;
    }
    for (v, deg) in indegree.iter_mut().enumerate() {
        *deg = g.data_preds(v).len() + usize::from(!g.first_on_rank(v));
    }
    let mut succ_start = vec![0usize; n + 1];
    for v in 0..n {
        succ_start[v + 1] = succ_start[v] + succ_count[v];
    }
    let mut fill = succ_start.clone();
    let mut succs = vec![0usize; g.preds.len()];
    for v in 0..n {
        for &(u, _, _) in g.data_preds(v) {
            succs[fill[u]] = v;
            fill[u] += 1;
        }
    }
    let mut queue: VecDeque<usize> = (0..n).filter(|v| indegree[*v] == 0).collect();
    let mut done = 0;
    while let Some(v) = queue.pop_front() {
        done += 1;
        let next_on_rank = (v + 1 < n && !g.first_on_rank(v + 1)).then_some(v + 1);
        for w in succs[succ_start[v]..succ_start[v + 1]].iter().copied().chain(next_on_rank) {
            indegree[w] -= 1;
            if indegree[w] == 0 {
                queue.push_back(w);
            }
        }
    }
    (done < n).then(|| indegree.iter().map(|d| *d > 0).collect())
}

/// The passes of a data wait (producer, consumer); `None` for the wait on
/// the previous op of the same rank.
type DataEdge = Option<(Pass, Pass)>;

/// One wait in a cycle: `waiter` needs `needs` (from `producer` at node `from`).
#[derive(Debug, Clone, Copy)]
struct Wait {
    waiter: usize,
    waiter_pass: Pass,
    from: usize,
    needs: Pass,
}

/// The cycle with the fewest data waits (ties: fewest ops), searching
/// backwards along waits from stuck nodes that wait on another rank.
fn shortest_cycle(g: &Graph, stuck: &[bool]) -> Option<Vec<Wait>> {
    let starts: Vec<usize> = (0..g.len())
        .filter(|&v| {
            stuck[v] && g.data_preds(v).iter().any(|&(u, _, _)| stuck[u] && g.position(u).rank != g.position(v).rank)
        })
        .take(MAX_SEARCHES)
        .collect();
    let mut best: Option<(usize, usize, Vec<Wait>)> = None;
    // 0-1 BFS over "v waits for u" edges: a data wait costs 1, the wait for
    // the previous op on the same rank costs 0.
    let n = g.len();
    let mut dist = vec![(usize::MAX, usize::MAX); n];
    let mut via: Vec<Option<(usize, DataEdge)>> = vec![None; n];
    for &start in &starts {
        dist.iter_mut().for_each(|d| *d = (usize::MAX, usize::MAX));
        via.iter_mut().for_each(|v| *v = None);
        let mut deque: VecDeque<usize> = VecDeque::new();
        let mut found: Option<(usize, usize, usize, DataEdge)> = None;
        dist[start] = (0, 0);
        deque.push_back(start);
        while let Some(v) = deque.pop_front() {
            let (dv, lv) = dist[v];
            if found.is_some_and(|f| f.0 <= dv) {
                break;
            }
            let prev_on_rank = (v > g.offsets[g.position(v).rank.index()]).then(|| v - 1);
            let edges = g
                .data_preds(v)
                .iter()
                .map(|&(u, prod, cons)| (u, 1, Some((prod, cons))))
                .chain(prev_on_rank.map(|u| (u, 0, None)));
            for (u, w, passes) in edges {
                if !stuck[u] {
                    continue;
                }
                let cand = (dv + w, lv + 1);
                if u == start {
                    if found.is_none_or(|f| (cand.0, cand.1) < (f.0, f.1)) {
                        found = Some((cand.0, cand.1, v, passes));
                    }
                    continue;
                }
                if cand >= dist[u] {
                    continue;
                }
                dist[u] = cand;
                via[u] = Some((v, passes));
                if w == 0 {
                    deque.push_front(u);
                } else {
                    deque.push_back(u);
                }
            }
        }
        let Some((cost, len, last, closing)) = found else { continue };
        if best.as_ref().is_some_and(|b| (b.0, b.1) <= (cost, len)) {
            continue;
        }
        // The path runs start -> ... -> last, each node waiting for the next;
        // `last` waits for `start`. Collect its data waits in that order.
        let mut waits = Vec::new();
        if let Some((needs, waiter_pass)) = closing {
            waits.push(Wait { waiter: last, waiter_pass, from: start, needs });
        }
        let mut node = last;
        while node != start {
            let Some((waiter, passes)) = via[node] else { break };
            if let Some((needs, waiter_pass)) = passes {
                waits.push(Wait { waiter, waiter_pass, from: node, needs });
            }
            node = waiter;
        }
        waits.reverse();
        best = Some((cost, len, waits));
    }
    best.map(|b| b.2)
}

fn report(s: &ComputeSchedule, g: &Graph, cycle: &[Wait]) -> Diagnostic {
    let origin = |node: usize| {
        let p = g.position(node);
        &s.ranks[p.rank.index()][p.index].origin
    };
    let rank_of = |node: usize| g.position(node).rank.0;
    let mut chain = String::new();
    for (k, w) in cycle.iter().enumerate() {
        if k == 0 {
            chain.push_str(&format!("{} on rank {}", describe(w.waiter_pass), rank_of(w.waiter)));
        }
        chain.push_str(&format!(" waits for {} on rank {}", describe(w.needs), rank_of(w.from)));
        let next = &cycle[(k + 1) % cycle.len()];
        if next.waiter != w.from {
            chain.push_str(&format!(", which runs only after {}", describe(next.waiter_pass)));
        }
        chain.push_str(if k + 1 == cycle.len() { ": a cycle" } else { ", which" });
    }
    let mut d =
        Diagnostic::new(Code::DependencyCycle, format!("deadlock: {} ops wait for each other in a cycle", cycle.len()));
    let mut labelled: Vec<(crate::syntax::span::Span, Vec<String>)> = Vec::new();
    for (k, w) in cycle.iter().enumerate() {
        let o = origin(w.waiter);
        let text = format!(
            "{}. {} (rank {}, {o}) waits for {}",
            k + 1,
            describe(w.waiter_pass),
            rank_of(w.waiter),
            describe(w.needs)
        );
        match labelled.iter_mut().find(|(span, _)| *span == o.span) {
            Some((_, texts)) => texts.push(text),
            None => labelled.push((o.span, vec![text])),
        }
    }
    for (span, texts) in labelled {
        d = d.with_label(span, texts.join("; "));
    }
    d.notes.push(chain);
    let marks: Vec<(Rank, usize)> =
        cycle.iter().flat_map(|w| [g.position(w.waiter), g.position(w.from)]).map(|p| (p.rank, p.index)).collect();
    if let Some(grid) = grid::grid(s, &marks) {
        d.notes.push(format!("the ops of every rank:\n{grid}"));
    }
    d.with_help("reorder the ops so that every op a rank waits for can run first")
}
