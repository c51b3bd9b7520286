//! Trains SmartFRZ's predictor ([`simfreeze_field::smartfrz::Predictor`])
//! with libtorch on recordings of simfreeze runs (the `smartfrz` plugin in
//! `record` mode), and exports it in the plugin's file format.
//!
//! Labels (SmartFRZ's, as its paper describes them): a block at a snapshot
//! is *converged* when the linear CKA of its output on the fixed batch
//! against the same block's output at the end of the run is at least `tau`
//! from that snapshot on. The inputs are the plugin's own
//! [`window_features`] of the last `W` snapshots, so training and the
//! plugin read the same numbers.

use anyhow::{bail, Context, Result};
use simfreeze_field::smartfrz::{
    linear_cka, window_features, Linear, Predictor, Provenance, Snapshot, FORMAT,
};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// A recording's snapshots, in step order (a step recorded twice, after a
/// resumed crash: the later line).
pub fn load(path: &std::path::Path) -> Result<Vec<Snapshot>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut snaps: Vec<Snapshot> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let s: Snapshot = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a smartfrz recording",
                path.display(),
                i + 1
            )
        })?;
        if s.weights.len() != s.layers * s.samples || s.grams.len() != s.layers * s.rows * s.rows {
            bail!("{} line {}: sizes do not match", path.display(), i + 1);
        }
        snaps.retain(|o| o.step != s.step);
        snaps.push(s);
    }
    snaps.sort_by_key(|s| s.step);
    if snaps.len() < 2 {
        bail!("{}: fewer than two snapshots", path.display());
    }
    Ok(snaps)
}

/// Per block, the CKA of each snapshot's probe output against the last
/// snapshot's: `[block][snapshot]`.
pub fn cka_to_final(snaps: &[Snapshot]) -> Vec<Vec<f64>> {
    let last = snaps.last().expect("at least one snapshot");
    let (b, l) = (last.rows, last.layers);
    (0..l)
        .map(|i| {
            let fin = &last.grams[i * b * b..(i + 1) * b * b];
            snaps
                .iter()
                .map(|s| linear_cka(&s.grams[i * b * b..(i + 1) * b * b], fin, b))
                .collect()
        })
        .collect()
}

/// Training windows of one recording: inputs `N × W × (S + 1)` and labels.
#[derive(Debug, Default, Clone)]
pub struct Windows {
    /// Inputs, row-major.
    pub x: Vec<f32>,
    /// 1 converged, 0 not.
    pub y: Vec<f32>,
}

impl Windows {
    /// Windows held.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Appends `other`.
    pub fn extend(&mut self, other: &Windows) {
        self.x.extend_from_slice(&other.x);
        self.y.extend_from_slice(&other.y);
    }
}

/// Every window of `window` snapshots `stride` snapshots apart, of every
/// block but the last (the plugin never freezes it), labelled by `tau`.
pub fn windows(snaps: &[Snapshot], window: usize, stride: usize, tau: f64) -> Windows {
    let cka = cka_to_final(snaps);
    let (l, s) = (snaps[0].layers, snaps[0].samples);
    let mut out = Windows::default();
    let span = (window - 1) * stride;
    for (i, row) in cka.iter().enumerate().take(l.saturating_sub(1)) {
        // Converged from t on: CKA at least tau at t and every later snapshot.
        let mut stays = vec![false; row.len()];
        let mut all = true;
        for t in (0..row.len()).rev() {
            all &= row[t] >= tau;
            stays[t] = all;
        }
        for t in span..snaps.len() {
            let picked: Vec<&[f32]> = (0..window)
                .map(|j| {
                    let snap = &snaps[t - span + j * stride];
                    &snap.weights[i * s..(i + 1) * s]
                })
                .collect();
            out.x.extend(window_features(&picked));
            out.y.push(if stays[t] { 1.0 } else { 0.0 });
        }
    }
    out
}

