//! One conformance suite over every shipped policy, run twice: statically
//! (the strategy type behind the same SDK adapter the export macro uses) and
//! through the real `.so`. Each property names the invariant it guards.
//! Observations are hostile on purpose: NaN and infinite features, losses
//! and gradient norms, labels of classes never seen or out of range,
//! batches of one, a single block.

use proptest::prelude::*;
use simfreeze_abi::sdk::policy_module;
use simfreeze_runtime::driver::{PolicyDriver, StepInput};
use simfreeze_runtime::loader::{Plugin, PolicyHandle};
use simfreeze_runtime::simulate::Rng;
use simfreeze_tests::plugin;

/// Every shipped policy plugin, by name.
const POLICIES: &[&str] = &["atsf", "slf", "ulf", "scf", "ucf", "autofreeze", "template"];

/// Options that make each policy act within a few dozen steps.
fn options(name: &str) -> &'static str {
    match name {
        "atsf" => "(record_steps: 3, compare_steps: 2)",
        "autofreeze" => "(interval: 4)",
        "template" => "(every: 3)",
        _ => "",
    }
}

fn static_plugin(name: &str) -> Plugin {
    let module = match name {
        "atsf" => policy_module::<simfreeze_atsf::Atsf>(),
        "slf" => policy_module::<simfreeze_freezeout::Slf>(),
        "ulf" => policy_module::<simfreeze_freezeout::Ulf>(),
        "scf" => policy_module::<simfreeze_freezeout::Scf>(),
        "ucf" => policy_module::<simfreeze_freezeout::Ucf>(),
        "autofreeze" => policy_module::<simfreeze_autofreeze::AutoFreeze>(),
        "template" => template::plugin_module(),
        other => panic!("no static build of {other}"),
    };
    Plugin::from_module(module, format!("static:{name}").into()).unwrap()
}

fn new_policy(name: &str, dynamic: bool) -> PolicyHandle {
    let p = if dynamic {
        Plugin::load(&plugin(name)).unwrap()
    } else {
        static_plugin(name)
    };
    assert_eq!(p.meta.name, name);
    p.new_policy(options(name)).unwrap()
}

/// The shape of a hostile run.
#[derive(Debug, Clone)]
struct Run {
    layers: u32,
    steps: u64,
    batch: usize,
    dim: usize,
    classes: usize,
    seed: u64,
}

fn any_run() -> impl Strategy<Value = Run> {
    (
        1u32..=6,
        1u64..60,
        1usize..=4,
        1usize..=5,
        1usize..=4,
        any::<u64>(),
    )
        .prop_map(|(layers, steps, batch, dim, classes, seed)| Run {
            layers,
            steps,
            batch,
            dim,
            classes,
            seed,
        })
}

/// The data of one step, hostile values included.
struct Data {
    features: Vec<f32>,
    labels: Vec<i64>,
    norms: Vec<f32>,
    loss: f32,
}

fn weird(rng: &mut Rng) -> f32 {
    match rng.below(20) {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => 0.0,
        _ => rng.normal() as f32,
    }
}

fn data(r: &Run, rng: &mut Rng) -> Data {
    Data {
        features: (0..r.batch * r.dim).map(|_| weird(rng)).collect(),
        // Classes never seen (>= classes) and invalid (-1) included.
        labels: (0..r.batch)
            .map(|_| rng.below(r.classes + 2) as i64 - 1)
            .collect(),
        norms: (0..r.layers).map(|_| weird(rng).abs()).collect(),
        loss: weird(rng),
    }
}

fn input<'a>(r: &Run, step: u64, d: &'a Data) -> StepInput<'a> {
    StepInput {
        step,
        epoch: step / 10,
        steps_per_epoch: 10,
        total_steps: r.steps,
        loss: d.loss,
        batch: r.batch,
        features: &d.features,
        feature_dim: r.dim,
        labels: &d.labels,
        num_classes: r.classes,
        grad_norms: &d.norms,
    }
}

/// Drives `name` through the host's controller; any refused decision or
/// policy error fails the property.
fn never_unfreezes_past_order(name: &str, dynamic: bool, r: &Run) -> Result<(), TestCaseError> {
    let mut driver = PolicyDriver::new(Some(new_policy(name, dynamic)), r.layers);
    let mut rng = Rng::new(r.seed);
    let mut last = 0;
    for step in 0..r.steps {
        let d = data(r, &mut rng);
        driver
            .after_step(&input(r, step, &d))
            .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        let s = driver.state();
        prop_assert!(s.frontier >= last && s.frontier <= r.layers);
        prop_assert!(s.probe.is_none() || s.probe == Some(s.frontier));
        last = s.frontier;
    }
    Ok(())
}

/// Saves after `k` steps, restores into a fresh instance, and requires the
/// two to decide identically from there on.
fn state_round_trip(name: &str, dynamic: bool, r: &Run, k: u64) -> Result<(), TestCaseError> {
    let mut a = PolicyDriver::new(Some(new_policy(name, dynamic)), r.layers);
    let mut rng = Rng::new(r.seed);
    let k = k % r.steps.max(1);
    for step in 0..k {
        let d = data(r, &mut rng);
        a.after_step(&input(r, step, &d))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let saved = a.policy().unwrap().save_state(k).unwrap();
    let mut restored = new_policy(name, dynamic);
    restored.load_state(k, &saved).unwrap();
    let mut b = PolicyDriver::new(Some(restored), r.layers);
    b.restore_state(a.state().clone());
    for step in k..r.steps {
        let d = data(r, &mut rng);
        let oa = a
            .after_step(&input(r, step, &d))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ob = b
            .after_step(&input(r, step, &d))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(a.state(), b.state(), "{} diverged at step {}", name, step);
        // NaN scalars compare unequal; compare their bit patterns.
        let bits = |o: &simfreeze_runtime::driver::StepOutcome| {
            o.scalars
                .iter()
                .map(|(n, v)| (n.clone(), v.to_bits()))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(bits(&oa), bits(&ob));
    }
    Ok(())
}

macro_rules! conformance {
    ($($policy:ident),*) => {
        mod statically {
            use super::*;
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(24))]
                $(
                    #[test]
                    fn $policy(r in any_run(), k in any::<u64>()) {
                        never_unfreezes_past_order(stringify!($policy), false, &r)?;
                        state_round_trip(stringify!($policy), false, &r, k)?;
                    }
                )*
            }
        }
        mod through_so {
            use super::*;
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(24))]
                $(
                    #[test]
                    fn $policy(r in any_run(), k in any::<u64>()) {
                        never_unfreezes_past_order(stringify!($policy), true, &r)?;
                        state_round_trip(stringify!($policy), true, &r, k)?;
                    }
                )*
            }
        }
    };
}

conformance!(atsf, slf, ulf, scf, ucf, autofreeze, template);

#[test]
fn every_shipped_policy_is_covered() {
    // A new plugins/<policy> must join POLICIES (and the macro list above).
    let mut shipped: Vec<String> = std::fs::read_dir(simfreeze_tests::repo_root().join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["cosine", "pearson", "cka", "rbf"].contains(&n.as_str()))
        .collect();
    shipped.sort();
    let mut listed: Vec<String> = POLICIES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(shipped, listed);
}

#[test]
fn single_block_models_work_for_every_policy() {
    let r = Run {
        layers: 1,
        steps: 50,
        batch: 1,
        dim: 3,
        classes: 2,
        seed: 9,
    };
    for name in POLICIES {
        never_unfreezes_past_order(name, true, &r).unwrap();
    }
}
