//! Google's `.npz` ViT checkpoints (the original release and big_vision's)
//! mapped onto timm's names, kernels transposed as timm's `_n2p` does.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::{err, take, Checkpoint, Format, WeightsError};

/// Google's `_n2p` with transposition: kernels are stored input-major.
fn n2p(t: Tensor) -> Tensor {
    let s = t.size();
    let t = if s.len() == 4 && s[0] == 1 && s[1] == 1 && s[2] == 1 {
        t.flatten(0, -1)
    } else {
        t
    };
    match t.dim() {
        4 => t.permute([3, 2, 0, 1]),
        3 => t.permute([2, 0, 1]),
        2 => t.tr(),
        _ => t,
    }
    .contiguous()
}

pub(super) fn from_npz(
    path: &Path,
    mut raw: BTreeMap<String, Tensor>,
) -> Result<Checkpoint, WeightsError> {
    let prefix = ["", "opt/target/", "params/", "params/img/"]
        .into_iter()
        .find(|p| raw.contains_key(&format!("{p}embedding/kernel")))
        .ok_or_else(|| err(path, "no `embedding/kernel`: not a ViT .npz checkpoint"))?;
    let big_vision = prefix.starts_with("params/")
        || raw.contains_key(&format!("{prefix}pos_embedding"))
        || raw.contains_key(&format!(
            "{prefix}Transformer/encoderblock/LayerNorm_0/scale"
        ));
    let mut out = BTreeMap::new();
    let k =
        |raw: &mut BTreeMap<String, Tensor>, key: &str| take(path, raw, &format!("{prefix}{key}"));
    out.insert(
        "patch_embed.proj.weight".to_string(),
        n2p(k(&mut raw, "embedding/kernel")?),
    );
    out.insert(
        "patch_embed.proj.bias".to_string(),
        k(&mut raw, "embedding/bias")?,
    );
    out.insert("cls_token".to_string(), k(&mut raw, "cls")?);
    let pos = if big_vision {
        k(&mut raw, "pos_embedding")?
    } else {
        k(&mut raw, "Transformer/posembed_input/pos_embedding")?
    };
    out.insert("pos_embed".to_string(), pos);
    out.insert(
        "norm.weight".to_string(),
        k(&mut raw, "Transformer/encoder_norm/scale")?,
    );
    out.insert(
        "norm.bias".to_string(),
        k(&mut raw, "Transformer/encoder_norm/bias")?,
    );
    if raw.contains_key(&format!("{prefix}head/kernel")) {
        out.insert("head.weight".to_string(), n2p(k(&mut raw, "head/kernel")?));
        out.insert("head.bias".to_string(), k(&mut raw, "head/bias")?);
    }
    let (mha, mlp, ln2) = if big_vision { (0, 0, 1) } else { (1, 3, 2) };
    let stacked = raw.contains_key(&format!(
        "{prefix}Transformer/encoderblock/LayerNorm_0/scale"
    ));
    let depth = if stacked {
        raw[&format!("{prefix}Transformer/encoderblock/LayerNorm_0/scale")].size()[0]
    } else {
        (0..)
            .take_while(|i| {
                raw.contains_key(&format!(
                    "{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale"
                ))
            })
            .count() as i64
    };
    // The stacked (scanned) layout keeps every block's tensor in one array.
    let mut stacked_cache: BTreeMap<String, Tensor> = BTreeMap::new();
    for i in 0..depth {
        let mut get =
            |raw: &mut BTreeMap<String, Tensor>, key: &str| -> Result<Tensor, WeightsError> {
                if stacked {
                    let full = format!("{prefix}Transformer/encoderblock/{key}");
                    if !stacked_cache.contains_key(&full) {
                        let t = take(path, raw, &full)?;
                        stacked_cache.insert(full.clone(), t);
                    }
                    Ok(stacked_cache[&full].get(i))
                } else {
                    take(
                        path,
                        raw,
                        &format!("{prefix}Transformer/encoderblock_{i}/{key}"),
                    )
                }
            };
        let b = format!("blocks.{i}.");
        let a = format!("MultiHeadDotProductAttention_{mha}/");
        out.insert(
            format!("{b}norm1.weight"),
            get(&mut raw, "LayerNorm_0/scale")?,
        );
        out.insert(format!("{b}norm1.bias"), get(&mut raw, "LayerNorm_0/bias")?);
        let mut w = Vec::new();
        let mut bias = Vec::new();
        for n in ["query", "key", "value"] {
            w.push(
                get(&mut raw, &format!("{a}{n}/kernel"))?
                    .flatten(1, -1)
                    .tr(),
            );
            bias.push(get(&mut raw, &format!("{a}{n}/bias"))?.reshape([-1]));
        }
        out.insert(format!("{b}attn.qkv.weight"), Tensor::cat(&w, 0));
        out.insert(format!("{b}attn.qkv.bias"), Tensor::cat(&bias, 0));
        out.insert(
            format!("{b}attn.proj.weight"),
            n2p(get(&mut raw, &format!("{a}out/kernel"))?).flatten(1, -1),
        );
        out.insert(
            format!("{b}attn.proj.bias"),
            get(&mut raw, &format!("{a}out/bias"))?,
        );
        out.insert(
            format!("{b}norm2.weight"),
            get(&mut raw, &format!("LayerNorm_{ln2}/scale"))?,
        );
        out.insert(
            format!("{b}norm2.bias"),
            get(&mut raw, &format!("LayerNorm_{ln2}/bias"))?,
        );
        for r in 0..2 {
            let d = format!("MlpBlock_{mlp}/Dense_{r}/");
            out.insert(
                format!("{b}mlp.fc{}.weight", r + 1),
                n2p(get(&mut raw, &format!("{d}kernel"))?),
            );
            out.insert(
                format!("{b}mlp.fc{}.bias", r + 1),
                get(&mut raw, &format!("{d}bias"))?,
            );
        }
    }
    // The old representation layer sits between the encoder and the head:
    // without it the head would compute something else, so it is dropped
    // (a new head is trained). Optimizer state outside the prefix is not a
    // weight. Anything else under the prefix is a layout we do not know.
    if raw.contains_key(&format!("{prefix}pre_logits/kernel")) {
        out.remove("head.weight");
        out.remove("head.bias");
    }
    let ignored = npz_leftovers(path, prefix, raw)?;
    Ok(Checkpoint {
        path: path.to_owned(),
        format: Format::Npz,
        tensors: out.into_iter().map(|(n, t)| (n, t.contiguous())).collect(),
        ignored,
        norm_eps: None,
    })
}

/// What an `.npz` checkpoint holds besides the ViT's weights, as groups
/// for the load report: the old `pre_logits` layer and optimizer state
/// outside the weights' prefix; anything else under the prefix is a layout
/// we do not know, and an error.
fn npz_leftovers(
    path: &Path,
    prefix: &str,
    raw: BTreeMap<String, Tensor>,
) -> Result<Vec<String>, WeightsError> {
    let mut ignored = BTreeMap::<String, usize>::new();
    for k in raw.into_keys() {
        let group = match k.strip_prefix(prefix) {
            Some(rest) if rest.starts_with("pre_logits/") => "pre_logits/*".to_string(),
            Some(_) => {
                return Err(err(
                    path,
                    format!("tensor `{k}` is not part of a ViT checkpoint we know"),
                ))
            }
            None => format!("{}/*", k.split('/').take(2).collect::<Vec<_>>().join("/")),
        };
        *ignored.entry(group).or_default() += 1;
    }
    Ok(ignored
        .into_iter()
        .map(|(g, n)| format!("{g} ({n} tensors)"))
        .collect())
}
