//! The Vision Transformer, with timm's structure and parameter names
//! (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv,
//! attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`), LayerNorm eps 1e-6,
//! exact GELU and `scaled_dot_product_attention`, so timm checkpoints map
//! onto it name for name.
//!
//! Invariant: [`Vit::forward_frozen`] runs the frozen prefix (the embedding
//! and blocks `[0, k)`) without autograd and detaches its output, so
//! backward stops at the first trainable block and builds no graph for the
//! prefix.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Tensor};

use crate::model::precision::{autocast, Precision};
use crate::model::{Forward, Group, PrefixModel};

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
}

fn default_norm_eps() -> f64 {
    1e-6
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
            norm_eps: 1e-6,
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

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        inventory::iter::<Preset>
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| (p.build)())
    }

    /// Every preset name, sorted.
    pub fn preset_names() -> Vec<&'static str> {
        let mut v: Vec<_> = inventory::iter::<Preset>
            .into_iter()
            .map(|p| p.name)
            .collect();
        v.sort_unstable();
        v
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
        Ok(())
    }

    /// Tokens per image, class token included.
    pub fn tokens(&self) -> i64 {
        (self.image_size / self.patch).pow(2) + 1
    }
}

/// A named model preset; register more with `inventory::submit!`.
pub struct Preset {
    /// Name used in configs (`model: (preset: "...")`).
    pub name: &'static str,
    /// Builds the configuration.
    pub build: fn() -> VitConfig,
}

inventory::collect!(Preset);

inventory::submit! { Preset { name: "tiny_fmnist", build: VitConfig::tiny_fmnist } }
inventory::submit! { Preset { name: "vit_tiny_patch16_224", build: VitConfig::vit_tiny_patch16_224 } }
inventory::submit! { Preset { name: "vit_small_patch16_224", build: VitConfig::vit_small_patch16_224 } }
inventory::submit! { Preset { name: "vit_base_patch16_224", build: VitConfig::vit_base_patch16_224 } }
inventory::submit! { Preset { name: "vit_large_patch16_224", build: VitConfig::vit_large_patch16_224 } }

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    // tch defaults to 1e-5; timm's ViT uses 1e-6.
    let cfg = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![dim], cfg)
}

#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        Attention {
            qkv: nn::linear(&p / "qkv", cfg.dim, 3 * cfg.dim, Default::default()),
            proj: nn::linear(&p / "proj", cfg.dim, cfg.dim, Default::default()),
            heads: cfg.heads,
        }
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("[B, N, D]");
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]) // [3, B, H, N, D/H]
            .unbind(0);
        // `unbind`, not three `select`s: its backward is one stack, where
        // each select's backward would fill a zero tensor of the full
        // [3, B, H, N, D/H] shape and the three would then be summed.
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        let o =
            Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false); // [B, H, N, D/H]
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, d]))
    }
}

#[derive(Debug)]
struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("none"))
    }
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        let hidden = (cfg.dim as f64 * cfg.mlp_ratio) as i64;
        Block {
            norm1: layer_norm(&p / "norm1", cfg.dim, cfg.norm_eps),
            attn: Attention::new(&p / "attn", cfg),
            norm2: layer_norm(&p / "norm2", cfg.dim, cfg.norm_eps),
            mlp: Mlp {
                fc1: nn::linear(&p / "mlp" / "fc1", cfg.dim, hidden, Default::default()),
                fc2: nn::linear(&p / "mlp" / "fc2", hidden, cfg.dim, Default::default()),
            },
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x));
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// A ViT whose variables live in a `VarStore` under timm's names.
#[derive(Debug)]
pub struct Vit {
    /// Its shape.
    pub cfg: VitConfig,
    proj: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    head: nn::Linear,
    /// Precision of every forward pass (float32 unless set).
    pub precision: Precision,
}

