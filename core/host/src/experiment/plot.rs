//! Charts for `simfreeze compare`: line, step and scatter plots written as
//! SVG by hand (small, diffable, no runtime dependency) and rasterised to
//! PNG with resvg for places that do not show SVG. Text in the PNG uses the
//! system's fonts (DejaVu Sans, installed by `scripts/setup.sh`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Straight segments between points.
    Line,
    /// Segments with a marker on every point.
    LineMarkers,
    /// A staircase: the value holds until the next point.
    Steps,
    /// Markers only, each labelled with the series name.
    Labelled,
    /// Markers only, small and light (individual seeds behind a mean).
    Faint,
}

/// One named series.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
    /// Drawing style.
    pub style: Style,
    /// Palette index (series of one policy share a colour).
    pub color: usize,
}

/// A chart with axes, ticks, a title and a legend.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The series.
    pub series: Vec<Series>,
    /// Horizontal reference lines `(y, label)`.
    pub h_lines: Vec<(f64, String)>,
    /// Vertical reference lines `(x, label)`.
    pub v_lines: Vec<(f64, String)>,
    /// Confidence intervals drawn as whiskers on both axes.
    pub error_bars: Vec<ErrorBar>,
}

/// A point's intervals on both axes, drawn as a cross of whiskers with
/// caps in its series' colour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorBar {
    /// The point.
    pub at: (f64, f64),
    /// The interval along x, if any.
    pub x: Option<(f64, f64)>,
    /// The interval along y, if any.
    pub y: Option<(f64, f64)>,
    /// Palette index.
    pub color: usize,
}

/// Matplotlib's tab10 palette, then the darker half of tab20b: a
/// comparison of up to 20 series (the regime proxy has 11 policies) gives
/// each its own colour.
const PALETTE: [&str; 20] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3",
    "#8ca252", "#bd9e39", "#ad494a", "#a55194",
];
const W: f64 = 760.0;
const H: f64 = 460.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 42.0;
const BOTTOM: f64 = 56.0;
const FONT: &str = "DejaVu Sans, Liberation Sans, Arial, sans-serif";

