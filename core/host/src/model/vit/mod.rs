//! The Vision Transformer, with timm's structure and parameter names
//! (`cls_token`, `reg_token`, `pos_embed`, `patch_embed.proj`, `norm_pre`,
//! `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
//! mlp.fc2, ls2.gamma}`, `norm`, `fc_norm`, `head`) and timm's options for
//! the families people fine-tune today: LayerScale (DeiT-III, DINOv2),
//! register tokens (DINOv2 with registers), position embeddings that skip
//! the prefix tokens (`no_embed_class`), average pooling with `fc_norm` and
//! no class token (MAE, BEiT), a LayerNorm before the blocks and QuickGELU
//! (OpenAI CLIP), `qkv_bias: false`, and a dynamic image size that
//! resamples the position embedding to each input's grid. So timm
//! checkpoints map onto it name for name, and each option is checked
//! against timm's own `VisionTransformer` (tests/integration/parity.rs).
//!
//! Invariant: [`Vit::forward_frozen`] runs the frozen prefix (the embedding
//! and blocks `[0, k)`) without autograd and detaches its output, so
//! backward stops at the first trainable block and builds no graph for the
//! prefix.

use tch::{nn, nn::Module, Tensor};

use crate::model::precision::{autocast, Precision};
use crate::model::{Forward, Group, PrefixModel};

mod config;
mod names;

pub use config::{Normalisation, Preset, VitConfig};
pub use names::{group_of, layer_id, no_weight_decay};

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
        let qkv = nn::LinearConfig {
            bias: cfg.qkv_bias,
            ..Default::default()
        };
        Attention {
            qkv: nn::linear(&p / "qkv", cfg.dim, 3 * cfg.dim, qkv),
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
    quick_gelu: bool,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu {
            // timm's `quick_gelu` (OpenAI CLIP).
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        };
        self.fc2.forward(&h)
    }
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    /// LayerScale `ls1.gamma`, `ls2.gamma` (with `init_values`).
    ls: Option<(Tensor, Tensor)>,
    norm2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        let hidden = (cfg.dim as f64 * cfg.mlp_ratio) as i64;
        let ls = cfg.init_values.map(|v| {
            let gamma = |name: &str| p.sub(name).var("gamma", &[cfg.dim], nn::Init::Const(v));
            (gamma("ls1"), gamma("ls2"))
        });
        Block {
            norm1: layer_norm(&p / "norm1", cfg.dim, cfg.norm_eps),
            attn: Attention::new(&p / "attn", cfg),
            ls,
            norm2: layer_norm(&p / "norm2", cfg.dim, cfg.norm_eps),
            mlp: Mlp {
                fc1: nn::linear(&p / "mlp" / "fc1", cfg.dim, hidden, Default::default()),
                fc2: nn::linear(&p / "mlp" / "fc2", hidden, cfg.dim, Default::default()),
                quick_gelu: cfg.act_layer == "quick_gelu",
            },
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let a = self.attn.forward(&self.norm1.forward(x));
        let x = match &self.ls {
            Some((g1, _)) => x + a * g1,
            None => x + a,
        };
        let m = self.mlp.forward(&self.norm2.forward(&x));
        match &self.ls {
            Some((_, g2)) => &x + m * g2,
            None => &x + m,
        }
    }
}

