//! # simfreeze: the host
//!
//! Fine-tunes Vision Transformers on libtorch and lets separately compiled
//! plugins decide when to freeze which encoder block. Where things live:
//!
//! - [`plugin`]: finding, checking and loading policy/metric plugins;
//! - [`controller`]: the freezing contract, checked on every decision;
//! - [`driver`]: the per-step policy loop shared by trainer and simulator;
//! - [`simulate`]: synthetic observations for `simfreeze simulate`;
//! - [`cli`]: the command line (the binary only calls [`cli::main`]).

pub mod cli;
pub mod controller;
pub mod driver;
pub mod plugin;
pub mod simulate;
