//! Plugin: mean row-wise cosine similarity (the paper's metric).
//! The logic lives in `strategies/metrics`; this crate only exports it.

simfreeze_abi::export_metric!(simfreeze_metrics::Cosine);
