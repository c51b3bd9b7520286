//! SmartFRZ's predictor (Li et al., ICLR 2023; no public code): an
//! attention network that reads a window of snapshots of one block's
//! sampled weights and says whether the block has converged.
//!
//! As built here (the shape follows the paper's description and a public
//! third-party reimplementation; the sizes are ours):
//!
//! ```text
//! x_t   = window_features(snapshots)[t]            (S + 1 values, t < W)
//! h_t   = embed2(relu(embed1(x_t)))                (H)
//! k_t   = key(h_t),  v_t = value(h_t),  q = query(h_{W-1})
//! a     = softmax_t(q · k_t / sqrt(H))
//! logit = out2(relu(out1(Σ_t a_t v_t)))           (1)
//! ```
//!
//! Every layer is `y = W x + b` with `W` stored `[out][in]` row-major
//! (PyTorch's `nn.Linear` layout), so weights trained with libtorch load
//! unchanged. The forward is plain Rust: the plugin needs no libtorch.

use serde::{Deserialize, Serialize};

/// The format tag of a predictor file.
pub const FORMAT: &str = "simfreeze-smartfrz-predictor/1";

/// A linear layer, `y = W x + b`, `W` `[out][in]` row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
    /// `out × inp`, row-major.
    pub weight: Vec<f32>,
    /// `out`.
    pub bias: Vec<f32>,
}

impl Linear {
    fn check(&self, name: &str, inp: usize, out: usize) -> Result<(), String> {
        if self.inp != inp || self.out != out {
            return Err(format!(
                "layer `{name}` is {}x{}, the predictor needs {inp}x{out}",
                self.inp, self.out
            ));
        }
        if self.weight.len() != inp * out || self.bias.len() != out {
            return Err(format!(
                "layer `{name}` holds {} weights and {} biases for {inp}x{out}",
                self.weight.len(),
                self.bias.len()
            ));
        }
        if self.weight.iter().chain(&self.bias).any(|v| !v.is_finite()) {
            return Err(format!("layer `{name}` holds a NaN or infinite value"));
        }
        Ok(())
    }

    fn apply(&self, x: &[f32], y: &mut Vec<f32>) {
        y.clear();
        for (row, b) in self.weight.chunks_exact(self.inp).zip(&self.bias) {
            // Accumulate in f64: the result is then the exact dot product
            // rounded once, whatever the summation order of a reference.
            let dot: f64 = row
                .iter()
                .zip(x)
                .map(|(w, v)| f64::from(*w) * f64::from(*v))
                .sum();
            y.push((dot + f64::from(*b)) as f32);
        }
    }
}

/// Where the predictor's weights came from, kept in its file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    /// The command that produced the file.
    pub command: String,
    /// What the training data was (source task, runs, labels).
    pub data: String,
    /// Training windows (positives, negatives).
    pub windows: (usize, usize),
    /// Accuracy on held-out windows, and on the training windows.
    pub accuracy: (f64, f64),
}

/// The predictor: its sizes, the snapshot cadence it was trained for, and
/// its layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Predictor {
    /// [`FORMAT`].
    pub format: String,
    /// Sampled weights per snapshot (S).
    pub samples: usize,
    /// Snapshots per window (W).
    pub window: usize,
    /// Steps between two snapshots in the training runs.
    pub every: u64,
    /// Hidden width (H).
    pub hidden: usize,
    /// `S + 1 -> H`.
    pub embed1: Linear,
    /// `H -> H`.
    pub embed2: Linear,
    /// `H -> H`.
    pub query: Linear,
    /// `H -> H`.
    pub key: Linear,
    /// `H -> H`.
    pub value: Linear,
    /// `H -> H`.
    pub out1: Linear,
    /// `H -> 1`.
    pub out2: Linear,
    /// Where the weights came from.
    pub provenance: Provenance,
}

/// The predictor shipped with the plugin (`smartfrz-predictor.json`; how
/// it was made: its `provenance` and docs/policies.md).
pub const SHIPPED: &str = include_str!("../../smartfrz-predictor.json");

impl Predictor {
    /// Parses and checks a predictor file.
    pub fn from_json(text: &str) -> Result<Predictor, String> {
        let p: Predictor =
            serde_json::from_str(text).map_err(|e| format!("not a predictor file: {e}"))?;
        p.check()?;
        Ok(p)
    }

