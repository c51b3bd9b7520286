//! The process group of a data-parallel run: PyTorch's c10d (a TCPStore
//! for rendezvous, ProcessGroupGloo for the collectives) through the small
//! C++ shim `csrc/dist.cpp`, and the launcher's environment contract.
//!
//! A run is data-parallel when it is started by `torchrun` (or anything
//! that sets the same variables): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`. Under torchrun the agent already serves
//! the store (`TORCHELASTIC_USE_AGENT_STORE=True`), so every rank connects
//! as a client; otherwise rank 0 serves it. Keys live under a prefix per
//! restart attempt (`TORCHELASTIC_RESTART_COUNT`), as PyTorch's own
//! `env://` rendezvous does, so a restarted group never reads a dead
//! attempt's keys. Without these variables a run is single-process and
//! unchanged.

use std::ffi::{c_void, CString};
use std::os::raw::{c_char, c_int, c_longlong};
use std::time::Duration;

use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::error::{ShimError, UsageError};

extern "C" {
    // csrc/dist.cpp
    fn simfreeze_dist_init(
        host: *const c_char,
        port: c_int,
        serve: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: c_longlong,
        rendezvous_ms: c_longlong,
        nccl: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn simfreeze_dist_has_nccl() -> c_int;
    fn simfreeze_dist_allreduce_sum(
        group: *mut c_void,
        tensors: *const *const C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_dist_backward_allreduce(
        group: *mut c_void,
        loss: *const C_tensor,
        params: *const *const C_tensor,
        n: usize,
        bucket: c_longlong,
        stage_cuda: c_int,
        overlap: c_int,
        out: *mut *mut C_tensor,
        exposed_s: *mut f64,
        early: *mut usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_dist_exposed_ms(
        group: *mut c_void,
        ms: *mut f64,
        had: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_dist_store_set(
        group: *mut c_void,
        key: *const c_char,
        value: *const u8,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_dist_store_get(
        group: *mut c_void,
        key: *const c_char,
        out: *mut u8,
        cap: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_longlong;
    fn simfreeze_dist_free(group: *mut c_void);
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    /// NCCL when the device is a GPU and this build has it, else Gloo.
    #[default]
    Auto,
    /// ProcessGroupGloo (a GPU's tensors are staged through host memory).
    Gloo,
    /// ProcessGroupNCCL, on `cuda:LOCAL_RANK`.
    Nccl,
}

impl Backend {
    /// The backend for training on `device`: `Auto` resolved, `Nccl`
    /// checked.
    pub fn resolve(self, device: Device) -> Result<Backend, UsageError> {
        match self {
            Backend::Auto if device.is_cuda() && nccl_available() => Ok(Backend::Nccl),
            Backend::Auto | Backend::Gloo => Ok(Backend::Gloo),
            Backend::Nccl if !nccl_available() => Err(UsageError(
                "train.dist_backend is Nccl but this build has no NCCL: run scripts/setup.sh \
                 (it installs the CUDA headers NCCL needs) and rebuild, or use Gloo"
                    .into(),
            )),
            Backend::Nccl if !device.is_cuda() => Err(UsageError(
                "train.dist_backend is Nccl but the device is the CPU: NCCL needs GPUs; use \
                 Gloo (or Auto)"
                    .into(),
            )),
            Backend::Nccl => Ok(Backend::Nccl),
        }
    }
}

/// Whether this build includes ProcessGroupNCCL.
pub fn nccl_available() -> bool {
    // SAFETY: a constant query of the shim.
    unsafe { simfreeze_dist_has_nccl() != 0 }
}

/// The least time the rendezvous waits for every rank to join.
const RENDEZVOUS_MIN: Duration = Duration::from_secs(60);

/// What the launcher says about this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank on this machine (the GPU it uses).
    pub local_rank: usize,
    /// Where the store is.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// The launcher's agent serves the store (torchrun): connect as a
    /// client even on rank 0.
    pub agent_store: bool,
    /// Restart attempt (torchrun `--max-restarts`).
    pub attempt: u64,
}

impl DistEnv {
    /// The launcher's variables, `None` when `WORLD_SIZE` is not set (a
    /// plain single-process run). A partial or malformed set is an error
    /// naming the variable.
    pub fn from_env() -> Result<Option<DistEnv>, UsageError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, UsageError> {
        if var("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |k: &str, default: Option<u64>| -> Result<u64, UsageError> {
            match (var(k), default) {
                (Some(v), _) => v.trim().parse().map_err(|_| {
                    UsageError(format!("{k}={v:?} is not a number (set by the launcher)"))
                }),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(UsageError(format!(
                    "WORLD_SIZE is set but {k} is not: launch with torchrun, which sets RANK, \
                     WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
                ))),
            }
        };
        let world = num("WORLD_SIZE", None)? as usize;
        let rank = num("RANK", None)? as usize;
        if world == 0 || rank >= world {
            return Err(UsageError(format!(
                "RANK {rank} with WORLD_SIZE {world}: the rank must be below the world size"
            )));
        }
        let port = num("MASTER_PORT", None)?;
        let port = u16::try_from(port)
            .map_err(|_| UsageError(format!("MASTER_PORT={port} is not a port")))?;
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank: num("LOCAL_RANK", Some(0))? as usize,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            attempt: num("TORCHELASTIC_RESTART_COUNT", Some(0))?,
        }))
    }
}

/// How much of an overlapped backward's communication the backward hid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlapped {
    /// Seconds the host waited for the all-reduces after the backward
    /// (on a GPU see [`ProcessGroup::exposed_on_device`]).
    pub exposed_seconds: f64,
    /// Buckets whose all-reduce started before the backward ended.
    pub early_buckets: usize,
}

impl DistEnv {
    /// The device this rank trains on: `cuda:LOCAL_RANK` when the run is on
    /// a GPU, made the process's current device here, before any CUDA work
    /// (else every rank would open a context on GPU 0); `device` itself on
    /// the CPU.
    pub fn claim_device(&self, device: Device) -> Result<Device, UsageError> {
        if !device.is_cuda() {
            return Ok(device);
        }
        crate::model::precision::cuda_set_device(self.local_rank).map_err(|e| {
            UsageError(format!(
                "LOCAL_RANK {} cannot use cuda:{}: {e} (one rank per GPU: torchrun \
                 --nproc-per-node at most the GPU count)",
                self.local_rank, self.local_rank
            ))
        })?;
        Ok(Device::Cuda(self.local_rank))
    }
}

pub use crate::error::CommError;

/// A Gloo process group (CPU tensors; CUDA tensors are staged through
/// host memory by the caller).
pub struct ProcessGroup {
    ptr: *mut c_void,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank on this machine (its GPU).
    pub local_rank: usize,
    /// Where the tensors of a collective must be: the CPU for Gloo, this
    /// rank's GPU for NCCL.
    pub device: Device,
    /// Collective and store timeout.
    pub timeout: Duration,
}

// SAFETY: the handle owns a c10d Store and Backend, which PyTorch calls
// from several threads itself (its Python bindings release the GIL around
// every collective); the loop uses the group from one thread.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above: c10d's Store and Backend methods are thread-safe.
unsafe impl Sync for ProcessGroup {}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("no interior NUL")
}

