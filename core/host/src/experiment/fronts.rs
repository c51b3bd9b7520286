//! Accuracy-speedup fronts over a grid's points: Pareto fronts, the best
//! accuracy at given speedups (table) and the fronts chart.

use crate::experiment::collect::Row;
use crate::experiment::config::CompareConfig;
use crate::experiment::plot::{Chart, Series, Style};
use crate::experiment::table::mean_std;

/// Compute speedups at which `fronts_table` reports each policy's best
/// accuracy.
pub const FRONT_SPEEDUPS: [f64; 3] = [1.3, 1.6, 2.0];

/// Mean compute speedup and mean top-1 of each point (over its completed
/// seeds), by family.
pub(super) fn point_means(cfg: &CompareConfig, rows: &[Row]) -> Vec<(String, String, f64, f64)> {
    let mut out = Vec::new();
    for p in cfg.points() {
        let ok: Vec<&Row> = rows
            .iter()
            .filter(|r| r.policy == p.label && r.status == "completed")
            .collect();
        let speed: Vec<f64> = ok.iter().map(|r| r.compute_speedup).collect();
        let top1: Vec<f64> = ok.iter().filter_map(|r| r.top1).collect();
        if !speed.is_empty() && !top1.is_empty() {
            out.push((p.family, p.label, mean_std(&speed).0, mean_std(&top1).0));
        }
    }
    out
}

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

/// Per policy: the best mean top-1 among its points whose mean compute
/// speedup reaches 1.3x, 1.6x and 2.0x.
pub fn fronts_table(cfg: &CompareConfig, rows: &[Row]) -> String {
    let means = point_means(cfg, rows);
    let mut t = String::from(
        "Fronts: each policy's best mean top-1 (%) over its points at a mean compute speedup of \
         at least\n\n| policy | points | >= 1.3x | >= 1.6x | >= 2.0x |\n|---|---:|---:|---:|---:|\n",
    );
    let mut families: Vec<String> = Vec::new();
    for (f, ..) in &means {
        if !families.contains(f) {
            families.push(f.clone());
        }
    }
    for family in families {
        let pts: Vec<(&str, f64, f64)> = means
            .iter()
            .filter(|m| m.0 == family)
            .map(|m| (m.1.as_str(), m.2, m.3))
            .collect();
        let cells: Vec<String> = FRONT_SPEEDUPS
            .iter()
            .map(|&at| {
                pts.iter()
                    .filter(|p| p.1 >= at)
                    .max_by(|a, b| a.2.total_cmp(&b.2))
                    .map_or("none".to_string(), |p| {
                        format!("{:.2} ({}, {:.2}x)", p.2, p.0, p.1)
                    })
            })
            .collect();
        t.push_str(&format!(
            "| {family} | {} | {} |\n",
            pts.len(),
            cells.join(" | ")
        ));
    }
    t
}

/// Every point's mean accuracy against its mean compute speedup, with each
/// policy's Pareto front drawn through its non-dominated points.
pub(super) fn fronts_chart(cfg: &CompareConfig, rows: &[Row]) -> Chart {
    let base: Vec<f64> = rows
        .iter()
        .filter(|r| r.policy == "baseline" && r.status == "completed")
        .filter_map(|r| r.top1)
        .collect();
    let base = if base.is_empty() {
        0.0
    } else {
        mean_std(&base).0
    };
    let means = point_means(cfg, rows);
    let mut series = Vec::new();
    for (color, e) in cfg.policies.iter().enumerate() {
        let family = e.label();
        let pts: Vec<(f64, f64)> = means
            .iter()
            .filter(|m| m.0 == family)
            .map(|m| (m.2, m.3 - base))
            .collect();
        if pts.is_empty() {
            continue;
        }
        series.push(Series {
            name: family.clone(),
            points: pts.clone(),
            style: Style::Faint,
            color: color + 1,
        });
        series.push(Series {
            name: family,
            points: pareto(&pts),
            style: Style::LineMarkers,
            color: color + 1,
        });
    }
    let v_lines: Vec<(f64, String)> = FRONT_SPEEDUPS
        .iter()
        .map(|s| (*s, format!("{s}x")))
        .collect();
    Chart {
        title: "Accuracy-speedup fronts (mean over seeds)".into(),
        x_label: "compute speedup over full fine-tuning (x)".into(),
        y_label: "Δ top-1 vs baseline (pp)".into(),
        series,
        h_lines: vec![(0.0, "baseline".into())],
        v_lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::collect::done_row;

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

    #[test]
    fn fronts_report_the_best_accuracy_at_each_speedup() {
        let c = cfg(
            r#"(seeds: [0, 1], policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.7)"])])"#,
        );
        let rows = vec![
            done_row("slf (t0: 0.3)", 0, 88.0, 1.7),
            done_row("slf (t0: 0.3)", 1, 86.0, 1.7),
            done_row("slf (t0: 0.7)", 0, 90.0, 1.35),
            done_row("slf (t0: 0.7)", 1, 92.0, 1.35),
        ];
        let t = fronts_table(&c, &rows);
        assert!(
            t.contains(
                "| slf | 2 | 91.00 (slf (t0: 0.7), 1.35x) | 87.00 (slf (t0: 0.3), 1.70x) | none |"
            ),
            "{t}"
        );
    }
}