impl Vit {
    /// Creates the variables under `p` (timm-like init: trunc-normal-ish
    /// 0.02 for tokens, tch defaults elsewhere).
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let conv = nn::ConvConfig {
            stride: cfg.patch,
            ..Default::default()
        };
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Vit {
            cfg: cfg.clone(),
            proj: nn::conv2d(
                p / "patch_embed" / "proj",
                cfg.channels,
                cfg.dim,
                cfg.patch,
                conv,
            ),
            cls_token: p.var("cls_token", &[1, 1, cfg.dim], init),
            pos_embed: p.var("pos_embed", &[1, cfg.tokens(), cfg.dim], init),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(p / "blocks" / i, cfg))
                .collect(),
            norm: layer_norm(p / "norm", cfg.dim, cfg.norm_eps),
            head: nn::linear(p / "head", cfg.dim, cfg.classes, Default::default()),
            precision: Precision::F32,
        }
    }

    /// Builds the model's variables in `vs`, running at `precision`: the
    /// one place a model is constructed (run, resume, eval and bench).
    pub fn build(vs: &nn::VarStore, cfg: &VitConfig, precision: Precision) -> Self {
        let mut model = Vit::new(&vs.root(), cfg);
        model.precision = precision;
        model
    }

    fn embed(&self, x: &Tensor) -> Tensor {
        let x = self.patchify(x);
        let b = x.size()[0];
        let cls = self.cls_token.expand([b, -1, -1], false);
        Tensor::cat(&[cls, x], 1) + &self.pos_embed // [B, N+1, D]
    }

    /// The patch embedding, `[B, C, H, W] -> [B, N, D]`: the same
    /// arithmetic as timm's stride-`patch` convolution (its weight
    /// `[D, C, p, p]` is the variable), written as patch extraction and one
    /// matrix product, whose backward on the CPU costs a third of the
    /// convolution's at the tiny preset (like the convolution, rows and
    /// columns beyond a multiple of the patch are ignored).
    fn patchify(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let p = self.cfg.patch;
        let (gh, gw) = (h / p, w / p);
        let x = if h % p != 0 || w % p != 0 {
            x.narrow(2, 0, gh * p).narrow(3, 0, gw * p)
        } else {
            x.shallow_clone()
        };
        let patches = x
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let weight = self.proj.ws.reshape([self.cfg.dim, c * p * p]);
        patches.linear(&weight, self.proj.bs.as_ref())
    }

    fn blocks_and_head(&self, h: Tensor, start: usize, frozen: usize) -> Forward {
        let frozen = frozen.clamp(start, self.blocks.len());
        let mut h = if frozen > start {
            tch::no_grad(|| {
                let mut h = h;
                for b in &self.blocks[start..frozen] {
                    h = b.forward(&h);
                }
                h
            })
            .detach()
        } else {
            h
        };
        for b in &self.blocks[frozen..] {
            h = b.forward(&h);
        }
        let h = self.norm.forward(&h);
        let cls = h.select(1, 0); // [B, D]
        Forward {
            logits: self.head.forward(&cls),
            cls,
        }
    }
}

impl PrefixModel for Vit {
    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn feature_dim(&self) -> i64 {
        self.cfg.dim
    }

    fn tokens(&self) -> i64 {
        self.cfg.tokens()
    }

    fn group_of(&self, name: &str) -> Group {
        group_of(name)
    }

    /// `[B, C, H, W] -> logits [B, classes]` and class-token features
    /// `[B, D]`, with the embedding and blocks `[0, frozen)` run without
    /// autograd (`frozen` may be 0..=L).
    fn forward_frozen(&self, x: &Tensor, frozen: usize) -> Forward {
        let frozen = frozen.min(self.blocks.len());
        if frozen == 0 {
            let h = autocast(self.precision, x.device(), || self.embed(x));
            return self.forward_from(h, 0, 0);
        }
        self.forward_from(self.frozen_prefix(x, frozen), frozen, frozen)
    }

    /// The output of the embedding and blocks `[0, k)`, computed without
    /// autograd and detached: `[B, C, H, W] -> [B, N+1, D]`.
    fn frozen_prefix(&self, x: &Tensor, k: usize) -> Tensor {
        autocast(self.precision, x.device(), || {
            tch::no_grad(|| {
                let mut h = self.embed(x);
                for b in &self.blocks[..k.min(self.blocks.len())] {
                    h = b.forward(&h);
                }
                h
            })
        })
        .detach()
    }

    /// Runs blocks `[from, to)` on `h` without autograd (advancing a cached
    /// boundary): `[B, N+1, D] -> [B, N+1, D]`.
    fn advance(&self, h: &Tensor, from: usize, to: usize) -> Tensor {
        autocast(self.precision, h.device(), || {
            tch::no_grad(|| {
                let mut h = h.shallow_clone();
                for b in &self.blocks[from.min(to)..to.min(self.blocks.len())] {
                    h = b.forward(&h);
                }
                h
            })
        })
        .detach()
    }

    /// Continues from `h`, the output of blocks `[0, start)`: blocks
    /// `[start, frozen)` without autograd (e.g. a probed block), the rest
    /// with it, then the final norm and the head. `[B, N+1, D] -> logits`.
    fn forward_from(&self, h: Tensor, start: usize, frozen: usize) -> Forward {
        let out = autocast(self.precision, h.device(), || {
            self.blocks_and_head(h, start, frozen)
        });
        if self.precision == Precision::F32 {
            return out;
        }
        // The loss and the policy's features are computed in float32.
        Forward {
            logits: out.logits.to_kind(tch::Kind::Float),
            cls: out.cls.to_kind(tch::Kind::Float),
        }
    }
}

