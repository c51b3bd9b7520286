//! The faults the tests inject into a run, in one place: a batch fetch
//! that libtorch refuses at a given step (the failure path of a run, end to
//! end; docs/errors.md), and a data-parallel rank that kills or stops
//! itself at a given step (a lost or hung rank; docs/distributed.md). Both
//! are off unless their environment variable is set.

use tch::{Device, Kind, Tensor};

/// Set to a step number to make that step's batch fetch run an operation
/// libtorch refuses.
pub const FAULT_STEP_VAR: &str = "SIMFREEZE_FAULT_AT_STEP";

/// `RANK:STEP`: that rank of a data-parallel run (rank 0 in one process)
/// kills itself (SIGKILL) when it reaches that step; `RANK:STEP:hang` stops
/// itself instead (SIGSTOP: alive, never answering).
pub const KILL_VAR: &str = "SIMFREEZE_KILL_RANK_AT_STEP";

/// The faults set for this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// The step whose batch fetch fails ([`FAULT_STEP_VAR`]).
    pub fail_fetch_at: Option<u64>,
    /// The step at which this rank kills or stops itself, and the signal
    /// ([`KILL_VAR`]).
    pub kill_at: Option<(u64, i32)>,
}

impl Faults {
    /// The faults the environment sets for rank `rank`.
    pub fn from_env(rank: usize) -> Faults {
        Faults::parse(
            std::env::var(FAULT_STEP_VAR).ok().as_deref(),
            std::env::var(KILL_VAR).ok().as_deref(),
            rank,
        )
    }

    /// The faults of the variables' values `fault` and `kill` for `rank`
    /// (malformed values set nothing).
    pub fn parse(fault: Option<&str>, kill: Option<&str>, rank: usize) -> Faults {
        let kill_at = kill.and_then(|v| {
            let mut parts = v.split(':');
            let (r, s) = (parts.next()?, parts.next()?);
            let signal = match parts.next() {
                Some("hang") => libc::SIGSTOP,
                _ => libc::SIGKILL,
            };
            (r.parse::<usize>().ok()? == rank).then(|| Some((s.parse().ok()?, signal)))?
        });
        Faults {
            fail_fetch_at: fault.and_then(|v| v.parse().ok()),
            kill_at,
        }
    }

    /// Whether [`KILL_VAR`] names `step`.
    pub fn kill_due(&self, step: u64) -> bool {
        self.kill_at.is_some_and(|(at, _)| at == step)
    }

    /// At the step [`KILL_VAR`] names, kills or stops this process.
    pub fn kill_if_due(&self, step: u64) {
        if let Some((at, signal)) = self.kill_at {
            if at == step {
                // SAFETY: signals this process, as `kill -9` (or `kill
                // -STOP`: alive, never answering) would.
                unsafe { libc::kill(libc::getpid(), signal) };
            }
        }
    }

    /// At the step [`FAULT_STEP_VAR`] names, runs an operation libtorch
    /// refuses (mismatched matrix shapes), inside the caller's guard.
    pub fn fail_fetch_if_due(&self, step: u64) {
        if self.fail_fetch_at == Some(step) {
            let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
            let _ = a.matmul(&Tensor::zeros([4, 5], (Kind::Float, Device::Cpu)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_per_rank_and_ignore_what_is_malformed() {
        let f = Faults::parse(Some("7"), Some("1:12:hang"), 1);
        assert_eq!(f.fail_fetch_at, Some(7));
        assert_eq!(f.kill_at, Some((12, libc::SIGSTOP)));
        let other_rank = Faults::parse(None, Some("1:12"), 0);
        assert_eq!(other_rank, Faults::default());
        assert_eq!(
            Faults::parse(None, Some("0:9"), 0).kill_at,
            Some((9, libc::SIGKILL))
        );
        assert_eq!(Faults::parse(Some("x"), Some("0"), 0), Faults::default());
    }
}
