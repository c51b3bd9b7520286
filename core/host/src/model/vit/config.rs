//! A ViT's shape (`VitConfig`: every field settable from RON), the input
//! normalisation its pretrained weights expect, and the named presets.

use serde::{Deserialize, Serialize};

/// Shape of a ViT. Every field can be set from RON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Input height and width.
    pub image_size: i64,
    /// Input channels.
    pub channels: i64,
    /// Patch height and width.
    pub patch: i64,
    /// Embedding width D.
    pub dim: i64,
    /// Encoder blocks L.
    pub depth: i64,
    /// Attention heads.
    pub heads: i64,
    /// MLP hidden width over D.
    pub mlp_ratio: f64,
    /// Output classes.
    pub classes: i64,
    /// LayerNorm epsilon (timm: 1e-6; Hugging Face checkpoints say theirs
    /// in `config.json`, usually 1e-12).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Bias in the attention's qkv projection (timm `qkv_bias`; true in
    /// every preset).
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// LayerScale: a learned per-channel scale on each residual branch,
    /// initialised to this value (timm `init_values`, `ls1.gamma` /
    /// `ls2.gamma`; DeiT-III 1e-6, DINOv2 1e-5); `None`: no LayerScale.
    #[serde(default)]
    pub init_values: Option<f64>,
    /// A class token (timm `class_token`).
    #[serde(default = "yes")]
    pub class_token: bool,
    /// Register tokens after the class token (timm `reg_tokens`; DINOv2
    /// with registers: 4).
    #[serde(default)]
    pub reg_tokens: i64,
    /// The position embedding covers the patches only and the class and
    /// register tokens are added after it (timm `no_embed_class`; DeiT-III,
    /// DINOv2 with registers).
    #[serde(default)]
    pub no_embed_class: bool,
    /// What the head sees: `"token"` (the class token) or `"avg"` (the
    /// mean of the patch tokens, MAE / BEiT fine-tuning) (timm
    /// `global_pool`).
    #[serde(default = "default_global_pool")]
    pub global_pool: String,
    /// Normalise after pooling instead of before (timm `fc_norm`; `None`:
    /// when `global_pool` is `"avg"`).
    #[serde(default)]
    pub fc_norm: Option<bool>,
    /// A LayerNorm after the embedding, before the blocks (timm
    /// `pre_norm`, the `norm_pre` module; OpenAI CLIP); the patch embedding
    /// then has no bias, as in timm.
    #[serde(default)]
    pub pre_norm: bool,
    /// MLP activation: `"gelu"` (exact) or `"quick_gelu"` (`x *
    /// sigmoid(1.702 x)`, OpenAI CLIP) (timm `act_layer`).
    #[serde(default = "default_act_layer")]
    pub act_layer: String,
    /// Inputs of another size than `image_size` are accepted and the
    /// position embedding is resampled to their grid on every forward pass
    /// (timm `dynamic_img_size`).
    #[serde(default)]
    pub dynamic_img_size: bool,
}

fn default_norm_eps() -> f64 {
    1e-6
}

fn yes() -> bool {
    true
}

fn default_global_pool() -> String {
    "token".into()
}

fn default_act_layer() -> String {
    "gelu".into()
}