/// The predictor as a libtorch module (the reference forward).
pub struct Net {
    /// Its variables.
    pub vs: nn::VarStore,
    layers: Vec<(String, nn::Linear)>,
    window: usize,
    samples: usize,
    hidden: usize,
}

const LAYERS: [&str; 7] = ["embed1", "embed2", "query", "key", "value", "out1", "out2"];

impl Net {
    /// A freshly initialised predictor (PyTorch's default `nn.Linear`
    /// initialisation).
    pub fn new(samples: usize, window: usize, hidden: usize) -> Net {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let layers = LAYERS
            .iter()
            .map(|name| {
                let (i, o) = match *name {
                    "embed1" => (samples + 1, hidden),
                    "out2" => (hidden, 1),
                    _ => (hidden, hidden),
                };
                let lin = nn::linear(&root / *name, i as i64, o as i64, Default::default());
                (name.to_string(), lin)
            })
            .collect();
        Net {
            vs,
            layers,
            window,
            samples,
            hidden,
        }
    }

    fn layer(&self, name: &str) -> &nn::Linear {
        &self
            .layers
            .iter()
            .find(|(n, _)| n == name)
            .expect("layer")
            .1
    }

    /// Logits of `x`, `N × W × (S + 1)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self
            .layer("embed2")
            .forward(&self.layer("embed1").forward(x).relu());
        let q = self
            .layer("query")
            .forward(&h.select(1, self.window as i64 - 1));
        let k = self.layer("key").forward(&h);
        let v = self.layer("value").forward(&h);
        let scores = k.matmul(&q.unsqueeze(-1)).squeeze_dim(-1) / (self.hidden as f64).sqrt();
        let a = scores.softmax(-1, Kind::Float);
        let context = (a.unsqueeze(-1) * v).sum_dim_intlist(1, false, Kind::Float);
        self.layer("out2")
            .forward(&self.layer("out1").forward(&context).relu())
            .squeeze_dim(-1)
    }

    /// The plugin's predictor with these weights.
    pub fn export(&self, every: u64, provenance: Provenance) -> Result<Predictor> {
        let lin = |name: &str| -> Result<Linear> {
            let l = self.layer(name);
            let (o, i) = l.ws.size2()?;
            let bias = l.bs.as_ref().context("bias")?;
            Ok(Linear {
                out: o as usize,
                inp: i as usize,
                weight: Vec::<f32>::try_from(l.ws.flatten(0, -1))?,
                bias: Vec::<f32>::try_from(bias)?,
            })
        };
        let p = Predictor {
            format: FORMAT.into(),
            samples: self.samples,
            window: self.window,
            every,
            hidden: self.hidden,
            embed1: lin("embed1")?,
            embed2: lin("embed2")?,
            query: lin("query")?,
            key: lin("key")?,
            value: lin("value")?,
            out1: lin("out1")?,
            out2: lin("out2")?,
            provenance,
        };
        p.check().map_err(anyhow::Error::msg)?;
        Ok(p)
    }

    /// The windows as a tensor.
    pub fn input(&self, w: &Windows) -> Tensor {
        Tensor::from_slice(&w.x).view([w.len() as i64, self.window as i64, self.samples as i64 + 1])
    }
}

/// Accuracy of `logits` against `y` at probability 0.5.
pub fn accuracy(logits: &Tensor, y: &[f32]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    let predicted = Vec::<f32>::try_from(logits.ge(0.0).to_kind(Kind::Float)).expect("floats");
    predicted.iter().zip(y).filter(|(p, y)| p == y).count() as f64 / y.len() as f64
}

