//! `stpc viz` pictures stay readable at production sizes: rendered to
//! pixels (resvg), every rank's row is coloured in proportion to its busy
//! time — boxes are neither lost below a pixel nor washed out by their
//! outlines — the width follows the makespan, a time axis is drawn, and
//! each chunk of a rank has its own shade.

use stp_ir::simulate::{simulate, CostModel, Timeline};
use stp_tests::build_std;
use stpc::emit::svg::{layout, timeline_svg, Extras, Layout};

/// The SVG and its layout for standard schedule `name` at unit costs.
fn picture(name: &str, p: i64, m: i64, v: Option<i64>) -> (String, Layout, Timeline) {
    picture_at(name, p, m, v, &CostModel::default())
}

fn picture_at(name: &str, p: i64, m: i64, v: Option<i64>, cost: &CostModel) -> (String, Layout, Timeline) {
    let b = build_std(name, p, m, v);
    let timeline = simulate(&b.program, cost).expect("runs");
    let svg = timeline_svg(&b.program, &timeline, Extras::default(), name, "");
    (svg, layout(&timeline, Extras::default()), timeline)
}

fn render(svg: &str) -> resvg::tiny_skia::Pixmap {
    let tree = resvg::usvg::Tree::from_str(svg, &resvg::usvg::Options::default()).expect("the SVG parses");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("a canvas");
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
}

/// Whether a pixel shows a pass's colour rather than the grey row, white
/// or a faint tick line: its channels spread apart.
fn coloured(pixel: resvg::tiny_skia::PremultipliedColorU8) -> bool {
    let [r, g, b] = [pixel.red(), pixel.green(), pixel.blue()].map(i32::from);
    r.max(g).max(b) - r.min(g).min(b) > 24
}

/// Per rank, the share of its row's middle line that is coloured.
fn coloured_shares(pixmap: &resvg::tiny_skia::Pixmap, at: &Layout, ranks: usize) -> Vec<f64> {
    let (x0, x1) = (at.left.ceil() as u32, (at.left + at.width).floor() as u32);
    (0..ranks)
        .map(|r| {
            let y = (at.top + at.per_rank * r as f64 + at.row / 2.0) as u32;
            let hits = (x0..x1).filter(|x| pixmap.pixel(*x, y).is_some_and(coloured)).count();
            hits as f64 / f64::from(x1 - x0)
        })
        .collect()
}

#[test]
fn every_rank_row_is_coloured_in_proportion_to_its_busy_time() {
    let unit = CostModel::default();
    // Weight gradients of a hundredth of a forward: at the width cap they
    // are under a pixel, and runs of ops are drawn as one box.
    let tiny_w = CostModel { backward_weight: 0.01, ..CostModel::default() };
    for (name, p, m, v, cost) in [
        ("1f1b", 4, 8, None, &unit),
        ("interleaved-1f1b", 8, 32, Some(3), &unit),
        ("zb-v", 32, 256, None, &unit),
        ("1f1b", 32, 256, None, &unit),
        ("zb-v", 8, 64, None, &tiny_w),
        ("dualpipe", 4, 8, None, &unit),
        ("chimera", 8, 16, None, &unit),
    ] {
        let (svg, at, timeline) = picture_at(name, p, m, v, cost);
        if cost.backward_weight < 0.1 {
            assert!(svg.contains(r#"class="run""#), "{name}: sub-pixel ops drawn as runs");
        }
        let pixmap = render(&svg);
        if let Ok(dir) = std::env::var("STP_PICTURES_PNG") {
            pixmap.save_png(format!("{dir}/{name}-p{p}-m{m}.png")).expect("the PNG is written");
        }
        let shares = coloured_shares(&pixmap, &at, timeline.ranks.len());
        for (rank, share) in timeline.ranks.iter().zip(shares) {
            let busy = rank.busy / timeline.makespan;
            // Pixels at the row's gaps round either way, and labelled boxes
            // keep a thin white outline.
            assert!(
                (share - busy).abs() <= 0.03,
                "{name} p={p} m={m} rank {}: {:.3} of the row coloured, busy {:.3}",
                rank.rank.0,
                share,
                busy
            );
        }
    }
}

#[test]
fn the_width_follows_the_makespan_and_a_time_axis_is_drawn() {
    let (small, small_at, _) = picture("1f1b", 2, 2, None);
    let (large, large_at, timeline) = picture("zb-v", 32, 256, None);
    assert_eq!(small_at.width, 1000.0, "a short step keeps the minimum width");
    // Six pixels for the shortest op (one time unit here).
    assert_eq!(large_at.width, 6.0 * timeline.makespan, "a makespan of {}", timeline.makespan);
    for svg in [&small, &large] {
        assert!(
            svg.contains(r#"class="axis""#) && svg.matches(r#"class="tick""#).count() >= 5,
            "a time axis with ticks"
        );
    }
}

#[test]
fn each_chunk_of_a_rank_has_its_own_shade() {
    let (svg, _, _) = picture("interleaved-1f1b", 4, 8, Some(3));
    for opacity in ["1.00", "0.70", "0.40"] {
        assert!(svg.contains(&format!(r#"fill-opacity="{opacity}""#)), "chunk shade {opacity}");
    }
}

/// With several pipelines and a reduction time, each rank's gradient
/// reductions are drawn after its compute, one box each, in pixels.
#[test]
fn gradient_reductions_are_drawn_when_they_take_time() {
    let cost = CostModel { reduce: 4.0, ..CostModel::default() };
    let (svg, at, timeline) = picture_at("chimera", 4, 4, None, &cost);
    assert_eq!(svg.matches(r#"class="reduce""#).count(), 8, "two per rank");
    assert!(svg.contains("gradient reduction"), "the legend names them");
    let pixmap = render(&svg);
    for (r, rank) in timeline.ranks.iter().enumerate() {
        let last =
            rank.spans.iter().filter(|s| s.stream == stp_ir::simulate::Stream::Comm).map(|s| s.end).fold(0.0, f64::max);
        let x = at.left + (last - 1.0) * at.width / timeline.makespan;
        let y = at.top + at.per_rank * r as f64 + at.row / 2.0;
        assert!(pixmap.pixel(x as u32, y as u32).is_some_and(coloured), "rank {r}: the last reduction is drawn");
    }
    let (plain, _, _) = picture("chimera", 4, 4, None);
    assert!(!plain.contains(r#"class="reduce""#), "free reductions take no room");
}
