//! timm's naming rules for a ViT's parameters: which block a name belongs
//! to (the stem with block 0), its layer id for layer-wise decay, and which
//! are exempt from weight decay.

use crate::model::Group;

/// The parameters timm's `group_matcher` puts in the stem.
const STEM: [&str; 5] = [
    "cls_token",
    "reg_token",
    "pos_embed",
    "patch_embed",
    "norm_pre",
];

fn in_stem(name: &str) -> bool {
    STEM.iter().any(|s| name.starts_with(s))
}

fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The group of a timm-named variable: `blocks.<i>.*` is block `i`, the
/// stem (patch and position embeddings, class and register tokens,
/// `norm_pre`) goes with block 0, everything else (final norm, `fc_norm`,
/// head) is never frozen.
pub fn group_of(name: &str) -> Group {
    match block_index(name) {
        Some(i) => Group::Block(i),
        None if in_stem(name) => Group::Block(0),
        None => Group::Head,
    }
}

/// timm's layer id for layer-wise learning-rate decay
/// (`param_groups_layer_decay` with the ViT's `group_matcher`): the stem
/// 0, block `i` `i + 1`, the final `norm` `depth` (with the last block),
/// `fc_norm` and the head `depth + 1`.
pub fn layer_id(name: &str, depth: usize) -> usize {
    match block_index(name) {
        Some(i) => i + 1,
        None if in_stem(name) => 0,
        None if name.starts_with("norm.") => depth,
        None => depth + 1,
    }
}

/// timm's `no_weight_decay` for the ViT: the position embedding and the
/// class and register tokens (one-dimensional parameters, biases included,
/// are excluded by the optimizer's own rule).
pub fn no_weight_decay(name: &str) -> bool {
    ["pos_embed", "cls_token", "reg_token"].contains(&name)
}
