//! Plugin: ATSF, the SimFreeze paper's adaptive token-similarity freezing.
//! The logic lives in `strategies/atsf`; this crate only exports it.

simfreeze_abi::export_policy!(simfreeze_atsf::Atsf);
