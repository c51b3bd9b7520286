//! The optimizers against PyTorch's update rules, the schedule, clipping
//! and the state's round trip.

use super::*;
use crate::model::vit::group_of;
use approx::assert_relative_eq;

#[test]
fn cosine_schedule_with_warmup() {
    let c = Recipe::sgd(SgdConfig {
        lr: 1.0,
        warmup_steps: 10,
        ..Default::default()
    });
    assert_relative_eq!(c.lr_at(0, 110), 0.1);
    assert_relative_eq!(c.lr_at(9, 110), 1.0);
    assert_relative_eq!(c.lr_at(10, 110), 1.0);
    assert_relative_eq!(c.lr_at(60, 110), 0.5, epsilon = 1e-12);
    assert!(c.lr_at(109, 110) < 0.001);
}

/// PyTorch's SGD rule in plain tensor operations, for one parameter.
fn reference_update(
    p: &Tensor,
    buf: &mut Option<Tensor>,
    g: &Tensor,
    cfg: &SgdConfig,
    lr: f64,
) -> Tensor {
    let mut d = g + p * cfg.weight_decay;
    if cfg.momentum != 0.0 {
        let b = match buf.take() {
            None => d.copy(),
            Some(b) => b * cfg.momentum + &d,
        };
        d = if cfg.nesterov {
            &d + &b * cfg.momentum
        } else {
            b.copy()
        };
        *buf = Some(b);
    }
    p - d * lr
}

#[test]
fn fused_step_follows_pytorch_rule_with_nesterov_decay_factors_and_late_unfreezing() {
    for (momentum, nesterov) in [(0.9, true), (0.9, false), (0.0, false)] {
        let cfg = SgdConfig {
            momentum,
            nesterov,
            weight_decay: 0.01,
            ..Default::default()
        };
        let vs = VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        let names = [
            "blocks.0.mlp.fc1.weight",
            "blocks.1.attn.qkv.weight",
            "head.weight",
        ];
        let vars: Vec<Tensor> = names
            .iter()
            .map(|n| {
                let mut path = root.clone();
                let parts: Vec<&str> = n.split('.').collect();
                for part in &parts[..parts.len() - 1] {
                    path = path.sub(*part);
                }
                path.var(
                    parts[parts.len() - 1],
                    &[3, 4],
                    tch::nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )
            })
            .collect();
        let mut shadow: Vec<Tensor> = vars.iter().map(|v| v.detach().copy()).collect();
        let mut bufs: Vec<Option<Tensor>> = vec![None, None, None];
        let mut opt = Optimizer::with_groups(&vs, Recipe::sgd(cfg.clone()), group_of);
        let factors = [0.5f32, 2.0];
        for step in 0..4 {
            // Block 0 is frozen for the first two steps, then trains.
            let frozen = if step < 2 { 1 } else { 0 };
            let loss = vars
                .iter()
                .map(|v| (v * v).sum(tch::Kind::Float) + v.sin().sum(tch::Kind::Float))
                .fold(
                    Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
                    |a, b| a + b,
                );
            let grads = opt.backward(&loss, frozen);
            let lr = 0.1 / (step + 1) as f64;
            for (i, s) in shadow.iter_mut().enumerate() {
                if i < frozen {
                    continue;
                }
                let g = s.shallow_clone() * 2.0 + s.cos();
                let factor = if i < 2 { f64::from(factors[i]) } else { 1.0 };
                *s = reference_update(s, &mut bufs[i], &g, &cfg, lr * factor);
            }
            opt.step(&grads, lr, &factors);
            for (v, s) in vars.iter().zip(&shadow) {
                let diff = (v.detach() - s).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "momentum {momentum} nesterov {nesterov} step {step}: {diff}"
                );
            }
        }
    }
}

#[test]
fn matches_pytorch_sgd_momentum_update_rule() {
    // buf_1 = g; p_1 = p_0 - lr * buf_1; buf_2 = m * buf_1 + g;
    // p_2 = p_1 - lr * buf_2 (constant gradient g = 2 * p_0 for p^2 ...
    // here a linear loss so g is constant).
    let vs = VarStore::new(tch::Device::Cpu);
    let w = vs
        .root()
        .sub("head")
        .var("weight", &[1], tch::nn::Init::Const(1.0));
    let mut opt = Optimizer::with_groups(
        &vs,
        Recipe::sgd(SgdConfig {
            momentum: 0.9,
            ..Default::default()
        }),
        group_of,
    );
    for _ in 0..2 {
        let grads = opt.backward(&(&w * 3.0).sum(tch::Kind::Float), 0);
        opt.step(&grads, 0.1, &[]);
    }
    // p1 = 1 - 0.1*3 = 0.7; buf2 = 0.9*3 + 3 = 5.7; p2 = 0.7 - 0.57 = 0.13
    assert_relative_eq!(w.double_value(&[0]), 0.13, epsilon = 1e-6);
}

fn one_var(vs: &VarStore, name: &str, shape: &[i64]) -> Tensor {
    let mut path = vs.root();
    let parts: Vec<&str> = name.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        path = path.sub(*part);
    }
    path.var(
        parts[parts.len() - 1],
        shape,
        tch::nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )
}

