//! The freezing rules of the field beside SimFreeze's own, each as its
//! papers and public code state it, within simfreeze's freezing contract:
//!
//! - [`LayerFreezing`]: Composer's linear schedule (Mosaic ML);
//! - [`PipeTransformer`]: PipeTransformer's geometric schedule and its
//!   dormant accumulated-gradient branch (He et al., ICML 2021);
//! - [`Egeria`]: Egeria's plasticity against a reference snapshot (Wang et
//!   al., EuroSys 2023; no public code);
//! - [`SmartFrz`]: SmartFRZ's attention predictor over weight snapshots
//!   (Li et al., ICLR 2023; no public code), trained on the source task.
//!
//! What was verified in public code, what was chosen where paper and code
//! are silent, and each deviation the contract forces: docs/policies.md.

mod egeria;
mod layer_freezing;
mod pipetransformer;
pub mod smartfrz;

pub use egeria::{relative_change, Egeria};
pub use layer_freezing::{composer_frozen, LayerFreezing};
pub use pipetransformer::{frozen_after, grad_branch_pick, PipeTransformer};
pub use smartfrz::SmartFrz;

/// Whether `step` (0-based) is the last step of an epoch.
fn ends_epoch(step: u64, steps_per_epoch: u64) -> bool {
    (step + 1) % steps_per_epoch.max(1) == 0
}

/// Whether `step` is the step before an epoch's last (when an observation
/// for the epoch's last step must be asked for).
fn before_epoch_end(step: u64, steps_per_epoch: u64) -> bool {
    let spe = steps_per_epoch.max(1);
    spe == 1 || (step + 2) % spe == 0
}
