//! Plugin: linear CKA similarity.
//! The logic lives in `strategies/metrics`; this crate only exports it.

simfreeze_abi::export_metric!(simfreeze_metrics::Cka);