#[test]
fn adamw_step_skipped_on_found_inf_leaves_weights_moments_and_step_count() {
    let vs = VarStore::new(tch::Device::Cpu);
    let w = one_var(&vs, "blocks.0.mlp.fc1.weight", &[3, 4]);
    let mut opt = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
    let loss = |w: &Tensor| (w * w).sum(tch::Kind::Float);
    let grads = opt.backward(&loss(&w), 0);
    opt.step(&grads, 0.01, &[]);
    let before: Vec<(String, Tensor)> = opt
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let w_before = w.detach().copy();
    assert_eq!(before.len(), 3);
    let grads = opt.backward(&loss(&w), 0);
    let inf = Tensor::ones([], (tch::Kind::Float, tch::Device::Cpu));
    opt.step_unless(&grads, 0.01, &[], Some(&inf));
    assert!(w.detach().equal(&w_before), "weights moved");
    for ((n, a), (_, b)) in before.iter().zip(opt.state()) {
        assert!(a.equal(&b), "{n} changed");
    }
    let step = &opt.state()[2].1;
    assert_eq!(step.double_value(&[]), 1.0);
    let fine = Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
    opt.step_unless(&grads, 0.01, &[], Some(&fine));
    assert!(!w.detach().equal(&w_before));
    assert_eq!(opt.state()[2].1.double_value(&[]), 2.0);
}

#[test]
fn clipping_scales_the_global_norm_down_to_the_limit_only() {
    let vs = VarStore::new(tch::Device::Cpu);
    let a = one_var(&vs, "blocks.0.attn.qkv.weight", &[4, 4]);
    let b = one_var(&vs, "head.weight", &[2, 4]);
    for (limit, scale) in [(1.0, 30.0), (1e6, 1.0)] {
        let recipe = Recipe {
            clip_grad_norm: limit,
            ..Recipe::sgd(Default::default())
        };
        let opt = Optimizer::with_groups(&vs, recipe, group_of);
        let loss = (&a * scale).sum(tch::Kind::Float) + (&b * scale).sum(tch::Kind::Float);
        let mut grads = opt.backward(&loss, 0);
        let norm = |g: &Grads| {
            g.grads
                .iter()
                .map(|t| t.square().sum(tch::Kind::Float).double_value(&[]))
                .sum::<f64>()
                .sqrt()
        };
        let raw = norm(&grads);
        opt.clip(&mut grads);
        let clipped = norm(&grads);
        if raw > limit {
            assert!((clipped - limit).abs() < 1e-4 * limit, "{raw} -> {clipped}");
        } else {
            assert_eq!(clipped, raw);
        }
    }
}

/// The one-kernel norms and scaling compute on the CPU exactly what
/// the per-tensor loop they replaced computed (clipping), and the
/// per-block norms agree with sums of squares to float rounding.
#[test]
fn foreach_clipping_and_block_norms_match_the_per_tensor_loop() {
    tch::manual_seed(7);
    let vs = VarStore::new(tch::Device::Cpu);
    let vars: Vec<Tensor> = [
        ("blocks.0.attn.qkv.weight", vec![6, 4]),
        ("blocks.0.attn.qkv.bias", vec![6]),
        ("blocks.1.mlp.fc1.weight", vec![5, 3]),
        ("head.weight", vec![2, 4]),
    ]
    .iter()
    .map(|(n, shape)| one_var(&vs, n, shape))
    .collect();
    let loss = vars
        .iter()
        .map(|v| (v * v * 3.0).sum(tch::Kind::Float) + v.sin().sum(tch::Kind::Float))
        .fold(
            Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu)),
            |a, b| a + b,
        );
    let recipe = Recipe {
        clip_grad_norm: 0.1,
        ..Recipe::sgd(Default::default())
    };
    let mut opt = Optimizer::with_groups(&vs, recipe, group_of);
    let mut grads = opt.backward(&loss, 0);
    let raw: Vec<Tensor> = grads.grads.iter().map(|g| g.copy()).collect();
    // Per block, the loop: sums of squares, then a root.
    let mut want = [0f64; 2];
    for (&i, g) in grads.index.iter().zip(&raw) {
        if let Group::Block(b) = opt.params[i].group {
            want[b] += g.square().sum(tch::Kind::Float).double_value(&[]);
        }
    }
    let norms: Vec<f32> = Vec::try_from(opt.grad_norms(&mut grads, 2)).unwrap();
    for b in 0..2 {
        let w = want[b].sqrt();
        assert!(
            (f64::from(norms[b]) - w).abs() <= 1e-6 * w,
            "{norms:?} {want:?}"
        );
    }
    // Clipping, the loop it replaced.
    let total = Tensor::stack(
        &raw.iter()
            .map(|g| g.norm().to_kind(tch::Kind::Float))
            .collect::<Vec<_>>(),
        0,
    )
    .norm();
    let coef = (total + 1e-6).reciprocal().g_mul_scalar(0.1).clamp_max(1.0);
    opt.clip(&mut grads);
    for (g, r) in grads.grads.iter().zip(&raw) {
        assert!(g.equal(&(r * &coef)), "clipping changed a number");
    }
}

#[test]
fn state_of_the_other_optimizer_is_refused_naming_both() {
    let vs = VarStore::new(tch::Device::Cpu);
    let w = one_var(&vs, "head.weight", &[2, 2]);
    let mut adamw = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
    let grads = adamw.backward(&w.sum(tch::Kind::Float), 0);
    adamw.step(&grads, 0.1, &[]);
    let mut sgd = Optimizer::with_groups(&vs, Recipe::sgd(Default::default()), group_of);
    let e = sgd.load_state(adamw.state()).unwrap_err();
    assert!(e.contains("AdamW state") && e.contains("Sgd"), "{e}");
    let mut again = Optimizer::with_groups(&vs, Recipe::adamw(Default::default()), group_of);
    again.load_state(adamw.state()).unwrap();
    assert_eq!(again.state().len(), 3);
    let partial: Vec<_> = adamw.state().into_iter().take(2).collect();
    let e = again.load_state(partial).unwrap_err();
    assert!(e.contains("incomplete"), "{e}");
}