impl ProcessGroup {
    /// Joins the group `env` describes, over `backend` (resolved: Gloo or
    /// Nccl). Collectives time out after `timeout`; the rendezvous waits at
    /// least a minute for the other ranks to start (they load data and
    /// plugins first).
    pub fn join(
        env: &DistEnv,
        timeout: Duration,
        backend: Backend,
    ) -> Result<ProcessGroup, CommError> {
        let nccl = backend == Backend::Nccl;
        let host = c_string(&env.master_addr);
        let prefix = c_string(&format!("/simfreeze/attempt_{}", env.attempt));
        let serve = !env.agent_store && env.rank == 0;
        let mut err = ShimError::default();
        // SAFETY: the strings outlive the call; the shim catches C++
        // exceptions and reports them in `err`.
        let ptr = unsafe {
            simfreeze_dist_init(
                host.as_ptr(),
                c_int::from(env.master_port),
                c_int::from(serve),
                prefix.as_ptr(),
                env.rank as c_int,
                env.world as c_int,
                timeout.as_millis() as c_longlong,
                timeout.max(RENDEZVOUS_MIN).as_millis() as c_longlong,
                c_int::from(nccl),
                err.ptr(),
                err.len(),
            )
        };
        if ptr.is_null() {
            return Err(CommError {
                message: format!(
                    "rank {} of {} could not join the group at {}:{} (the rendezvous waits {} s): {}",
                    env.rank,
                    env.world,
                    env.master_addr,
                    env.master_port,
                    timeout.max(RENDEZVOUS_MIN).as_secs(),
                    err.message()
                ),
            });
        }
        Ok(ProcessGroup {
            ptr,
            rank: env.rank,
            world: env.world,
            local_rank: env.local_rank,
            device: match nccl {
                true => Device::Cuda(env.local_rank),
                false => Device::Cpu,
            },
            timeout,
        })
    }

