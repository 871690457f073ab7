//! The timeline as a picture: one row per rank, a box per compute op
//! coloured by pass kind (a braided op split into two halves), microbatch
//! numbers in the boxes, each of a rank's chunks a lighter shade, a time
//! axis with ticks, a width that follows the makespan (so that the
//! shortest op keeps a few pixels, up to a cap), and past the cap runs of
//! ops closer than a pixel drawn as one box (idle time stays visible), a thin lane
//! under each rank for its transfers when they take time and one for its
//! tensor-parallel all-reduces when the program lists them (`--tp`), the
//! exposed part of a collective as a dark tail of its box, optionally the
//! live activations over time as a step line, idle time as gaps, a
//! legend, a title and a summary line.

use std::fmt::Write;
use stp_ir::simulate::{Stream, Timeline};
use stp_ir::{Instr, Pass, PassKind, Program};

const LEFT: f64 = 70.0;
/// The narrowest and widest drawing area, in pixels.
const MIN_WIDTH: f64 = 1000.0;
const MAX_WIDTH: f64 = 16000.0;
/// Pixels the shortest compute op gets, where the width cap allows.
const SHORTEST_OP: f64 = 6.0;
const ROW: f64 = 26.0;
const LANE: f64 = 7.0;
const GAP: f64 = 6.0;
const TOP: f64 = 44.0;

fn colour(kind: PassKind) -> &'static str {
    match kind {
        PassKind::F => "#4C78A8",
        PassKind::B => "#F58518",
        PassKind::W => "#54A24B",
        PassKind::BW => "#E45756",
        PassKind::R => "#72B7B2",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Which thin lanes sit under each rank's row.
struct Lanes {
    /// Point-to-point transfers, when they take time.
    p2p: bool,
    /// Tensor-parallel collectives, when the program lists them.
    tp: bool,
    /// Live activations over time, when asked for.
    memory: bool,
}

/// Height of the memory lane.
const MEMORY_LANE: f64 = 18.0;

impl Lanes {
    fn of(timeline: &Timeline, p2p: f64, memory: bool) -> Lanes {
        let spans = || timeline.ranks.iter().flat_map(|r| &r.spans);
        Lanes {
            p2p: p2p > 0.0 && spans().any(|s| s.stream == Stream::Comm),
            tp: timeline.ranks.iter().any(|r| !r.collectives.is_empty()),
            memory,
        }
    }

    fn height(&self) -> f64 {
        let thin = (LANE + 2.0) * (f64::from(u8::from(self.p2p)) + f64::from(u8::from(self.tp)));
        thin + if self.memory { MEMORY_LANE + 2.0 } else { 0.0 }
    }

    /// Top of the collective lane below a row at `y`.
    fn tp_top(&self, y: f64) -> f64 {
        y + ROW + 2.0 + if self.p2p { LANE + 2.0 } else { 0.0 }
    }

    /// Top of the memory lane below a row at `y`.
    fn memory_top(&self, y: f64) -> f64 {
        self.tp_top(y) + if self.tp { LANE + 2.0 } else { 0.0 }
    }
}

/// What to draw besides the boxes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    /// How long a transfer takes (its lane shows when it is above 0).
    pub p2p: f64,
    /// A lane per rank with its live activations over time.
    pub memory: bool,
}

/// Where the picture of a timeline puts things, in pixels: rank `r`'s
/// row spans `top + per_rank·r` to that plus `row`, and time `t` is at
/// `left + t·width/makespan`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// Left edge of the drawing area.
    pub left: f64,
    /// Top of the first rank's row.
    pub top: f64,
    /// Height of a rank's row of boxes.
    pub row: f64,
    /// From one rank's row to the next.
    pub per_rank: f64,
    /// Width of the drawing area.
    pub width: f64,
}

