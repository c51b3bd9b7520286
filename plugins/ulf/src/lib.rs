//! Plugin: FreezeOut ULF (unscaled learning rates, linear schedule).
//! The logic lives in `strategies/freezeout`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_freezeout::Ulf);
