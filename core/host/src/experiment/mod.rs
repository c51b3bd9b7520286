//! Experiments built from runs: `simfreeze compare` (cached pretraining,
//! the baseline and every policy from one checkpoint, the table and
//! results), in parts you can see:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the experiment file, its grids expanded into points, the pretraining cache key |
//! | [`plan`] | the comparison as a plan of jobs: the experiment directory, the job list with stable indices, the locks |
//! | [`compare`] | the whole comparison in one process (or `--parallel` child processes), and its resume |
//! | [`job`] | one job: the pretraining, or one fine-tune (kept, resumed or started) |
//! | [`rows`] | `Row` (one fine-tune's result), its stage, the CSV helpers |
//! | [`collect`] | the rows read back from the runs of whatever finished, `results.csv`, the outputs |
//! | [`table`] | the Markdown table and the regime verdict |
//! | [`stats`] | paired differences, Student-t intervals, ratios on the log scale, verdicts |
//! | [`points`] | per-point statistics of one stage, `points.csv` |
//! | [`stages`] | the selection and confirmation, and the precision rounds, decided from results |
//! | [`fronts`] | Pareto fronts and each policy's point per speedup band |
//! | [`slurm`] | the plan as Slurm batch scripts: the pretraining, the fine-tunes' job array, the collect |
//! | [`charts`] | the comparison's charts, drawn by [`plot`] |
//!
//! Each fine-tune is an ordinary run (`crate::run`); this layer only
//! composes them.

pub mod charts;
pub mod collect;
pub mod compare;
pub mod config;
pub mod fronts;
pub mod job;
pub mod plan;
pub mod plot;
pub mod points;
pub mod rows;
pub mod slurm;
pub mod stages;
pub mod stats;
pub mod table;
