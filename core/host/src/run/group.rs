//! The data-parallel group around a run (joined by
//! [`crate::engine::launch`]): rank 0's run directory on every rank, each
//! rank's share of a global batch.

use super::*;

/// Rank 0's run directory on every rank: rank 0 publishes `dir` in the
/// group's store, the others read it after a barrier.
pub(super) fn shared_dir(g: &ProcessGroup, dir: Option<&RunDir>) -> Result<RunDir> {
    if let Some(d) = dir {
        g.store_set("run_dir", d.path.to_string_lossy().as_bytes())?;
    }
    g.barrier()?;
    match dir {
        Some(d) => Ok(d.clone()),
        None => {
            let path = g
                .store_get("run_dir")?
                .ok_or_else(|| anyhow::anyhow!("rank 0 did not publish its run directory"))?;
            Ok(RunDir::existing(Path::new(
                &String::from_utf8_lossy(&path).into_owned(),
            )))
        }
    }
}

/// This rank's samples of an epoch's `order`: of every step's global
/// batch (`batch * world` consecutive samples), the `rank`-th contiguous
/// share of `batch`; the order itself in one process.
pub(super) fn local_share(
    order: Vec<i64>,
    steps: u64,
    batch: usize,
    rank: usize,
    world: usize,
) -> Vec<i64> {
    if world == 1 {
        return order;
    }
    (0..steps as usize)
        .flat_map(|s| {
            let from = s * batch * world + rank * batch;
            order[from..from + batch].iter().copied()
        })
        .collect()
}
