//! Hugging Face `ViTModel` / `ViTForImageClassification` and
//! `Dinov2Model` safetensors mapped onto timm's names: the encoder's prefix
//! found, separate q/k/v concatenated, the rest renamed.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::{err, take, WeightsError};

pub(super) fn from_hf(
    path: &Path,
    mut raw: BTreeMap<String, Tensor>,
) -> Result<(BTreeMap<String, Tensor>, Vec<String>), WeightsError> {
    // `ViTForImageClassification` prefixes the encoder with `vit.`;
    // `ViTModel` does not.
    // `ViTForImageClassification` and `Dinov2ForImageClassification`
    // prefix the encoder; the bare models do not.
    let pre = ["vit.", "dinov2."]
        .into_iter()
        .find(|p| raw.contains_key(&format!("{p}embeddings.cls_token")))
        .unwrap_or("");
    let width = raw
        .get(&format!("{pre}embeddings.cls_token"))
        .map_or(0, |t| *t.size().last().unwrap_or(&0));
    let mut unused = Vec::new();
    let mut out = BTreeMap::new();
    let mut put = |ours: &str, t: Tensor| {
        out.insert(ours.to_string(), t);
    };
    let e = format!("{pre}embeddings.");
    put("cls_token", take(path, &mut raw, &format!("{e}cls_token"))?);
    put(
        "pos_embed",
        take(path, &mut raw, &format!("{e}position_embeddings"))?,
    );
    for wb in ["weight", "bias"] {
        put(
            &format!("patch_embed.proj.{wb}"),
            take(
                path,
                &mut raw,
                &format!("{e}patch_embeddings.projection.{wb}"),
            )?,
        );
        put(
            &format!("norm.{wb}"),
            take(path, &mut raw, &format!("{pre}layernorm.{wb}"))?,
        );
        if let Some(t) = raw.remove(&format!("classifier.{wb}")) {
            // Dinov2ForImageClassification's classifier reads the class
            // token and the mean patch token side by side (2 x width): not
            // our head's input, so it is not loaded.
            if wb == "weight" && t.size().get(1) != Some(&width) || !unused.is_empty() {
                unused.push(format!("classifier.{wb}"));
            } else {
                put(&format!("head.{wb}"), t);
            }
        }
    }
    // ViT's and Dinov2's layers differ in their norms' and MLP's names,
    // and Dinov2 has LayerScale.
    let dinov2 = raw.contains_key(&format!("{pre}encoder.layer.0.norm1.weight"));
    let layer: &[(&str, &str)] = if dinov2 {
        &[
            ("norm1", "norm1"),
            ("attention.output.dense", "attn.proj"),
            ("norm2", "norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]
    } else {
        &[
            ("layernorm_before", "norm1"),
            ("attention.output.dense", "attn.proj"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ]
    };
    let first_norm = if dinov2 { "norm1" } else { "layernorm_before" };
    for i in 0.. {
        let l = format!("{pre}encoder.layer.{i}.");
        if !raw.contains_key(&format!("{l}{first_norm}.weight")) {
            break;
        }
        let b = format!("blocks.{i}.");
        for wb in ["weight", "bias"] {
            let qkv: Vec<Tensor> = ["query", "key", "value"]
                .iter()
                .map(|n| take(path, &mut raw, &format!("{l}attention.attention.{n}.{wb}")))
                .collect::<Result<_, _>>()?;
            put(&format!("{b}attn.qkv.{wb}"), Tensor::cat(&qkv, 0));
            for (theirs, ours) in layer {
                put(
                    &format!("{b}{ours}.{wb}"),
                    take(path, &mut raw, &format!("{l}{theirs}.{wb}"))?,
                );
            }
        }
        if dinov2 {
            for n in 1..=2 {
                put(
                    &format!("{b}ls{n}.gamma"),
                    take(path, &mut raw, &format!("{l}layer_scale{n}.lambda1"))?,
                );
            }
        }
    }
    // The pooler and Dinov2's mask token (for masked pre-training) have
    // no place in a classifier.
    let (mut ignored, unknown): (Vec<String>, Vec<String>) = raw.into_keys().partition(|k| {
        k.starts_with(&format!("{pre}pooler.")) || *k == format!("{pre}embeddings.mask_token")
    });
    ignored.extend(unused);
    if let Some(k) = unknown.first() {
        return Err(err(
            path,
            format!(
                "tensor `{k}` is not part of a Hugging Face ViT or Dinov2 model{}",
                if k.contains("register_tokens") {
                    " (Dinov2WithRegistersModel is not read: use timm's \
                     vit_base_patch14_reg4_dinov2 weights with that preset)"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok((out, ignored))
}
