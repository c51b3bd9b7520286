//! # simfreeze-runtime: the policy runtime
//!
//! Everything between a policy plugin and a training loop, with no libtorch
//! (it builds in seconds, so plugin crates can test against it):
//!
//! - [`loader`]: finding, checking and loading policy and metric plugins;
//! - [`contract`]: the freezing contract, checked on every decision;
//! - [`driver`]: the per-step policy loop shared by trainer and simulator;
//! - [`simulate`]: the synthetic world behind `simfreeze simulate`;
//! - [`testkit`]: the same, in-process, for a plugin crate's `cargo test`;
//! - [`conformance`]: the property suite every policy is held to
//!   (`simfreeze check`);
//! - [`observations`]: the observation stream a run records and a replay
//!   feeds a policy again;
//! - [`more`]: the owned buffers behind the on-demand observations
//!   (contract 2) and their synthetic values;
//! - [`rng`]: the deterministic generator of the simulator and the data order.
//!
//! Layers and seams: docs/architecture.md.

pub mod conformance;
pub mod contract;
pub mod driver;
pub mod loader;
pub mod more;
pub mod observations;
pub mod rng;
pub mod simulate;
pub mod testkit;