/// Tick positions covering `[lo, hi]` at a 1-2-5 step, about `n` of them.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let s = format!("{v:.decimals$}");
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    fn bounds(&self) -> ((f64, f64), (f64, f64)) {
        let pts = self.series.iter().flat_map(|s| s.points.iter().copied());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        let extra_y = self.h_lines.iter().map(|(y, _)| (f64::NAN, *y));
        let extra_x = self.v_lines.iter().map(|(x, _)| (*x, f64::NAN));
        let whiskers = self.error_bars.iter().flat_map(|e| {
            let (x, y) = e.at;
            let (x0, x1) = e.x.unwrap_or((x, x));
            let (y0, y1) = e.y.unwrap_or((y, y));
            [(x0, y0), (x1, y1)]
        });
        for (x, y) in pts.chain(extra_y).chain(extra_x).chain(whiskers) {
            if x.is_finite() {
                x0 = x0.min(x);
                x1 = x1.max(x);
            }
            if y.is_finite() {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        let pad = |a: f64, b: f64| {
            if a > b {
                (0.0, 1.0)
            } else if a == b {
                (a - 0.5, b + 0.5)
            } else {
                let p = 0.05 * (b - a);
                (a - p, b + p)
            }
        };
        (pad(x0, x1), pad(y0, y1))
    }

    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let ((x0, x1), (y0, y1)) = self.bounds();
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="{FONT}" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
        let xt = ticks(x0, x1, 7);
        let yt = ticks(y0, y1, 6);
        let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
        let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
        for x in &xt {
            let px = sx(*x);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                fmt_tick(*x, xstep)
            );
        }
        for y in &yt {
            let py = sy(*y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                py + 4.0,
                fmt_tick(*y, ystep)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 14.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        for (y, label) in &self.h_lines {
            let py = sy(*y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#555" stroke-dasharray="5 4"/><text x="{:.1}" y="{:.1}" fill="#555" font-size="11" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT + pw - 4.0,
                py - 4.0,
                esc(label)
            );
        }
        // The vertical lines' labels go at the foot of the plot, away from
        // the horizontal lines' (drawn at the right end, above their line:
        // the baseline's Δ = 0 sits near the top of an accuracy chart), or
        // at the top when a horizontal line runs along the foot.
        let foot = self.h_lines.iter().any(|(y, _)| sy(*y) > TOP + ph - 24.0);
        let label_y = if foot { TOP + 14.0 } else { TOP + ph - 4.0 };
        for (x, label) in &self.v_lines {
            let px = sx(*x);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="5 4"/><text x="{:.1}" y="{:.1}" fill="#555" font-size="11">{}</text>"##,
                TOP + ph,
                px + 4.0,
                label_y,
                esc(label)
            );
        }
        // Series, clipped to the plot area.
        let _ = writeln!(
            s,
            r#"<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/></clipPath><g clip-path="url(#plot)">"#
        );
        for se in &self.series {
            let c = PALETTE[se.color % PALETTE.len()];
            let pts: Vec<(f64, f64)> = se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|(x, y)| (sx(*x), sy(*y)))
                .collect();
            draw_series(&mut s, se, c, &pts);
        }
        draw_error_bars(&mut s, &self.error_bars, &sx, &sy);
        let _ = writeln!(s, "</g>");
        // Point labels, outside the clip: a label near the plot's edge
        // turns inwards instead of being cut (head-only sits at the right
        // edge of accuracy-speedup).
        for se in self.series.iter().filter(|s| s.style == Style::Labelled) {
            let c = PALETTE[se.color % PALETTE.len()];
            for (x, y) in se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
            {
                let (lx, ly, anchor) = label_at(sx(*x), sy(*y), &se.name);
                let _ = writeln!(
                    s,
                    r#"<text x="{lx:.1}" y="{ly:.1}" fill="{c}" text-anchor="{anchor}">{}</text>"#,
                    esc(&se.name)
                );
            }
        }
        // Legend: one entry per name (Faint series share their mean's).
        let mut seen = Vec::new();
        let mut ly = TOP + 8.0;
        for se in self.series.iter().filter(|s| s.style != Style::Faint) {
            if seen.contains(&se.name) {
                continue;
            }
            seen.push(se.name.clone());
            let c = PALETTE[se.color % PALETTE.len()];
            let lx = LEFT + pw + 14.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{:.1}" width="14" height="4" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly,
                lx + 20.0,
                ly + 6.0,
                esc(&se.name)
            );
            ly += 18.0;
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Each interval as whiskers with caps, in plot coordinates (`sx`, `sy`
/// map data to the plot).
fn draw_error_bars(
    s: &mut String,
    bars: &[ErrorBar],
    sx: &dyn Fn(f64) -> f64,
    sy: &dyn Fn(f64) -> f64,
) {
    for e in bars {
        let c = PALETTE[e.color % PALETTE.len()];
        let (px, py) = (sx(e.at.0), sy(e.at.1));
        if !(px.is_finite() && py.is_finite()) {
            continue;
        }
        let mut d = String::new();
        if let Some((lo, hi)) = e.x.filter(|(a, b)| a.is_finite() && b.is_finite()) {
            let (a, b) = (sx(lo), sx(hi));
            let _ = write!(
                d,
                "M{a:.1} {py:.1} H{b:.1} M{a:.1} {:.1} V{:.1} M{b:.1} {:.1} V{:.1} ",
                py - 3.0,
                py + 3.0,
                py - 3.0,
                py + 3.0
            );
        }
        if let Some((lo, hi)) = e.y.filter(|(a, b)| a.is_finite() && b.is_finite()) {
            let (a, b) = (sy(lo), sy(hi));
            let _ = write!(
                d,
                "M{px:.1} {a:.1} V{b:.1} M{:.1} {a:.1} H{:.1} M{:.1} {b:.1} H{:.1}",
                px - 3.0,
                px + 3.0,
                px - 3.0,
                px + 3.0
            );
        }
        if !d.is_empty() {
            let _ = writeln!(
                s,
                r#"<path class="ci" d="{}" fill="none" stroke="{c}" stroke-width="1.2" stroke-opacity="0.8"/>"#,
                d.trim_end()
            );
        }
    }
}

/// One series' marks (already in plot coordinates) in colour `c`.
fn draw_series(s: &mut String, se: &Series, c: &str, pts: &[(f64, f64)]) {
    match se.style {
        Style::Line | Style::LineMarkers | Style::Steps => {
            let mut d = String::new();
            for (i, (x, y)) in pts.iter().enumerate() {
                if i == 0 {
                    let _ = write!(d, "M{x:.1} {y:.1}");
                } else if se.style == Style::Steps {
                    let _ = write!(d, " H{x:.1} V{y:.1}");
                } else {
                    let _ = write!(d, " L{x:.1} {y:.1}");
                }
            }
            let _ = writeln!(
                s,
                r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="2"/>"#
            );
            if se.style == Style::LineMarkers {
                for (x, y) in pts {
                    let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
                }
            }
        }
        Style::Labelled | Style::Faint => {
            let (r, op) = if se.style == Style::Faint {
                (3.0, 0.35)
            } else {
                (5.5, 1.0)
            };
            // Labelled points get their text after the clipped series.
            for (x, y) in pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{c}" fill-opacity="{op}"/>"#
                );
            }
        }
    }
}

