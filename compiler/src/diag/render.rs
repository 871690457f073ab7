//! The one place that turns diagnostics into text (with ariadne).

use super::{Diagnostic, MAX_REPORTED};
use crate::syntax::span::SourceFile;
use ariadne::{Color, Config, IndexType, Label, Report, ReportKind, Source};

/// Renders `diagnostics` against `file`, at most [`MAX_REPORTED`] of them
/// followed by "and N more". With `color` false the output is plain text
/// (for snapshots and pipes).
pub fn render(diagnostics: &[Diagnostic], file: &SourceFile, color: bool) -> String {
    let mut out = String::new();
    for d in diagnostics.iter().take(MAX_REPORTED) {
        out.push_str(&render_one(d, file, color));
    }
    if diagnostics.len() > MAX_REPORTED {
        out.push_str(&format!("error: and {} more errors\n", diagnostics.len() - MAX_REPORTED));
    }
    out
}

fn render_one(d: &Diagnostic, file: &SourceFile, color: bool) -> String {
    let Some(primary) = d.primary_span() else {
        return render_without_location(d);
    };
    let name = file.name.as_str();
    let clamp = |r: std::ops::Range<usize>| r.start.min(file.text.len())..r.end.min(file.text.len());
    let mut report = Report::build(ReportKind::Error, (name, clamp(primary.range())))
        .with_config(Config::default().with_color(color).with_index_type(IndexType::Byte))
        .with_code(d.code)
        .with_message(&d.message);
    for (i, label) in d.labels.iter().enumerate() {
        let mut l = Label::new((name, clamp(label.span.range()))).with_message(&label.message).with_order(i as i32);
        if color {
            l = l.with_color(if i == 0 { Color::Red } else { Color::Blue });
        }
        report = report.with_label(l);
    }
    for note in &d.notes {
        report = report.with_note(note);
    }
    if let Some(help) = &d.help {
        report = report.with_help(help);
    }
    let mut buf = Vec::new();
    let written = report.finish().write((name, Source::from(file.text.as_str())), &mut buf);
    match written {
        Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => render_without_location(d),
    }
}

fn render_without_location(d: &Diagnostic) -> String {
    let mut out = format!("[{}] Error: {}\n", d.code, d.message);
    for note in &d.notes {
        out.push_str(&format!("  note: {note}\n"));
    }
    if let Some(help) = &d.help {
        out.push_str(&format!("  help: {help}\n"));
    }
    out
}