/// The layout [`timeline_svg`] draws `timeline` with.
pub fn layout(timeline: &Timeline, extras: Extras) -> Layout {
    let lanes = Lanes::of(timeline, extras.p2p, extras.memory);
    Layout { left: LEFT, top: TOP, row: ROW, per_rank: ROW + lanes.height() + GAP, width: drawing_width(timeline) }
}

/// The SVG of `timeline`, a timed run of `program`. A transfer's span
/// also covers the time it waits for its peer, so the transfer lane shows
/// only its last `p2p`: the data moving.
pub fn timeline_svg(program: &Program, timeline: &Timeline, extras: Extras, title: &str, summary: &str) -> String {
    let makespan = timeline.makespan.max(f64::MIN_POSITIVE);
    let width = drawing_width(timeline);
    let scale = width / makespan;
    let p2p = extras.p2p;
    let lanes = Lanes::of(timeline, p2p, extras.memory);
    let live: Vec<Vec<i64>> = (0..timeline.ranks.len()).map(|r| stp_ir::trace::live_activations(program, r)).collect();
    let most_live = live.iter().flatten().copied().max().unwrap_or(0).max(1);
    let per_rank = ROW + lanes.height() + GAP;
    let height = TOP + per_rank * timeline.ranks.len() as f64 + 60.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="sans-serif">"#,
        w = LEFT + width + 30.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{}</text>"#, escape(title));
    let _ = writeln!(svg, r##"<text x="{LEFT}" y="36" font-size="11" fill="#444">{}</text>"##, escape(summary));
    let mut any_exposed = false;
    let mut any_reduction = false;
    let rows_bottom = TOP + per_rank * timeline.ranks.len() as f64 - GAP;
    time_axis(&mut svg, (width, scale, makespan), rows_bottom);
    for (r, rank) in timeline.ranks.iter().enumerate() {
        let y = TOP + per_rank * r as f64;
        let _ = writeln!(svg, r#"<text x="8" y="{:.2}" font-size="12">rank {r}</text>"#, y + ROW * 0.65);
        let _ = writeln!(svg, r##"<rect x="{LEFT}" y="{y:.2}" width="{width:.2}" height="{ROW}" fill="#f4f4f4"/>"##);
        let owned: Vec<u32> = program
            .schedule
            .placement
            .iter()
            .enumerate()
            .filter(|(_, o)| o.index() == r)
            .map(|(s, _)| s as u32)
            .collect();
        let live = &live[r];
        let merged = merged_runs(program, r, &rank.spans, scale);
        for run in &merged {
            run.draw(&mut svg, (y, scale));
        }
        for span in &rank.spans {
            let x = LEFT + span.start * scale;
            let w = ((span.end - span.start) * scale).max(0.5);
            match program.ranks[r].instrs.get(span.instr) {
                Some(Instr::Compute(_)) if !merged.is_empty() => {}
                Some(Instr::Compute(c)) => {
                    let op = OpBox { passes: &c.passes, owned: &owned, times: (span.start, span.end) };
                    op.draw(&mut svg, (x, y, w), live.get(span.instr).copied().unwrap_or(0));
                    if span.exposed > 0.0 && c.units.is_empty() {
                        any_exposed = true;
                        exposed_tail(&mut svg, (x + w, y), span.exposed * scale, span.exposed);
                    }
                }
                Some(Instr::Reduce { stages }) if span.end > span.start => {
                    any_reduction = true;
                    let names: Vec<String> = stages.iter().map(ToString::to_string).collect();
                    let _ = writeln!(
                        svg,
                        r#"<rect class="reduce" x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{ROW}" fill="{REDUCTION}"><title>reduce {}: {:.3} to {:.3}</title></rect>"#,
                        names.join(" "),
                        span.start,
                        span.end
                    );
                }
                Some(Instr::Comm(_)) if lanes.p2p => {
                    let moving = p2p.min(span.end - span.start);
                    let _ = writeln!(
                        svg,
                        r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{LANE}" fill="{TRANSFER}"/>"##,
                        LEFT + (span.end - moving) * scale,
                        y + ROW + 2.0,
                        (moving * scale).max(0.5)
                    );
                }
                _ => {}
            }
        }
        if lanes.memory {
            memory_lane(&mut svg, &rank.spans, live, (lanes.memory_top(y), (scale, width), most_live));
        }
        for c in &rank.collectives {
            let _ = writeln!(
                svg,
                r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{LANE}" fill="{COLLECTIVE}"><title>all-reduce: {:.3} to {:.3}</title></rect>"#,
                LEFT + c.start * scale,
                lanes.tp_top(y),
                ((c.end - c.start) * scale).max(0.5),
                c.start,
                c.end
            );
        }
    }
    let y = TOP + per_rank * timeline.ranks.len() as f64 + 14.0;
    legend(&mut svg, y, &lanes, (any_exposed, any_reduction));
    svg.push_str("</svg>\n");
    svg
}

/// The drawing width: enough for the shortest compute op to get
/// [`SHORTEST_OP`] pixels, within [`MIN_WIDTH`] and [`MAX_WIDTH`].
fn drawing_width(timeline: &Timeline) -> f64 {
    let makespan = timeline.makespan.max(f64::MIN_POSITIVE);
    let shortest = timeline
        .ranks
        .iter()
        .flat_map(|r| &r.spans)
        .filter(|s| s.stream == Stream::Compute && s.end > s.start)
        .map(|s| s.end - s.start)
        .fold(f64::INFINITY, f64::min);
    if !shortest.is_finite() {
        return MIN_WIDTH;
    }
    (makespan / shortest * SHORTEST_OP).clamp(MIN_WIDTH, MAX_WIDTH)
}

/// Ticks at 1, 2 or 5 times a power of ten, about every 80 pixels, with a
/// faint line down through the rows; labels above the first row.
fn time_axis(svg: &mut String, (width, scale, makespan): (f64, f64, f64), rows_bottom: f64) {
    let raw = 80.0 / scale;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|k| k * power).find(|s| *s >= raw).unwrap_or(10.0 * power);
    let axis_y = TOP - 4.0;
    let _ = writeln!(
        svg,
        r##"<line class="axis" x1="{LEFT}" y1="{axis_y:.2}" x2="{:.2}" y2="{axis_y:.2}" stroke="#999" stroke-width="0.8"/>"##,
        LEFT + width
    );
    let mut k = 0u64;
    loop {
        let t = step * k as f64;
        if t > makespan + step * 1e-9 {
            break;
        }
        let x = LEFT + t * scale;
        let _ = writeln!(
            svg,
            r##"<line class="tick" x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{rows_bottom:.2}" stroke="#000" stroke-opacity="0.08" stroke-width="0.6"/>"##,
            axis_y - 3.0
        );
        let label = if step >= 1.0 { format!("{t:.0}") } else { format!("{t}") };
        let _ = writeln!(
            svg,
            r##"<text x="{x:.2}" y="{:.2}" font-size="9" fill="#666" text-anchor="middle">{label}</text>"##,
            axis_y - 5.0
        );
        k += 1;
    }
}

/// Ops of one rank that end less than a pixel before the next starts,
/// drawn as one box in the colour of the kind that ran longest in it:
/// used only when some op would be narrower than a pixel (the width cap
/// was hit); gaps of a pixel or more, the bubbles, stay visible. Empty
/// when every op is wide enough to draw on its own.
fn merged_runs(program: &Program, r: usize, spans: &[stp_ir::simulate::Span], scale: f64) -> Vec<Run> {
    let computes: Vec<(&stp_ir::simulate::Span, &stp_ir::Compute)> = spans
        .iter()
        .filter(|s| s.stream == Stream::Compute)
        .filter_map(|s| match program.ranks[r].instrs.get(s.instr) {
            Some(Instr::Compute(c)) => Some((s, c)),
            _ => None,
        })
        .collect();
    if computes.iter().all(|(s, _)| (s.end - s.start) * scale >= 1.0) {
        return Vec::new();
    }
    let mut runs: Vec<Run> = Vec::new();
    for (span, compute) in computes {
        let joins = runs.last().is_some_and(|run| (span.start - run.end) * scale < 1.0);
        if !joins {
            runs.push(Run { start: span.start, end: span.end, time_by_kind: [0.0; 5], ops: 0 });
        }
        if let Some(run) = runs.last_mut() {
            run.end = run.end.max(span.end);
            run.ops += 1;
            let share = (span.end - span.start) / compute.passes.len().max(1) as f64;
            for pass in &compute.passes {
                let k = PassKind::ALL.iter().position(|k| *k == pass.kind).unwrap_or(0);
                run.time_by_kind[k] += share;
            }
        }
    }
    runs
}

/// A run of ops drawn as one box.
struct Run {
    start: f64,
    end: f64,
    /// Compute time per pass kind, in [`PassKind::ALL`] order.
    time_by_kind: [f64; 5],
    ops: usize,
}

impl Run {
    fn draw(&self, svg: &mut String, (y, scale): (f64, f64)) {
        let most = (0..5).max_by(|a, b| self.time_by_kind[*a].total_cmp(&self.time_by_kind[*b])).unwrap_or(0);
        let _ = writeln!(
            svg,
            r#"<rect class="run" x="{:.2}" y="{y:.2}" width="{:.2}" height="{ROW}" fill="{}"><title>{} ops, {:.3} to {:.3}</title></rect>"#,
            LEFT + self.start * scale,
            ((self.end - self.start) * scale).max(0.5),
            colour(PassKind::ALL[most]),
            self.ops,
            self.start,
            self.end
        );
    }
}

/// A step line of the live activations after each compute op of one rank,
/// at `(top, time scale, the most live on any rank)` (every rank on one
/// scale, so rows compare), with the rank's peak written at its right.
fn memory_lane(
    svg: &mut String,
    spans: &[stp_ir::simulate::Span],
    live: &[i64],
    (top, (scale, width), most): (f64, (f64, f64), i64),
) {
    let level = |units: i64| top + MEMORY_LANE - MEMORY_LANE * units as f64 / most as f64;
    let _ =
        writeln!(svg, r##"<rect x="{LEFT}" y="{top:.2}" width="{width:.2}" height="{MEMORY_LANE}" fill="#fafafa"/>"##);
    let mut path = format!("M{LEFT:.2},{:.2}", level(0));
    let mut peak = 0;
    for span in spans.iter().filter(|s| s.stream == Stream::Compute) {
        let Some(&units) = live.get(span.instr) else { continue };
        let _ = write!(path, " H{:.2} V{:.2}", LEFT + span.end * scale, level(units));
        peak = peak.max(units);
    }
    let _ = write!(path, " H{:.2}", LEFT + width);
    let _ = writeln!(
        svg,
        r##"<path class="memory" d="{path}" fill="none" stroke="{MEMORY}" stroke-width="1.2"><title>live activations (peak {peak})</title></path>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.2}" y="{:.2}" font-size="9" fill="{MEMORY}">{peak}</text>"##,
        LEFT + width + 3.0,
        top + 9.0
    );
}

const MEMORY: &str = "#B279A2";
const TRANSFER: &str = "#888";
const COLLECTIVE: &str = "#9467BD";
const EXPOSED: &str = "#222";
/// A gradient reduction between model copies (several pipelines).
const REDUCTION: &str = "#8C6D31";

/// The last `width` of a box ending at `(x_end, y)`: time the compute
/// stream waited on its own tensor-parallel collective.
fn exposed_tail(svg: &mut String, (x_end, y): (f64, f64), width: f64, time: f64) {
    let _ = writeln!(
        svg,
        r#"<rect x="{:.2}" y="{y:.2}" width="{:.2}" height="{ROW}" fill="{EXPOSED}" fill-opacity="0.35"><title>exposed collective: {time:.3}</title></rect>"#,
        x_end - width,
        width.max(0.5)
    );
}

/// `svg` in a standalone HTML page: hovering a box highlights it and the
/// browser shows its `<title>` (pass, stage, microbatch, times).
pub fn html_page(title: &str, svg: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n\
         <style>body{{font-family:sans-serif;margin:16px}} rect:hover{{stroke:black;stroke-width:1.5}}</style>\n\
         </head><body>\n{svg}</body></html>\n",
        escape(title)
    )
}

/// One compute op: its passes, the stages its rank owns (for the chunk
/// shade) and its (start, end).
struct OpBox<'a> {
    passes: &'a [Pass],
    owned: &'a [u32],
    times: (f64, f64),
}

impl OpBox<'_> {
    /// Its boxes at `(x, y, width)`, one horizontal slice per pass; the
    /// tooltip says what ran when, and how many activations are live after.
    fn draw(&self, svg: &mut String, (x, y, w): (f64, f64, f64), live_after: i64) {
        let h = ROW / self.passes.len().max(1) as f64;
        // A white outline separates neighbouring boxes, but would wash out
        // boxes a few pixels wide: only boxes wide enough for a label get one.
        let outline = if w >= 12.0 { r#" stroke="white" stroke-width="0.5""# } else { "" };
        for (i, pass) in self.passes.iter().enumerate() {
            let chunk = self.owned.iter().position(|s| *s == pass.stage.0).unwrap_or(0);
            let opacity = chunk_opacity(chunk, self.owned.len());
            let top = y + h * i as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.2}" y="{top:.2}" width="{w:.2}" height="{h:.2}" fill="{}" fill-opacity="{opacity:.2}"{outline}><title>{} s{} mb{}: {:.3} to {:.3}, {live_after} activations live after</title></rect>"#,
                colour(pass.kind),
                pass.kind.as_str(),
                pass.stage.0,
                pass.mb.0,
                self.times.0,
                self.times.1
            );
            if w >= 12.0 && h >= 10.0 {
                let size = (h * 0.6).min(11.0);
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.2}" y="{:.2}" font-size="{size:.1}" fill="white" text-anchor="middle">{}</text>"#,
                    x + w / 2.0,
                    top + h / 2.0 + size * 0.35,
                    pass.mb.0
                );
            }
        }
    }
}

