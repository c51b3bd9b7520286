//! The command line: clap types and dispatch; [`print`] holds the text and
//! JSON printers. The work itself lives in the layers below; the plugin
//! search path is built here, once per command, and passed down. Exit codes
//! are documented and computed in [`crate::error`].

mod compare;
mod print;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use simfreeze_runtime::loader::SearchPath;
use simfreeze_runtime::simulate::{simulate, SimConfig};
use simfreeze_runtime::testkit::PolicyTest;

use crate::bench::{bench, BenchSpec};
use crate::config::{DataSource, PolicySection, RunConfig};
use crate::engine::{Engine, SingleEngine};
use crate::error::{exit_code, UsageError};
use crate::plan::{self, Plan};
use crate::run::{self, RunControl};

/// Fine-tune Vision Transformers, freezing encoder blocks with plugin policies.
#[derive(Debug, Parser)]
#[command(name = "simfreeze", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the plugins found on the search path ($SIMFREEZE_PLUGIN_PATH,
    /// then the directory of this binary).
    Plugins {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the model presets: their shapes, options and the input
    /// normalisation their weights expect.
    Models {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drive a policy with synthetic observations (no training) and print
    /// its freeze timeline.
    Simulate(SimulateArgs),
    /// Run the conformance suite on a policy plugin: hostile observations,
    /// the freezing contract, save/restore continuing identically.
    Check(CheckArgs),
    /// Fine-tune a ViT as a RON config says, in a fresh run directory.
    Run(RunArgs),
    /// Time training steps per frozen prefix on random inputs.
    Bench(BenchArgs),
    /// Top-1 of a weights file on the config's evaluation split.
    Eval(EvalArgs),
    /// Pretrain on a source task (cached), fine-tune on the target with
    /// the baseline and each policy, print the table, write plots.
    Compare(compare::CompareArgs),
}

#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// The RON configuration file (its data, model and device are used).
    #[arg(long)]
    config: PathBuf,
    /// Weights: timm or Hugging Face safetensors, Google `.npz`, or a
    /// run's `model.safetensors`; the head must match the classes.
    #[arg(long)]
    weights: PathBuf,
    /// Override a config value (value is RON).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Print one JSON object `{"top1": X, "n": N}` on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The RON configuration file.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint (with the
    /// configuration it was started with).
    #[arg(long, conflicts_with_all = ["config", "policy_config", "sets"])]
    resume: Option<PathBuf>,
    /// Stop after this many steps in total, checkpointed and resumable
    /// (time-boxed jobs).
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// Policy plugin (name or path), replacing the config's; `none` for
    /// full fine-tuning. With `--resume`: where the run's policy library is
    /// now (when it moved).
    #[arg(long)]
    policy: Option<String>,
    /// The policy's options as RON, replacing the config's.
    #[arg(long)]
    policy_config: Option<String>,
    /// Override a config value, e.g. `--set train.epochs=3` (value is RON).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The RON configuration file (its model, device and threads are used).
    #[arg(long)]
    config: PathBuf,
    /// Only these frozen prefixes, e.g. `--frozen 0,6` (default: every K
    /// from 0 to L).
    #[arg(long, value_delimiter = ',')]
    frozen: Vec<usize>,
    /// Also run this policy's loop every step and report its share of the
    /// step time.
    #[arg(long)]
    policy: Option<String>,
    /// The policy's options as RON.
    #[arg(long, default_value = "")]
    policy_config: String,
    /// Timed steps per K and round.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Rounds over all K; each K reports its best round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Untimed warm-up steps per K.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Batch size (default: the config's).
    #[arg(long)]
    batch: Option<i64>,
    /// Override a config value, e.g. `--set train.threads=1`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Policy plugin: a name (`atsf`) or a path (`./target/release/libmy_policy.so`).
    #[arg(long)]
    policy: String,
    /// The policy's options as RON, e.g. `(every: 50)`.
    #[arg(long, default_value = "")]
    policy_config: String,
    /// Run shapes per property (each up to 12 blocks and 60 steps).
    #[arg(long, default_value_t = 64)]
    cases: u32,
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Policy plugin: a name (`atsf`) or a path (`./libatsf.so`).
    #[arg(long)]
    policy: String,
    /// The policy's options as RON, e.g. `(every: 50)`.
    #[arg(long, default_value = "")]
    policy_config: String,
    /// Encoder blocks.
    #[arg(long, default_value_t = 12)]
    layers: u32,
    /// Training steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Steps per epoch (default: steps / 10).
    #[arg(long)]
    steps_per_epoch: Option<u64>,
    /// Classes of the synthetic task.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Feature width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seed of the synthetic world.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    crate::memory::keep_freed_memory();
    crate::error::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let search = SearchPath::from_env();
    match cli.command {
        Command::Plugins { json } => print::plugins(&search, json),
        Command::Models { json } => print::models(json),
        Command::Simulate(args) => simulate_cmd(args, &search),
        Command::Check(args) => check_cmd(args, &search),
        Command::Run(args) => run_cmd(args, &search),
        Command::Compare(args) => compare_cmd(args, &search),
        Command::Eval(args) => eval_cmd(args),
        Command::Bench(args) => bench_cmd(args, &search),
    }
}