impl VitConfig {
    /// The CPU proxy: 28×28 single-channel inputs, patch 7 (16 tokens + class
    /// token), D 96, 8 blocks, 3 heads (the CPU proxy, docs/architecture.md).
    pub fn tiny_fmnist() -> Self {
        VitConfig {
            image_size: 28,
            channels: 1,
            patch: 7,
            dim: 96,
            depth: 8,
            heads: 3,
            mlp_ratio: 4.0,
            classes: 10,
            ..Self::imagenet(96, 8, 3)
        }
    }
    fn imagenet(dim: i64, depth: i64, heads: i64) -> Self {
        VitConfig {
            image_size: 224,
            channels: 3,
            patch: 16,
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            classes: 1000,
            norm_eps: 1e-6,
            qkv_bias: true,
            init_values: None,
            class_token: true,
            reg_tokens: 0,
            no_embed_class: false,
            global_pool: default_global_pool(),
            fc_norm: None,
            pre_norm: false,
            act_layer: default_act_layer(),
            dynamic_img_size: false,
        }
    }
    /// timm `vit_tiny_patch16_224`.
    pub fn vit_tiny_patch16_224() -> Self {
        Self::imagenet(192, 12, 3)
    }
    /// timm `vit_small_patch16_224`.
    pub fn vit_small_patch16_224() -> Self {
        Self::imagenet(384, 12, 6)
    }
    /// timm `vit_base_patch16_224` (the paper's ViT-B/16).
    pub fn vit_base_patch16_224() -> Self {
        Self::imagenet(768, 12, 12)
    }
    /// timm `vit_large_patch16_224` (the paper's ViT-L/16).
    pub fn vit_large_patch16_224() -> Self {
        Self::imagenet(1024, 24, 16)
    }

    /// timm `deit3_base_patch16_224` (DeiT-III: LayerScale 1e-6, the
    /// position embedding skips the class token).
    pub fn deit3_base_patch16_224() -> Self {
        VitConfig {
            init_values: Some(1e-6),
            no_embed_class: true,
            ..Self::imagenet(768, 12, 12)
        }
    }
    fn dinov2(dim: i64, heads: i64, reg_tokens: i64) -> Self {
        VitConfig {
            image_size: 518,
            patch: 14,
            init_values: Some(1e-5),
            reg_tokens,
            no_embed_class: reg_tokens > 0,
            ..Self::imagenet(dim, 12, heads)
        }
    }
    /// timm `vit_small_patch14_dinov2` (518 px; set `image_size: 224` to
    /// fine-tune at 224, the position embedding is resampled on load).
    pub fn vit_small_patch14_dinov2() -> Self {
        Self::dinov2(384, 6, 0)
    }
    /// timm `vit_base_patch14_dinov2`.
    pub fn vit_base_patch14_dinov2() -> Self {
        Self::dinov2(768, 12, 0)
    }
    /// timm `vit_base_patch14_reg4_dinov2` (4 register tokens).
    pub fn vit_base_patch14_reg4_dinov2() -> Self {
        Self::dinov2(768, 12, 4)
    }
    /// timm `vit_base_patch16_clip_224`: the CLIP image tower (LayerNorm
    /// before the blocks, epsilon 1e-5, GELU as timm builds it).
    pub fn vit_base_patch16_clip_224() -> Self {
        VitConfig {
            pre_norm: true,
            norm_eps: 1e-5,
            ..Self::imagenet(768, 12, 12)
        }
    }
    /// timm `vit_base_patch16_clip_quickgelu_224`: OpenAI's CLIP image
    /// tower with the QuickGELU it was trained with.
    pub fn vit_base_patch16_clip_quickgelu_224() -> Self {
        VitConfig {
            act_layer: "quick_gelu".into(),
            ..Self::vit_base_patch16_clip_224()
        }
    }
    /// timm `vit_base_patch16_224` as MAE fine-tunes it: the mean of the
    /// patch tokens, normalised by `fc_norm`, feeds the head.
    pub fn vit_base_patch16_224_mae() -> Self {
        VitConfig {
            global_pool: "avg".into(),
            ..Self::vit_base_patch16_224()
        }
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        Preset::find(name).map(|p| (p.build)())
    }