/// Full-batch Adam on the binary cross-entropy, positives weighted to
/// balance the classes. Every epoch flips the sign of each sampled
/// weight's trajectory at random (whether a block has converged does not
/// depend on which way its weights move, and the predictor must not learn
/// the recorded weights themselves). Returns the final training loss.
pub fn train(net: &mut Net, w: &Windows, epochs: usize, lr: f64) -> Result<f64> {
    let x = net.input(w);
    let (n, s) = (w.len() as i64, net.samples as i64);
    let y = Tensor::from_slice(&w.y);
    let positives = w.y.iter().filter(|v| **v > 0.5).count().max(1) as f64;
    let negatives = (w.len() as f64 - positives).max(1.0);
    let pos_weight = Tensor::from_slice(&[(negatives / positives) as f32]);
    let mut opt = nn::Adam::default().build(&net.vs, lr)?;
    let mut last = f64::NAN;
    for epoch in 0..epochs {
        let signs = Tensor::randint(2, [n, 1, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let flip = Tensor::cat(
            &[signs, Tensor::ones([n, 1, 1], (Kind::Float, Device::Cpu))],
            2,
        );
        let loss = net.forward(&(&x * flip)).binary_cross_entropy_with_logits(
            &y,
            None::<Tensor>,
            Some(pos_weight.shallow_clone()),
            Reduction::Mean,
        );
        opt.backward_step(&loss);
        last = loss.double_value(&[]);
        if !last.is_finite() {
            bail!("the loss became {last} at epoch {epoch}");
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_forward_matches_libtorchs_on_the_same_weights() {
        tch::manual_seed(7);
        let net = Net::new(64, 8, 32);
        let p = net.export(4, Provenance::default()).unwrap();
        // Windows of a random walk with drift, and a still one.
        let mut w = Windows::default();
        let mut state = 1u64;
        let mut rand = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for k in 0..16 {
            let mut snaps = vec![(0..64).map(|_| rand()).collect::<Vec<f32>>()];
            for t in 1..8 {
                let prev = snaps[t - 1].clone();
                snaps.push(
                    prev.iter()
                        .map(|v| v + 0.01 * k as f32 * (rand() + 0.2))
                        .collect(),
                );
            }
            let refs: Vec<&[f32]> = snaps.iter().map(|v| &v[..]).collect();
            w.x.extend(window_features(&refs));
            w.y.push(0.0);
        }
        let torch = Vec::<f32>::try_from(net.forward(&net.input(&w))).unwrap();
        let per = 8 * 65;
        for (i, t) in torch.iter().enumerate() {
            let ours = p.logit(&w.x[i * per..(i + 1) * per]);
            assert!(
                (ours - t).abs() <= 1e-5 * (1.0 + t.abs()),
                "window {i}: plugin {ours}, libtorch {t}"
            );
        }
    }

    fn snapshot(step: u64, w: f32, gram_scale: f32, second: f32) -> Snapshot {
        // 2 blocks, 1 sample each, probe of 2 rows: block 0's Gram fixed,
        // block 1's depends on `second`.
        Snapshot {
            step,
            layers: 2,
            samples: 1,
            weights: vec![w, w],
            rows: 2,
            grams: vec![gram_scale, 0.0, 0.0, 1.0, 1.0, second, second, 1.0],
        }
    }

    #[test]
    fn labels_say_converged_from_the_snapshot_whose_cka_stays_above_tau() {
        // Block 0's centred Gram: 2 rows, [[a, -a], [-a, a]] for any scale:
        // CKA 1 throughout, so every window is converged.
        let snaps: Vec<Snapshot> = (0..5)
            .map(|t| snapshot(t, t as f32, 2.0 + t as f32, 1.0))
            .collect();
        let w = windows(&snaps, 2, 1, 0.9);
        // Block 1 is the last block: never labelled. Windows t = 1..5.
        assert_eq!(w.y, vec![1.0; 4]);
        assert_eq!(w.x.len(), 4 * 2 * 2);
        // The CKA of a constant Gram against itself is 0 (nothing to
        // compare): never converged.
        let cka = cka_to_final(&snaps);
        assert_eq!(cka[1], vec![0.0; 5]);
    }
}
