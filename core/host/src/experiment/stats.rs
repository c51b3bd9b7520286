//! The statistics of a comparison: paired differences over seeds, their
//! Student-t confidence intervals, ratios on the log scale, and the
//! verdicts read from them ([`docs/reading-a-comparison.md`]).
//!
//! Every figure here is computed from per-seed pairs (a policy's run and
//! the same seed's baseline): the seed's head initialisation and data order
//! are shared, so the pair's difference removes most of the seed-to-seed
//! spread. With one seed there is no interval: the functions return `None`
//! and the tables say `n/a`.

/// The two-sided confidence level of every interval.
pub const LEVEL: f64 = 0.95;

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// A sample's mean with its two-sided [`LEVEL`] Student-t interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// Their sample standard deviation (n − 1 in the denominator).
    pub std: f64,
    /// The interval `(low, high)`; none with fewer than two values.
    pub ci: Option<(f64, f64)>,
}

impl Estimate {
    /// The estimate of `v` (none when empty).
    pub fn of(v: &[f64]) -> Option<Estimate> {
        if v.is_empty() {
            return None;
        }
        let (mean, std) = mean_std(v);
        let n = v.len();
        let ci = (n >= 2).then(|| {
            let half = t_quantile(0.5 + LEVEL / 2.0, (n - 1) as f64) * std / (n as f64).sqrt();
            (mean - half, mean + half)
        });
        Some(Estimate { n, mean, std, ci })
    }

    /// The interval's half-width (none without an interval).
    pub fn half_width(&self) -> Option<f64> {
        self.ci.map(|(lo, hi)| (hi - lo) / 2.0)
    }
}

/// A ratio estimated on the log scale (the geometric mean of per-seed
/// ratios), reported back as ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    /// Ratios.
    pub n: usize,
    /// `exp(mean(ln r))`.
    pub mean: f64,
    /// `exp` of the log-scale interval's ends.
    pub ci: Option<(f64, f64)>,
}

impl Ratio {
    /// The estimate of the positive, finite ratios in `v` (none when there
    /// are none).
    pub fn of(v: &[f64]) -> Option<Ratio> {
        let logs: Vec<f64> = v
            .iter()
            .filter(|r| r.is_finite() && **r > 0.0)
            .map(|r| r.ln())
            .collect();
        let e = Estimate::of(&logs)?;
        Some(Ratio {
            n: e.n,
            mean: e.mean.exp(),
            ci: e.ci.map(|(lo, hi)| (lo.exp(), hi.exp())),
        })
    }
}

/// What a paired difference's interval says against 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The interval lies above 0.
    Better,
    /// The interval contains 0.
    NoDifference,
    /// The interval lies below 0.
    Worse,
}

impl Verdict {
    /// The verdict of `e`; none without an interval (one seed).
    pub fn of(e: &Estimate) -> Option<Verdict> {
        let (lo, hi) = e.ci?;
        Some(if lo > 0.0 {
            Verdict::Better
        } else if hi < 0.0 {
            Verdict::Worse
        } else {
            Verdict::NoDifference
        })
    }

    /// `better`, `no difference`, `worse`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::NoDifference => "no difference",
            Verdict::Worse => "worse",
        }
    }
}

/// The non-inferiority reading of "within `margin` points": the interval's
/// lower bound is at least `-margin`. None without an interval.
pub fn within_margin(e: &Estimate, margin: f64) -> Option<bool> {
    e.ci.map(|(lo, _)| lo >= -margin)
}

