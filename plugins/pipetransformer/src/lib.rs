//! Plugin: PipeTransformer, the geometric freezing schedule (or its gradient rule).
//! The logic lives in `strategies/field`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_field::PipeTransformer);
