//! Similarity metrics between two aligned `n × d` matrices (row `i` of `a`
//! is compared with row `i` of `b`). Higher means more similar.
//!
//! - `cosine` (the paper's): mean over rows of the cosine similarity.
//! - `pearson`: mean over rows of the Pearson correlation of the two rows.
//! - `cka`: linear CKA (Kornblith et al. 2019) of the column-centred
//!   matrices, `||AᵀB||²_F / (||AᵀA||_F ||BᵀB||_F)`; a property of the
//!   matrices, not of rows, so it needs more than one row.
//! - `rbf`: mean over rows of `exp(-gamma * ||a_i - b_i||² / d)`, a
//!   distance-based similarity in (0, 1]; option `gamma` (default 1).
//!
//! Sums run in f64. Degenerate inputs (zero rows, constant rows) count as
//! similarity 0 rather than NaN; non-finite inputs give an error.

use serde::Deserialize;
use simfreeze_abi::sdk::{
    Info, Matrix, Metric, MetricHandle, MetricPlugin, OptionDoc, PolicyError,
};

fn check(a: Matrix<'_>, b: Matrix<'_>) -> Result<(), PolicyError> {
    if a.rows() != b.rows() || a.cols() != b.cols() {
        return Err(PolicyError::invalid("matrices of different shapes"));
    }
    if a.rows() == 0 || a.cols() == 0 {
        return Err(PolicyError::invalid("empty matrices"));
    }
    if a.as_slice()
        .iter()
        .chain(b.as_slice())
        .any(|v| !v.is_finite())
    {
        return Err(PolicyError::invalid("non-finite values"));
    }
    Ok(())
}

fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

/// Row-wise cosine similarity, averaged.
pub fn cosine(a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
    check(a, b)?;
    let total: f64 = a
        .iter_rows()
        .zip(b.iter_rows())
        .map(|(x, y)| {
            let n = (dot(x, x) * dot(y, y)).sqrt();
            if n > 0.0 {
                dot(x, y) / n
            } else {
                0.0
            }
        })
        .sum();
    Ok(total / a.rows() as f64)
}

/// Row-wise Pearson correlation, averaged.
pub fn pearson(a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
    check(a, b)?;
    let d = a.cols() as f64;
    let total: f64 = a
        .iter_rows()
        .zip(b.iter_rows())
        .map(|(x, y)| {
            let mx = x.iter().map(|v| f64::from(*v)).sum::<f64>() / d;
            let my = y.iter().map(|v| f64::from(*v)).sum::<f64>() / d;
            let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
            for (p, q) in x.iter().zip(y) {
                let (u, v) = (f64::from(*p) - mx, f64::from(*q) - my);
                sxy += u * v;
                sxx += u * u;
                syy += v * v;
            }
            let n = (sxx * syy).sqrt();
            if n > 0.0 {
                sxy / n
            } else {
                0.0
            }
        })
        .sum();
    Ok(total / a.rows() as f64)
}

/// Linear CKA of the column-centred matrices.
pub fn cka(a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
    check(a, b)?;
    let (n, d) = (a.rows(), a.cols());
    let centred = |m: Matrix<'_>| -> Vec<f64> {
        let mut mean = vec![0.0; d];
        for r in m.iter_rows() {
            for (k, v) in r.iter().enumerate() {
                mean[k] += f64::from(*v) / n as f64;
            }
        }
        m.iter_rows()
            .flat_map(|r| {
                r.iter()
                    .zip(&mean)
                    .map(|(v, m)| f64::from(*v) - m)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (x, y) = (centred(a), centred(b));
    // Gram form: ||XᵀY||²_F = sum over row pairs of (x_i·x_j)(y_i·y_j).
    let gram = |m: &[f64]| -> Vec<f64> {
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v: f64 = (0..d).map(|k| m[i * d + k] * m[j * d + k]).sum();
                g[i * n + j] = v;
                g[j * n + i] = v;
            }
        }
        g
    };
    let (kx, ky) = (gram(&x), gram(&y));
    let hsic = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f64>();
    let den = (hsic(&kx, &kx) * hsic(&ky, &ky)).sqrt();
    Ok(if den > 0.0 { hsic(&kx, &ky) / den } else { 0.0 })
}

/// Mean RBF kernel value between aligned rows.
pub fn rbf(a: Matrix<'_>, b: Matrix<'_>, gamma: f64) -> Result<f64, PolicyError> {
    check(a, b)?;
    let d = a.cols() as f64;
    let total: f64 = a
        .iter_rows()
        .zip(b.iter_rows())
        .map(|(x, y)| {
            let sq: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (f64::from(*p) - f64::from(*q)).powi(2))
                .sum();
            (-gamma * sq / d).exp()
        })
        .sum();
    Ok(total / a.rows() as f64)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

macro_rules! simple_metric {
    ($ty:ident, $name:literal, $f:ident, $desc:literal) => {
        #[doc = $desc]
        pub struct $ty;
        impl Metric for $ty {
            fn similarity(&self, a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
                $f(a, b)
            }
        }
        impl MetricPlugin for $ty {
            fn info() -> Info {
                Info {
                    name: $name,
                    version: env!("CARGO_PKG_VERSION"),
                    description: $desc,
                    options: &[],
                }
            }
            fn new(options: &str) -> Result<Self, PolicyError> {
                let _: NoOptions = simfreeze_options::parse(options)?;
                Ok($ty)
            }
        }
    };
}

simple_metric!(
    Cosine,
    "cosine",
    cosine,
    "Mean row-wise cosine similarity (the paper's metric)."
);
simple_metric!(
    Pearson,
    "pearson",
    pearson,
    "Mean row-wise Pearson correlation."
);
simple_metric!(
    Cka,
    "cka",
    cka,
    "Linear CKA of the column-centred matrices."
);

