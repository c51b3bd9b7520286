//! FreezeOut (Brock, Lim, Ritchie, Weston, 2017; reference code
//! ajbrock/FreezeOut): every block gets its own cosine learning-rate
//! schedule that reaches zero at a fixed fraction of training, and the block
//! freezes there.
//!
//! With blocks `i = 0..L-1` (the head is index L and never freezes),
//! `t_i = f(t0 + (1 - t0) * i / L)` with `f(x) = x` (linear) or `x^3`
//! (cubic); block `i` is frozen from step `floor(t_i * T)` on. Scaled
//! variants start block `i` at `lr / t_i`, unscaled at `lr`; until it
//! freezes, `lr_i(j) = 0.5 * lr_i(0) * (1 + cos(pi * j / (t_i * T)))`.
//! SLF/ULF/SCF/UCF = scaled/unscaled x linear/cubic. Option `t0` (default
//! 0.5: the paper does not state it; 0.5 reproduces its reported speedups).
//!
//! The host multiplies its own schedule by the factors this policy returns,
//! so the factor is `lr_i(j) / lr(j)` with the host's cosine `lr(j) =
//! 0.5 * lr * (1 + cos(pi * j / T))`: FreezeOut assumes the host's default
//! cosine schedule without warm-up.

use std::f64::consts::PI;
use std::marker::PhantomData;

use serde::Deserialize;
use simfreeze_abi::sdk::{
    Decision, HostServices, Info, OptionDoc, Policy, PolicyError, PolicyPlugin, Step,
};

/// The options every variant takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Fraction of training after which block 0 freezes (before `f`).
    pub t0: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { t0: 0.5 }
    }
}

/// Which of the four schedules.
pub trait Variant: Send + 'static {
    /// Plugin name.
    const NAME: &'static str;
    /// Whether block `i` starts at `lr / t_i`.
    const SCALED: bool;
    /// Whether `f(x) = x^3` (else `x`).
    const CUBIC: bool;
    /// One line for `simfreeze plugins`.
    const DESCRIPTION: &'static str;
}

macro_rules! variant {
    ($ty:ident, $name:literal, $scaled:literal, $cubic:literal, $desc:literal) => {
        #[doc = $desc]
        pub struct $ty;
        impl Variant for $ty {
            const NAME: &'static str = $name;
            const SCALED: bool = $scaled;
            const CUBIC: bool = $cubic;
            const DESCRIPTION: &'static str = $desc;
        }
    };
}

variant!(
    ScaledLinear,
    "slf",
    true,
    false,
    "FreezeOut, scaled learning rates, linear schedule (SLF)."
);
variant!(
    UnscaledLinear,
    "ulf",
    false,
    false,
    "FreezeOut, unscaled learning rates, linear schedule (ULF)."
);
variant!(
    ScaledCubic,
    "scf",
    true,
    true,
    "FreezeOut, scaled learning rates, cubic schedule (SCF)."
);
variant!(
    UnscaledCubic,
    "ucf",
    false,
    true,
    "FreezeOut, unscaled learning rates, cubic schedule (UCF)."
);

/// SLF: scaled, linear.
pub type Slf = FreezeOut<ScaledLinear>;
/// ULF: unscaled, linear.
pub type Ulf = FreezeOut<UnscaledLinear>;
/// SCF: scaled, cubic.
pub type Scf = FreezeOut<ScaledCubic>;
/// UCF: unscaled, cubic.
pub type Ucf = FreezeOut<UnscaledCubic>;

/// A FreezeOut policy. It has no state: every decision is a function of
/// the step, so a resumed run continues identically.
pub struct FreezeOut<V> {
    t0: f64,
    _variant: PhantomData<V>,
}

impl<V: Variant> FreezeOut<V> {
    /// `t_i` of block `i` of `layers`.
    pub fn t(&self, i: usize, layers: usize) -> f64 {
        let x = self.t0 + (1.0 - self.t0) * i as f64 / layers as f64;
        if V::CUBIC {
            x * x * x
        } else {
            x
        }
    }

    /// First step at which block `i` is frozen: `floor(t_i * T)`.
    pub fn freeze_step(&self, i: usize, layers: usize, total: u64) -> u64 {
        (self.t(i, layers) * total as f64).floor() as u64
    }

    /// Learning rate of block `i` at step `j` relative to the base `lr`
    /// (`lr_i(j) / lr`), 0 once frozen.
    pub fn block_lr(&self, i: usize, layers: usize, j: u64, total: u64) -> f64 {
        if j >= self.freeze_step(i, layers, total) {
            return 0.0;
        }
        let t = self.t(i, layers);
        let start = if V::SCALED { 1.0 / t } else { 1.0 };
        0.5 * start * (1.0 + (PI * j as f64 / (t * total as f64)).cos())
    }

