//! Process memory: the allocator setting every command runs with, and the
//! peak resident memory that `bench` reports.
//!
//! A training step frees and reallocates the same activation-sized buffers
//! (hundreds of KiB to tens of MiB) every step. With glibc's defaults the
//! freed memory at the top of the heap is returned to the kernel once it
//! exceeds the trim threshold, and the next step takes it back one page
//! fault at a time: 280-570 faults per step on the tiny preset at batch
//! 16. [`keep_freed_memory`] keeps it in the process instead, so the steady
//! state allocates without faults; resident memory then stays at its high
//! mark, which a training run reaches in its first step anyway.

/// Tells glibc's malloc to serve blocks up to 32 MiB from the heap and
/// never to trim the heap. Returns false where that is not possible (not
/// glibc); nothing else changes then.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Blocks up to this size come from the heap, not from `mmap`
        // (glibc's ceiling for the setting on 64-bit systems).
        const MMAP_THRESHOLD: i32 = 32 << 20;
        // SAFETY: mallopt only changes malloc's tunables; it is safe to call
        // at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the heap's free memory back to the kernel now (glibc's
/// `malloc_trim`), e.g. before measuring what one piece of work needs.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resets the kernel's peak-RSS mark of this process (Linux).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS since the last reset, in MiB (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// A step-like pattern: buffers of several sizes allocated, written and
    /// freed together, twenty times; returns the page faults it took after
    /// its first round.
    fn steady_state_faults() -> i64 {
        let sizes = [3usize << 20, 17 << 20, 9 << 20, 25 << 20];
        let mut after_first = 0;
        for round in 0..20 {
            if round == 1 {
                after_first = thread_faults();
            }
            let bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![1u8; n]).collect();
            std::hint::black_box(&bufs);
        }
        thread_faults() - after_first
    }

    #[test]
    fn freed_memory_is_reused_without_page_faults() {
        let before = steady_state_faults();
        assert!(keep_freed_memory(), "mallopt refused the setting");
        let after = steady_state_faults();
        // 19 rounds of 54 MiB would be about 250 000 faults if the memory
        // went back to the kernel every round.
        assert!(
            after < 1000,
            "{after} page faults in the steady state (before: {before})"
        );
    }
}
