//! Host reads: every place the engine brings a tensor's values back to the
//! host (the step's loss, gradient norms, evaluation counts, a
//! data-parallel step's control values) goes through these functions, and
//! they count.
//!
//! On a GPU a read waits for everything queued before it, so where reads
//! happen decides whether the host stays ahead of the device. The rule
//! they make checkable: a step on one device reads once (its loss), or
//! twice when the policy asks for gradient norms, and both after the
//! update is queued; an evaluation reads once, whatever its number of
//! batches. `simfreeze bench` reports the reads per step, and the unit
//! tests of [`super::single`] assert the counts.
//!
//! The count is per thread: the engine runs on the thread that calls it
//! (the loop's), and tests running side by side do not see each other's
//! reads. Copies that do not wait (a non-blocking copy into pinned memory,
//! which a later read completes) are not reads.
//!
//! The first read of a step is also where the host would otherwise sit
//! idle while the device finishes the step: [`before_next_read`] queues
//! work for that moment (the loop uploads the next batch there, on a side
//! stream), so it runs behind the step instead of after it.

use std::cell::{Cell, RefCell};

use tch::{Device, Kind, Tensor};

/// Work queued for the next read.
type BeforeRead = Box<dyn FnOnce()>;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
    static BEFORE: RefCell<Option<BeforeRead>> = const { RefCell::new(None) };
}

fn counted() {
    if let Some(f) = BEFORE.with(|b| b.borrow_mut().take()) {
        f();
    }
    READS.with(|r| r.set(r.get() + 1));
}

/// Runs `f` once, on this thread, at its next host read, just before the
/// read waits for the device (replacing work queued earlier and not run).
pub fn before_next_read(f: impl FnOnce() + 'static) {
    BEFORE.with(|b| *b.borrow_mut() = Some(Box::new(f)));
}

/// Drops the work [`before_next_read`] queued if no read ran it; whether
/// there was such work.
pub fn cancel_before_read() -> bool {
    BEFORE.with(|b| b.borrow_mut().take()).is_some()
}

/// Host reads made by this thread so far.
pub fn count() -> u64 {
    READS.with(Cell::get)
}

/// The value of a one-element tensor, as f64.
pub fn scalar(t: &Tensor) -> f64 {
    counted();
    t.double_value(&[])
}

/// The values of `t`, flattened, as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    counted();
    let host = t
        .flatten(0, -1)
        .to_kind(Kind::Double)
        .to_device(Device::Cpu);
    Vec::try_from(host).unwrap_or_default()
}

/// The values of `t`, flattened, as f32.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    counted();
    let host = t.flatten(0, -1).to_kind(Kind::Float).to_device(Device::Cpu);
    Vec::try_from(host).unwrap_or_default()
}

/// The values of `t`, flattened, as i64.
pub fn i64s(t: &Tensor) -> Vec<i64> {
    counted();
    let host = t.flatten(0, -1).to_kind(Kind::Int64).to_device(Device::Cpu);
    Vec::try_from(host).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_read_counts_once_and_gives_the_values() {
        let before = count();
        let t = Tensor::from_slice(&[1.5f32, -2.0]);
        assert_eq!(f32s(&t), vec![1.5, -2.0]);
        assert_eq!(f64s(&t), vec![1.5, -2.0]);
        assert_eq!(i64s(&Tensor::from_slice(&[3i64, 4])), vec![3, 4]);
        assert_eq!(scalar(&t.sum(Kind::Float)), -0.5);
        assert_eq!(count() - before, 4);
    }

    #[test]
    fn work_queued_for_the_next_read_runs_once_before_it_or_is_cancelled() {
        use std::rc::Rc;
        let ran = Rc::new(Cell::new(0u32));
        let seen = Rc::new(Cell::new(u64::MAX));
        let (r, s) = (ran.clone(), seen.clone());
        before_next_read(move || {
            r.set(r.get() + 1);
            s.set(count());
        });
        let before = count();
        let t = Tensor::from_slice(&[2.0f32]);
        assert_eq!(scalar(&t), 2.0);
        assert_eq!(scalar(&t), 2.0);
        // Once, before the first read was counted.
        assert_eq!((ran.get(), seen.get()), (1, before));
        assert!(!cancel_before_read());
        let r = ran.clone();
        before_next_read(move || r.set(r.get() + 10));
        assert!(cancel_before_read());
        assert_eq!(scalar(&t), 2.0);
        assert_eq!(ran.get(), 1);
    }
}
