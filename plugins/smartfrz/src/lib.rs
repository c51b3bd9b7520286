//! Plugin: SmartFRZ, an attention predictor over weight snapshots, with its
//! trained weights built in. The logic lives in `strategies/field`; this
//! crate only exports it.

simfreeze_abi::export_policy!(simfreeze_field::SmartFrz);
