//! The comparison's Markdown table: per point its seeds, the paired Δ
//! top-1 with its 95 % interval, verdict and margin reading, the speedups
//! with their intervals, the wall-time flag with its cause, the regime
//! verdict, the fronts, and where the figures come from. With a
//! confirmation, the headline is the confirmation's and the grid's table
//! follows, labelled as the selection it was.

use std::path::Path;

use crate::experiment::config::CompareConfig;
use crate::experiment::fronts::fronts_table;
use crate::experiment::points::{fmt_delta, fmt_ratio, point_stats, PointStats};
use crate::experiment::rows::Row;
use crate::experiment::stages::{stage_labels, Phase, Stages};
use crate::experiment::stats::{Estimate, Verdict};

/// The whole table: the headline stage, the regime, the fronts, the
/// selection (with a confirmation) and the provenance.
pub fn table(cfg: &CompareConfig, stages: &Stages, rows: &[Row]) -> String {
    let headline = Phase::headline(cfg);
    let mut t = String::new();
    match stage_labels(cfg, stages, headline) {
        Some(labels) => {
            let stats = point_stats(cfg, rows, headline, &labels);
            let heading = match headline {
                Phase::Confirm => format!(
                    "Confirmation: the selected points, the baseline and head-only run anew on \
                     seeds {} (not the seeds they were selected on)",
                    seeds_of(rows, Phase::Confirm)
                ),
                Phase::Grid => format!("Seeds {}", seeds_of(rows, Phase::Grid)),
            };
            t.push_str(&intro(cfg, &heading));
            t.push_str(&stage_table(cfg, &stats, rows, headline));
            if let Some(r) = regime(&stats, rows, headline) {
                t.push('\n');
                t.push_str(&r);
            }
            if has_grid(cfg) || headline == Phase::Confirm {
                t.push('\n');
                let name = match headline {
                    Phase::Confirm => "Fronts (confirmation)",
                    Phase::Grid => "Fronts",
                };
                t.push_str(&fronts_table(cfg, &stats, name));
            }
        }
        None => t.push_str(&intro(
            cfg,
            "Confirmation: not run yet (it waits for the selection below)",
        )),
    }
    if headline == Phase::Confirm {
        let labels = stage_labels(cfg, stages, Phase::Grid).unwrap_or_default();
        let stats = point_stats(cfg, rows, Phase::Grid, &labels);
        t.push_str(&format!(
            "\n### Selection (seeds {})\n\nEvery grid point on the seeds the confirmation's \
             points were picked on (per policy and band, the best lower bound of Δ). These \
             figures carry the pick's winner's curse: read the confirmation above.\n\n",
            seeds_of(rows, Phase::Grid)
        ));
        t.push_str(&stage_table(cfg, &stats, rows, Phase::Grid));
        if has_grid(cfg) {
            t.push('\n');
            t.push_str(&fronts_table(cfg, &stats, "Fronts (selection)"));
        }
    }
    if let Some(p) = provenance(rows) {
        t.push('\n');
        t.push_str(&p);
    }
    t
}

fn has_grid(cfg: &CompareConfig) -> bool {
    cfg.policies.iter().any(|e| !e.grid.is_empty())
}

/// The seeds of `stage`'s rows, in order of appearance.
fn seeds_of(rows: &[Row], stage: Phase) -> String {
    let mut seeds: Vec<u64> = Vec::new();
    for r in rows.iter().filter(|r| r.stage == stage) {
        if !seeds.contains(&r.seed) {
            seeds.push(r.seed);
        }
    }
    let s: Vec<String> = seeds.iter().map(u64::to_string).collect();
    s.join(", ")
}

fn intro(cfg: &CompareConfig, heading: &str) -> String {
    format!(
        "Fine-tuning on {} from {}. {heading}. Δ top-1: the policy minus the same seed's \
         baseline, mean with its 95 % Student-t interval over the n seeds ([n/a]: one seed, no \
         interval); verdict: that interval against 0; within {m} pp: its lower bound is at least \
         -{m} (non-inferiority). Speedups: geometric means over seeds with their 95 % \
         intervals; the compute speedup charges what the host computes for the policy's \
         observations, the training-only one does not. Wall speedup: baseline training seconds \
         over the policy's, same seed, evaluation excluded.{evaluated}\n\n",
        cfg.finetune
            .classes
            .as_ref()
            .map_or("all classes".to_string(), |c| format!("classes {c:?}")),
        match (&cfg.pretrain, &cfg.model.weights) {
            (Some(p), _) => format!(
                "a model pretrained on {}{}",
                p.classes
                    .as_ref()
                    .map_or("all classes".to_string(), |c| format!("classes {c:?}")),
                cfg.backbone.as_ref().map_or(String::new(), |b| format!(
                    " (the shipped backbone `{}`, sha256 {}…)",
                    b.path
                        .parent()
                        .and_then(Path::file_name)
                        .map_or(String::new(), |n| n.to_string_lossy().into()),
                    &b.sha256[..12.min(b.sha256.len())]
                ))
            ),
            (None, Some(w)) => w.display().to_string(),
            (None, None) => "scratch".into(),
        },
        m = cfg.margin_pp,
        evaluated = evaluated(cfg),
    )
}

