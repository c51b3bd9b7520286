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
//! | [`collect`] | the rows read back from the runs of whatever finished, `results.csv`, the outputs |
//! | [`table`] | the Markdown table and the regime verdict |
//! | [`fronts`] | Pareto fronts over a grid's points |
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
pub mod slurm;
pub mod table;
