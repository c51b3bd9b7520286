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
//! infinite; 7 libtorch refused an operation (CUDA out of memory, a device
//! error); 8 a data-parallel group failed (a rank exited, hung past the
//! timeout or never joined, or the ranks disagreed); 130 the run was
//! interrupted (signal or `--stop-after`) and can be resumed.
//!
//! tch's tensor methods panic when libtorch throws; [`torch_guard`] turns
//! such a panic into a [`TorchError`] (one paragraph, no C++ stack frames
//! unless `SIMFREEZE_TORCH_BACKTRACE=1`), and the panic hook installed by
//! [`install_panic_hook`] keeps those guarded panics quiet.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use simfreeze_runtime::conformance::ConformanceFailure;
use simfreeze_runtime::contract::ContractViolation;
use simfreeze_runtime::driver::DriverError;
use simfreeze_runtime::loader::{LoadError, PolicyCallError};

/// A collective or the store of a data-parallel group failed: a peer
/// exited, hung past the timeout or never joined, or the ranks disagreed.
/// The group is unusable afterwards (exit code 8).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CommError {
    /// What failed, naming the lost rank when that is known.
    pub message: String,
}

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

/// libtorch refused an operation (exit code 7): CUDA out of memory, a
/// device error, a kernel that does not support the input.
#[derive(Debug, thiserror::Error)]
#[error("libtorch failed {during}: {message}")]
pub struct TorchError {
    /// What was running (`at step 12`, `building the model`).
    pub during: String,
    /// libtorch's message, without C++ stack frames unless
    /// `SIMFREEZE_TORCH_BACKTRACE=1`.
    pub message: String,
}

impl TorchError {
    /// Whether the device ran out of memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.message.contains("out of memory")
    }
}

/// A libtorch error raised by our own C++ shims, as a panic payload that
/// [`torch_guard`] recognises like tch's.
#[derive(Debug)]
pub struct TorchPanic(pub String);

/// Set to `1` to keep libtorch's C++ stack frames in error messages.
pub const TORCH_BACKTRACE_VAR: &str = "SIMFREEZE_TORCH_BACKTRACE";

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a libtorch error raised inside it (tch panics with it)
/// becomes a [`TorchError`] saying it happened `during` that. Any other
/// panic is a bug and propagates unchanged.
pub fn torch_guard<T>(
    during: impl FnOnce() -> String,
    f: impl FnOnce() -> T,
) -> Result<T, TorchError> {
    let outer = GUARDED.with(|g| g.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    match result {
        Ok(v) => Ok(v),
        Err(payload) => {
            if let Some(TorchPanic(message)) = payload.downcast_ref::<TorchPanic>() {
                return Err(TorchError {
                    during: during(),
                    message: message.clone(),
                });
            }
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
            match text.as_deref().and_then(torch_message) {
                Some(message) => Err(TorchError {
                    during: during(),
                    message,
                }),
                None => panic::resume_unwind(payload),
            }
        }
    }
}

/// libtorch's message inside a tch panic (`... Torch("...")`), unescaped,
/// cut before its C++ stack frames unless asked for.
fn torch_message(panic: &str) -> Option<String> {
    let start = panic.find("Torch(\"")? + "Torch(\"".len();
    let end = panic.rfind("\")").filter(|&e| e >= start)?;
    let raw = &panic[start..end];
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            text.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => text.push('\n'),
            Some('t') => text.push('\t'),
            Some(other) => text.push(other),
            None => {}
        }
    }
    let keep_frames = std::env::var(TORCH_BACKTRACE_VAR).is_ok_and(|v| v == "1");
    if !keep_frames {
        if let Some(at) = text.find("Exception raised from") {
            text.truncate(at);
        }
    }
    Some(text.trim().to_string())
}

/// Keeps panics raised inside [`torch_guard`] off stderr (they become
/// errors with one paragraph); every other panic prints as usual.
pub fn install_panic_hook() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(Cell::get) {
            default(info);
        }
    }));
}

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
    /// libtorch refused an operation; `hint` says what to try.
    Torch {
        /// The error.
        error: TorchError,
        /// What to try (for out of memory: the model, batch, precision).
        hint: String,
    },
    /// A data-parallel collective failed or the ranks disagreed: stopped
    /// at once, the last checkpoint kept (a new one would not be
    /// consistent across ranks).
    Peer(CommError),
}