/// Width of `text` at the chart's 12 px font, a little over DejaVu Sans's
/// widest lower-case average (about 7 px a character).
fn text_width(text: &str) -> f64 {
    7.5 * text.chars().count() as f64
}

/// Where the label of a point at `(px, py)` (plot coordinates) goes: up
/// and to the right of it, or to its left (anchored at its end) when it
/// would run past the plot's right edge; below it when above would leave
/// the plot. Returns `(x, y, text-anchor)`.
fn label_at(px: f64, py: f64, text: &str) -> (f64, f64, &'static str) {
    let right_edge = W - RIGHT;
    let (x, anchor) = if px + 8.0 + text_width(text) <= right_edge {
        (px + 8.0, "start")
    } else {
        (px - 8.0, "end")
    };
    let y = if py - 6.0 - 12.0 < TOP {
        py + 16.0
    } else {
        py - 6.0
    };
    (x, y, anchor)
}

/// Rasterises an SVG document to a PNG at twice its size.
pub fn svg_to_png(svg: &str, png: &Path) -> Result<()> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options {
        font_family: "DejaVu Sans".into(),
        ..Default::default()
    };
    opt.fontdb_mut().load_system_fonts();
    if opt.fontdb.is_empty() {
        eprintln!(
            "warning: no system fonts found; {} has no text (install fonts-dejavu-core)",
            png.display()
        );
    }
    let tree = usvg::Tree::from_str(svg, &opt).context("rendering the chart")?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(2.0)
        .context("chart size")?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).context("chart size")?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(png)
        .with_context(|| format!("cannot write {}", png.display()))
}

