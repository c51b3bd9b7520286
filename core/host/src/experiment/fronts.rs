//! Accuracy-speedup fronts over a grid's points: Pareto fronts, each
//! policy's point per speedup band (table) and the fronts chart, all from
//! one stage's per-point statistics.

use crate::experiment::config::CompareConfig;
use crate::experiment::plot::{Chart, ErrorBar, Series, Style};
use crate::experiment::points::{fmt_delta, PointStats};
use crate::experiment::stages::BANDS;

/// The non-dominated points of `(speedup, accuracy)`: none other is at
/// least as fast and more accurate, or faster and as accurate; sorted by
/// speedup.
pub fn pareto(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(s, a)| {
            !points
                .iter()
                .any(|&(s2, a2)| (s2 >= s && a2 > a) || (s2 > s && a2 >= a))
        })
        .collect();
    front.sort_by(|x, y| x.0.total_cmp(&y.0));
    front.dedup();
    front
}

/// The point's mean compute speedup (NaN without one).
fn speed(p: &PointStats) -> f64 {
    p.compute.map_or(f64::NAN, |c| c.mean)
}

/// One cell of the fronts table: among `pts` in band `band`, the point with
/// the best lower bound that is shown within the margin; else why none is.
fn band_cell(pts: &[&PointStats], band: f64, margin: f64) -> String {
    let inside: Vec<&&PointStats> = pts
        .iter()
        .filter(|p| speed(p) >= band && p.d_acc.is_some())
        .collect();
    let shown = inside
        .iter()
        .filter(|p| p.within == Some(true))
        .max_by(|a, b| {
            a.selection_key()
                .total_cmp(&b.selection_key())
                .then(speed(a).total_cmp(&speed(b)))
        });
    if let Some(p) = shown {
        let d = p.d_acc.expect("filtered");
        return format!("{} at {:.2}x ({})", fmt_delta(&d), speed(p), p.label);
    }
    let best = inside.iter().max_by(|a, b| {
        a.selection_key()
            .total_cmp(&b.selection_key())
            .then(speed(a).total_cmp(&speed(b)))
    });
    match best {
        Some(p) if p.within.is_none() => format!(
            "n/a (one seed: {} at {:.2}x)",
            fmt_delta(&p.d_acc.expect("filtered")),
            speed(p)
        ),
        Some(p) => format!(
            "none within {margin} pp (best: {} at {:.2}x)",
            fmt_delta(&p.d_acc.expect("filtered")),
            speed(p)
        ),
        None => {
            let fastest = pts.iter().map(|p| speed(p)).fold(f64::NAN, f64::max);
            if fastest.is_finite() {
                format!("none (fastest {fastest:.2}x)")
            } else {
                "none".into()
            }
        }
    }
}

/// Per policy and band (1.3x, 1.6x, 2.0x of mean compute speedup): the
/// point whose Δ top-1 interval has the best lower bound among those shown
/// within `margin_pp` of the baseline (not the best mean).
pub fn fronts_table(cfg: &CompareConfig, stats: &[PointStats], heading: &str) -> String {
    let m = cfg.margin_pp;
    let mut t = format!(
        "{heading}: per policy and band of mean compute speedup, the point whose Δ top-1 \
         interval has the best lower bound among those shown within {m} pp (lower bound \
         ≥ -{m}); Δ in pp with its 95 % interval\n\n\
         | policy | points | >= 1.3x | >= 1.6x | >= 2.0x |\n|---|---:|---|---|---|\n"
    );
    for family in cfg.families() {
        let pts: Vec<&PointStats> = stats.iter().filter(|p| p.family == family).collect();
        if pts.is_empty() {
            continue;
        }
        let cells: Vec<String> = BANDS.iter().map(|&b| band_cell(&pts, b, m)).collect();
        t.push_str(&format!(
            "| {family} | {} | {} |\n",
            pts.len(),
            cells.join(" | ")
        ));
    }
    t
}

