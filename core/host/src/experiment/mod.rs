//! Experiments built from runs: [`compare`] (`simfreeze compare`: cached
//! pretraining, the baseline and every policy from one checkpoint, the
//! table and results) and [`plot`] (its SVG/PNG charts). Each fine-tune is
//! an ordinary run (`crate::run`); this layer only composes them.

pub mod compare;
pub mod plot;
