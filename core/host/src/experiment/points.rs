//! Per-point statistics of one stage of a comparison, from the per-seed
//! rows: the paired Δ top-1 with its interval, verdict and margin reading,
//! the speedups as ratios on the log scale, and `points.csv`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::experiment::config::CompareConfig;
use crate::experiment::rows::Phase;
use crate::experiment::rows::{csv_field, Row};
use crate::experiment::stats::{mean_std, within_margin, Estimate, Ratio, Verdict};

/// One point (an arm: the baseline, head-only or a policy point) of one
/// stage, over its completed seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct PointStats {
    /// The stage.
    pub stage: Phase,
    /// Its label.
    pub label: String,
    /// Its front (the entry's label; the label itself for the references).
    pub family: String,
    /// Seeds tried (completed or failed).
    pub attempted: usize,
    /// Top-1 (%).
    pub top1: Option<Estimate>,
    /// The paired Δ top-1 (pp): the point minus the same seed's baseline.
    pub d_acc: Option<Estimate>,
    /// Compute speedup, observation charged.
    pub compute: Option<Ratio>,
    /// Compute speedup of training alone.
    pub train_compute: Option<Ratio>,
    /// Wall speedup against the same seed's baseline.
    pub wall: Option<Ratio>,
    /// Mean blocks that ran frozen by the end.
    pub frozen: Option<f64>,
    /// Mean steps that ran with a probe (the frontier block held frozen
    /// for one step to test it): speed that no committed freeze explains.
    pub probe_steps: Option<f64>,
    /// The Δ interval against 0 (none with one seed).
    pub verdict: Option<Verdict>,
    /// Whether the Δ interval's lower bound is at least `-margin_pp` (none
    /// with one seed).
    pub within: Option<bool>,
}

impl PointStats {
    /// Completed, paired seeds.
    pub fn n(&self) -> usize {
        self.d_acc.map_or(0, |e| e.n)
    }

    /// What the selection maximises: the Δ interval's lower bound, or the
    /// mean Δ with one seed.
    pub fn selection_key(&self) -> f64 {
        self.d_acc
            .map_or(f64::NEG_INFINITY, |e| e.ci.map_or(e.mean, |c| c.0))
    }
}

/// The statistics of `labels` (`(label, family)`) over the completed rows
/// of `stage`; a label none of whose runs completed still gets a row (no
/// estimates).
pub fn point_stats(
    cfg: &CompareConfig,
    rows: &[Row],
    stage: Phase,
    labels: &[(String, String)],
) -> Vec<PointStats> {
    labels
        .iter()
        .map(|(label, family)| {
            let mine: Vec<&Row> = rows
                .iter()
                .filter(|r| r.stage == stage && &r.policy == label)
                .collect();
            let attempted = mine
                .iter()
                .filter(|r| r.status == "completed" || r.status == "failed")
                .count();
            let ok: Vec<&Row> = mine
                .into_iter()
                .filter(|r| r.status == "completed")
                .collect();
            let col = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<f64> {
                ok.iter().filter_map(|r| f(r)).collect()
            };
            let d_acc = Estimate::of(&col(&|r| r.d_acc));
            let frozen = col(&|r| Some(r.frontier as f64));
            let probes = col(&|r| Some(r.probe_steps as f64));
            PointStats {
                stage,
                label: label.clone(),
                family: family.clone(),
                attempted,
                top1: Estimate::of(&col(&|r| r.top1)),
                d_acc,
                compute: Ratio::of(&col(&|r| Some(r.compute_speedup))),
                train_compute: Ratio::of(&col(&|r| Some(r.train_compute_speedup))),
                wall: Ratio::of(&col(&|r| r.wall_speedup)),
                frozen: (!frozen.is_empty()).then(|| mean_std(&frozen).0),
                probe_steps: (!probes.is_empty()).then(|| mean_std(&probes).0),
                verdict: d_acc.as_ref().and_then(Verdict::of),
                within: d_acc.as_ref().and_then(|e| within_margin(e, cfg.margin_pp)),
            }
        })
        .collect()
}

/// The header of `points.csv`.
pub const POINTS_HEADER: &str = "stage,label,family,n,top1_mean,d_acc_mean,d_acc_std,\
d_acc_ci_low,d_acc_ci_high,d_acc_half_width,verdict,within_margin,compute_speedup,\
compute_ci_low,compute_ci_high,train_compute_speedup,train_compute_ci_low,\
train_compute_ci_high,wall_speedup,wall_ci_low,wall_ci_high,frozen_blocks,probe_steps";