/// How the top-1 was measured: on how many test images, and whether only
/// at the last epochs (`train.eval_last`).
fn evaluated(cfg: &CompareConfig) -> String {
    let images = cfg
        .finetune
        .eval_limit
        .map_or("every test image of these classes".to_string(), |n| {
            format!("the first {n} test images of these classes")
        });
    match cfg.finetune.train.eval_last {
        0 => format!(" Top-1 on {images}, evaluated after every epoch."),
        1 => format!(" Top-1 on {images}, evaluated after the last epoch only."),
        n => format!(" Top-1 on {images}, evaluated after the last {n} epochs only."),
    }
}

/// One stage's table with its wall-time footnote.
fn stage_table(cfg: &CompareConfig, stats: &[PointStats], rows: &[Row], stage: Phase) -> String {
    let depth = rows.iter().map(|r| r.freeze_step.len()).max().unwrap_or(0);
    let m = cfg.margin_pp;
    let mut t = format!(
        "| policy | n | top-1 (%) | Δ top-1 (pp) [95 % CI] | verdict | within {m} pp | compute \
         speedup [95 % CI] | training-only | wall speedup | frozen blocks | probe steps |\n\
         |---|---:|---:|---|---|---|---|---:|---:|---:|---:|\n"
    );
    let mut flags: Vec<(String, u64, Cause)> = Vec::new();
    for p in stats {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.stage == stage && r.policy == p.label && r.status == "completed")
            .collect();
        let causes: Vec<(u64, Cause)> = mine
            .iter()
            .filter_map(|r| {
                let base = rows.iter().find(|b| {
                    b.stage == stage
                        && b.seed == r.seed
                        && b.policy == "baseline"
                        && b.status == "completed"
                });
                wall_cause(r, base).map(|c| (r.seed, c))
            })
            .collect();
        flags.extend(causes.iter().map(|(s, c)| (p.label.clone(), *s, c.clone())));
        let reference = p.label == "baseline";
        let dash = || "—".to_string();
        let cells = [
            p.label.clone(),
            p.top1.map_or(0, |e| e.n).to_string(),
            p.top1.map_or("failed".into(), |e| fmt_top1(&e)),
            match (reference, p.d_acc) {
                (true, _) => dash(),
                (false, Some(d)) => fmt_delta(&d),
                (false, None) => "failed".into(),
            },
            match (reference, p.verdict) {
                (true, _) => dash(),
                (false, Some(v)) => v.as_str().into(),
                (false, None) => "n/a".into(),
            },
            match (reference, p.within) {
                (true, _) => dash(),
                (false, Some(true)) => "yes".into(),
                (false, Some(false)) => "no".into(),
                (false, None) => "n/a".into(),
            },
            p.compute.map_or(dash(), |r| fmt_ratio(&r)),
            p.train_compute
                .map_or(dash(), |r| format!("{:.2}x", r.mean)),
            p.wall.map_or(dash(), |r| format!("{:.2}x", r.mean))
                + if causes.is_empty() { "" } else { " †" },
            p.frozen.map_or(dash(), |f| format!("{f:.1} / {depth}")),
            p.probe_steps.map_or(dash(), |n| format!("{n:.0}")),
        ];
        t.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    if !flags.is_empty() {
        t.push_str(&footnote(&flags));
    }
    t
}

fn fmt_top1(e: &Estimate) -> String {
    match e.ci {
        Some((lo, hi)) => format!("{:.2} [{lo:.2}, {hi:.2}]", e.mean),
        None => format!("{:.2}", e.mean),
    }
}

/// Why a run's wall speedup is outside what the compute model explains.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The host's work for the policy's observations (seconds per step
    /// outside the training step, against the baseline's).
    Observation {
        /// The run's seconds per step outside the step.
        host: f64,
        /// The same seed's baseline's.
        baseline: f64,
    },
    /// Probe steps: a block held frozen for one step to test it.
    Probes(u64),
    /// Nothing the run knows about: most likely other work on the machine.
    Noise,
}

