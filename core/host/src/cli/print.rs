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
            "results": results,
        });
        writeln!(out, "{obj}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{} (depth {}), batch {}, {threads} threads, {}, best of {} rounds of {} steps",
        h.preset,
        h.depth,
        h.batch,
        crate::plan::device_name(h.device),
        h.rounds,
        h.steps
    )?;
    writeln!(
        out,
        "frozen    img/s  speedup  model 3L/(3L-2K)  peak RSS  policy share"
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
        writeln!(
            out,
            "{:>6}  {:>7.1}  {measured:>7}  {model_speedup:>15.2}x  {rss:>8}  {share:>12}",
            r.frozen, r.images_per_sec
        )?;
    }
    Ok(())
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