/// Writes `<dir>/<stem>.svg` and `<dir>/<stem>.png`.
pub fn write(chart: &Chart, dir: &Path, stem: &str) -> Result<()> {
    let svg = chart.to_svg();
    let path = dir.join(format!("{stem}.svg"));
    std::fs::write(&path, &svg).with_context(|| format!("cannot write {}", path.display()))?;
    svg_to_png(&svg, &dir.join(format!("{stem}.png")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.93, 1.87, 6);
        assert!(t.iter().all(|v| (0.93..=1.87).contains(v)), "{t:?}");
        assert!(t.len() >= 3, "{t:?}");
        assert_eq!(fmt_tick(0.2, 0.1), "0.2");
        assert_eq!(fmt_tick(1500.0, 500.0), "1500");
    }

    /// A scatter of three labelled points, the last at the right edge of
    /// the plot (where `head-only` sits in accuracy-speedup).
    fn scatter(edge_label: &str) -> Chart {
        let point = |name: &str, x: f64, y: f64, color| Series {
            name: name.into(),
            points: vec![(x, y)],
            style: Style::Labelled,
            color,
        };
        Chart {
            series: vec![
                point("baseline", 1.0, 0.0, 0),
                point("atsf", 1.4, -0.5, 1),
                point(edge_label, 3.0, -4.0, 2),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_label_at_the_right_edge_is_drawn_whole_inside_the_chart() {
        let svg = scatter("head-only").to_svg();
        // The label is outside the clipped group, anchored at its end so
        // that it runs leftwards, into the plot.
        let clip_end = svg.find("</g>").unwrap();
        let at = svg.find(">head-only</text>").expect("the whole label");
        assert!(at > clip_end, "the label must not be clipped:\n{svg}");
        let line = svg[..at].rsplit('\n').next().unwrap();
        assert!(line.contains(r#"text-anchor="end""#), "{line}");
        let x: f64 = line
            .split(r#"x=""#)
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            x - text_width("head-only") >= LEFT && x <= W - RIGHT,
            "{line}"
        );
        // A label with room to its right stays there.
        let (x, _, anchor) = label_at(LEFT + 10.0, TOP + 100.0, "baseline");
        assert_eq!((x, anchor), (LEFT + 18.0, "start"));
        // A point at the top puts its label below it.
        let (_, y, _) = label_at(LEFT + 10.0, TOP + 2.0, "baseline");
        assert!(y > TOP + 2.0);

        // Rasterised, the whole label has far more ink than its first two
        // letters would (what clipping left of it). Skipped without fonts.
        let dir = tempfile::tempdir().unwrap();
        let ink = |label: &str| {
            let png = dir.path().join("s.png");
            svg_to_png(&scatter(label).to_svg(), &png).unwrap();
            let img = resvg::tiny_skia::Pixmap::load_png(&png).unwrap();
            // tab10's green (#2ca02c), the edge point's colour.
            img.pixels()
                .iter()
                .filter(|p| p.green() > 120 && p.red() < 120 && p.blue() < 120)
                .count()
        };
        let (none, two, whole) = (ink(""), ink("he"), ink("head-only"));
        if two > none {
            assert!(whole - none > 2 * (two - none), "{none} {two} {whole}");
        } else {
            eprintln!("no system fonts: the rasterised label was not checked");
        }
    }

    #[test]
    fn svg_and_png_are_written_and_png_has_ink() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "eta <per block>".into(),
            x_label: "step".into(),
            y_label: "eta".into(),
            series: vec![
                Series {
                    name: "block 0".into(),
                    points: vec![(0.0, 0.5), (100.0, 0.7), (200.0, 0.69)],
                    style: Style::LineMarkers,
                    color: 0,
                },
                Series {
                    name: "atsf".into(),
                    points: vec![(1.5, -0.2)],
                    style: Style::Labelled,
                    color: 1,
                },
            ],
            h_lines: vec![(0.6, "baseline".into())],
            v_lines: vec![],
            error_bars: vec![],
        };
        write(&chart, dir.path(), "c").unwrap();
        let svg = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        assert!(svg.contains("eta &lt;per block&gt;") && svg.contains("block 0"));
        let png = std::fs::read(dir.path().join("c.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let img = resvg::tiny_skia::Pixmap::load_png(dir.path().join("c.png")).unwrap();
        assert_eq!((img.width(), img.height()), (2 * W as u32, 2 * H as u32));
        let coloured = img.pixels().iter().filter(|p| p.red() != p.blue()).count();
        assert!(coloured > 100, "the series should be drawn in colour");
    }

    /// The `(x, y)` of the `<text>` that reads `label`.
    fn text_at(svg: &str, label: &str) -> (f64, f64) {
        let end = svg.find(&format!(">{label}</text>")).unwrap();
        let start = svg[..end].rfind("<text").unwrap();
        let attr = |name: &str| -> f64 {
            let tag = &svg[start..end];
            let i = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            tag[i..].split('"').next().unwrap().parse().unwrap()
        };
        (attr("x"), attr("y"))
    }

    #[test]
    fn the_baseline_label_and_the_band_labels_do_not_overlap() {
        // Δ = 0 at the top of the chart and a band line near its right
        // end: where the two labels used to share a corner.
        let chart = Chart {
            series: vec![Series {
                name: "p".into(),
                points: vec![(1.0, 0.0), (2.1, -3.0)],
                style: Style::Labelled,
                color: 1,
            }],
            h_lines: vec![(0.0, "baseline".into())],
            v_lines: vec![(2.0, "2x".into())],
            ..Default::default()
        };
        let svg = chart.to_svg();
        let (bx, by) = text_at(&svg, "baseline");
        let (vx, vy) = text_at(&svg, "2x");
        // "baseline" ends at bx (anchored at its end); "2x" starts at vx.
        let apart = (by - vy).abs() > 14.0 || vx > bx || vx + 20.0 < bx - 60.0;
        assert!(apart, "baseline at ({bx}, {by}), 2x at ({vx}, {vy})");
    }

    #[test]
    fn error_bars_span_their_intervals_and_widen_the_axes() {
        let bar = ErrorBar {
            at: (1.5, -0.5),
            x: Some((1.4, 1.6)),
            y: Some((-3.0, 2.0)),
            color: 1,
        };
        let chart = Chart {
            series: vec![Series {
                name: "p".into(),
                points: vec![(1.5, -0.5)],
                style: Style::Labelled,
                color: 1,
            }],
            error_bars: vec![bar],
            ..Default::default()
        };
        let ((x0, x1), (y0, y1)) = chart.bounds();
        assert!(x0 < 1.4 && x1 > 1.6 && y0 < -3.0 && y1 > 2.0);
        let svg = chart.to_svg();
        let path = svg
            .lines()
            .find(|l| l.contains(r#"class="ci""#))
            .expect("the whiskers are drawn");
        // Two whiskers, each with two caps: six sub-paths.
        assert_eq!(path.matches('M').count(), 6, "{path}");
        let only_y = Chart {
            error_bars: vec![ErrorBar { x: None, ..bar }],
            ..chart
        };
        let svg = only_y.to_svg();
        let path = svg.lines().find(|l| l.contains(r#"class="ci""#)).unwrap();
        assert_eq!(path.matches('M').count(), 3, "{path}");
    }
}