/// Installs SIGINT/SIGTERM handling: the first signal asks the run to
/// finish its step, checkpoint and stop; a second one exits at once.
///
/// Under a launcher (`WORLD_SIZE` set) only a second SIGINT exits at once:
/// on Ctrl-C torchrun's agent follows the terminal's SIGINT with a SIGTERM
/// of its own, which must not cut the agreed stop and its checkpoint short.
fn interrupt_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let flag = Arc::new(AtomicBool::new(false));
    if std::env::var_os("WORLD_SIZE").is_some() {
        let sigint = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, sigint.clone())?;
        signal_hook::flag::register(SIGINT, sigint)?;
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register(sig, flag.clone())?;
        }
        return Ok(flag);
    }
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// Whether this process prints results: not a data-parallel rank other
/// than 0 (rank 0 speaks for the group).
fn speaks() -> bool {
    std::env::var("RANK").map_or(true, |r| r.trim() == "0")
}

fn run_cmd(a: RunArgs, search: &SearchPath) -> Result<()> {
    let control = RunControl {
        stop_after: a.stop_after,
        interrupt: Some(interrupt_flag()?),
    };
    if let Some(dir) = &a.resume {
        let summary = run::resume(dir, search, a.policy.as_deref(), &control)?;
        if speaks() {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        return Ok(());
    }
    let config = a.config.expect("clap requires --config without --resume");
    let mut cfg = RunConfig::load(&config)?;
    match a.policy.as_deref() {
        Some("none") => cfg.policy = None,
        Some(p) => {
            cfg.policy = Some(PolicySection {
                plugin: p.to_string(),
                options: String::new(),
            })
        }
        None => {}
    }
    if let Some(opts) = a.policy_config {
        match cfg.policy.as_mut() {
            Some(p) => p.options = opts,
            None => {
                return Err(UsageError(
                    "--policy-config given but no policy (add --policy or a policy section)".into(),
                )
                .into())
            }
        }
    }
    let cfg = cfg.with_overrides(&a.sets)?;
    let summary = run::run(Plan::resolve(cfg, search)?, &control)?;
    if speaks() {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let mut cfg = RunConfig::load(&a.config)?.with_overrides(&a.sets)?;
    cfg.model.weights = Some(a.weights.clone());
    cfg.model.head = crate::model::weights::HeadInit::Load;
    let device = plan::parse_device(&cfg.train.device)?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads);
    }
    let eval = plan::load_splits(&cfg, false)?.eval;
    let model_cfg = cfg.model.resolve(eval.classes)?;
    let ck = crate::model::weights::Checkpoint::read(&a.weights)?;
    let (precision, recipe) = (cfg.train.precision, cfg.train.recipe());
    let mut engine = SingleEngine::new(&model_cfg, precision, recipe, device)?;
    let report = engine.import_weights(ck, cfg.model.head)?;
    eprintln!("weights: {}: {report}", a.weights.display());
    let (top1, loss) = engine.evaluate(&eval)?;
    if a.json {
        println!("{}", serde_json::json!({"top1": top1, "n": eval.len()}));
    } else {
        println!("top-1 {top1:.2}% on {} images (loss {loss:.4})", eval.len());
    }
    Ok(())
}

fn compare_cmd(a: compare::CompareArgs, search: &SearchPath) -> Result<()> {
    let control = RunControl {
        stop_after: None,
        interrupt: Some(interrupt_flag()?),
    };
    compare::compare_cmd(a, search, control)
}