/// Whether a row's wall speedup is outside what the compute model and this
/// machine's kernels explain, and the cause the run knows of. A frozen
/// block saves somewhat more wall time than the model's 2 of 3 units on a
/// CPU (K = L measured at 3.4-3.6x against the model's 3x), never several
/// times more, except with the activation cache, which skips the frozen
/// prefix's forward as well: wall above compute is then expected and not
/// flagged. A policy that froze nothing saves nothing.
pub fn wall_cause(r: &Row, baseline: Option<&Row>) -> Option<Cause> {
    let wall = r.wall_speedup?;
    let ratio = wall / r.compute_speedup;
    let doubtful = if r.compute_speedup < 1.005 && r.frontier == 0 {
        (wall - 1.0).abs() > 0.10
    } else {
        !(0.75..=1.35).contains(&ratio)
    };
    if !doubtful || (ratio > 1.0 && r.cached) {
        return None;
    }
    let host = r.host_seconds_per_step.unwrap_or(0.0);
    let base = baseline
        .and_then(|b| b.host_seconds_per_step)
        .unwrap_or(0.0);
    let step = baseline.map_or(f64::NAN, |b| b.train_seconds / b.steps.max(1) as f64);
    // Observation explains a slow run when its extra host time per step is
    // a tenth of a baseline step or more.
    if ratio < 1.0 && r.observe_cost > 0.0 && host - base >= 0.1 * step {
        return Some(Cause::Observation {
            host,
            baseline: base,
        });
    }
    if ratio < 1.0 && r.probe_steps > 0 {
        return Some(Cause::Probes(r.probe_steps));
    }
    Some(Cause::Noise)
}

fn footnote(flags: &[(String, u64, Cause)]) -> String {
    let mut t = String::from(
        "\n† The wall speedup of a seed disagrees with its compute speedup beyond what this \
         machine's kernels explain (0.75x to 1.35x of it, or more than ±10 % for a policy that \
         froze nothing):\n",
    );
    let mut noise: Vec<String> = Vec::new();
    for (label, seed, cause) in flags {
        let why = match cause {
            Cause::Observation { host, baseline } => format!(
                "the policy's observations: {:.1} ms per step on the host outside the training \
                 step, against the baseline's {:.1} ms (the compute speedup charges their FLOPs; \
                 on this machine they cost more time than FLOPs say)",
                host * 1e3,
                baseline * 1e3
            ),
            Cause::Probes(n) => format!(
                "{n} probe steps (a block held frozen for one step to test it): the compute model \
                 counts them as frozen, the step's time may not fall as much"
            ),
            Cause::Noise => {
                noise.push(format!("{label} seed {seed}"));
                continue;
            }
        };
        t.push_str(&format!("- {label}, seed {seed}: {why}.\n"));
    }
    if !noise.is_empty() {
        t.push_str(&format!(
            "- {}: nothing these runs know of (no observation cost, no probes, no activation \
             cache): other work on the machine most likely slowed the run or its baseline; trust \
             the compute speedup, or rerun on a quiet machine.\n",
            noise.join(", ")
        ));
    }
    t
}