/// Options of [`Rbf`].
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RbfOptions {
    /// Kernel width: similarity is `exp(-gamma * ||a - b||² / d)`.
    pub gamma: f64,
}

impl Default for RbfOptions {
    fn default() -> Self {
        RbfOptions { gamma: 1.0 }
    }
}

/// Mean RBF similarity of aligned rows.
pub struct Rbf {
    gamma: f64,
}

impl Metric for Rbf {
    fn similarity(&self, a: Matrix<'_>, b: Matrix<'_>) -> Result<f64, PolicyError> {
        rbf(a, b, self.gamma)
    }
}

impl MetricPlugin for Rbf {
    fn info() -> Info {
        Info {
            name: "rbf",
            version: env!("CARGO_PKG_VERSION"),
            description: "Mean RBF similarity exp(-gamma * ||a_i - b_i||^2 / d) of aligned rows.",
            options: &[OptionDoc {
                name: "gamma",
                default: "1.0",
                doc: "kernel width (per-dimension squared distance scale)",
            }],
        }
    }
    fn new(options: &str) -> Result<Self, PolicyError> {
        let o: RbfOptions = simfreeze_options::parse(options)?;
        if !(o.gamma > 0.0 && o.gamma.is_finite()) {
            return Err(PolicyError::options(format!(
                "gamma must be > 0, got {}",
                o.gamma
            )));
        }
        Ok(Rbf { gamma: o.gamma })
    }
}

/// Resolves a metric name to a native (linked-in) metric: the loader
/// policies get from `HostServices::native` in tests and static use.
pub fn native(name: &str, options: &str) -> Result<MetricHandle, PolicyError> {
    Ok(MetricHandle::Native(match name {
        "cosine" => Box::new(Cosine::new(options)?),
        "pearson" => Box::new(Pearson::new(options)?),
        "cka" => Box::new(Cka::new(options)?),
        "rbf" => Box::new(Rbf::new(options)?),
        other => {
            return Err(PolicyError::options(format!(
                "unknown metric `{other}`; shipped: cosine, pearson, cka, rbf"
            )))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use proptest::prelude::*;

    fn m(data: &[f32], rows: usize) -> Matrix<'_> {
        Matrix::new(data, rows, data.len() / rows).unwrap()
    }

    #[test]
    fn identical_rows_are_maximally_similar() {
        let a = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0, 0.0, 1.0, 4.0];
        assert_relative_eq!(cosine(m(&a, 3), m(&a, 3)).unwrap(), 1.0, epsilon = 1e-12);
        assert_relative_eq!(pearson(m(&a, 3), m(&a, 3)).unwrap(), 1.0, epsilon = 1e-12);
        assert_relative_eq!(cka(m(&a, 3), m(&a, 3)).unwrap(), 1.0, epsilon = 1e-12);
        assert_relative_eq!(rbf(m(&a, 3), m(&a, 3), 1.0).unwrap(), 1.0);
    }

    #[test]
    fn known_values() {
        // Orthogonal rows: cosine 0; opposite rows: -1.
        assert_relative_eq!(cosine(m(&[1.0, 0.0], 1), m(&[0.0, 1.0], 1)).unwrap(), 0.0);
        assert_relative_eq!(
            cosine(m(&[1.0, 2.0], 1), m(&[-1.0, -2.0], 1)).unwrap(),
            -1.0
        );
        // Pearson ignores offset and scale.
        assert_relative_eq!(
            pearson(m(&[1.0, 2.0, 3.0], 1), m(&[10.0, 20.0, 30.0], 1)).unwrap(),
            1.0,
            epsilon = 1e-12
        );
        // RBF of distance^2 = 2 over d = 2 with gamma 1: exp(-1).
        assert_relative_eq!(
            rbf(m(&[0.0, 0.0], 1), m(&[1.0, 1.0], 1), 1.0).unwrap(),
            (-1f64).exp()
        );
        // CKA is invariant to orthogonal transforms and isotropic scaling.
        let a = [1.0, 0.0, 0.0, 2.0, 3.0, 1.0];
        let b = [0.0, 2.0, -4.0, 0.0, -2.0, 6.0]; // a rotated 90 degrees, scaled 2
        assert_relative_eq!(cka(m(&a, 3), m(&b, 3)).unwrap(), 1.0, epsilon = 1e-12);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(cosine(m(&[f32::NAN, 1.0], 1), m(&[1.0, 1.0], 1)).is_err());
        assert!(cosine(m(&[1.0, 1.0], 1), m(&[1.0, 1.0, 1.0, 1.0], 2)).is_err());
        assert!(Rbf::new("(gamma: -1.0)").is_err());
        assert!(native("nope", "").is_err());
    }

    proptest! {
        #[test]
        fn metrics_are_bounded_and_symmetric(v in proptest::collection::vec(-10.0f32..10.0, 24), w in proptest::collection::vec(-10.0f32..10.0, 24)) {
            let (a, b) = (m(&v, 4), m(&w, 4));
            for (f, lo, hi) in [
                (cosine as fn(Matrix<'_>, Matrix<'_>) -> Result<f64, PolicyError>, -1.0, 1.0),
                (pearson, -1.0, 1.0),
                (cka, 0.0, 1.0),
            ] {
                let s = f(a, b).unwrap();
                prop_assert!(s >= lo - 1e-9 && s <= hi + 1e-9, "{s}");
                prop_assert!((s - f(b, a).unwrap()).abs() < 1e-9);
            }
            let r = rbf(a, b, 1.0).unwrap();
            prop_assert!(r > 0.0 && r <= 1.0);
        }
    }
}