/// The group of a timm-named variable: `blocks.<i>.*` is block `i`, the
/// patch and position embeddings and the class token go with block 0,
/// everything else (final norm, head) is never frozen.
pub fn group_of(name: &str) -> Group {
    if let Some(rest) = name.strip_prefix("blocks.") {
        let idx = rest.split('.').next().and_then(|s| s.parse().ok());
        return Group::Block(idx.unwrap_or(0));
    }
    if name.starts_with("cls_token")
        || name.starts_with("pos_embed")
        || name.starts_with("patch_embed")
    {
        return Group::Block(0);
    }
    Group::Head
}

/// A 3-block ViT on 8x8 single-channel images for unit tests.
#[cfg(test)]
pub(crate) fn test_config(classes: i64) -> VitConfig {
    VitConfig {
        image_size: 8,
        channels: 1,
        patch: 4,
        dim: 12,
        depth: 3,
        heads: 3,
        mlp_ratio: 2.0,
        classes,
        norm_eps: 1e-6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny() -> VitConfig {
        test_config(5)
    }

    #[test]
    fn shapes_and_names_follow_timm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &tiny());
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let f = m.forward_frozen(&x, 0);
        assert_eq!(f.logits.size(), [2, 5]);
        assert_eq!(f.cls.size(), [2, 12]);
        let vars = vs.variables();
        for n in [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "blocks.2.attn.qkv.weight",
            "blocks.0.mlp.fc2.bias",
            "blocks.1.norm2.weight",
            "norm.weight",
            "head.bias",
        ] {
            assert!(vars.contains_key(n), "{n} missing: {:?}", vars.keys());
        }
        assert_eq!(vars["pos_embed"].size(), [1, 5, 12]);
    }

    #[test]
    fn patch_embedding_equals_timms_strided_convolution() {
        let cfg = VitConfig {
            channels: 3,
            ..tiny()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &cfg);
        // 9x10 is not a multiple of the patch (4): the convolution ignores
        // the last row and columns, and so must we.
        for (h, w) in [(8, 8), (9, 10)] {
            let x = Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu));
            let conv = x
                .conv2d(
                    &m.proj.ws,
                    m.proj.bs.as_ref(),
                    [cfg.patch, cfg.patch],
                    [0, 0],
                    [1, 1],
                    1,
                )
                .flatten(2, -1)
                .transpose(1, 2);
            let ours = m.patchify(&x);
            assert_eq!(ours.size(), conv.size());
            let diff = (ours - conv).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{h}x{w}: {diff}");
        }
    }

    #[test]
    fn frozen_prefix_gets_no_gradient_and_same_output() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &tiny());
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let full = m.forward_frozen(&x, 0).logits;
        let part = m.forward_frozen(&x, 2);
        assert!(full.allclose(&part.logits, 1e-6, 1e-6, false));
        part.logits.sum(Kind::Float).backward();
        let vars = vs.variables();
        assert!(!vars["blocks.0.attn.qkv.weight"].grad().defined());
        assert!(!vars["cls_token"].grad().defined());
        assert!(!vars["blocks.1.mlp.fc1.weight"].grad().defined());
        assert!(vars["blocks.2.mlp.fc1.weight"].grad().defined());
    }

    #[test]
    fn resuming_from_a_cached_boundary_gives_the_same_output() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &tiny());
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let direct = m.forward_frozen(&x, 2).logits;
        let cached = m.forward_from(m.frozen_prefix(&x, 1), 1, 2).logits;
        assert!(direct.allclose(&cached, 1e-6, 1e-6, false));
    }

    #[test]
    fn groups() {
        assert_eq!(group_of("pos_embed"), Group::Block(0));
        assert_eq!(group_of("patch_embed.proj.weight"), Group::Block(0));
        assert_eq!(group_of("blocks.11.attn.qkv.bias"), Group::Block(11));
        assert_eq!(group_of("norm.weight"), Group::Head);
        assert_eq!(group_of("head.weight"), Group::Head);
    }

    #[test]
    fn presets_are_valid() {
        let names = VitConfig::preset_names();
        assert_eq!(names.len(), 5, "{names:?}");
        for name in names {
            let c = VitConfig::preset(name).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(VitConfig::preset("vit_base_patch16_224").unwrap().dim, 768);
        assert!(tiny().validate().is_ok());
        let bad = VitConfig { heads: 5, ..tiny() };
        assert!(bad.validate().unwrap_err().contains("divisible"));
    }
}