/// A ViT whose variables live in a `VarStore` under timm's names.
#[derive(Debug)]
pub struct Vit {
    /// Its shape.
    pub cfg: VitConfig,
    proj: nn::Conv2D,
    cls_token: Option<Tensor>,
    reg_token: Option<Tensor>,
    pos_embed: Tensor,
    norm_pre: Option<nn::LayerNorm>,
    blocks: Vec<Block>,
    /// The final norm on every token (`norm`), or after pooling
    /// (`fc_norm`), as [`VitConfig::use_fc_norm`] says.
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
            // As timm: no patch-embedding bias when a norm follows (CLIP).
            bias: !cfg.pre_norm,
            ..Default::default()
        };
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let d = cfg.dim;
        let final_norm = if cfg.use_fc_norm() { "fc_norm" } else { "norm" };
        Vit {
            cfg: cfg.clone(),
            proj: nn::conv2d(p / "patch_embed" / "proj", cfg.channels, d, cfg.patch, conv),
            cls_token: cfg
                .class_token
                .then(|| p.var("cls_token", &[1, 1, d], init)),
            reg_token: (cfg.reg_tokens > 0)
                .then(|| p.var("reg_token", &[1, cfg.reg_tokens, d], init)),
            pos_embed: p.var("pos_embed", &[1, cfg.pos_embed_len(), d], init),
            norm_pre: cfg
                .pre_norm
                .then(|| layer_norm(p / "norm_pre", d, cfg.norm_eps)),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(p / "blocks" / i, cfg))
                .collect(),
            norm: layer_norm(p / final_norm, d, cfg.norm_eps),
            head: nn::linear(p / "head", d, cfg.classes, Default::default()),
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

    /// Patch embedding, position embedding and prefix tokens, as timm's
    /// `_pos_embed`, then `norm_pre`: `[B, C, H, W] -> [B, T, D]`.
    fn embed(&self, x: &Tensor) -> Tensor {
        let (_, _, h, w) = x.size4().expect("[B, C, H, W]");
        let x = self.patchify(x);
        let b = x.size()[0];
        let grid = (h / self.cfg.patch, w / self.cfg.patch);
        let pos = self.pos_embed_for(grid);
        let mut prefix: Vec<Tensor> = [&self.cls_token, &self.reg_token]
            .into_iter()
            .flatten()
            .map(|t| t.expand([b, -1, -1], false))
            .collect();
        let x = if self.cfg.no_embed_class {
            prefix.push(x + pos);
            Tensor::cat(&prefix, 1)
        } else {
            prefix.push(x);
            Tensor::cat(&prefix, 1) + pos
        };
        match &self.norm_pre {
            Some(n) => n.forward(&x),
            None => x,
        }
    }

    /// The position embedding for a `grid` of patches: the variable itself
    /// at `image_size`, resampled (bicubic, antialiased, as timm's
    /// `dynamic_img_size`) for another grid when the size is dynamic.
    fn pos_embed_for(&self, grid: (i64, i64)) -> Tensor {
        let own = self.cfg.grid();
        if grid == (own, own) {
            return self.pos_embed.shallow_clone();
        }
        assert!(
            self.cfg.dynamic_img_size,
            "input of {}x{} patches, the model's position embedding is for {own}x{own} \
             (resize the images to model.image_size {}, or set model.dynamic_img_size)",
            grid.0, grid.1, self.cfg.image_size
        );
        let prefix = if self.cfg.no_embed_class {
            0
        } else {
            self.cfg.prefix_tokens()
        };
        crate::model::weights::resample_pos_embed(&self.pos_embed, prefix, (own, own), grid, true)
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

    /// The feature the head sees, `[B, T, D] -> [B, D]`: the class token
    /// after `norm`, or the mean of the patch tokens after `fc_norm`
    /// (timm's `forward_head` before the classifier).
    fn pool(&self, h: &Tensor) -> Tensor {
        let fc_norm = self.cfg.use_fc_norm();
        let h = if fc_norm {
            h.shallow_clone()
        } else {
            self.norm.forward(h)
        };
        let pooled = if self.cfg.global_pool == "avg" {
            let prefix = self.cfg.prefix_tokens();
            let t = h.size()[1];
            h.narrow(1, prefix, t - prefix).mean_dim(1, false, None)
        } else {
            h.select(1, 0)
        };
        if fc_norm {
            self.norm.forward(&pooled)
        } else {
            pooled
        }
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
        let cls = self.pool(&h); // [B, D]
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

    fn layer_id(&self, name: &str) -> usize {
        layer_id(name, self.blocks.len())
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        no_weight_decay(name)
    }

    /// `[B, C, H, W] -> logits [B, classes]` and the pooled features
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
    /// autograd and detached: `[B, C, H, W] -> [B, T, D]`.
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
    /// boundary): `[B, T, D] -> [B, T, D]`.
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

    fn walk_blocks(&self, x: &Tensor, each: &mut dyn FnMut(usize, &Tensor)) {
        autocast(self.precision, x.device(), || {
            tch::no_grad(|| {
                let mut h = self.embed(x);
                for (i, b) in self.blocks.iter().enumerate() {
                    h = b.forward(&h);
                    each(i, &h);
                }
            })
        })
    }

    /// As [`Vit::pool`] picks its token, without the norm.
    fn block_token(&self, h: &Tensor) -> Tensor {
        if self.cfg.global_pool == "avg" {
            let prefix = self.cfg.prefix_tokens();
            let t = h.size()[1];
            h.narrow(1, prefix, t - prefix).mean_dim(1, false, None)
        } else {
            h.select(1, 0)
        }
    }

    /// Continues from `h`, the output of blocks `[0, start)`: blocks
    /// `[start, frozen)` without autograd (e.g. a probed block), the rest
    /// with it, then pooling, the final norm and the head. `[B, T, D] -> logits`.
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
        ..VitConfig::tiny_fmnist()
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
        assert_eq!(group_of("reg_token"), Group::Block(0));
        assert_eq!(group_of("norm_pre.bias"), Group::Block(0));
        assert_eq!(group_of("blocks.3.ls2.gamma"), Group::Block(3));
        assert_eq!(group_of("fc_norm.weight"), Group::Head);
        // timm's layer ids for layer-wise decay with 12 blocks.
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("norm_pre.weight", 12), 0);
        assert_eq!(layer_id("blocks.0.norm1.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.mlp.fc2.bias", 12), 12);
        assert_eq!(layer_id("norm.weight", 12), 12);
        assert_eq!(layer_id("fc_norm.weight", 12), 13);
        assert_eq!(layer_id("head.weight", 12), 13);
    }

    #[test]
    fn every_option_builds_runs_and_freezes_like_the_plain_model() {
        let variants = [
            VitConfig {
                init_values: Some(0.1),
                reg_tokens: 2,
                no_embed_class: true,
                ..tiny()
            },
            VitConfig {
                class_token: false,
                global_pool: "avg".into(),
                qkv_bias: false,
                ..tiny()
            },
            VitConfig {
                pre_norm: true,
                act_layer: "quick_gelu".into(),
                reg_tokens: 1,
                ..tiny()
            },
        ];
        for cfg in variants {
            cfg.validate().unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let m = Vit::new(&vs.root(), &cfg);
            let n: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(n, cfg.parameter_count(), "{cfg:?}");
            let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
            let full = m.forward_frozen(&x, 0);
            let frozen = m.forward_frozen(&x, 2);
            assert!(full.logits.allclose(&frozen.logits, 1e-6, 1e-6, false));
            assert_eq!(m.frozen_prefix(&x, 1).size()[1], cfg.tokens());
            let cached = m.forward_from(m.frozen_prefix(&x, 1), 1, 2).logits;
            assert!(cached.allclose(&full.logits, 1e-6, 1e-6, false));
        }
        // A fixed-size model refuses another input size; a dynamic one
        // resamples its position embedding.
        let vs = nn::VarStore::new(Device::Cpu);
        let fixed = Vit::new(&vs.root(), &tiny());
        let big = Tensor::randn([1, 1, 12, 12], (Kind::Float, Device::Cpu));
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fixed.forward_frozen(&big, 0)
        }));
        assert!(e.is_err());
        let dynamic = VitConfig {
            dynamic_img_size: true,
            ..tiny()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Vit::new(&vs.root(), &dynamic);
        assert_eq!(m.forward_frozen(&big, 0).logits.size(), [1, 5]);
    }

    #[test]
    fn presets_are_valid() {
        let names = VitConfig::preset_names();
        assert_eq!(names.len(), 12, "{names:?}");
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
