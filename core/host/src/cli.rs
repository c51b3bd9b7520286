//! The command line: argument parsing, output formats and exit codes. The
//! work itself lives in the other modules.
//!
//! Exit codes (also in the README): 0 success; 1 internal or I/O error;
//! 2 bad command line or configuration; 3 a plugin could not be found,
//! loaded or constructed; 4 a policy failed while running (error, panic or a
//! decision that breaks the freezing contract); 5 a dataset file is missing
//! or corrupt; 6 the training loss became NaN or infinite; 130 the run was
//! interrupted (signal or `--stop-after`) and can be resumed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{PolicySection, RunConfig};
use crate::driver::DriverError;
use crate::plugin::{LoadError, Plugin, PolicyCallError, SearchPath};
use crate::simulate::{simulate, SimConfig};
use crate::train;

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
    /// Drive a policy with synthetic observations (no training) and print
    /// its freeze timeline.
    Simulate(SimulateArgs),
    /// Fine-tune a ViT as a RON config says, in a fresh run directory.
    Run(RunArgs),
    /// Time training steps per frozen prefix on random inputs.
    Bench(BenchArgs),
    /// Top-1 of a weights file on the config's evaluation split.
    Eval(EvalArgs),
    /// Pretrain on a source task (cached), fine-tune on the target with
    /// the baseline and each policy, print the table, write plots.
    Compare(CompareArgs),
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
struct CompareArgs {
    /// The RON experiment file (e.g. configs/quickstart.ron).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value, e.g. `--set finetune.train.epochs=1`
    /// or `--set seeds=[0,1]` (value is RON).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The RON configuration file.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint (with the
    /// configuration it was started with).
    #[arg(long, conflicts_with_all = ["config", "policy", "policy_config", "sets"])]
    resume: Option<PathBuf>,
    /// Stop after this many steps in total, checkpointed and resumable
    /// (time-boxed jobs).
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// Policy plugin (name or path), replacing the config's; `none` for
    /// full fine-tuning.
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

/// A bad command line or configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    crate::memory::keep_freed_memory();
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

/// The documented exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(stopped) = cause.downcast_ref::<train::RunStopped>() {
            return stopped.exit_code;
        }
        if cause.is::<train::Diverged>() {
            return 6;
        }
        if cause.is::<UsageError>() {
            return 2;
        }
        if cause.is::<crate::data::DataError>() || cause.is::<crate::weights::WeightsError>() {
            return 5;
        }
        if cause.is::<LoadError>() {
            return 3;
        }
        if cause.is::<DriverError>()
            || cause.is::<PolicyCallError>()
            || cause.is::<crate::controller::ContractViolation>()
        {
            return 4;
        }
    }
    1
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plugins { json } => plugins(json),
        Command::Simulate(args) => simulate_cmd(args),
        Command::Run(args) => run_cmd(args),
        Command::Compare(args) => compare_cmd(args),
        Command::Eval(args) => eval_cmd(args),
        Command::Bench(args) => bench_cmd(args),
    }
}

/// Installs SIGINT/SIGTERM handling: the first signal asks the run to
/// finish its step, checkpoint and stop; a second one exits at once.
fn interrupt_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let control = train::RunControl {
        stop_after: a.stop_after,
        interrupt: Some(interrupt_flag()?),
    };
    if let Some(dir) = &a.resume {
        let summary = train::resume(dir, &control)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
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
    let summary = train::run(train::Plan::resolve(cfg)?, &control)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let mut cfg = RunConfig::load(&a.config)?.with_overrides(&a.sets)?;
    cfg.model.weights = Some(a.weights.clone());
    cfg.model.head = crate::weights::HeadInit::Load;
    let device = train::parse_device(&cfg.train.device)?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads);
    }
    let eval = train::load_splits(&cfg, false)?.eval;
    let model_cfg = cfg.model.resolve(eval.classes)?;
    let ck = crate::weights::Checkpoint::read(&a.weights)?;
    let vs = tch::nn::VarStore::new(device);
    let mut model = crate::model::Vit::new(&vs.root(), &model_cfg);
    model.precision = cfg.train.precision;
    let report = crate::weights::load_into(&vs, &model_cfg, ck, cfg.model.head)?;
    eprintln!("weights: {}: {report}", a.weights.display());
    let (top1, loss) = train::evaluate(&model, &eval, device);
    if a.json {
        println!("{}", serde_json::json!({"top1": top1, "n": eval.len()}));
    } else {
        println!("top-1 {top1:.2}% on {} images (loss {loss:.4})", eval.len());
    }
    Ok(())
}