/// Which regime the proxy is in, read from intervals: head-only's paired Δ
/// (the paper's ImageNet-21k features: linear probing 2 to 7 points below
/// full fine-tuning) and the baseline's top-1 gain over its last epoch
/// (converged when its interval contains 0). Undecided where an interval
/// straddles a bound. None without a head-only row.
pub fn regime(stats: &[PointStats], rows: &[Row], stage: Phase) -> Option<String> {
    let head = stats
        .iter()
        .find(|p| p.label == crate::experiment::config::HEAD_ONLY)?;
    let gap = head.d_acc?;
    let gains: Vec<f64> = rows
        .iter()
        .filter(|r| r.stage == stage && r.policy == "baseline" && r.status == "completed")
        .filter_map(|r| r.last_epoch_gain)
        .collect();
    let gain = Estimate::of(&gains);
    let mut text = format!(
        "Regime: head-only (every block frozen from step 0: linear probing of the source \
         features) is {} pp from the baseline ({})",
        fmt_delta(&gap),
        Verdict::of(&gap).map_or("one seed, no verdict", Verdict::as_str)
    );
    if let Some(g) = &gain {
        text.push_str(&format!(
            "; the baseline gained {} pp over its last epoch",
            fmt_delta(g)
        ));
    }
    text.push_str(". ");
    let mut not = Vec::new();
    let mut open = Vec::new();
    match gap.ci {
        Some((_, hi)) if hi < -2.0 && gap.mean >= -7.0 => {}
        Some((lo, _)) if lo >= -2.0 => not.push(
            "the source features already solve the target (head-only's interval lies above -2 pp)",
        ),
        Some(_) if gap.mean < -7.0 => {
            not.push("the source features do not serve the target (head-only more than 7 pp below)")
        }
        Some(_) => open.push("head-only's interval straddles -2 pp"),
        None if gap.mean < -7.0 => {
            not.push("the source features do not serve the target (head-only more than 7 pp below)")
        }
        None if gap.mean > -2.0 => {
            not.push("the source features already solve the target (head-only within 2 pp)")
        }
        None => open.push("one seed gives no interval for head-only"),
    }
    match gain.and_then(|g| g.ci.map(|c| (g, c))) {
        Some((_, (lo, _))) if lo > 0.0 => {
            not.push("the baseline is still learning at its end (its last-epoch gain's interval lies above 0)")
        }
        Some(_) => {}
        None => match gain {
            Some(g) if g.mean >= 0.3 => {
                not.push("the baseline is still learning at its end (last-epoch gain >= 0.3 pp)")
            }
            Some(_) => {}
            None => open.push("no last-epoch gain (one epoch)"),
        },
    }
    if !not.is_empty() {
        text.push_str(&format!("Not the paper's regime: {}.\n", not.join("; ")));
    } else if !open.is_empty() {
        text.push_str(&format!(
            "Undecided whether this is the paper's regime: {}.\n",
            open.join("; ")
        ));
    } else {
        text.push_str(
            "This is the paper's regime (strong source features, a fine-tune that converges).\n",
        );
    }
    Some(text)
}

