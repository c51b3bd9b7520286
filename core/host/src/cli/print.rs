//! What the commands print: text for people, one JSON object for scripts.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use simfreeze_runtime::loader::{Plugin, SearchPath};
use simfreeze_runtime::simulate::{SimConfig, SimReport};
use tch::Device;

use crate::bench::BenchResult;
use crate::model::VitConfig;

/// What a bench run measured, for its header.
pub struct BenchHeader<'a> {
    /// The model preset.
    pub preset: &'a str,
    /// Its blocks.
    pub depth: usize,
    /// Its resolved shape.
    pub shape: &'a VitConfig,
    /// The policy whose loop ran, if any.
    pub policy: Option<&'a str>,
    /// Batch size.
    pub batch: i64,
    /// Device.
    pub device: Device,
    /// Rounds.
    pub rounds: u32,
    /// Timed steps per K and round.
    pub steps: u64,
    /// Ranks (1 in one process).
    pub world: usize,
}

/// `simfreeze bench`'s table or JSON object.
pub fn bench(h: &BenchHeader<'_>, results: &[BenchResult], json: bool) -> Result<()> {
    let threads = tch::get_num_threads();
    let mut out = std::io::stdout().lock();
    if json {
        let obj = serde_json::json!({
            "model": h.preset,
            "depth": h.depth,
            "shape": h.shape,
            "policy": h.policy,
            "batch": h.batch,
            "threads": threads,
            "device": crate::plan::device_name(h.device),
            "rounds": h.rounds,
            "steps": h.steps,
            "world_size": h.world,
            "results": results,
        });
        writeln!(out, "{obj}")?;
        return Ok(());
    }
    let ranks = match h.world {
        1 => String::new(),
        n => format!(" per rank, {n} ranks (img/s counts all)"),
    };
    writeln!(
        out,
        "{} (depth {}), batch {}{ranks}, {threads} threads, {}, best of {} rounds of {} steps",
        h.preset,
        h.depth,
        h.batch,
        crate::plan::device_name(h.device),
        h.rounds,
        h.steps
    )?;
    writeln!(
        out,
        "frozen    img/s  speedup  model 3L/(3L-2K)  peak RSS  policy share  comm share  all-reduced/step  host ms/step  reads/step"
    )?;
    let base = results
        .iter()
        .find(|r| r.frozen == 0)
        .map(|r| r.images_per_sec);
    for r in results {
        let depth = h.depth as f64;
        let model_speedup = 3.0 * depth / (3.0 * depth - 2.0 * r.frozen as f64);
        let measured = base.map_or(String::from("-"), |b| {
            format!("{:.2}x", r.images_per_sec / b)
        });
        let rss = r
            .peak_rss_mib
            .map_or(String::from("-"), |m| format!("{m:.0} MiB"));
        let share = r
            .policy_overhead
            .map_or(String::from("-"), |f| format!("{:.2} %", 100.0 * f));
        let comm = r
            .comm_share
            .map_or(String::from("-"), |f| format!("{:.1} %", 100.0 * f));
        let bytes = r.allreduce_bytes.map_or(String::from("-"), |b| match b {
            b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
            b => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        });
        writeln!(
            out,
            "{:>6}  {:>7.1}  {measured:>7}  {model_speedup:>15.2}x  {rss:>8}  {share:>12}  {comm:>10}  {bytes:>16}  {:>12.3}  {:>10.1}",
            r.frozen,
            r.images_per_sec,
            1e3 * r.host_seconds_per_step,
            r.host_reads_per_step
        )?;
    }
    Ok(())
}

/// `simfreeze models`: every preset, its shape, its options that differ
/// from the plain ViT, and the normalisation its weights expect.
pub fn models(json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let presets = crate::model::Preset::all();
    if json {
        let list: Vec<_> = presets
            .iter()
            .map(|p| {
                let cfg = (p.build)();
                serde_json::json!({
                    "name": p.name,
                    "about": p.about,
                    "config": cfg,
                    "tokens": cfg.tokens(),
                    "parameters": cfg.parameter_count(),
                    "normalisation": {"name": p.norm.name, "mean": p.norm.mean, "std": p.norm.std},
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::json!({ "presets": list }))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36} {:>5} {:>5} {:>4} {:>5} {:>6} {:>7}  {:<13} options",
        "preset", "image", "patch", "dim", "depth", "tokens", "params", "normalisation"
    )?;
    for p in &presets {
        let c = (p.build)();
        writeln!(
            out,
            "{:<36} {:>5} {:>5} {:>4} {:>5} {:>6} {:>6.1}M  {:<13} {}",
            p.name,
            c.image_size,
            c.patch,
            c.dim,
            c.depth,
            c.tokens(),
            c.parameter_count() as f64 / 1e6,
            p.norm.name,
            model_options(&c)
        )?;
        writeln!(out, "{:<36} {}", "", p.about)?;
    }
    writeln!(
        out,
        "\nUse one as `model: (preset: \"...\")`; any field can be overridden \
         (`image_size: 224`, `depth: 6`, ...). `data: (mean: \"preset\", std: \"preset\")` \
         takes the normalisation listed. Parameter counts are for 1000 classes."
    )?;
    Ok(())
}

/// The options of `c` that differ from the plain ViT, timm's names.
fn model_options(c: &VitConfig) -> String {
    let mut v = Vec::new();
    if let Some(iv) = c.init_values {
        v.push(format!("init_values={iv:e}"));
    }
    if c.reg_tokens > 0 {
        v.push(format!("reg_tokens={}", c.reg_tokens));
    }
    if c.no_embed_class {
        v.push("no_embed_class".into());
    }
    if !c.class_token {
        v.push("class_token=false".into());
    }
    if c.global_pool != "token" {
        v.push(format!("global_pool={}", c.global_pool));
    }
    if c.use_fc_norm() {
        v.push("fc_norm".into());
    }
    if c.pre_norm {
        v.push("pre_norm".into());
    }
    if c.act_layer != "gelu" {
        v.push(format!("act_layer={}", c.act_layer));
    }
    if !c.qkv_bias {
        v.push("qkv_bias=false".into());
    }
    if c.norm_eps != 1e-6 {
        v.push(format!("norm_eps={:e}", c.norm_eps));
    }
    if c.channels != 3 {
        v.push(format!("channels={}", c.channels));
    }
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// `simfreeze plugins`: every plugin on the search path.
pub fn plugins(search: &SearchPath, json: bool) -> Result<()> {
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
        "{} ({} {}, ABI {}, contract {})",
        m.name, m.kind, m.version, m.abi_version, m.contract
    )?;
    writeln!(out, "    path: {}", p.path.display())?;
    writeln!(out, "    {}", m.description)?;
    for o in &m.options {
        writeln!(out, "    option {} = {}    {}", o.name, o.default, o.doc)?;
    }
    Ok(())
}

/// `simfreeze simulate`'s timeline or JSON object.
pub fn simulation(report: &SimReport, cfg: &SimConfig, path: &Path, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
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
