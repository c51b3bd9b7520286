//! `smartfrz-train`: trains SmartFRZ's predictor on recordings of simfreeze
//! runs and writes the plugin's predictor file. The whole procedure, from
//! the source-task runs to the shipped file: `scripts/smartfrz-train.sh`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use simfreeze_field::smartfrz::Provenance;
use simfreeze_smartfrz_train::{accuracy, cka_to_final, load, train, windows, Net, Windows};

/// Trains SmartFRZ's predictor on `smartfrz` recordings (the last one held
/// out for validation) and writes the predictor file.
#[derive(Parser, Debug)]
#[command(name = "smartfrz-train")]
struct Args {
    /// Recordings (JSON lines from the plugin's `record` option); the last
    /// is held out.
    #[arg(required = true, num_args = 2..)]
    recordings: Vec<PathBuf>,
    /// The predictor file to write.
    #[arg(long)]
    out: PathBuf,
    /// Snapshots per window.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Steps between the recordings' snapshots.
    #[arg(long, default_value_t = 2)]
    recorded_every: u64,
    /// Steps between two snapshots the predictor reads (a multiple of
    /// `--recorded-every`).
    #[arg(long, default_value_t = 4)]
    every: u64,
    /// Smallest CKA to the final output that counts as converged.
    #[arg(long, default_value_t = 0.95)]
    tau: f64,
    /// Hidden width.
    #[arg(long, default_value_t = 32)]
    hidden: usize,
    /// Full-batch Adam epochs.
    #[arg(long, default_value_t = 400)]
    epochs: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// What the recordings are (kept in the file's provenance).
    #[arg(long, default_value = "")]
    data: String,
    /// The command that made them (kept in the file's provenance).
    #[arg(long, default_value = "")]
    command: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.recorded_every == 0 || a.every % a.recorded_every != 0 {
        bail!("--every must be a multiple of --recorded-every");
    }
    let stride = (a.every / a.recorded_every) as usize;
    let (mut fit, mut held) = (Windows::default(), Windows::default());
    let mut samples = None;
    for (n, path) in a.recordings.iter().enumerate() {
        let snaps = load(path)?;
        if *samples.get_or_insert(snaps[0].samples) != snaps[0].samples {
            bail!("{}: another number of samples per block", path.display());
        }
        let cka = cka_to_final(&snaps);
        let w = windows(&snaps, a.window, stride, a.tau);
        println!(
            "{}: {} snapshots (steps {}..={}), {} windows, {:.0}% converged",
            path.display(),
            snaps.len(),
            snaps[0].step,
            snaps.last().map_or(0, |s| s.step),
            w.len(),
            100.0 * w.y.iter().sum::<f32>() as f64 / w.len().max(1) as f64
        );
        // When each block's output settles (CKA >= tau for good).
        for (i, row) in cka.iter().enumerate() {
            let from = (0..row.len())
                .rev()
                .take_while(|t| row[*t] >= a.tau)
                .last()
                .map_or("never".to_string(), |t| format!("step {}", snaps[t].step));
            println!(
                "  block {i}: CKA at start {:.3}, >= {} from {from}",
                row[0], a.tau
            );
        }
        if n + 1 == a.recordings.len() {
            held.extend(&w);
        } else {
            fit.extend(&w);
        }
    }
    if fit.is_empty() || held.is_empty() {
        bail!("no windows: recordings shorter than a window");
    }
    tch::manual_seed(a.seed);
    let mut net = Net::new(samples.unwrap_or(0), a.window, a.hidden);
    let loss = train(&mut net, &fit, a.epochs, a.lr)?;
    let fit_acc = accuracy(&net.forward(&net.input(&fit)), &fit.y);
    let held_logits = net.forward(&net.input(&held));
    let held_acc = accuracy(&held_logits, &held.y);
    let positives = fit.y.iter().filter(|v| **v > 0.5).count();
    println!(
        "trained: loss {loss:.4}, accuracy {:.1}% on {} training windows ({positives} converged), \
         {:.1}% on {} held-out windows",
        100.0 * fit_acc,
        fit.len(),
        100.0 * held_acc,
        held.len()
    );
    let p = net.export(
        a.every,
        Provenance {
            command: a.command.clone(),
            data: a.data.clone(),
            windows: (positives, fit.len() - positives),
            accuracy: (held_acc, fit_acc),
        },
    )?;
    // The plugin's forward must give what libtorch gave.
    let torch = Vec::<f32>::try_from(held_logits)?;
    let per = a.window * (p.samples + 1);
    let worst = torch
        .iter()
        .enumerate()
        .map(|(i, t)| (p.logit(&held.x[i * per..(i + 1) * per]) - t).abs())
        .fold(0f32, f32::max);
    if worst > 1e-4 {
        bail!("the plugin's forward differs from libtorch's by {worst}");
    }
    println!("plugin forward against libtorch: largest difference {worst:.2e}");
    std::fs::write(&a.out, serde_json::to_string(&p)? + "\n")?;
    println!("wrote {}", a.out.display());
    Ok(())
}
