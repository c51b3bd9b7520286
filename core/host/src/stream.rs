//! CUDA streams and events, through a small C++ shim (`csrc/stream.cpp`)
//! over c10's device-generic interfaces: tch exposes neither.
//!
//! The data path uses them as timm's `PrefetchLoader` does: the next batch
//! is uploaded (and normalised) on a side [`Stream`] while the current step
//! still runs on the main one, and the main stream waits for an [`Event`]
//! recorded after the upload, without the host waiting. A tensor made on
//! one stream and used on another is marked with [`Stream::keep`], so that
//! the caching allocator does not reuse its memory early.
//!
//! Everything here is for CUDA devices; on the CPU nothing calls it (there
//! is one stream, and an upload is the tensor itself).

use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn simfreeze_cuda_pool_stream(
        device: c_int,
        id: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_current_stream(
        device: c_int,
        id: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_exchange_stream(
        device: c_int,
        id: i64,
        previous: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_event_record(
        device: c_int,
        id: i64,
        timing: c_int,
        event: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_event_block(
        event: *mut c_void,
        device: c_int,
        id: i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_event_elapsed_ms(
        from: *mut c_void,
        to: *mut c_void,
        ms: *mut f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn simfreeze_cuda_event_free(event: *mut c_void);
    fn simfreeze_cuda_record_stream(
        t: *const C_tensor,
        device: c_int,
        id: i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// A shim function that writes a stream's id.
type StreamGetter = unsafe extern "C" fn(c_int, *mut i64, *mut c_char, usize) -> c_int;

/// Runs one shim call with an error buffer: its message (first line) on
/// failure.
fn shim(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    crate::error::shim_call(call).map_err(|e| format!("{what}: {e}"))
}

/// A CUDA stream of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    device: usize,
    id: i64,
}

impl Stream {
    /// A stream of CUDA device `device` from libtorch's high-priority
    /// pool: not the default stream, and not one of the normal-priority
    /// pool's that NCCL takes its streams from.
    pub fn side(device: usize) -> Result<Stream, String> {
        Stream::of(device, "a CUDA side stream", simfreeze_cuda_pool_stream)
    }

    /// The calling thread's current stream of CUDA device `device` (the
    /// one libtorch queues its work on).
    pub fn current(device: usize) -> Result<Stream, String> {
        Stream::of(
            device,
            "the current CUDA stream",
            simfreeze_cuda_current_stream,
        )
    }

    /// The stream of `device` that the shim function `get` names.
    fn of(device: usize, what: &str, get: StreamGetter) -> Result<Stream, String> {
        let mut id = 0;
        // SAFETY: the shim writes `id` or the error buffer.
        shim(what, |e, n| unsafe { get(device as c_int, &mut id, e, n) })?;
        Ok(Stream { device, id })
    }

    /// Makes this the calling thread's current stream until the returned
    /// scope is dropped: libtorch queues the work of that scope here.
    pub fn enter(&self) -> Result<StreamScope, String> {
        let mut previous = 0;
        // SAFETY: as in `side`.
        shim("entering a CUDA stream", |e, n| unsafe {
            simfreeze_cuda_exchange_stream(self.device as c_int, self.id, &mut previous, e, n)
        })?;
        Ok(StreamScope {
            previous: Stream {
                device: self.device,
                id: previous,
            },
        })
    }

    /// An event recorded on this stream now: it completes when the work
    /// queued here so far is done. `timing`: [`Event::elapsed_ms`] can
    /// measure it.
    pub fn record(&self, timing: bool) -> Result<Event, String> {
        let mut event = std::ptr::null_mut();
        // SAFETY: as in `side`; the event is owned by the returned value.
        shim("recording a CUDA event", |e, n| unsafe {
            simfreeze_cuda_event_record(
                self.device as c_int,
                self.id,
                c_int::from(timing),
                &mut event,
                e,
                n,
            )
        })?;
        Ok(Event(event))
    }

    /// This stream's later work waits for `event` (the host does not).
    pub fn wait(&self, event: &Event) -> Result<(), String> {
        // SAFETY: `event` is alive (borrowed).
        shim("waiting for a CUDA event", |e, n| unsafe {
            simfreeze_cuda_event_block(event.0, self.device as c_int, self.id, e, n)
        })
    }

    /// Marks `t` (made on another stream) as used by this one: its memory
    /// is not reused before the work this stream has queued is done.
    pub fn keep(&self, t: &Tensor) -> Result<(), String> {
        // SAFETY: `t` is a live tch tensor.
        shim("marking a tensor's stream", |e, n| unsafe {
            simfreeze_cuda_record_stream(t.as_ptr(), self.device as c_int, self.id, e, n)
        })
    }
}

/// The scope of [`Stream::enter`]: dropped, it sets the thread's previous
/// stream back.
#[must_use = "the stream is current only while the scope lives"]
pub struct StreamScope {
    previous: Stream,
}

impl Drop for StreamScope {
    fn drop(&mut self) {
        let mut ignored = 0;
        // SAFETY: as in `Stream::side`. The previous stream was current a
        // moment ago: setting it back does not fail.
        let _ = shim("leaving a CUDA stream", |e, n| unsafe {
            simfreeze_cuda_exchange_stream(
                self.previous.device as c_int,
                self.previous.id,
                &mut ignored,
                e,
                n,
            )
        });
    }
}

/// A CUDA event recorded on a stream.
#[derive(Debug)]
pub struct Event(*mut c_void);

impl Event {
    /// Milliseconds from this event to `later` (both recorded with
    /// `timing`), waiting for `later` to complete first.
    pub fn elapsed_ms(&self, later: &Event) -> Result<f64, String> {
        let mut ms = 0.0;
        // SAFETY: both events are alive (borrowed).
        shim("timing CUDA events", |e, n| unsafe {
            simfreeze_cuda_event_elapsed_ms(self.0, later.0, &mut ms, e, n)
        })?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the pointer came from the shim and is freed once.
        unsafe { simfreeze_cuda_event_free(self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a libtorch without CUDA (or a machine without a GPU) every call
    /// fails with libtorch's message instead of crashing; with a GPU the
    /// whole round trip works.
    #[test]
    fn streams_and_events_fail_cleanly_without_cuda_and_work_with_it() {
        match Stream::side(0) {
            Err(e) => {
                assert!(!tch::Cuda::is_available());
                assert!(e.starts_with("a CUDA side stream: "), "{e}");
                assert!(Stream::current(0).is_err());
            }
            Ok(side) => {
                let device = tch::Device::Cuda(0);
                let main = Stream::current(0).unwrap();
                assert_ne!(main, side);
                let start = side.record(true).unwrap();
                let x = {
                    let _scope = side.enter().unwrap();
                    assert_eq!(Stream::current(0).unwrap(), side);
                    Tensor::ones([1024, 1024], (tch::Kind::Float, device)) * 2.0
                };
                assert_eq!(Stream::current(0).unwrap(), main);
                let done = side.record(true).unwrap();
                main.wait(&done).unwrap();
                main.keep(&x).unwrap();
                assert_eq!(
                    x.sum(tch::Kind::Float).double_value(&[]),
                    2.0 * 1024.0 * 1024.0
                );
                assert!(start.elapsed_ms(&done).unwrap() >= 0.0);
            }
        }
    }
}