/// Where the figures come from: the starting checkpoint, the machine,
/// libtorch and the code, each distinct value once.
fn provenance(rows: &[Row]) -> Option<String> {
    let ps: Vec<&crate::run::records::Provenance> =
        rows.iter().filter_map(|r| r.provenance.as_ref()).collect();
    if ps.is_empty() {
        return None;
    }
    let distinct = |f: &dyn Fn(&crate::run::records::Provenance) -> String| -> String {
        let mut v: Vec<String> = Vec::new();
        for p in &ps {
            let x = f(p);
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v.join("; ")
    };
    Some(format!(
        "Provenance: started from weights sha256 {}; machine {}; libtorch {}; revision {}.\n",
        distinct(&|p| p
            .weights_sha256
            .clone()
            .unwrap_or_else(|| "none (from scratch)".into())),
        distinct(&|p| p.machine()),
        distinct(&|p| p.libtorch.clone()),
        distinct(&|p| p.revision.clone()),
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::config::HEAD_ONLY;
    use crate::experiment::rows::{done_row, failed_row};

    fn cfg(text: &str) -> CompareConfig {
        parse_ron(text, "c").unwrap()
    }

    fn stats_of(c: &CompareConfig, rows: &[Row]) -> Vec<PointStats> {
        let labels = stage_labels(c, &Stages::default(), Phase::Grid).unwrap();
        point_stats(c, rows, Phase::Grid, &labels)
    }

    #[test]
    fn the_regime_is_read_from_intervals() {
        let c = cfg("(seeds: [0, 1, 2])");
        let mut rows = Vec::new();
        for (seed, gap, gain) in [(0, -4.0, 0.1), (1, -4.5, -0.1), (2, -3.8, 0.0)] {
            let mut b = done_row("baseline", seed, 90.0, 1.0);
            b.last_epoch_gain = Some(gain);
            let mut h = done_row(HEAD_ONLY, seed, 90.0 + gap, 3.0);
            h.d_acc = Some(gap);
            rows.extend([b, h]);
        }
        let text = regime(&stats_of(&c, &rows), &rows, Phase::Grid).unwrap();
        assert!(
            text.contains("(worse)") && text.contains("This is the paper's regime"),
            "{text}"
        );
        // A head-only interval across -2 pp: undecided.
        for (r, gap) in rows
            .iter_mut()
            .filter(|r| r.policy == HEAD_ONLY)
            .zip([-0.5, -4.0, -2.5])
        {
            r.d_acc = Some(gap);
        }
        let text = regime(&stats_of(&c, &rows), &rows, Phase::Grid).unwrap();
        assert!(
            text.contains("Undecided") && text.contains("straddles -2 pp"),
            "{text}"
        );
        // A baseline still learning.
        for r in rows.iter_mut().filter(|r| r.policy == "baseline") {
            r.last_epoch_gain = Some(1.5 + r.seed as f64 * 0.1);
        }
        let text = regime(&stats_of(&c, &rows), &rows, Phase::Grid).unwrap();
        assert!(text.contains("still learning"), "{text}");
        let base: Vec<Row> = rows
            .into_iter()
            .filter(|r| r.policy == "baseline")
            .collect();
        let c = cfg("(seeds: [0, 1, 2], head_only: false)");
        assert!(regime(&stats_of(&c, &base), &base, Phase::Grid).is_none());
    }

    fn timed(label: &str, compute: f64, wall: f64) -> Row {
        Row {
            wall_speedup: Some(wall),
            compute_speedup: compute,
            train_compute_speedup: compute,
            frontier: usize::from(compute > 1.0),
            train_seconds: 10.0,
            steps: 100,
            host_seconds_per_step: Some(0.001),
            status: "completed".into(),
            ..failed_row(label, 0, PathBuf::new())
        }
    }

    #[test]
    fn wall_speedups_the_compute_model_cannot_explain_are_flagged_with_their_cause() {
        let base = timed("baseline", 1.0, 1.0);
        // A policy that froze nothing "sped up" by a slowed baseline.
        assert_eq!(
            wall_cause(&timed("p", 1.0, 2.34), Some(&base)),
            Some(Cause::Noise)
        );
        assert_eq!(wall_cause(&timed("p", 1.0, 1.04), Some(&base)), None);
        // Table 1 on the CPU: 1.85x compute, 2.08x wall: the kernels.
        assert_eq!(wall_cause(&timed("p", 1.85, 2.08), Some(&base)), None);
        // The quickstart under a concurrent build: 1.77x compute, 5.56x wall.
        assert_eq!(
            wall_cause(&timed("p", 1.77, 5.56), Some(&base)),
            Some(Cause::Noise)
        );
        // The same with the activation cache: expected, not flagged.
        let cached = Row {
            cached: true,
            ..timed("p", 3.0, 5.04)
        };
        assert_eq!(wall_cause(&cached, Some(&base)), None);
        // A policy that observes a lot: 1.20x compute, 0.88x wall, 76 ms
        // per step outside the step against the baseline's 1 ms.
        let observing = Row {
            observe_cost: 50.0,
            host_seconds_per_step: Some(0.076),
            ..timed("atsf", 1.20, 0.88)
        };
        let cause = wall_cause(&observing, Some(&base)).unwrap();
        assert!(matches!(cause, Cause::Observation { .. }), "{cause:?}");
        let probing = Row {
            probe_steps: 40,
            ..timed("p", 1.5, 1.0)
        };
        assert_eq!(wall_cause(&probing, Some(&base)), Some(Cause::Probes(40)));

        let c = cfg(r#"(policies: [(plugin: "atsf")], head_only: false)"#);
        let rows = [base.clone(), observing];
        let t = stage_table(&c, &stats_of(&c, &rows), &rows, Phase::Grid);
        assert!(
            t.contains("0.88x †") && t.contains("the policy's observations: 76.0 ms"),
            "{t}"
        );
        let calm = [base, timed("atsf", 1.77, 1.9)];
        assert!(!stage_table(&c, &stats_of(&c, &calm), &calm, Phase::Grid).contains('†'));
    }

    #[test]
    fn the_table_gives_n_intervals_verdicts_and_the_margin() {
        let c = cfg(r#"(seeds: [0, 1], head_only: false, policies: [(plugin: "ucf")])"#);
        let row = |p: &str, seed, top1: f64, d: f64, cs: f64| Row {
            top1: Some(top1),
            d_acc: Some(d),
            wall_speedup: Some(cs),
            compute_speedup: cs,
            train_compute_speedup: cs,
            frontier: 2,
            freeze_step: vec![Some(1), Some(2), None],
            ..done_row(p, seed, top1, cs)
        };
        let rows = vec![
            row("baseline", 0, 90.0, 0.0, 1.0),
            row("ucf", 0, 89.0, -1.0, 1.5),
            row("baseline", 1, 92.0, 0.0, 1.0),
            row("ucf", 1, 90.0, -2.0, 1.7),
        ];
        let t = table(&c, &Stages::default(), &rows);
        assert!(
            t.contains("| baseline | 2 | 91.00 [78.29, 103.71] | — | — | — |"),
            "{t}"
        );
        // Δ -1.5 ± t(0.975, 1) · 0.7071 / √2 = ±6.35.
        assert!(t.contains("| ucf | 2 | 89.50 [83.15, 95.85] | -1.50 [-7.85, +4.85] | no difference | no | 1.60x ["), "{t}");
        assert!(t.contains("2.0 / 3"), "{t}");
        assert!(t.contains("Seeds 0, 1"), "{t}");
    }
}
