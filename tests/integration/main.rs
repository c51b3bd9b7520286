//! Workspace-level integration tests, one binary (see tests/src/lib.rs for
//! the helpers). Each module owns one area.

mod compare;
mod configs;
mod conformance;
mod contract;
mod distributed;
mod formulas;
mod layers;
mod loader;
mod parity;
mod reliability;
mod run;
mod simulate;
mod slurm;
mod smartfrz;
mod statistics;
mod sweep;
mod template;
mod tensorboard;
