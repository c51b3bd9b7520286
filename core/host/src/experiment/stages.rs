//! The stages of a comparison beyond its grid, decided from results as
//! they come in, and kept in the experiment directory so that every
//! process (a `--job`, a `--collect`, a resumed comparison) sees the same
//! jobs at the same indices:
//!
//! - **the selection** (`selection.json`): with `confirm_seeds`, once the
//!   grid has run, each policy's point per speedup band, picked on the
//!   grid's seeds; the confirmation runs those points, the baseline and
//!   head-only on `confirm_seeds`, and the headline table comes from those
//!   runs only (the grid's figures carry the winner's curse of the pick);
//! - **the rounds** (`rounds.json`): with `precision_pp`, one seed more at
//!   a time for the headline stage's points whose interval is still wider
//!   than asked, until each is within it or has `max_seeds` seeds.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::UsageError;
use crate::experiment::config::{arms, CompareConfig, Point};
use crate::experiment::points::{point_stats, PointStats};
pub use crate::experiment::rows::Phase;
use crate::experiment::rows::Row;

/// The compute-speedup bands of the fronts and of the selection: a point
/// is in band `b` when its mean compute speedup is at least `b`.
pub const BANDS: [f64; 3] = [1.3, 1.6, 2.0];
/// The selection, in the experiment directory.
pub const SELECTION_FILE: &str = "selection.json";
/// The precision rounds, in the experiment directory.
pub const ROUNDS_FILE: &str = "rounds.json";

/// One policy's pick for one band.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    /// The policy (its entry's label).
    pub family: String,
    /// The band: the pick's mean compute speedup is at least this.
    pub band: f64,
    /// The picked point's label; none when no point reaches the band.
    pub point: Option<String>,
}

/// The selection: every policy's pick per band, from the grid's runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Selection {
    /// Family by family, band by band.
    pub picks: Vec<Pick>,
}

impl Selection {
    /// The pick of `family` in `band`.
    pub fn pick(&self, family: &str, band: f64) -> Option<&Pick> {
        self.picks
            .iter()
            .find(|p| p.family == family && p.band == band)
    }

    /// The distinct picked points' labels, in family then band order.
    pub fn points(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.picks {
            if let Some(l) = &p.point {
                if !out.contains(l) {
                    out.push(l.clone());
                }
            }
        }
        out
    }
}

/// One precision round: one more seed for the baseline and the points
/// whose interval is still too wide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// The round's seed.
    pub seed: u64,
    /// The arms it runs (the baseline first).
    pub labels: Vec<String>,
}

/// What has been decided beyond the grid.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stages {
    /// The selection, once made.
    pub selection: Option<Selection>,
    /// The precision rounds so far.
    pub rounds: Vec<Round>,
}

impl Stages {
    /// The stages decided in the experiment directory `exp` (none for a
    /// directory without them).
    pub fn load(exp: &Path) -> Result<Stages> {
        let read = |name: &str| -> Result<Option<String>> {
            let p = exp.join(name);
            match fs::read_to_string(&p) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
            }
        };
        let selection =
            match read(SELECTION_FILE)? {
                Some(t) => Some(serde_json::from_str(&t).with_context(|| {
                    format!("{} is damaged", exp.join(SELECTION_FILE).display())
                })?),
                None => None,
            };
        let rounds = match read(ROUNDS_FILE)? {
            Some(t) => serde_json::from_str(&t)
                .with_context(|| format!("{} is damaged", exp.join(ROUNDS_FILE).display()))?,
            None => Vec::new(),
        };
        Ok(Stages { selection, rounds })
    }

    /// Writes the selection (once) into `exp`.
    fn save_selection(exp: &Path, s: &Selection) -> Result<()> {
        write_atomic(exp, SELECTION_FILE, &serde_json::to_string_pretty(s)?)
    }

    /// Writes the rounds into `exp`.
    fn save_rounds(exp: &Path, rounds: &[Round]) -> Result<()> {
        write_atomic(exp, ROUNDS_FILE, &serde_json::to_string_pretty(rounds)?)
    }

    /// Every seed any stage has used so far.
    fn seeds_used(&self, cfg: &CompareConfig) -> Vec<u64> {
        let mut v = cfg.seeds.clone();
        v.extend(cfg.confirm_seeds.iter().flatten());
        v.extend(self.rounds.iter().map(|r| r.seed));
        v
    }
}