    /// Checks the sizes of every layer.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format `{}`, this plugin reads `{FORMAT}`",
                self.format
            ));
        }
        if self.window < 2 || self.samples == 0 || self.hidden == 0 || self.every == 0 {
            return Err("window must be at least 2; samples, hidden and every at least 1".into());
        }
        let (s, h) = (self.samples, self.hidden);
        self.embed1.check("embed1", s + 1, h)?;
        self.embed2.check("embed2", h, h)?;
        self.query.check("query", h, h)?;
        self.key.check("key", h, h)?;
        self.value.check("value", h, h)?;
        self.out1.check("out1", h, h)?;
        self.out2.check("out2", h, 1)?;
        Ok(())
    }

    /// The logit that the block whose window `features` is (`W × (S + 1)`,
    /// from [`window_features`]) has converged.
    pub fn logit(&self, features: &[f32]) -> f32 {
        let (w, h) = (self.window, self.hidden);
        debug_assert_eq!(features.len(), w * (self.samples + 1));
        let (mut a, mut hid) = (Vec::new(), Vec::with_capacity(w));
        for x in features.chunks_exact(self.samples + 1) {
            self.embed1.apply(x, &mut a);
            relu(&mut a);
            let mut e = Vec::new();
            self.embed2.apply(&a, &mut e);
            hid.push(e);
        }
        let mut q = Vec::new();
        self.query.apply(&hid[w - 1], &mut q);
        let scale = 1.0 / (h as f64).sqrt();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for e in &hid {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            self.key.apply(e, &mut k);
            self.value.apply(e, &mut v);
            keys.push(k);
            values.push(v);
        }
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut context = vec![0f32; h];
        for (e, v) in exp.iter().zip(&values) {
            for (c, x) in context.iter_mut().zip(v) {
                *c += (e / total) as f32 * x;
            }
        }
        self.out1.apply(&context, &mut a);
        relu(&mut a);
        let mut out = Vec::new();
        self.out2.apply(&a, &mut out);
        out[0]
    }

    /// The probability that the block has converged.
    pub fn probability(&self, features: &[f32]) -> f64 {
        let z = f64::from(self.logit(features));
        1.0 / (1.0 + (-z).exp())
    }

    /// Multiply-adds of one [`Predictor::logit`] (the predictor's own
    /// compute, for the speedup's accounting).
    pub fn macs(&self) -> u64 {
        let (w, s, h) = (self.window as u64, self.samples as u64, self.hidden as u64);
        w * ((s + 1) * h + h * h) + h * h + 2 * w * h * h + 2 * w * h + h * h + h
    }
}

fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// The predictor's input from `W` snapshots of a block's `S` sampled
/// weights (oldest first): per snapshot, each weight minus its mean over the
/// window, divided by the root mean square of all those differences (the
/// trajectory's shape, whatever the learning rate's scale), and as value
/// `S + 1` the base-10 logarithm of that root mean square relative to the
/// weights' own (how far the block moves for its size). A block that did
/// not move at all gets zeros and -12.
pub fn window_features(snapshots: &[&[f32]]) -> Vec<f32> {
    let w = snapshots.len();
    let s = snapshots.first().map_or(0, |x| x.len());
    let mut mean = vec![0f64; s];
    for snap in snapshots {
        for (m, v) in mean.iter_mut().zip(snap.iter()) {
            *m += f64::from(*v) / w as f64;
        }
    }
    let (mut sq, mut own) = (0f64, 0f64);
    for snap in snapshots {
        for (m, v) in mean.iter().zip(snap.iter()) {
            sq += (f64::from(*v) - m).powi(2);
            own += f64::from(*v).powi(2);
        }
    }
    let n = (w * s).max(1) as f64;
    let (rms, own_rms) = ((sq / n).sqrt(), (own / n).sqrt());
    let moved = (rms / own_rms.max(1e-30)).max(1e-12).log10();
    let mut out = Vec::with_capacity(w * (s + 1));
    for snap in snapshots {
        for (m, v) in mean.iter().zip(snap.iter()) {
            out.push(if rms > 0.0 {
                ((f64::from(*v) - m) / rms) as f32
            } else {
                0.0
            });
        }
        out.push(moved as f32);
    }
    out
}

