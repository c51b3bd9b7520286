//! # simfreeze: the host
//!
//! Fine-tunes Vision Transformers on libtorch and lets separately compiled
//! plugins decide when to freeze which encoder block. Where things live:
//!
//! - [`plugin`]: finding, checking and loading policy/metric plugins;
//! - [`controller`]: the freezing contract, checked on every decision;
//! - [`driver`]: the per-step policy loop shared by trainer and simulator;
//! - [`simulate`]: synthetic observations for `simfreeze simulate`;
//! - [`model`]: the ViT (timm names) with frozen-prefix execution;
//! - [`weights`]: timm / Hugging Face / Google `.npz` checkpoints;
//! - [`data`]: Fashion-MNIST, synthetic data, subsets, deterministic order;
//! - [`images`]: ImageFolder, CUB-200-2011, NABirds, Stanford Dogs
//!   ([`matfile`] reads its MATLAB lists), JPEG/PNG decoding;
//! - [`precision`]: bf16 autocast (a small C++ shim);
//! - [`optim`]: per-block SGD with our own momentum state, cosine schedule
//!   (libtorch's fused SGD kernel, through a small C++ shim);
//! - [`memory`]: the allocator setting every command runs with, peak RSS;
//! - [`config`]: the RON run configuration and `--set` overrides;
//! - [`train`]: the training loop, run directories, `bench`;
//! - [`compare`]: `simfreeze compare`, baseline against policies, with
//!   [`plot`] for its charts;
//! - [`cli`]: the command line (the binary only calls [`cli::main`]).

pub mod cache;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod controller;
pub mod data;
pub mod driver;
pub mod images;
pub mod matfile;
pub mod memory;
pub mod model;
pub mod optim;
pub mod plot;
pub mod plugin;
pub mod precision;
pub mod simulate;
pub mod train;
pub mod weights;