fn compare_cmd(a: CompareArgs) -> Result<()> {
    let cfg = crate::compare::CompareConfig::load(&a.config)?;
    let cfg = crate::config::apply_overrides(cfg, &a.sets)?;
    let control = train::RunControl {
        stop_after: None,
        interrupt: Some(interrupt_flag()?),
    };
    crate::compare::compare(&cfg, &control)?;
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let cfg = RunConfig::load(&a.config)?.with_overrides(&a.sets)?;
    let device = train::parse_device(&cfg.train.device)?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads);
    }
    let classes = match &cfg.data.source {
        crate::config::DataSource::Synthetic { classes, .. } => *classes,
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
        Some(p) => Some(
            SearchPath::from_env()
                .load(p)?
                .new_policy(&a.policy_config)?,
        ),
        None => None,
    };
    let spec = train::BenchSpec {
        model: &model,
        device,
        batch,
        frozen: &frozen,
        steps: a.steps,
        warmup: a.warmup,
        rounds: a.rounds,
        precision: cfg.train.precision,
    };
    let results = train::bench(&spec, policy)?;
    let threads = tch::get_num_threads();
    let mut out = std::io::stdout().lock();
    if a.json {
        let obj = serde_json::json!({
            "model": cfg.model.preset,
            "depth": depth,
            "shape": model,
            "policy": a.policy,
            "batch": batch,
            "threads": threads,
            "device": format!("{device:?}"),
            "rounds": a.rounds,
            "steps": a.steps,
            "results": results,
        });
        writeln!(out, "{obj}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{} (depth {depth}), batch {batch}, {threads} threads, {device:?}, best of {} rounds of {} steps",
        cfg.model.preset, a.rounds, a.steps
    )?;
    writeln!(
        out,
        "frozen    img/s  speedup  model 3L/(3L-2K)  peak RSS  policy share"
    )?;
    let base = results
        .iter()
        .find(|r| r.frozen == 0)
        .map(|r| r.images_per_sec);
    for r in &results {
        let model_speedup = 3.0 * depth as f64 / (3.0 * depth as f64 - 2.0 * r.frozen as f64);
        let measured = base.map_or(String::from("-"), |b| {
            format!("{:.2}x", r.images_per_sec / b)
        });
        let rss = r
            .peak_rss_mib
            .map_or(String::from("-"), |m| format!("{m:.0} MiB"));
        let share = r
            .policy_overhead
            .map_or(String::from("-"), |f| format!("{:.2} %", 100.0 * f));
        writeln!(
            out,
            "{:>6}  {:>7.1}  {measured:>7}  {model_speedup:>15.2}x  {rss:>8}  {share:>12}",
            r.frozen, r.images_per_sec
        )?;
    }
    Ok(())
}

fn plugins(json: bool) -> Result<()> {
    let search = SearchPath::from_env();
    let (plugins, errors) = search.discover();
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<_> = plugins
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(&p.meta).unwrap_or_default();
                v["path"] = serde_json::Value::String(p.path.display().to_string());
                v
            })
            .collect();
        let errs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let dirs: Vec<String> = search
            .dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let obj = serde_json::json!({ "search_path": dirs, "plugins": list, "errors": errs });
        writeln!(out, "{obj}")?;
        return Ok(());
    }
    if plugins.is_empty() {
        writeln!(
            out,
            "no plugins found in: {}",
            search
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        )?;
    }
    for p in &plugins {
        print_plugin(&mut out, p)?;
    }
    for e in &errors {
        writeln!(out, "not loaded: {e}")?;
    }
    Ok(())
}

fn print_plugin(out: &mut impl Write, p: &Plugin) -> Result<()> {
    let m = &p.meta;
    writeln!(
        out,
        "{} ({} {}, ABI {})",
        m.name, m.kind, m.version, m.abi_version
    )?;
    writeln!(out, "    path: {}", p.path.display())?;
    writeln!(out, "    {}", m.description)?;
    for o in &m.options {
        writeln!(out, "    option {} = {}    {}", o.name, o.default, o.doc)?;
    }
    Ok(())
}

fn simulate_cmd(a: SimulateArgs) -> Result<()> {
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
    let plugin = SearchPath::from_env().load(&a.policy)?;
    let path: PathBuf = plugin.path.clone();
    let policy = plugin.new_policy(&a.policy_config)?;
    let report =
        simulate(policy, &cfg, |_| {}).with_context(|| format!("simulating {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "policy {} {} ({}): {} blocks, {} steps, {} per epoch",
        report.policy,
        report.version,
        path.display(),
        cfg.layers,
        cfg.steps,
        cfg.steps_per_epoch
    )?;
    writeln!(out, "block  frozen from step")?;
    for (i, s) in report.freeze_step.iter().enumerate() {
        match s {
            Some(s) => writeln!(out, "{i:>5}  {s}")?,
            None => writeln!(out, "{i:>5}  -")?,
        }
    }
    writeln!(out, "steps with a probe: {}", report.probe_steps)?;
    writeln!(out, "compute-model speedup: {:.3}x", report.compute_speedup)?;
    for (name, values) in &report.scalars {
        let last = values.last().map_or(f64::NAN, |v| v.1);
        writeln!(
            out,
            "scalar {name}: {} values, last {last:.6}",
            values.len()
        )?;
    }
    Ok(())
}