/// Writes `points.csv`: one row per point and stage (the baseline's Δ
/// columns empty: it is the reference), empty cells where there is
/// nothing to say (`n/a` in the tables: no interval with one seed).
pub fn write_points(dir: &Path, points: &[PointStats]) -> Result<()> {
    let f = |v: Option<f64>, d: usize| v.map_or(String::new(), |v| format!("{v:.d$}"));
    let mut s = format!("{POINTS_HEADER}\n");
    for p in points {
        let reference = p.label == "baseline";
        let d = p.d_acc.filter(|_| !reference);
        let ci = |r: Option<crate::experiment::stats::Ratio>| {
            (
                f(r.map(|r| r.mean), 4),
                f(r.and_then(|r| r.ci).map(|c| c.0), 4),
                f(r.and_then(|r| r.ci).map(|c| c.1), 4),
            )
        };
        let (c, c_lo, c_hi) = ci(p.compute);
        let (t, t_lo, t_hi) = ci(p.train_compute);
        let (w, w_lo, w_hi) = ci(p.wall);
        let fields = [
            p.stage.as_str().to_string(),
            csv_field(&p.label),
            csv_field(&p.family),
            p.top1.map_or(0, |e| e.n).to_string(),
            f(p.top1.map(|e| e.mean), 3),
            f(d.map(|e| e.mean), 3),
            f(d.map(|e| e.std), 3),
            f(d.and_then(|e| e.ci).map(|c| c.0), 3),
            f(d.and_then(|e| e.ci).map(|c| c.1), 3),
            f(d.and_then(|e| e.half_width()), 3),
            match (reference, p.verdict) {
                (true, _) => "reference".into(),
                (false, Some(v)) => v.as_str().into(),
                (false, None) => "n/a".into(),
            },
            match (reference, p.within) {
                (true, _) => String::new(),
                (false, Some(w)) => w.to_string(),
                (false, None) => "n/a".into(),
            },
            c,
            c_lo,
            c_hi,
            t,
            t_lo,
            t_hi,
            w,
            w_lo,
            w_hi,
            f(p.frozen, 2),
            f(p.probe_steps, 1),
        ];
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    fs::write(dir.join("points.csv"), s).context("cannot write points.csv")
}

/// `-0.35 [-1.20, +0.50]`, or `-0.35 [n/a]` without an interval.
pub fn fmt_delta(e: &Estimate) -> String {
    match e.ci {
        Some((lo, hi)) => format!("{:+.2} [{lo:+.2}, {hi:+.2}]", e.mean),
        None => format!("{:+.2} [n/a]", e.mean),
    }
}

/// `1.61x [1.55, 1.67]`, or `1.61x [n/a]` without an interval.
pub fn fmt_ratio(r: &Ratio) -> String {
    match r.ci {
        Some((lo, hi)) => format!("{:.2}x [{lo:.2}, {hi:.2}]", r.mean),
        None => format!("{:.2}x [n/a]", r.mean),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::rows::done_row;

    #[test]
    fn paired_deltas_give_intervals_verdicts_and_the_margin_reading() {
        let c: CompareConfig = parse_ron(r#"(seeds: [0, 1, 2], margin_pp: 0.5)"#, "c").unwrap();
        let mut rows = Vec::new();
        for (seed, d) in [(0, -0.1), (1, 0.1), (2, 0.0)] {
            rows.push(done_row("baseline", seed, 80.0, 1.0));
            let mut r = done_row("p", seed, 80.0 + d, 1.5 + 0.1 * seed as f64);
            r.d_acc = Some(d);
            r.train_compute_speedup = 1.6;
            rows.push(r);
        }
        let labels = [
            ("baseline".to_string(), "baseline".to_string()),
            ("p".to_string(), "p".to_string()),
        ];
        let s = point_stats(&c, &rows, Phase::Grid, &labels);
        let p = &s[1];
        assert_eq!((p.n(), p.attempted), (3, 3));
        let (lo, hi) = p.d_acc.unwrap().ci.unwrap();
        // t(0.975, 2) · 0.1 / √3 = 0.2484…
        assert!(
            (hi - 0.248_413_771).abs() < 1e-6 && (lo + hi).abs() < 1e-12,
            "{lo} {hi}"
        );
        assert_eq!(p.verdict, Some(Verdict::NoDifference));
        assert_eq!(p.within, Some(true));
        assert!((p.compute.unwrap().mean - (1.5f64 * 1.6 * 1.7).cbrt()).abs() < 1e-12);
        assert_eq!(p.train_compute.unwrap().mean, 1.6);
        assert_eq!(fmt_delta(&p.d_acc.unwrap()), "+0.00 [-0.25, +0.25]");
        let d = tempfile::tempdir().unwrap();
        write_points(d.path(), &s).unwrap();
        let csv = fs::read_to_string(d.path().join("points.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], POINTS_HEADER);
        assert!(
            lines[1].starts_with("grid,baseline,baseline,3,80.000,,,,,,reference,,"),
            "{csv}"
        );
        assert!(
            lines[2].starts_with(
                "grid,p,p,3,80.000,0.000,0.100,-0.248,0.248,0.248,no difference,true,1.5979,"
            ),
            "{csv}"
        );
        // One seed: no interval, no verdict, nothing invented.
        let one = point_stats(&c, &rows[..2], Phase::Grid, &labels);
        assert_eq!((one[1].verdict, one[1].within), (None, None));
        assert_eq!(fmt_delta(&one[1].d_acc.unwrap()), "-0.10 [n/a]");
        write_points(d.path(), &one).unwrap();
        let csv = fs::read_to_string(d.path().join("points.csv")).unwrap();
        assert!(csv.contains(",-0.100,0.000,,,,n/a,n/a,"), "{csv}");
    }
}
