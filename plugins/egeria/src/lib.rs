//! Plugin: Egeria, plasticity against a quantized reference snapshot.
//! The logic lives in `strategies/field`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_field::Egeria);