    /// Sums each tensor over the ranks, in place (contiguous tensors on
    /// [`ProcessGroup::device`]; every all-reduce is in flight before the
    /// first is waited for).
    pub fn allreduce_sum(&self, tensors: &[&Tensor]) -> Result<(), CommError> {
        let ptrs: Vec<*const C_tensor> = tensors.iter().map(|t| t.as_ptr()).collect();
        let mut err = ShimError::default();
        // SAFETY: the tensors are live for the call; errors come back in
        // `err`.
        let rc = unsafe {
            simfreeze_dist_allreduce_sum(self.ptr, ptrs.as_ptr(), ptrs.len(), err.ptr(), err.len())
        };
        match rc {
            0 => Ok(()),
            _ => Err(CommError {
                message: err.message(),
            }),
        }
    }

    /// Backpropagates `loss` into `params` and averages their gradients
    /// over the ranks while the backward runs (PyTorch DDP's overlap): the
    /// parameters are cut into buckets of at most `bucket` elements from
    /// the last to the first, and a bucket's all-reduce starts as soon as
    /// its last gradient is computed, in the same bucket order on every
    /// rank; the first bucket holds at most 1 MiB, as DDP's. Without
    /// `overlap` every bucket starts after the backward
    /// (`train.overlap_allreduce: false`; the same buckets, the same sums).
    /// Returns each parameter's averaged gradient (on its device).
    pub fn backward_mean(
        &self,
        loss: &Tensor,
        params: &[&Tensor],
        bucket: i64,
        overlap: bool,
    ) -> Result<(Vec<Tensor>, Overlapped), CommError> {
        let ptrs: Vec<*const C_tensor> = params.iter().map(|t| t.as_ptr()).collect();
        let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); params.len()];
        let mut exposed = 0.0f64;
        let mut early = 0usize;
        let stage = match self.device {
            Device::Cuda(i) => i as c_int,
            _ => -1,
        };
        let mut err = ShimError::default();
        // SAFETY: the tensors are live for the call; on success the shim
        // fills every `out` slot with a tensor handle allocated with `new`,
        // which `Tensor::from_ptr` takes ownership of; on failure it fills
        // none and the message comes back in `err`.
        let rc = unsafe {
            simfreeze_dist_backward_allreduce(
                self.ptr,
                loss.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
                bucket,
                stage,
                c_int::from(overlap),
                out.as_mut_ptr(),
                &mut exposed,
                &mut early,
                err.ptr(),
                err.len(),
            )
        };
        match rc {
            // SAFETY: see above.
            0 => Ok((
                out.into_iter()
                    .map(|p| unsafe { Tensor::from_ptr(p) })
                    .collect(),
                Overlapped {
                    exposed_seconds: exposed,
                    early_buckets: early,
                },
            )),
            _ => Err(CommError {
                message: err.message(),
            }),
        }
    }

    /// On a GPU, the seconds the compute stream waited for the last
    /// [`Self::backward_mean`]'s buckets after its backward (CUDA events
    /// around the stream's waits: under NCCL the host does not wait, so
    /// [`Overlapped::exposed_seconds`] reads about zero there); waits for
    /// the stream to get there. `None` on the CPU (Gloo, where the host's
    /// wait is the figure), or when read already.
    pub fn exposed_on_device(&self) -> Result<Option<f64>, CommError> {
        let (mut ms, mut had) = (0.0f64, 0 as c_int);
        let mut err = ShimError::default();
        // SAFETY: the shim writes `ms` and `had`, or the error buffer.
        let rc =
            unsafe { simfreeze_dist_exposed_ms(self.ptr, &mut ms, &mut had, err.ptr(), err.len()) };
        match (rc, had) {
            (0, 0) => Ok(None),
            (0, _) => Ok(Some(ms / 1000.0)),
            _ => Err(CommError {
                message: err.message(),
            }),
        }
    }

    /// Sets `key` in the group's store.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let k = c_string(key);
        let mut err = ShimError::default();
        // SAFETY: as above.
        let rc = unsafe {
            simfreeze_dist_store_set(
                self.ptr,
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
                err.ptr(),
                err.len(),
            )
        };
        match rc {
            0 => Ok(()),
            _ => Err(CommError {
                message: err.message(),
            }),
        }
    }

    /// The value of `key` in the group's store, `None` when it is not set.
    pub fn store_get(&self, key: &str) -> Result<Option<Vec<u8>>, CommError> {
        let k = c_string(key);
        let mut out = vec![0u8; 4096];
        let mut err = ShimError::default();
        // SAFETY: `out` has `out.len()` writable bytes.
        let n = unsafe {
            simfreeze_dist_store_get(
                self.ptr,
                k.as_ptr(),
                out.as_mut_ptr(),
                out.len(),
                err.ptr(),
                err.len(),
            )
        };
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(CommError {
                message: err.message(),
            }),
            n => {
                out.truncate((n as usize).min(4096));
                Ok(Some(out))
            }
        }
    }

    /// Rank 0's `tensors` on every rank (on [`ProcessGroup::device`]; an
    /// all-reduce of zeros elsewhere: `x + 0` is exact, so every rank gets
    /// rank 0's bits).
    pub fn broadcast_from_zero(&self, tensors: &[Tensor]) -> Result<(), CommError> {
        if self.rank != 0 {
            for t in tensors {
                let _ = t.shallow_clone().zero_();
            }
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        self.allreduce_sum(&refs)
    }

    /// Every rank's `local` (same shape and kind on every rank) stacked in
    /// rank order, `[world, ...]`, in host memory; bit-exact (an all-reduce
    /// of zero-padded slots).
    pub fn gather(&self, local: &Tensor) -> Result<Tensor, CommError> {
        let mut shape = vec![self.world as i64];
        shape.extend(local.size());
        let all = Tensor::zeros(shape.as_slice(), (local.kind(), self.device));
        all.get(self.rank as i64).copy_(local);
        self.allreduce_sum(&[&all])?;
        Ok(all.to_device(Device::Cpu))
    }

    /// Waits until every rank got here.
    pub fn barrier(&self) -> Result<(), CommError> {
        self.allreduce_sum(&[&Tensor::zeros([1], (tch::Kind::Float, self.device))])
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `simfreeze_dist_init` and is freed once.
        unsafe { simfreeze_dist_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, UsageError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn the_launchers_contract() {
        assert_eq!(env(&[]).unwrap(), None);
        let torchrun = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(torchrun.rank, 1);
        assert_eq!(torchrun.world, 2);
        assert!(torchrun.agent_store);
        assert_eq!(torchrun.attempt, 2);
        let e = env(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.0.contains("RANK is not"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.0.contains("below the world size"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "99999")]).unwrap_err();
        assert!(e.0.contains("not a port"), "{e}");
    }

    /// A group of one rank that serves its own store on a free port.
    fn alone() -> DistEnv {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            agent_store: false,
            attempt: 0,
        }
    }

    /// A one-rank group (its own store) sums, gathers and keeps keys.
    #[test]
    fn a_one_rank_group_works_end_to_end() {
        let g = ProcessGroup::join(&alone(), Duration::from_secs(20), Backend::Gloo).unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0]);
        g.allreduce_sum(&[&t]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.5, -2.0]);
        let all = g.gather(&Tensor::from_slice(&[7i64, 8])).unwrap();
        assert_eq!(all.size(), [1, 2]);
        g.store_set("k", b"v1").unwrap();
        assert_eq!(g.store_get("k").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(g.store_get("absent").unwrap(), None);
        g.barrier().unwrap();
    }

    /// The overlapped backward of a one-rank group returns autograd's own
    /// gradients, bit for bit, whatever the buckets: one per parameter, a
    /// few, or one for all; a parameter the loss does not reach gets zeros;
    /// a second call (the hooks were removed) gives the same again.
    #[test]
    fn the_overlapped_backward_gives_autograd_s_gradients() {
        let g = ProcessGroup::join(&alone(), Duration::from_secs(20), Backend::Gloo).unwrap();
        tch::manual_seed(3);
        let opts = (tch::Kind::Float, Device::Cpu);
        let w: Vec<Tensor> = [[4i64, 3], [3, 3], [3, 2], [5, 1]]
            .iter()
            .map(|s| Tensor::randn(*s, opts).set_requires_grad(true))
            .collect();
        let x = Tensor::randn([6, 4], opts);
        // w[3] is not used: its gradient is zero.
        let loss = || {
            x.matmul(&w[0])
                .tanh()
                .matmul(&w[1])
                .relu()
                .matmul(&w[2])
                .square()
                .sum(tch::Kind::Float)
        };
        let used: Vec<&Tensor> = w[..3].iter().collect();
        let want = Tensor::run_backward(&[loss()], &used, false, false);
        let params: Vec<&Tensor> = w.iter().collect();
        for bucket in [1, 10, 12, 1 << 20] {
            for _ in 0..2 {
                let (got, o) = g.backward_mean(&loss(), &params, bucket, true).unwrap();
                assert_eq!(got.len(), 4);
                for (a, b) in got.iter().zip(&want) {
                    assert!(a.equal(b), "bucket {bucket}");
                }
                assert_eq!(got[3].size(), [5, 1]);
                assert_eq!(got[3].abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
                assert!(o.exposed_seconds >= 0.0);
                // The unused last parameter is in the first bucket: it
                // holds every bucket back until the backward ends.
                assert_eq!(o.early_buckets, 0);
            }
            // Without it, the hooks start every bucket during the backward
            // (the last in the hook of the backward's last gradient).
            let (got, o) = g.backward_mean(&loss(), &used, bucket, true).unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!(a.equal(b), "bucket {bucket}");
            }
            // Without overlap, the same gradients, every bucket after.
            let (after, late) = g.backward_mean(&loss(), &used, bucket, false).unwrap();
            assert!(after.iter().zip(&got).all(|(a, b)| a.equal(b)));
            assert_eq!(late.early_buckets, 0);
            // 12, 9 and 6 values from the last: one bucket each up to 12
            // (6 + 9 > 12), one for all at the 1 MiB first-bucket cap.
            let buckets = if bucket <= 12 { 3 } else { 1 };
            assert_eq!(o.early_buckets, buckets, "bucket {bucket}");
        }
        // Nothing accumulated in .grad, as with run_backward.
        assert!(w.iter().all(|t| !t.grad().defined()));
    }

    /// NCCL is refused where it cannot run, and when this build has it, a
    /// group on a machine without a GPU stops with c10d's own message.
    #[test]
    fn nccl_only_where_it_can_run() {
        assert_eq!(Backend::Auto.resolve(Device::Cpu).unwrap(), Backend::Gloo);
        assert!(Backend::Nccl.resolve(Device::Cpu).is_err());
        assert_eq!(
            Backend::Auto.resolve(Device::Cuda(0)).unwrap(),
            if nccl_available() {
                Backend::Nccl
            } else {
                Backend::Gloo
            }
        );
        if !nccl_available() || tch::Cuda::is_available() {
            return;
        }
        let err = ProcessGroup::join(&alone(), Duration::from_secs(20), Backend::Nccl)
            .err()
            .expect("no GPU here");
        assert!(err.message.contains("GPU"), "{}", err.message);
        eprintln!("NCCL without a GPU: {}", err.message);
    }
}
