//! Plugin: AutoFreeze, gradient-norm-change freezing.
//! The logic lives in `strategies/autofreeze`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_autofreeze::AutoFreeze);
