//! The models the trainer fine-tunes, behind one seam: [`PrefixModel`], a
//! stack of `depth()` blocks that can run its first `k` blocks frozen and
//! that declares which block each of its parameters belongs to (as timm's
//! `group_matcher` does), so the optimizer, the activation cache and the
//! engine never parse a model family's parameter names.
//!
//! - [`vit`]: the plain ViT under timm's names, with presets;
//! - [`weights`]: timm / Hugging Face / Google `.npz` checkpoints;
//! - [`precision`]: bf16 autocast (a small C++ shim).
//!
//! Invariant every implementation keeps (the freezing contract,
//! docs/architecture.md): the embedding belongs to block 0 and the final norm
//! and head to [`Group::Head`], which is never frozen; a frozen prefix runs
//! without autograd and its output is detached, so backward stops at the
//! first trainable block.

pub mod precision;
pub mod vit;
pub mod weights;

use tch::Tensor;

pub use vit::{Normalisation, Preset, Vit, VitConfig};

/// Output of a forward pass.
pub struct Forward {
    /// `[B, classes]`.
    pub logits: Tensor,
    /// The feature the head sees, `[B, D]`: the class token after the
    /// final norm, or the pooled patch tokens after `fc_norm` (what the
    /// policies observe as "class-token features").
    pub cls: Tensor,
}

/// Which block a parameter belongs to, for the optimizer and for freezing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Block `i` (the embedding counts as block 0).
    Block(usize),
    /// Final norm and head: never frozen.
    Head,
}

/// A model that runs with its first `k` blocks frozen.
///
/// Shapes: images `[B, C, H, W]`; a boundary (the output of some prefix of
/// blocks) `[B, T, D]` with `T = tokens()`; features `[B, D]`.
pub trait PrefixModel {
    /// Number of blocks L.
    fn depth(&self) -> usize;

    /// Width D of the features the head sees (and the policy observes).
    fn feature_dim(&self) -> i64;

    /// Tokens T of a boundary activation (what the activation cache stores).
    fn tokens(&self) -> i64;

    /// The group of the parameter called `name` in the model's var store.
    fn group_of(&self, name: &str) -> Group;

    /// The parameter's layer for layer-wise learning-rate decay, timm's
    /// convention: 0 for the embedding, `i + 1` for block `i`, up to
    /// `depth() + 1` for the head, whose learning rate is not decayed
    /// (a parameter gets `decay^(depth() + 1 - layer_id)`).
    fn layer_id(&self, name: &str) -> usize;

    /// Whether the parameter is exempt from weight decay beyond the
    /// optimizer's own rule (one-dimensional tensors and biases): position
    /// embeddings, class and register tokens (timm's `no_weight_decay`).
    fn no_weight_decay(&self, name: &str) -> bool;

    /// Logits and features, with the embedding and blocks `[0, frozen)` run
    /// without autograd (`frozen` may be `0..=L`).
    fn forward_frozen(&self, x: &Tensor, frozen: usize) -> Forward;

    /// The output of the embedding and blocks `[0, k)`, computed without
    /// autograd and detached.
    fn frozen_prefix(&self, x: &Tensor, k: usize) -> Tensor;

    /// Runs blocks `[from, to)` on a boundary without autograd.
    fn advance(&self, h: &Tensor, from: usize, to: usize) -> Tensor;

    /// Continues from `h`, the output of blocks `[0, start)`: blocks
    /// `[start, frozen)` without autograd, the rest with it, then the head.
    fn forward_from(&self, h: Tensor, start: usize, frozen: usize) -> Forward;

    /// Runs the embedding and every block on images `x` without autograd,
    /// handing each block's output `[B, T, D]` to `each(block, output)` in
    /// order (the policies' per-block observations).
    fn walk_blocks(&self, x: &Tensor, each: &mut dyn FnMut(usize, &Tensor));

    /// The token of a block output the head would pool, `[B, T, D] -> [B,
    /// D]`: the class token, or the mean of the patch tokens (registers
    /// and class token excluded) for an average-pooling model; no norm
    /// applied.
    fn block_token(&self, h: &Tensor) -> Tensor;
}

#[cfg(test)]
pub(crate) use vit::test_config;