    /// The factor for the host's cosine schedule at step `j`.
    pub fn lr_factor(&self, i: usize, layers: usize, j: u64, total: u64) -> f32 {
        let host = 0.5 * (1.0 + (PI * j as f64 / total as f64).cos());
        let f = if host > 1e-12 {
            self.block_lr(i, layers, j, total) / host
        } else {
            0.0
        };
        if f.is_finite() && f >= 0.0 {
            f as f32
        } else {
            0.0
        }
    }
}

impl<V: Variant> Policy for FreezeOut<V> {
    fn decide(&mut self, s: &Step<'_>) -> Result<Decision, PolicyError> {
        let (l, total) = (s.layers, s.total_steps.max(1));
        let next = s.step + 1;
        let due = (0..l)
            .take_while(|&i| self.freeze_step(i, l, total) <= next)
            .count();
        let frontier = due.max(s.frontier).min(l);
        let factors = (0..l).map(|i| self.lr_factor(i, l, next, total)).collect();
        Ok(Decision::frontier(frontier).with_lr_factors(factors))
    }

    fn save_state(&self) -> Result<Vec<u8>, PolicyError> {
        Ok(Vec::new())
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), PolicyError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::state(
                "FreezeOut has no state; expected an empty one",
            ))
        }
    }
}

const LINEAR_OPTIONS: &[OptionDoc] = &[OptionDoc {
    name: "t0",
    default: "0.5",
    doc: "fraction of training after which block 0 freezes; later blocks later",
}];

const CUBIC_OPTIONS: &[OptionDoc] = &[OptionDoc {
    name: "t0",
    default: "0.5",
    doc: "block 0 freezes after t0^3 of training (0.125 at the default); later blocks later",
}];

impl<V: Variant> PolicyPlugin for FreezeOut<V> {
    fn info() -> Info {
        Info {
            name: V::NAME,
            version: env!("CARGO_PKG_VERSION"),
            description: V::DESCRIPTION,
            options: if V::CUBIC {
                CUBIC_OPTIONS
            } else {
                LINEAR_OPTIONS
            },
        }
    }

    fn new(options: &str, _host: &HostServices) -> Result<Self, PolicyError> {
        let o: Options = simfreeze_options::parse(options)?;
        if !(o.t0 > 0.0 && o.t0 <= 1.0) {
            return Err(PolicyError::options(format!(
                "t0 must be in (0, 1], got {}",
                o.t0
            )));
        }
        Ok(FreezeOut {
            t0: o.t0,
            _variant: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    fn policy<V: Variant>(t0: f64) -> FreezeOut<V> {
        FreezeOut::<V>::new(&format!("(t0: {t0})"), &HostServices::none()).unwrap()
    }

    #[test]
    fn schedules_follow_the_formulas() {
        let (l, total) = (12, 1000);
        let ucf = policy::<UnscaledCubic>(0.5);
        let slf = policy::<ScaledLinear>(0.5);
        for i in 0..l {
            let x = 0.5 + 0.5 * i as f64 / l as f64;
            assert_relative_eq!(ucf.t(i, l), x * x * x);
            assert_relative_eq!(slf.t(i, l), x);
            assert_eq!(
                ucf.freeze_step(i, l, total),
                (x * x * x * 1000.0).floor() as u64
            );
            // Scaled starts at lr / t_i, unscaled at lr.
            assert_relative_eq!(slf.block_lr(i, l, 0, total), 1.0 / x);
            assert_relative_eq!(ucf.block_lr(i, l, 0, total), 1.0);
            // Half way to its freeze step, a block's cosine is at half.
            let half = (x * 1000.0 / 2.0) as u64;
            let expect = 0.5 * (1.0 / x) * (1.0 + (PI * half as f64 / (x * 1000.0)).cos());
            assert_relative_eq!(slf.block_lr(i, l, half, total), expect, epsilon = 1e-12);
        }
    }

    #[test]
    fn factors_are_relative_to_the_host_cosine() {
        let p = policy::<ScaledLinear>(0.5);
        let (l, total, j) = (4, 100, 20);
        let host = 0.5 * (1.0 + (PI * j as f64 / 100.0).cos());
        assert_relative_eq!(
            p.lr_factor(1, l, j, total) as f64,
            p.block_lr(1, l, j, total) / host,
            epsilon = 1e-6
        );
        assert_eq!(p.lr_factor(0, l, 60, total), 0.0);
    }

    #[test]
    fn bad_t0_is_refused() {
        assert!(FreezeOut::<ScaledCubic>::new("(t0: 0.0)", &HostServices::none()).is_err());
        assert!(FreezeOut::<ScaledCubic>::new("(t1: 0.5)", &HostServices::none()).is_err());
    }
}