    /// Every preset name, sorted.
    pub fn preset_names() -> Vec<&'static str> {
        Preset::all().iter().map(|p| p.name).collect()
    }

    /// Tokens before the patch tokens: the class token and the registers.
    pub fn prefix_tokens(&self) -> i64 {
        i64::from(self.class_token) + self.reg_tokens
    }

    /// Patches per side at `image_size`.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch
    }

    /// Tokens of the position embedding (the patches, plus the prefix
    /// tokens unless `no_embed_class`).
    pub fn pos_embed_len(&self) -> i64 {
        self.grid().pow(2)
            + if self.no_embed_class {
                0
            } else {
                self.prefix_tokens()
            }
    }

    /// Whether the features are normalised after pooling (`fc_norm`)
    /// rather than the tokens before it (`norm`).
    pub fn use_fc_norm(&self) -> bool {
        self.fc_norm.unwrap_or(self.global_pool == "avg")
    }

    /// Parameters of the model, head included.
    pub fn parameter_count(&self) -> i64 {
        let (d, l) = (self.dim, self.depth);
        let hidden = (d as f64 * self.mlp_ratio) as i64;
        let norm = 2 * d;
        let block = 2 * norm
            + 3 * d * d
            + if self.qkv_bias { 3 * d } else { 0 }
            + d * d
            + d
            + d * hidden
            + hidden
            + hidden * d
            + d
            + if self.init_values.is_some() { 2 * d } else { 0 };
        let embed = d * self.channels * self.patch * self.patch
            + if self.pre_norm { 0 } else { d }
            + self.prefix_tokens() * d
            + self.pos_embed_len() * d
            + if self.pre_norm { norm } else { 0 };
        embed + l * block + norm + d * self.classes + self.classes
    }

    /// Checks that the shape is buildable.
    pub fn validate(&self) -> Result<(), String> {
        let pos = [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("patch", self.patch),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("classes", self.classes),
        ];
        if let Some((n, v)) = pos.iter().find(|(_, v)| *v < 1) {
            return Err(format!("model.{n} must be at least 1, got {v}"));
        }
        if self.image_size % self.patch != 0 {
            return Err(format!(
                "model.image_size {} is not a multiple of model.patch {}",
                self.image_size, self.patch
            ));
        }
        if self.dim % self.heads != 0 {
            return Err(format!(
                "model.dim {} is not divisible by model.heads {}",
                self.dim, self.heads
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(format!("model.norm_eps must be > 0, got {}", self.norm_eps));
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_ratio.is_finite()) {
            return Err(format!(
                "model.mlp_ratio must be > 0, got {}",
                self.mlp_ratio
            ));
        }
        if self.reg_tokens < 0 {
            return Err(format!(
                "model.reg_tokens must be >= 0, got {}",
                self.reg_tokens
            ));
        }
        if let Some(v) = self.init_values {
            if !v.is_finite() {
                return Err(format!("model.init_values must be finite, got {v}"));
            }
        }
        match self.global_pool.as_str() {
            "token" if !self.class_token => {
                return Err(
                    "model.global_pool \"token\" needs the class token: set class_token: true \
                     or global_pool: \"avg\""
                        .into(),
                )
            }
            "token" | "avg" => {}
            other => {
                return Err(format!(
                    "model.global_pool is {other:?}: use \"token\" or \"avg\""
                ))
            }
        }
        if !matches!(self.act_layer.as_str(), "gelu" | "quick_gelu") {
            return Err(format!(
                "model.act_layer is {:?}: use \"gelu\" or \"quick_gelu\"",
                self.act_layer
            ));
        }
        Ok(())
    }

    /// Tokens per image: the prefix tokens and the patches.
    pub fn tokens(&self) -> i64 {
        self.grid().pow(2) + self.prefix_tokens()
    }
}

/// The normalisation a preset's pretrained weights expect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalisation {
    /// Its name in configs (`data: (mean: "imagenet", std: "imagenet")`).
    pub name: &'static str,
    /// Per-channel mean.
    pub mean: &'static [f64],
    /// Per-channel standard deviation.
    pub std: &'static [f64],
}

impl Normalisation {
    /// ImageNet's (DeiT-III, DINOv2, MAE).
    pub const IMAGENET: Self = Normalisation {
        name: "imagenet",
        mean: &[0.485, 0.456, 0.406],
        std: &[0.229, 0.224, 0.225],
    };
    /// 0.5 and 0.5 (Google's augreg ImageNet-21k ViTs).
    pub const INCEPTION: Self = Normalisation {
        name: "inception",
        mean: &[0.5, 0.5, 0.5],
        std: &[0.5, 0.5, 0.5],
    };
    /// OpenAI CLIP's.
    pub const CLIP: Self = Normalisation {
        name: "clip",
        mean: &[0.48145466, 0.4578275, 0.40821073],
        std: &[0.26862954, 0.26130258, 0.27577711],
    };
    /// Fashion-MNIST's training-set statistics.
    pub const FASHION_MNIST: Self = Normalisation {
        name: "fashion_mnist",
        mean: &[0.2860],
        std: &[0.3530],
    };

