//! Progress of a training run on stderr: one updating line on a terminal,
//! a log line every 5 % of the steps otherwise (CI, files).

use std::io::IsTerminal;
use std::time::Instant;

/// A one-line progress display on a terminal, a log line every few
/// percent otherwise.
pub struct Progress {
    total: u64,
    tty: bool,
    started: Instant,
    start: u64,
    last_print: u64,
}

impl Progress {
    /// Progress over `total` steps, starting at `start` (resume).
    pub fn new(total: u64, start: u64) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            start,
            last_print: start,
        }
    }

    /// After `step` steps: the loss of the last, batch size, frontier.
    pub fn tick(&mut self, step: u64, loss: f64, batch: i64, frozen: u32) {
        let every = if self.tty {
            10
        } else {
            (self.total / 20).max(1)
        };
        if step - self.last_print < every && step != self.total {
            return;
        }
        self.last_print = step;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let ips = (step - self.start) as f64 * batch as f64 / secs;
        let line = format!(
            "step {step}/{} loss {loss:.4} {ips:.0} img/s frozen {frozen}",
            self.total
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    /// Ends the updating line (before other output).
    pub fn finish_line(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