fn write_atomic(exp: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = exp.join(format!("{name}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, exp.join(name)).with_context(|| format!("cannot write {name}"))?;
    Ok(())
}

/// The arm labelled `label` (a reference or a point of `cfg`).
pub fn arm(cfg: &CompareConfig, label: &str) -> Option<Point> {
    arms(cfg).into_iter().find(|a| a.label == label)
}

/// Picks every policy's point per band from the grid's statistics: among
/// its points whose mean compute speedup reaches the band, the one with the
/// highest lower bound of its Δ top-1 interval (the highest mean Δ when the
/// grid has one seed), the faster on a tie. Refuses a policy that has no
/// point in any band, naming it.
pub fn select(cfg: &CompareConfig, grid: &[PointStats]) -> Result<Selection, UsageError> {
    let mut picks = Vec::new();
    for family in cfg.families() {
        let mine: Vec<&PointStats> = grid.iter().filter(|p| p.family == family).collect();
        let speed = |p: &PointStats| p.compute.map_or(f64::NAN, |c| c.mean);
        let mut any = false;
        for band in BANDS {
            let best = mine
                .iter()
                .filter(|p| speed(p) >= band && p.d_acc.is_some())
                .max_by(|a, b| {
                    a.selection_key()
                        .total_cmp(&b.selection_key())
                        .then(speed(a).total_cmp(&speed(b)))
                });
            any |= best.is_some();
            picks.push(Pick {
                family: family.clone(),
                band,
                point: best.map(|p| p.label.clone()),
            });
        }
        if !any {
            let fastest = mine
                .iter()
                .filter(|p| speed(p).is_finite())
                .max_by(|a, b| speed(a).total_cmp(&speed(b)));
            return Err(UsageError(format!(
                "policy `{family}` has no point at a mean compute speedup of {}x or more{}, so \
                 the confirmation has nothing of it to confirm: add a faster point to its grid, \
                 or remove it from this comparison",
                BANDS[0],
                match fastest {
                    Some(p) => format!(" (its fastest: `{}` at {:.2}x)", p.label, speed(p)),
                    None => " (none of its runs completed)".into(),
                }
            )));
        }
    }
    Ok(Selection { picks })
}

/// The next precision round of the headline stage, when `precision_pp` is
/// set and some point's interval is wider than it with fewer than
/// `max_seeds` seeds tried; none when every point is done.
pub fn next_round(cfg: &CompareConfig, stages: &Stages, rows: &[Row]) -> Option<Round> {
    let x = cfg.precision_pp?;
    let stage = Phase::headline(cfg);
    let labels = stage_labels(cfg, stages, stage)?;
    let stats = point_stats(cfg, rows, stage, &labels);
    let wanting: Vec<String> = stats
        .iter()
        .filter(|p| p.label != "baseline")
        .filter(|p| p.attempted < cfg.seed_cap())
        .filter(|p| !p.d_acc.and_then(|e| e.half_width()).is_some_and(|h| h <= x))
        .map(|p| p.label.clone())
        .collect();
    if wanting.is_empty() {
        return None;
    }
    let used = stages.seeds_used(cfg);
    let seed = used.iter().max().map_or(0, |m| m + 1);
    let mut labels = vec!["baseline".to_string()];
    labels.extend(wanting);
    Some(Round { seed, labels })
}

/// The arms of `stage`, as `(label, family)` in table order: every arm for
/// the grid; the baseline, head-only and the selected points for the
/// confirmation (none before the selection).
pub fn stage_labels(
    cfg: &CompareConfig,
    stages: &Stages,
    stage: Phase,
) -> Option<Vec<(String, String)>> {
    let all: Vec<(String, String)> = arms(cfg).into_iter().map(|a| (a.label, a.family)).collect();
    match stage {
        Phase::Grid => Some(all),
        Phase::Confirm => {
            let picked = stages.selection.as_ref()?.points();
            Some(
                all.into_iter()
                    .filter(|(l, f)| (l == f && !cfg.families().contains(f)) || picked.contains(l))
                    .collect(),
            )
        }
    }
}

/// What advancing the experiment decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Advanced {
    /// Nothing new: the experiment is complete, or waits for its jobs.
    Nothing,
    /// The selection was made: the confirmation's jobs can run.
    Selected(Selection),
    /// A precision round was added.
    Round(Round),
}

/// Decides the next stage of the experiment in `exp` from its `rows`: the
/// selection once every grid job has ended, then a precision round once
/// every job has (`all_ended`). Writes what it decides.
pub fn advance(cfg: &CompareConfig, exp: &Path, rows: &[Row], all_ended: bool) -> Result<Advanced> {
    let mut stages = Stages::load(exp)?;
    let grid_ended = rows
        .iter()
        .filter(|r| r.stage == Phase::Grid)
        .all(|r| r.status == "completed" || r.status == "failed");
    if cfg.confirm_seeds.is_some() && stages.selection.is_none() {
        if !grid_ended {
            return Ok(Advanced::Nothing);
        }
        let labels = stage_labels(cfg, &stages, Phase::Grid).unwrap_or_default();
        let grid = point_stats(cfg, rows, Phase::Grid, &labels);
        let selection = select(cfg, &grid)?;
        Stages::save_selection(exp, &selection)?;
        return Ok(Advanced::Selected(selection));
    }
    if !all_ended {
        return Ok(Advanced::Nothing);
    }
    match next_round(cfg, &stages, rows) {
        Some(round) => {
            stages.rounds.push(round.clone());
            Stages::save_rounds(exp, &stages.rounds)?;
            Ok(Advanced::Round(round))
        }
        None => Ok(Advanced::Nothing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_ron;
    use crate::experiment::rows::done_row;

    fn cfg(text: &str) -> CompareConfig {
        let c: CompareConfig = parse_ron(text, "c").unwrap();
        c.validate().unwrap();
        c
    }

    /// Rows of `label` on `seeds` with paired Δ `d` and compute speedup
    /// `speed`, and the baseline's.
    fn rows(label: &str, seeds: &[u64], d: &[f64], speed: f64, stage: Phase) -> Vec<Row> {
        let mut out = Vec::new();
        for (s, d) in seeds.iter().zip(d) {
            let mut b = done_row("baseline", *s, 80.0, 1.0);
            b.stage = stage;
            let mut r = done_row(label, *s, 80.0 + d, speed);
            r.d_acc = Some(*d);
            r.stage = stage;
            r.family = label.split(' ').next().unwrap_or(label).into();
            out.push(b);
            out.push(r);
        }
        out
    }

    #[test]
    fn the_selection_picks_the_best_lower_bound_per_band_and_refuses_a_policy_without_one() {
        let c = cfg(
            r#"(seeds: [0, 1, 2], confirm_seeds: Some([3, 4]), head_only: false,
            policies: [(plugin: "slf", grid: ["(t0: 0.3)", "(t0: 0.5)", "(t0: 0.7)"])])"#,
        );
        let mut r = rows(
            "slf (t0: 0.3)",
            &[0, 1, 2],
            &[-2.0, -1.0, -1.5],
            1.7,
            Phase::Grid,
        );
        // A better mean but a wider interval: not picked for 1.3x.
        r.extend(rows(
            "slf (t0: 0.5)",
            &[0, 1, 2],
            &[1.0, -2.0, 0.5],
            1.45,
            Phase::Grid,
        ));
        r.extend(rows(
            "slf (t0: 0.7)",
            &[0, 1, 2],
            &[-0.2, -0.1, -0.3],
            1.35,
            Phase::Grid,
        ));
        let labels = stage_labels(&c, &Stages::default(), Phase::Grid).unwrap();
        let s = select(&c, &point_stats(&c, &r, Phase::Grid, &labels)).unwrap();
        let pick = |b| s.pick("slf", b).unwrap().point.clone();
        assert_eq!(pick(1.3).as_deref(), Some("slf (t0: 0.7)"));
        assert_eq!(pick(1.6).as_deref(), Some("slf (t0: 0.3)"));
        assert_eq!(pick(2.0), None);
        assert_eq!(s.points(), ["slf (t0: 0.7)", "slf (t0: 0.3)"]);
        let confirm = stage_labels(
            &c,
            &Stages {
                selection: Some(s),
                rounds: vec![],
            },
            Phase::Confirm,
        )
        .unwrap();
        let names: Vec<&str> = confirm.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(names, ["baseline", "slf (t0: 0.3)", "slf (t0: 0.7)"]);

        let slow = rows(
            "slf (t0: 0.7)",
            &[0, 1, 2],
            &[0.0, 0.1, 0.0],
            1.2,
            Phase::Grid,
        );
        let e = select(&c, &point_stats(&c, &slow, Phase::Grid, &labels))
            .unwrap_err()
            .0;
        assert!(
            e.contains("policy `slf` has no point") && e.contains("1.20x"),
            "{e}"
        );
    }

    #[test]
    fn precision_rounds_add_seeds_until_the_half_width_or_the_cap() {
        let c = cfg(
            r#"(seeds: [0, 1], precision_pp: Some(0.5), max_seeds: Some(4),
            head_only: false, policies: [(plugin: "ucf")])"#,
        );
        let stages = Stages::default();
        // Wide: Δ -1 and +1 over two seeds.
        let wide = rows("ucf", &[0, 1], &[-1.0, 1.0], 1.5, Phase::Grid);
        let r = next_round(&c, &stages, &wide).unwrap();
        assert_eq!(
            r,
            Round {
                seed: 2,
                labels: vec!["baseline".into(), "ucf".into()]
            }
        );
        // Narrow enough: no round.
        let narrow = rows("ucf", &[0, 1, 2], &[-0.30, -0.32, -0.31], 1.5, Phase::Grid);
        assert!(next_round(&c, &stages, &narrow).is_none());
        // Still wide at the cap: no round either.
        let capped = rows(
            "ucf",
            &[0, 1, 2, 3],
            &[-1.0, 1.0, -1.0, 1.0],
            1.5,
            Phase::Grid,
        );
        let stages = Stages {
            selection: None,
            rounds: vec![
                Round {
                    seed: 2,
                    labels: vec![],
                },
                Round {
                    seed: 3,
                    labels: vec![],
                },
            ],
        };
        assert!(next_round(&c, &stages, &capped).is_none());
        // One seed has no interval: it always wants another.
        let one = rows("ucf", &[0], &[0.0], 1.5, Phase::Grid);
        let c1 = cfg(r#"(seeds: [0], precision_pp: Some(0.5), head_only: false,
            policies: [(plugin: "ucf")])"#);
        assert_eq!(next_round(&c1, &Stages::default(), &one).unwrap().seed, 1);
    }
}
