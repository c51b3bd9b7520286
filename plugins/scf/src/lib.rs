//! Plugin: FreezeOut SCF (scaled learning rates, cubic schedule).
//! The logic lives in `strategies/freezeout`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_freezeout::Scf);
