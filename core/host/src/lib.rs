//! # simfreeze: the trainer
//!
//! Fine-tunes Vision Transformers on libtorch while policy plugins, run by
//! [`simfreeze_runtime`], decide when to freeze which encoder block. The
//! modules are layers; each imports only from the layers listed before it
//! (docs/architecture.md has the picture and the rules):
//!
//! - [`error`]: errors shared across layers, how a run stops, exit codes;
//! - [`memory`]: the allocator setting every command runs with, peak RSS;
//! - [`stream`]: CUDA streams and events (the data path's side stream);
//! - [`model`]: the [`model::PrefixModel`] seam, the ViT, weight import,
//!   bf16 autocast;
//! - [`data`]: datasets, image files, augmentation;
//! - [`config`]: the RON configuration and `--set` overrides;
//! - [`engine`]: the [`engine::Engine`] seam (a step under a freeze state,
//!   evaluation, save/restore), the optimizer and the activation cache;
//! - [`observe`]: what a policy sees of a step: the host copies it asked
//!   for, contract 2's on-demand observations and their compute cost;
//! - [`plan`]: a configuration resolved into everything a run needs;
//! - [`run`]: the training loop, the run directory and its records,
//!   checkpoints;
//! - [`bench`]: step timing per frozen prefix, through the same engine;
//! - [`experiment`]: `simfreeze compare` and its plots;
//! - [`cli`]: the command line (the binary only calls [`cli::main`]).

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod memory;
pub mod model;
pub mod observe;
pub mod plan;
pub mod run;
pub mod stream;

pub use simfreeze_runtime as runtime;
