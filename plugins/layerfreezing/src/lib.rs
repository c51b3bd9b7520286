//! Plugin: Composer's LayerFreezing, a linear freezing schedule.
//! The logic lives in `strategies/field`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_field::LayerFreezing);
