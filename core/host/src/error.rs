//! Errors that cross layers, how a run stops, and the documented exit
//! codes. Everything here sits at the bottom of the host: any module may
//! import it, it imports no other host module, so the command line maps an
//! error to its code without the trainer ever importing the command line.
//!
//! Exit codes (also in the README): 0 success; 1 internal or I/O error;
//! 2 bad command line or configuration; 3 a plugin could not be found,
//! loaded or constructed; 4 a policy failed while running (error, panic or a
//! decision that breaks the freezing contract); 5 a dataset or weights file
//! is missing, corrupt or does not fit; 6 the training loss became NaN or
//! infinite; 130 the run was interrupted (signal or `--stop-after`) and can
//! be resumed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use simfreeze_runtime::contract::ContractViolation;
use simfreeze_runtime::driver::DriverError;
use simfreeze_runtime::loader::{LoadError, PolicyCallError};

/// A bad command line or configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A dataset file is missing or corrupt (exit code 5).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file does not exist or cannot be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, not repeated as an error source).
        cause: std::io::Error,
    },
    /// The file's contents are not what its format promises.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Something else about the dataset request is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// A weights file is missing, corrupt or does not fit the model (exit
/// code 5).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct WeightsError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// The training loss became NaN or infinite (exit code 6).
#[derive(Debug, thiserror::Error)]
#[error("training diverged")]
pub struct Diverged;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every epoch ran.
    Completed,
    /// Stopped early on request (signal or `--stop-after`); resumable.
    Interrupted,
    /// Stopped by a fault: a policy failure or a diverged loss.
    Failed,
}

/// Why a run stopped before its last step.
#[derive(Debug)]
pub enum Stop {
    /// A signal or `--stop-after`: checkpointed, resumable.
    Interrupted {
        /// Steps done.
        step: u64,
        /// Steps planned.
        total: u64,
    },
    /// The loss of a step was NaN or infinite; that step updated nothing.
    Diverged {
        /// The step.
        step: u64,
        /// Its epoch.
        epoch: u64,
        /// The loss.
        loss: f64,
    },
    /// The policy failed, panicked or broke the freezing contract.
    Policy(DriverError),
}

impl Stop {
    /// Interrupted or failed.
    pub fn status(&self) -> Status {
        match self {
            Stop::Interrupted { .. } => Status::Interrupted,
            Stop::Diverged { .. } | Stop::Policy(_) => Status::Failed,
        }
    }

    /// The line `summary.json` and the error message give.
    pub fn reason(&self) -> String {
        match self {
            Stop::Interrupted { step, total } => format!("stopped after step {step} of {total}"),
            Stop::Diverged { step, epoch, loss } => format!(
                "training loss is {loss} at step {step} (epoch {epoch}); the weights were not \
                 updated by that step. Lower train.sgd.lr or check the data."
            ),
            Stop::Policy(e) => e.to_string(),
        }
    }

    /// The documented exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Stop::Interrupted { .. } => 130,
            Stop::Diverged { .. } => 6,
            Stop::Policy(_) => 4,
        }
    }
}

/// A run that ended before its last step: the run directory holds a
/// checkpoint (if one was written) and a summary with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{reason}\nrun directory: {dir}{resume}")]
pub struct RunStopped {
    /// Interrupted or failed.
    pub status: Status,
    /// Why.
    pub reason: String,
    /// The run directory.
    pub dir: PathBuf,
    /// How to resume, when a checkpoint exists.
    pub resume: String,
    /// The documented exit code of the underlying fault (130 when
    /// interrupted); the fault's text is already in `reason`.
    pub exit_code: i32,
}

/// The documented exit code for an error: the first cause in its chain
/// that has one, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(stopped) = cause.downcast_ref::<RunStopped>() {
            return stopped.exit_code;
        }
        if cause.is::<Diverged>() {
            return 6;
        }
        if cause.is::<UsageError>() {
            return 2;
        }
        if cause.is::<DataError>() || cause.is::<WeightsError>() {
            return 5;
        }
        if cause.is::<LoadError>() {
            return 3;
        }
        if cause.is::<DriverError>()
            || cause.is::<PolicyCallError>()
            || cause.is::<ContractViolation>()
        {
            return 4;
        }
    }
    1
}