    /// Every named normalisation.
    pub const ALL: [Self; 4] = [
        Self::IMAGENET,
        Self::INCEPTION,
        Self::CLIP,
        Self::FASHION_MNIST,
    ];

    /// A normalisation by name.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.name == name)
    }
}

/// A named model preset; register more with `inventory::submit!`.
pub struct Preset {
    /// Name used in configs (`model: (preset: "...")`), timm's where
    /// there is one.
    pub name: &'static str,
    /// Builds the configuration.
    pub build: fn() -> VitConfig,
    /// The normalisation its pretrained weights expect.
    pub norm: Normalisation,
    /// The weights it is meant for, in a few words.
    pub about: &'static str,
}

impl Preset {
    /// Every preset, sorted by name.
    pub fn all() -> Vec<&'static Preset> {
        let mut v: Vec<&Preset> = inventory::iter::<Preset>.into_iter().collect();
        v.sort_unstable_by_key(|p| p.name);
        v
    }

    /// A preset by name.
    pub fn find(name: &str) -> Option<&'static Preset> {
        inventory::iter::<Preset>
            .into_iter()
            .find(|p| p.name == name)
    }
}

inventory::collect!(Preset);

macro_rules! preset {
    ($name:literal, $build:ident, $norm:ident, $about:literal) => {
        inventory::submit! { Preset {
            name: $name,
            build: VitConfig::$build,
            norm: Normalisation::$norm,
            about: $about,
        } }
    };
}

preset!(
    "tiny_fmnist",
    tiny_fmnist,
    FASHION_MNIST,
    "the CPU proxy (28x28 grey, 8 blocks)"
);
preset!(
    "vit_tiny_patch16_224",
    vit_tiny_patch16_224,
    INCEPTION,
    "ViT-Ti/16, augreg ImageNet-21k"
);
preset!(
    "vit_small_patch16_224",
    vit_small_patch16_224,
    INCEPTION,
    "ViT-S/16, augreg ImageNet-21k"
);
preset!(
    "vit_base_patch16_224",
    vit_base_patch16_224,
    INCEPTION,
    "ViT-B/16, augreg ImageNet-21k (the paper's)"
);
preset!(
    "vit_large_patch16_224",
    vit_large_patch16_224,
    INCEPTION,
    "ViT-L/16, augreg ImageNet-21k (the paper's)"
);
preset!(
    "deit3_base_patch16_224",
    deit3_base_patch16_224,
    IMAGENET,
    "DeiT-III B/16 (LayerScale)"
);
preset!(
    "vit_small_patch14_dinov2",
    vit_small_patch14_dinov2,
    IMAGENET,
    "DINOv2 ViT-S/14 at 518 (LayerScale)"
);
preset!(
    "vit_base_patch14_dinov2",
    vit_base_patch14_dinov2,
    IMAGENET,
    "DINOv2 ViT-B/14 at 518 (LayerScale)"
);
preset!(
    "vit_base_patch14_reg4_dinov2",
    vit_base_patch14_reg4_dinov2,
    IMAGENET,
    "DINOv2 ViT-B/14 with 4 registers"
);
preset!(
    "vit_base_patch16_clip_224",
    vit_base_patch16_clip_224,
    CLIP,
    "CLIP ViT-B/16 image tower (pre-norm, GELU)"
);
preset!(
    "vit_base_patch16_clip_quickgelu_224",
    vit_base_patch16_clip_quickgelu_224,
    CLIP,
    "OpenAI CLIP ViT-B/16 (pre-norm, QuickGELU)"
);
preset!(
    "vit_base_patch16_224.mae",
    vit_base_patch16_224_mae,
    IMAGENET,
    "MAE ViT-B/16, avg pool + fc_norm"
);
