//! Plugin: mean RBF similarity of aligned rows.
//! The logic lives in `strategies/metrics`; this crate only exports it.

simfreeze_abi::export_metric!(simfreeze_metrics::Rbf);