/// A rank's c-th chunk (of `chunks`): the first at full colour, the last
/// at 0.4, the others evenly between.
fn chunk_opacity(chunk: usize, chunks: usize) -> f64 {
    if chunks <= 1 {
        return 1.0;
    }
    1.0 - 0.6 * chunk as f64 / (chunks - 1) as f64
}

fn legend(svg: &mut String, y: f64, lanes: &Lanes, (exposed, reductions): (bool, bool)) {
    let mut items = vec![
        (colour(PassKind::F), "F forward"),
        (colour(PassKind::B), "B input gradient"),
        (colour(PassKind::W), "W weight gradient"),
        (colour(PassKind::BW), "BW full backward"),
        (colour(PassKind::R), "R recompute"),
    ];
    if lanes.p2p {
        items.push((TRANSFER, "transfer"));
    }
    if lanes.tp {
        items.push((COLLECTIVE, "TP all-reduce"));
    }
    if exposed {
        items.push((EXPOSED, "exposed collective"));
    }
    if lanes.memory {
        items.push((MEMORY, "live activations"));
    }
    if reductions {
        items.push((REDUCTION, "gradient reduction"));
    }
    let mut x = LEFT;
    for (fill, label) in items {
        let _ = writeln!(svg, r#"<rect x="{x}" y="{y:.2}" width="12" height="12" fill="{fill}"/>"#);
        let _ = writeln!(svg, r#"<text x="{}" y="{:.2}" font-size="11">{label}</text>"#, x + 16.0, y + 10.0);
        x += 145.0;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{:.2}" font-size="10" fill="#666">numbers are microbatches; a braided op is split into halves; each later chunk of a rank is lighter</text>"##,
        y + 28.0
    );
}
