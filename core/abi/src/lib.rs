//! # simfreeze-abi: the stable plugin interface of simfreeze
//!
//! Freezing policies and similarity metrics are separately compiled dynamic
//! libraries. This crate is the only thing host and plugins share: the
//! [`ffi`] types that cross the boundary (checked by `abi_stable` when a
//! plugin is loaded) and the [`sdk`] that lets a researcher write a policy in
//! ordinary Rust:
//!
//! ```
//! use simfreeze_abi::sdk::*;
//!
//! /// Freezes one more block every `every` steps.
//! struct EveryN { every: u64 }
//!
//! impl Policy for EveryN {
//!     fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
//!         let due = ((s.step + 1) / self.every) as usize;
//!         Ok(Decision::frontier(due.min(s.layers).max(s.frontier)))
//!     }
//!     fn save_state(&self) -> Result<Vec<u8>, PolicyError> { Ok(Vec::new()) }
//!     fn load_state(&mut self, _: &[u8]) -> Result<(), PolicyError> { Ok(()) }
//! }
//! ```
//!
//! The crate's version is the ABI version: a host loads plugins built against
//! the same `0.MINOR` (or a later compatible one) and refuses the rest with a
//! short message. It depends on `abi_stable` only: no tensors, no I/O.

pub mod ffi;
pub mod sdk;

pub use ffi::{ErrorKind, Needs, PluginKind};

/// The ABI version this crate defines (its package version).
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");
