//! The comparison's charts: every scalar a policy logs, the freeze
//! timeline, accuracy against speedup and the fronts.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::experiment::config::{labels, CompareConfig};
use crate::experiment::fronts::fronts_chart;
use crate::experiment::plot::{self, Chart, Series, Style};
use crate::experiment::points::PointStats;
use crate::experiment::rows::Phase;
use crate::experiment::rows::Row;
use crate::experiment::stats::mean_std;
use crate::run::dir::RunDir;
use crate::run::records::EventKind;

/// One chart's curves: a plain scalar's one curve under `None`, the
/// curves of `<name>.<block>` scalars under their block.
pub(super) type Curves = BTreeMap<Option<usize>, Vec<(f64, f64)>>;

/// Every scalar a run's policy logged (its `scalar` events), grouped into
/// one chart per name: `eta.0`, `eta.1`, ... (a name ending in `.<block>`)
/// are the curves of chart `eta`; `plasticity` is chart `plasticity` with
/// one curve. Points are (step, value); non-finite values are left out.
pub(super) fn scalar_curves(run_dir: &Path) -> Result<BTreeMap<String, Curves>> {
    let mut charts: BTreeMap<String, Curves> = BTreeMap::new();
    for event in RunDir::existing(run_dir).read_events()? {
        let EventKind::Scalar { name, value } = event.kind else {
            continue;
        };
        let (chart, block) = match name.rsplit_once('.') {
            Some((stem, b)) if !stem.is_empty() => match b.parse::<usize>() {
                Ok(b) => (stem.to_string(), Some(b)),
                Err(_) => (name, None),
            },
            _ => (name, None),
        };
        let curve = charts.entry(chart).or_default().entry(block).or_default();
        if value.is_finite() {
            curve.push((event.step as f64, value));
        }
    }
    // A scalar that was never finite has no curve to draw.
    for curves in charts.values_mut() {
        curves.retain(|_, points| !points.is_empty());
    }
    charts.retain(|_, curves| !curves.is_empty());
    Ok(charts)
}

/// The chart of one logged scalar `name` of `policy`'s run, and its file
/// stem (`<name>-<policy>`; `scalar-` in front of a name that would take
/// another chart's file).
pub(super) fn scalar_chart(policy: &str, seed: u64, name: &str, curves: Curves) -> (Chart, String) {
    let per_block = curves.keys().any(Option::is_some);
    let title = match per_block {
        true => format!("{policy}: {name} per block (seed {seed})"),
        false => format!("{policy}: {name} (seed {seed})"),
    };
    let y_label = match name {
        "eta" => "eta (mean similarity to the class memory)".to_string(),
        other => other.to_string(),
    };
    let series = curves
        .into_iter()
        .enumerate()
        .map(|(i, (block, points))| Series {
            name: block.map_or_else(|| name.to_string(), |b| format!("block {b}")),
            // Markers while they stay apart; a line for a per-step curve.
            style: match points.len() {
                0..=100 => Style::LineMarkers,
                _ => Style::Line,
            },
            points,
            color: block.unwrap_or(i),
        })
        .collect();
    let chart = Chart {
        title,
        x_label: "step".into(),
        y_label,
        series,
        ..Default::default()
    };
    let stem = format!("{}-{}", file_stem(name), file_stem(policy));
    let stem = match ["timeline", "accuracy-speedup", "fronts"].contains(&stem.as_str()) {
        true => format!("scalar-{stem}"),
        false => stem,
    };
    (chart, stem)
}

