//! Progress of a training run on stderr: on a terminal, a progress bar
//! (step, epoch, loss, img/s, frozen blocks, ETA); otherwise (CI, files) a
//! plain log line every 5 % of the steps.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The run's progress display.
pub struct Progress {
    total: u64,
    steps_per_epoch: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    start: u64,
    last_print: u64,
    /// Prints nothing (a data-parallel rank other than 0).
    quiet: bool,
}

impl Progress {
    /// Progress over `total` steps of `steps_per_epoch` each, starting at
    /// `start` (resume).
    pub fn new(total: u64, steps_per_epoch: u64, start: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_position(start);
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Progress {
            total,
            steps_per_epoch: steps_per_epoch.max(1),
            bar,
            started: Instant::now(),
            start,
            last_print: start,
            quiet: false,
        }
    }

    /// A display that shows nothing (ranks other than 0 of a
    /// data-parallel run: rank 0 speaks for the group).
    pub fn quiet(total: u64, steps_per_epoch: u64) -> Self {
        Progress {
            total,
            steps_per_epoch: steps_per_epoch.max(1),
            bar: None,
            started: Instant::now(),
            start: 0,
            last_print: 0,
            quiet: true,
        }
    }

    /// After `step` steps: the loss of the last, batch size, frontier.
    pub fn tick(&mut self, step: u64, loss: f64, batch: i64, frozen: u32) {
        if self.quiet {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let ips = (step - self.start) as f64 * batch as f64 / secs;
        let epoch = (step.saturating_sub(1)) / self.steps_per_epoch;
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!(
                "epoch {epoch} loss {loss:.4} {ips:.0} img/s frozen {frozen}"
            ));
            return;
        }
        let every = (self.total / 20).max(1);
        if step - self.last_print < every && step != self.total {
            return;
        }
        self.last_print = step;
        eprintln!(
            "step {step}/{} loss {loss:.4} {ips:.0} img/s frozen {frozen}",
            self.total
        );
    }

    /// Prints a line above the bar (or as a plain line).
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Takes the bar off the terminal (before the run's last messages).
    pub fn finish_line(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
