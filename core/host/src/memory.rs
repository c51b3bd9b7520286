//! Process memory: the allocator setting every command runs with, the
//! peak resident memory that `bench` reports, and the free memory of a
//! device (the activation cache's default cap).
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

/// Memory free on `device` now, in MiB: for a GPU its free memory as the
/// CUDA runtime libtorch loaded reports it (`cudaMemGetInfo` on that
/// device), for the CPU the kernel's `MemAvailable`; `None` when it cannot
/// be told.
pub fn free_mib(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cuda(i) => cuda_free_bytes(i).map(|b| b >> 20),
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib >> 10)
        }
    }
}

/// Free bytes of CUDA device `index`, through the CUDA runtime's C API
/// found in the process (libtorch_cuda loads it); `None` without one.
fn cuda_free_bytes(index: usize) -> Option<u64> {
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    let find = |name: &std::ffi::CStr| {
        // SAFETY: dlsym with a NUL-terminated name only looks the symbol up.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let get = find(c"cudaGetDevice")?;
    let set = find(c"cudaSetDevice")?;
    let info = find(c"cudaMemGetInfo")?;
    // SAFETY: the CUDA runtime's documented signatures; the current
    // device is restored after the query.
    unsafe {
        let (get, set, info): (GetDevice, SetDevice, MemGetInfo) = (
            std::mem::transmute::<*mut libc::c_void, GetDevice>(get),
            std::mem::transmute::<*mut libc::c_void, SetDevice>(set),
            std::mem::transmute::<*mut libc::c_void, MemGetInfo>(info),
        );
        let mut current = 0i32;
        if get(&mut current) != 0 || set(index as i32) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let rc = info(&mut free, &mut total);
        set(current);
        (rc == 0).then_some(free as u64)
    }
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
    fn free_memory_is_known_for_the_cpu_and_absent_for_a_missing_gpu() {
        let free = free_mib(tch::Device::Cpu).expect("MemAvailable");
        assert!(free > 0);
        if !tch::Cuda::is_available() {
            assert_eq!(free_mib(tch::Device::Cuda(0)), None);
        }
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