/// A label as part of a file name: letters, digits, `_`, `.` and `-`
/// kept, every other run of characters one `-` (`atsf (record_steps: 5)`
/// becomes `atsf-record_steps-5`).
pub(super) fn file_stem(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() || "_.-".contains(c) {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// The frontier over steps: a staircase from (0, 0) to the last step.
pub(super) fn frontier_steps(freeze_step: &[Option<u64>], steps: u64) -> Vec<(f64, f64)> {
    let mut at: Vec<u64> = freeze_step.iter().flatten().copied().collect();
    at.sort_unstable();
    let mut pts = vec![(0.0, 0.0)];
    for (i, s) in at.iter().enumerate() {
        pts.push((*s as f64, (i + 1) as f64));
    }
    pts.push((steps as f64, at.len() as f64));
    pts
}

/// The charts of the headline stage (the scalars, timeline and scatter of
/// its first seed and its points), its fronts, and with a confirmation the
/// selection's fronts (`fronts-selection`).
pub(super) fn plots(
    cfg: &CompareConfig,
    dir: &Path,
    rows: &[Row],
    points: &[PointStats],
) -> Result<()> {
    let stage = Phase::headline(cfg);
    let rows: Vec<Row> = rows.iter().filter(|r| r.stage == stage).cloned().collect();
    let Some(first_seed) = rows.first().map(|r| r.seed) else {
        return Ok(());
    };
    let labels = labels(cfg);
    let color = |label: &str| labels.iter().position(|l| l == label).unwrap_or(0);
    let done = |r: &&Row| r.status == "completed";
    // Every scalar each policy logs, one chart per name (ATSF's eta.N:
    // one curve per block).
    for r in rows.iter().filter(done).filter(|r| r.seed == first_seed) {
        for (name, curves) in scalar_curves(&r.run_dir)? {
            let (chart, stem) = scalar_chart(&r.policy, first_seed, &name, curves);
            plot::write(&chart, dir, &stem)?;
        }
    }
    let timeline = Chart {
        title: format!("Freeze timeline (seed {first_seed})"),
        x_label: "step".into(),
        y_label: "frozen blocks".into(),
        series: rows
            .iter()
            .filter(done)
            .filter(|r| r.seed == first_seed)
            .map(|r| Series {
                name: r.policy.clone(),
                points: frontier_steps(&r.freeze_step, r.steps),
                style: Style::Steps,
                color: color(&r.policy),
            })
            .collect(),
        ..Default::default()
    };
    plot::write(&timeline, dir, "timeline")?;
    let mut series = Vec::new();
    for label in &labels {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(done)
            .filter(|r| &r.policy == label)
            .filter_map(|r| Some((r.compute_speedup, r.d_acc?)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
        let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
        if pts.len() > 1 {
            series.push(Series {
                name: label.clone(),
                points: pts,
                style: Style::Faint,
                color: color(label),
            });
        }
        series.push(Series {
            name: label.clone(),
            points: vec![(mean_std(&xs).0, mean_std(&ys).0)],
            style: Style::Labelled,
            color: color(label),
        });
    }
    let scatter = Chart {
        title: "Accuracy against speedup".into(),
        x_label: "compute speedup over full fine-tuning (x)".into(),
        y_label: "Δ top-1 vs baseline (pp)".into(),
        series,
        h_lines: vec![(0.0, "baseline".into())],
        ..Default::default()
    };
    plot::write(&scatter, dir, "accuracy-speedup")?;
    let of =
        |s: Phase| -> Vec<PointStats> { points.iter().filter(|p| p.stage == s).cloned().collect() };
    if cfg.policies.iter().any(|e| !e.grid.is_empty()) || stage == Phase::Confirm {
        let title = match stage {
            Phase::Confirm => "Accuracy-speedup fronts (confirmation seeds, 95 % intervals)",
            Phase::Grid => "Accuracy-speedup fronts (means, 95 % intervals)",
        };
        plot::write(&fronts_chart(cfg, &of(stage), title), dir, "fronts")?;
    }
    if stage == Phase::Confirm && cfg.policies.iter().any(|e| !e.grid.is_empty()) {
        let title = "Selection: every grid point (selection seeds, 95 % intervals)";
        plot::write(
            &fronts_chart(cfg, &of(Phase::Grid), title),
            dir,
            "fronts-selection",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scalar_a_policy_logs_gets_a_chart() {
        let d = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":3,"event":"scalar","name":"eta.0","value":0.5}"#,
            r#"{"step":3,"event":"scalar","name":"eta.10","value":0.25}"#,
            r#"{"step":3,"event":"scalar","name":"plasticity","value":1.5}"#,
            r#"{"step":4,"event":"freeze","blocks":[0],"decided_at":3}"#,
            r#"{"step":4,"event":"scalar","name":"plasticity","value":null}"#,
            r#"{"step":5,"event":"scalar","name":"plasticity","value":1.0}"#,
            r#"{"step":5,"event":"scalar","name":"frozen","value":1.0}"#,
            r#"{"step":5,"event":"scalar","name":"v1.2.x","value":2.0}"#,
            r#"{"step":6,"event":"scalar","name":"nan_only","value":null}"#,
        ];
        std::fs::write(d.path().join("events.jsonl"), lines.join("\n")).unwrap();
        let charts = scalar_curves(d.path()).unwrap();
        let names: Vec<&str> = charts.keys().map(String::as_str).collect();
        assert_eq!(names, ["eta", "frozen", "plasticity", "v1.2.x"]);
        let blocks: Vec<Option<usize>> = charts["eta"].keys().copied().collect();
        assert_eq!(blocks, [Some(0), Some(10)]);
        // The NaN at step 4 is left out.
        assert_eq!(charts["plasticity"][&None], [(3.0, 1.5), (5.0, 1.0)]);

        let (chart, stem) =
            scalar_chart("my policy", 0, "plasticity", charts["plasticity"].clone());
        assert_eq!(stem, "plasticity-my-policy");
        assert_eq!(chart.series.len(), 1);
        assert_eq!(chart.series[0].name, "plasticity");
        let (chart, stem) = scalar_chart("atsf", 0, "eta", charts["eta"].clone());
        assert_eq!(stem, "eta-atsf");
        let names: Vec<&str> = chart.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["block 0", "block 10"]);
        // A name that would overwrite another chart's file does not.
        let (_, stem) = scalar_chart("speedup", 0, "accuracy", charts["frozen"].clone());
        assert_eq!(stem, "scalar-accuracy-speedup");
        for (name, curves) in charts {
            let (chart, stem) = scalar_chart("p", 0, &name, curves);
            plot::write(&chart, d.path(), &stem).unwrap();
        }
        for stem in ["eta-p", "frozen-p", "plasticity-p", "v1.2.x-p"] {
            assert!(d.path().join(format!("{stem}.png")).is_file(), "{stem}");
        }
    }

    #[test]
    fn grid_labels_become_plain_file_names() {
        assert_eq!(file_stem("atsf"), "atsf");
        assert_eq!(
            file_stem("atsf (record_steps: 5, history: Continuous)"),
            "atsf-record_steps-5-history-Continuous"
        );
    }

    #[test]
    fn frontier_is_a_staircase_to_the_last_step() {
        let pts = frontier_steps(&[Some(5), None, Some(3)], 10);
        assert_eq!(pts, vec![(0.0, 0.0), (3.0, 1.0), (5.0, 2.0), (10.0, 2.0)]);
    }
}