/// Every point's mean Δ top-1 against its mean compute speedup with both
/// 95 % intervals as whiskers, each policy's Pareto front drawn through
/// its non-dominated means.
pub(super) fn fronts_chart(cfg: &CompareConfig, stats: &[PointStats], title: &str) -> Chart {
    let mut series = Vec::new();
    let mut error_bars = Vec::new();
    for (i, family) in cfg.families().into_iter().enumerate() {
        let color = i + 1;
        let mine: Vec<&PointStats> = stats
            .iter()
            .filter(|p| p.family == family && p.d_acc.is_some() && p.compute.is_some())
            .collect();
        if mine.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64)> = mine
            .iter()
            .map(|p| (speed(p), p.d_acc.map_or(f64::NAN, |d| d.mean)))
            .collect();
        for (p, at) in mine.iter().zip(&pts) {
            error_bars.push(ErrorBar {
                at: *at,
                x: p.compute.and_then(|c| c.ci),
                y: p.d_acc.and_then(|d| d.ci),
                color,
            });
        }
        series.push(Series {
            name: family.clone(),
            points: pts.clone(),
            style: Style::Faint,
            color,
        });
        series.push(Series {
            name: family,
            points: pareto(&pts),
            style: Style::LineMarkers,
            color,
        });
    }
    let v_lines: Vec<(f64, String)> = BANDS.iter().map(|s| (*s, format!("{s}x"))).collect();
    Chart {
        title: title.into(),
        x_label: "compute speedup over full fine-tuning (x, observation charged)".into(),
        y_label: "Δ top-1 vs baseline (pp), 95 % intervals".into(),
        series,
        h_lines: vec![(0.0, "baseline".into())],
        v_lines,
        error_bars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::points::point_stats;
    use crate::experiment::rows::{done_row, Row};
    use crate::experiment::stages::{stage_labels, Phase, Stages};

    fn cfg(text: &str) -> CompareConfig {
        parse_ron(text, "c").unwrap()
    }

    #[test]
    fn the_front_keeps_only_points_nothing_beats_in_both() {
        let pts = [
            (1.2, 90.0),
            (1.5, 89.0),
            (1.4, 88.0),
            (2.0, 85.0),
            (2.0, 84.0),
            (1.1, 89.5),
        ];
        assert_eq!(pareto(&pts), vec![(1.2, 90.0), (1.5, 89.0), (2.0, 85.0)]);
        assert_eq!(pareto(&[(1.0, 1.0), (1.0, 1.0)]), vec![(1.0, 1.0)]);
    }

    fn rows(label: &str, d: &[f64], speed: f64) -> Vec<Row> {
        let mut out = Vec::new();
        for (seed, d) in d.iter().enumerate() {
            out.push(done_row("baseline", seed as u64, 90.0, 1.0));
            let mut r = done_row(label, seed as u64, 90.0 + d, speed);
            r.d_acc = Some(*d);
            r.family = "slf".into();
            out.push(r);
        }
        out
    }

    #[test]
    fn fronts_report_the_best_lower_bound_shown_within_the_margin() {
        let c = cfg(r#"(seeds: [0, 1, 2], head_only: false,
            policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)", "(t0: 0.7)"])])"#);
        // The best mean, but too wide to be shown within 0.5 pp.
        let mut r = rows("slf (t0: 0.5)", &[1.5, -1.5, 1.2], 1.4);
        // Narrow, just within.
        r.extend(rows("slf (t0: 0.7)", &[-0.1, -0.2, -0.15], 1.35));
        // Fast, clearly worse.
        r.extend(rows("slf (t0: 0.3)", &[-2.0, -2.2, -2.1], 1.7));
        let labels = stage_labels(&c, &Stages::default(), Phase::Grid).unwrap();
        let stats = point_stats(&c, &r, Phase::Grid, &labels);
        let t = fronts_table(&c, &stats, "Fronts");
        let line = t.lines().find(|l| l.starts_with("| slf |")).unwrap();
        let cells: Vec<&str> = line.split(" | ").collect();
        assert!(
            cells[2].contains("(slf (t0: 0.7))") && cells[2].starts_with("-0.15 ["),
            "{line}"
        );
        assert!(
            cells[3].starts_with("none within 0.5 pp (best: -2.10"),
            "{line}"
        );
        assert!(cells[4].starts_with("none (fastest 1.70x)"), "{line}");
        let chart = fronts_chart(&c, &stats, "t");
        assert_eq!(chart.error_bars.len(), 3);
        assert!(chart
            .error_bars
            .iter()
            .all(|e| e.x.is_some() && e.y.is_some()));
        // One seed: no interval, nothing shown within the margin.
        let one = rows("slf (t0: 0.7)", &[-0.1], 1.35);
        let stats = point_stats(&c, &one, Phase::Grid, &labels);
        let t = fronts_table(&c, &stats, "Fronts");
        assert!(t.contains("n/a (one seed: -0.10 [n/a] at 1.35x)"), "{t}");
    }
}