/// The `p` quantile of Student's t distribution with `df` degrees of
/// freedom (`df` > 0, 0 < `p` < 1), by bisection on [`t_cdf`].
pub fn t_quantile(p: f64, df: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0 && df > 0.0, "t_quantile({p}, {df})");
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-14 * hi.max(1.0) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Student's t cumulative distribution function.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, x);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularised incomplete beta function `I_x(a, b)` (continued
/// fraction, modified Lentz).
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let away_from_zero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / away_from_zero(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz step with coefficient `aa`: the factor it multiplies `h` by.
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 / away_from_zero(1.0 + aa * *d);
        *c = away_from_zero(1.0 + aa / *c);
        *d * *c
    };
    for m in 1..400 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let del = step(
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
            &mut c,
            &mut d,
        );
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from scipy 1.17.1 (`scipy.stats.t.ppf(0.975, df)`,
    // `scipy.stats.t.cdf(t, df)`, `scipy.stats.t.interval(0.95, n - 1,
    // loc=mean, scale=sem)`).
    #[test]
    fn t_quantiles_and_cdf_match_scipy() {
        let cases = [
            (1.0, 12.706_204_736_174_694),
            (2.0, 4.302_652_729_749_462),
            (3.0, 3.182_446_305_283_708),
            (4.0, 2.776_445_105_197_793_4),
            (9.0, 2.262_157_162_798_205),
            (29.0, 2.045_229_642_132_703),
            (1000.0, 1.962_339_080_826_408_3),
        ];
        for (df, want) in cases {
            let got = t_quantile(0.975, df);
            assert!((got - want).abs() < 1e-9, "df {df}: {got} vs {want}");
        }
        assert!((t_quantile(0.025, 4.0) + 2.776_445_105_197_793_4).abs() < 1e-9);
        assert!((t_cdf(1.5, 3.0) - 0.884_708_067_377_588_6).abs() < 1e-12);
        assert!((t_cdf(-0.3, 7.0) - 0.386_445_025_201_067_1).abs() < 1e-12);
        assert_eq!(t_cdf(0.0, 5.0), 0.5);
    }

    #[test]
    fn a_paired_interval_matches_scipys() {
        // d = [-0.35, 0.10, -1.20]: mean -0.4833…, sem 0.381…;
        // scipy.stats.t.interval(0.95, 2, loc, scale) = (-2.1233…, 1.1566…).
        let e = Estimate::of(&[-0.35, 0.10, -1.20]).unwrap();
        assert_eq!(e.n, 3);
        assert!((e.mean + 0.483_333_333_333_333_3).abs() < 1e-12);
        assert!((e.std - 0.660_176_744_011_278_6).abs() < 1e-12, "{}", e.std);
        let (lo, hi) = e.ci.unwrap();
        assert!((lo + 2.123_303_279_552_294).abs() < 1e-9, "{lo}");
        assert!((hi - 1.156_636_612_885_627_6).abs() < 1e-9, "{hi}");
        assert_eq!(Verdict::of(&e), Some(Verdict::NoDifference));
        assert_eq!(within_margin(&e, 0.5), Some(false));
        assert_eq!(within_margin(&e, 2.5), Some(true));
    }

    #[test]
    fn one_seed_has_no_interval_and_no_verdict() {
        let e = Estimate::of(&[-0.4]).unwrap();
        assert_eq!((e.n, e.mean, e.std, e.ci), (1, -0.4, 0.0, None));
        assert_eq!(Verdict::of(&e), None);
        assert_eq!(within_margin(&e, 0.5), None);
        assert!(Estimate::of(&[]).is_none());
        assert!(Ratio::of(&[1.5]).unwrap().ci.is_none());
    }

    #[test]
    fn identical_runs_give_zero_and_no_difference() {
        let e = Estimate::of(&[0.0, 0.0, 0.0]).unwrap();
        assert_eq!(e.ci, Some((0.0, 0.0)));
        assert_eq!(Verdict::of(&e), Some(Verdict::NoDifference));
        assert_eq!(within_margin(&e, 0.5), Some(true));
        let worse = Estimate::of(&[-5.0, -4.2, -5.6]).unwrap();
        assert_eq!(Verdict::of(&worse), Some(Verdict::Worse));
        let better = Estimate::of(&[1.0, 1.2, 0.9]).unwrap();
        assert_eq!(Verdict::of(&better), Some(Verdict::Better));
    }

    #[test]
    fn ratios_are_averaged_on_the_log_scale() {
        // Geometric mean of 1.5 and 1.5 · 1.2 ; interval symmetric in logs.
        let r = Ratio::of(&[1.5, 1.8]).unwrap();
        assert!((r.mean - (1.5f64 * 1.8).sqrt()).abs() < 1e-12);
        let (lo, hi) = r.ci.unwrap();
        assert!((lo * hi - r.mean * r.mean).abs() < 1e-9);
        assert!(lo < 1.5 && hi > 1.8);
        assert!(Ratio::of(&[f64::NAN, 0.0]).is_none());
    }
}