impl Stop {
    /// Interrupted or failed.
    pub fn status(&self) -> Status {
        match self {
            Stop::Interrupted { .. } => Status::Interrupted,
            Stop::Diverged { .. } | Stop::Policy(_) | Stop::Torch { .. } | Stop::Peer(_) => {
                Status::Failed
            }
        }
    }

    /// The line `summary.json` and the error message give.
    pub fn reason(&self) -> String {
        match self {
            Stop::Interrupted { step, total } => format!("stopped after step {step} of {total}"),
            Stop::Diverged { step, epoch, loss } => format!(
                "training loss is {loss} at step {step} (epoch {epoch}); the weights were not \
                 updated by that step. Lower the learning rate (train.sgd.lr or train.adamw.lr) \
                 or check the data."
            ),
            Stop::Policy(e) => e.to_string(),
            Stop::Torch { error, hint } => format!("{error}{hint}"),
            Stop::Peer(e) => e.to_string(),
        }
    }

    /// The documented exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Stop::Interrupted { .. } => 130,
            Stop::Diverged { .. } => 6,
            Stop::Policy(_) => 4,
            Stop::Torch { .. } => 7,
            Stop::Peer(_) => 8,
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

/// How to call this program again in a hint: the path it was started
/// with when that was a path (`./target/release/simfreeze`: after setup it
/// is not on `PATH`), else `simfreeze`.
pub fn command_name() -> String {
    std::env::args_os()
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a.contains('/'))
        .unwrap_or_else(|| "simfreeze".into())
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
        if cause.is::<TorchError>() {
            return 7;
        }
        if cause.is::<CommError>() {
            return 8;
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
            || cause.is::<ConformanceFailure>()
        {
            return 4;
        }
    }
    1
}

/// The error buffer of a C++ shim call (`csrc/*.cpp`): the shims catch
/// C++ exceptions and write the message here, NUL-terminated. One helper
/// for every shim, so their messages read alike.
pub struct ShimError([std::os::raw::c_char; 1024]);

impl Default for ShimError {
    fn default() -> Self {
        ShimError([0; 1024])
    }
}

impl ShimError {
    /// The buffer to hand the shim.
    pub fn ptr(&mut self) -> *mut std::os::raw::c_char {
        self.0.as_mut_ptr()
    }

    /// Its capacity, to hand the shim with it.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never empty: a buffer of 1024 bytes (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The shim's message without the C++ stack frames c10 appends.
    pub fn message(&self) -> String {
        // SAFETY: the buffer starts zeroed and the shims NUL-terminate
        // what they write, so it always holds a terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(self.0.as_ptr()) }.to_string_lossy();
        let text = text.split("\nException raised from").next().unwrap_or("");
        text.trim().to_string()
    }

    /// The message's first line.
    pub fn first_line(&self) -> String {
        self.message().lines().next().unwrap_or("").to_string()
    }
}

/// Runs a shim call that returns a status (0: success) with a fresh error
/// buffer; its message's first line on failure.
pub fn shim_call(
    call: impl FnOnce(*mut std::os::raw::c_char, usize) -> std::os::raw::c_int,
) -> Result<(), String> {
    let mut err = ShimError::default();
    let len = err.len();
    match call(err.ptr(), len) {
        0 => Ok(()),
        _ => Err(err.first_line()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_error_becomes_one_paragraph_without_stack_frames() {
        install_panic_hook();
        let e = torch_guard(
            || "at step 3".into(),
            || {
                tch::Tensor::zeros([2, 3], tch::kind::FLOAT_CPU)
                    .matmul(&tch::Tensor::zeros([4, 5], tch::kind::FLOAT_CPU))
            },
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("libtorch failed at step 3: "), "{text}");
        assert!(text.contains("cannot be multiplied"), "{text}");
        assert!(!text.contains("frame #"), "{text}");
        assert!(!e.is_out_of_memory());
    }

    #[test]
    fn other_panics_are_not_swallowed() {
        let r = panic::catch_unwind(|| torch_guard(String::new, || panic!("a bug")));
        assert!(r.is_err());
    }

    #[test]
    fn messages_are_unescaped_and_cut_before_the_frames() {
        let p = r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 2.00 GiB.\nException raised from malloc at x.cpp:1 (most recent call first):\nframe #0: f")"#;
        assert_eq!(
            torch_message(p).unwrap(),
            "CUDA out of memory. Tried to allocate 2.00 GiB."
        );
        assert!(torch_message("index out of bounds").is_none());
    }
}