/// Linear CKA (Kornblith et al. 2019) of two representations given as
/// their `n × n` Gram matrices `K = X Xᵀ` and `L = Y Yᵀ` (row-major):
/// `⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖)`, `H` the centring matrix. 1 for
/// representations equal up to rotation and scale; 0 when either is
/// constant.
pub fn linear_cka(k: &[f32], l: &[f32], n: usize) -> f64 {
    let centre = |g: &[f32]| -> Vec<f64> {
        let row: Vec<f64> = (0..n)
            .map(|i| {
                g[i * n..(i + 1) * n]
                    .iter()
                    .map(|v| f64::from(*v))
                    .sum::<f64>()
                    / n as f64
            })
            .collect();
        let all = row.iter().sum::<f64>() / n as f64;
        let mut c = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                // G symmetric: column means equal row means.
                c[i * n + j] = f64::from(g[i * n + j]) - row[i] - row[j] + all;
            }
        }
        c
    };
    let (a, b) = (centre(k), centre(l));
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    let (ab, aa, bb) = (dot(&a, &b), dot(&a, &a), dot(&b, &b));
    if aa <= 0.0 || bb <= 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cka_is_one_for_a_rotated_and_scaled_copy_and_matches_a_hand_computed_case() {
        // X: 3 samples x 2; Y = 2 X rotated by 90 degrees.
        let x = [[1.0f32, 0.0], [0.0, 2.0], [3.0, 1.0]];
        let y: Vec<[f32; 2]> = x.iter().map(|r| [-2.0 * r[1], 2.0 * r[0]]).collect();
        let gram = |m: &[[f32; 2]]| -> Vec<f32> {
            let mut g = Vec::new();
            for a in m {
                for b in m {
                    g.push(a[0] * b[0] + a[1] * b[1]);
                }
            }
            g
        };
        let (k, l) = (gram(&x), gram(&y));
        assert!((linear_cka(&k, &l, 3) - 1.0).abs() < 1e-12);
        // Z = first coordinate only: centred X = [[-1/3, -1], [-4/3, 1],
        // [5/3, 0]], centred Z = [-1/3, -4/3, 5/3]. ‖XᵀZ‖² / (‖XᵀX‖ ‖ZᵀZ‖)
        // with XᵀZ = (42/9, -1), XᵀX = [[42/9, -1], [-1, 2]], ZᵀZ = 42/9.
        let z: Vec<[f32; 2]> = x.iter().map(|r| [r[0], 0.0]).collect();
        let m = gram(&z);
        let xz2 = (42.0f64 / 9.0).powi(2) + 1.0;
        let xx = ((42.0f64 / 9.0).powi(2) + 1.0 + 1.0 + 4.0).sqrt();
        let expected = xz2 / (xx * 42.0 / 9.0);
        assert!((linear_cka(&k, &m, 3) - expected).abs() < 1e-6);
        assert_eq!(linear_cka(&k, &[1.0; 9], 3), 0.0);
    }

    #[test]
    fn window_features_are_the_centred_shape_and_the_log_relative_movement() {
        // Two weights, three snapshots: w0 = 1, 2, 3 (moves), w1 = 10 (still).
        let snaps: [&[f32]; 3] = [&[1.0, 10.0], &[2.0, 10.0], &[3.0, 10.0]];
        let f = window_features(&snaps);
        // Centred w0: -1, 0, 1; squares sum 2 over 6 values: rms = 1/sqrt(3).
        let rms = (1.0f64 / 3.0).sqrt();
        assert!((f64::from(f[0]) + 1.0 / rms).abs() < 1e-6);
        assert_eq!(f[1], 0.0);
        assert_eq!(f[3], 0.0);
        assert!((f64::from(f[6]) - 1.0 / rms).abs() < 1e-6);
        // Own rms: sqrt((1 + 4 + 9 + 300) / 6).
        let moved = (rms / (314.0f64 / 6.0).sqrt()).log10();
        assert!((f64::from(f[2]) - moved).abs() < 1e-6);
        assert_eq!(f[2], f[5]);
        // Still: zeros and -12.
        let still: [&[f32]; 2] = [&[1.0, 2.0], &[1.0, 2.0]];
        assert_eq!(
            window_features(&still),
            vec![0.0, 0.0, -12.0, 0.0, 0.0, -12.0]
        );
    }

    #[test]
    fn the_shipped_predictor_loads_and_a_bad_file_is_refused_with_the_reason() {
        let p = Predictor::from_json(SHIPPED).expect("shipped predictor");
        assert!(p.window >= 2 && p.samples > 0);
        let mut q = p.clone();
        q.key.bias.pop();
        let e = q.check().unwrap_err();
        assert!(e.contains("key"), "{e}");
        let mut q = p.clone();
        q.embed1.weight[0] = f32::NAN;
        assert!(q.check().unwrap_err().contains("NaN"));
        assert!(Predictor::from_json("{}")
            .unwrap_err()
            .contains("not a predictor"));
    }
}