fn bench_cmd(a: BenchArgs, search: &SearchPath) -> Result<()> {
    let cfg = RunConfig::load(&a.config)?.with_overrides(&a.sets)?;
    let device = plan::parse_device(&cfg.train.device)?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads);
    }
    let classes = match &cfg.data.source {
        DataSource::Synthetic { classes, .. } => *classes,
        // Only the shape matters for timing; the head's width is negligible.
        _ => 10,
    };
    let model = cfg.model.resolve(classes)?;
    let depth = model.depth as usize;
    if let Some(k) = a.frozen.iter().find(|k| **k > depth) {
        return Err(UsageError(format!(
            "--frozen {k} is more than the model's {depth} blocks"
        ))
        .into());
    }
    let frozen: Vec<usize> = if a.frozen.is_empty() {
        (0..=depth).collect()
    } else {
        a.frozen.clone()
    };
    let batch = a.batch.unwrap_or(cfg.train.batch);
    if batch < 1 || a.steps < 1 {
        return Err(UsageError("--batch and --steps must be at least 1".into()).into());
    }
    let policy = match &a.policy {
        Some(p) => Some(search.load(p)?.new_policy(&a.policy_config)?),
        None => None,
    };
    let spec = BenchSpec {
        model: &model,
        device,
        batch,
        frozen: &frozen,
        steps: a.steps,
        warmup: a.warmup,
        rounds: a.rounds,
        precision: cfg.train.precision,
        dist_timeout_s: cfg.train.dist_timeout_s,
        bucket_mib: cfg.train.bucket_mib,
        dist_backend: cfg.train.dist_backend,
        overlap_allreduce: cfg.train.overlap_allreduce,
    };
    let run = bench(&spec, policy)?;
    if run.rank != 0 {
        // Rank 0 reports for the group.
        return Ok(());
    }
    let what = print::BenchHeader {
        preset: &cfg.model.preset,
        depth,
        shape: &model,
        policy: a.policy.as_deref(),
        batch,
        device,
        rounds: a.rounds,
        steps: a.steps,
        world: run.world,
    };
    print::bench(&what, &run.results, a.json)
}

fn check_cmd(a: CheckArgs, search: &SearchPath) -> Result<()> {
    use simfreeze_runtime::conformance::PROPERTIES;
    if a.cases < 1 {
        return Err(UsageError("--cases must be at least 1".into()).into());
    }
    let plugin = search.load(&a.policy)?;
    // Options the constructor refuses fail here, as they would in a run.
    plugin.new_policy(&a.policy_config)?;
    let (name, path) = (plugin.meta.name.clone(), plugin.path.clone());
    println!(
        "checking {name} ({}) with options {:?}: {} run shapes per property",
        path.display(),
        a.policy_config,
        a.cases
    );
    let test = PolicyTest::from_plugin(plugin).with_options(&a.policy_config);
    let verdict = test.conformance(a.cases);
    let failed_at = match &verdict {
        Ok(()) => PROPERTIES.len(),
        Err(f) => PROPERTIES
            .iter()
            .position(|p| *p == f.property)
            .unwrap_or(0),
    };
    for (i, property) in PROPERTIES.iter().enumerate() {
        let mark = match i.cmp(&failed_at) {
            std::cmp::Ordering::Less => "ok",
            std::cmp::Ordering::Equal => "FAILED",
            std::cmp::Ordering::Greater => "not run",
        };
        println!("  {mark:>7}  {property}");
    }
    if let Err(f) = &verdict {
        // The failure (on stderr) ends with how to replay it; this is the
        // `test` it names.
        let what = f.run.as_ref().map_or("the suite", |_| "this case");
        println!(
            "to replay {what} in {name}'s `cargo test`: \
             let test = PolicyTest::new(plugin_module()).unwrap().with_options({:?});",
            a.policy_config
        );
    }
    verdict.with_context(|| format!("{name} does not conform"))?;
    Ok(())
}

fn simulate_cmd(a: SimulateArgs, search: &SearchPath) -> Result<()> {
    let cfg = SimConfig {
        layers: a.layers,
        steps: a.steps,
        steps_per_epoch: a.steps_per_epoch.unwrap_or((a.steps / 10).max(1)),
        classes: a.classes,
        dim: a.dim,
        batch: a.batch,
        seed: a.seed,
    };
    cfg.validate().map_err(UsageError)?;
    let plugin = search.load(&a.policy)?;
    let path: PathBuf = plugin.path.clone();
    let policy = plugin.new_policy(&a.policy_config)?;
    let report =
        simulate(policy, &cfg, |_| {}).with_context(|| format!("simulating {}", path.display()))?;
    print::simulation(&report, &cfg, &path, a.json)
}
