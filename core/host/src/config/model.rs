//! The `model` section: a preset with optional field overrides, and the
//! weights to start from.

use super::*;

/// Which model: a preset with optional field overrides. Every field of
/// [`VitConfig`] can be overridden; `simfreeze models` lists the presets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Preset name (`tiny_fmnist`, `vit_base_patch16_224`,
    /// `vit_base_patch14_dinov2`, ...).
    pub preset: String,
    /// Overrides of the preset's fields.
    pub image_size: Option<i64>,
    /// Input channels.
    pub channels: Option<i64>,
    /// Patch size.
    pub patch: Option<i64>,
    /// Width.
    pub dim: Option<i64>,
    /// Blocks.
    pub depth: Option<i64>,
    /// Heads.
    pub heads: Option<i64>,
    /// MLP ratio.
    pub mlp_ratio: Option<f64>,
    /// Classes (default: the dataset's).
    pub classes: Option<i64>,
    /// LayerNorm epsilon (default: the preset's, or what a Hugging Face
    /// checkpoint's `config.json` says).
    pub norm_eps: Option<f64>,
    /// Bias in the attention's qkv projection.
    pub qkv_bias: Option<bool>,
    /// LayerScale initial value (timm `init_values`).
    pub init_values: Option<f64>,
    /// A class token.
    pub class_token: Option<bool>,
    /// Register tokens.
    pub reg_tokens: Option<i64>,
    /// Position embedding without entries for the class/register tokens.
    pub no_embed_class: Option<bool>,
    /// `"token"` or `"avg"`.
    pub global_pool: Option<String>,
    /// Normalise after pooling.
    pub fc_norm: Option<bool>,
    /// LayerNorm before the blocks (`norm_pre`).
    pub pre_norm: Option<bool>,
    /// `"gelu"` or `"quick_gelu"`.
    pub act_layer: Option<String>,
    /// Resample the position embedding to each input's grid.
    pub dynamic_img_size: Option<bool>,
    /// Initial weights: timm or Hugging Face safetensors, Google `.npz`,
    /// or the `model.safetensors` of an earlier run.
    pub weights: Option<PathBuf>,
    /// The checkpoint's classifier head: `Auto` (loaded when its class
    /// count matches), `New` or `Load`.
    pub head: HeadInit,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny_fmnist".into(),
            image_size: None,
            channels: None,
            patch: None,
            dim: None,
            depth: None,
            heads: None,
            mlp_ratio: None,
            classes: None,
            norm_eps: None,
            qkv_bias: None,
            init_values: None,
            class_token: None,
            reg_tokens: None,
            no_embed_class: None,
            global_pool: None,
            fc_norm: None,
            pre_norm: None,
            act_layer: None,
            dynamic_img_size: None,
            weights: None,
            head: HeadInit::Auto,
        }
    }
}

impl ModelSection {
    /// The preset with overrides applied; `classes` defaults to `data_classes`.
    pub fn resolve(&self, data_classes: i64) -> Result<VitConfig, UsageError> {
        let preset = VitConfig::preset(&self.preset).ok_or_else(|| {
            UsageError(format!(
                "unknown model.preset `{}`; presets: {} (`simfreeze models` lists them)",
                self.preset,
                VitConfig::preset_names().join(", ")
            ))
        })?;
        // Every override that is set replaces the preset's field of the
        // same name (the fields are named alike, and a test checks that
        // each override reaches the model).
        let json = |e: serde_json::Error| UsageError(format!("model: {e}"));
        let mut tree = serde_json::to_value(&preset).map_err(json)?;
        let overrides = serde_json::to_value(self).map_err(json)?;
        for (key, value) in overrides.as_object().into_iter().flatten() {
            if value.is_null() || ["preset", "weights", "head"].contains(&key.as_str()) {
                continue;
            }
            tree[key] = value.clone();
        }
        let mut c: VitConfig = serde_json::from_value(tree).map_err(json)?;
        c.classes = self.classes.unwrap_or(data_classes);
        if let (None, Some(w)) = (self.norm_eps, &self.weights) {
            c.norm_eps = crate::model::weights::norm_eps_beside(w)
                .map_err(|e| UsageError(e.to_string()))?
                .unwrap_or(c.norm_eps);
        }
        c.validate().map_err(UsageError)?;
        Ok(c)
    }

    /// The normalisation the preset's weights expect.
    pub fn normalisation(&self) -> Option<Normalisation> {
        crate::model::Preset::find(&self.preset).map(|p| p.norm)
    }
}
