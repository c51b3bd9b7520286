// CUDA streams and events for the host's data path, through c10's
// device-generic interfaces (the device guard libtorch_cuda registers), so
// this file needs no CUDA headers: a stream from libtorch's pool, the
// thread's current stream swapped for a scope, events recorded on one stream
// and waited for by another (the host does not wait), and a tensor marked as
// used by a stream, so that the caching allocator does not hand its memory
// to another stream's allocation while that stream may still read it.
//
// Streams cross as their packed id (c10::Stream::pack3's stream_id) with the
// device index; events as opaque pointers. A C++ exception (no CUDA in this
// libtorch, a CUDA error) is caught here and its message returned, never
// thrown into Rust.
#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>

#include "shim.h"

namespace {

c10::Device cuda(int device) {
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
}

c10::Stream unpack(int device, int64_t id) {
    return c10::Stream::unpack3(id, static_cast<c10::DeviceIndex>(device),
                                c10::DeviceType::CUDA);
}

const c10::impl::DeviceGuardImplInterface* guard() {
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

// A stream of CUDA device `device` from libtorch's high-priority pool: *id.
// (ProcessGroupNCCL takes its streams from the normal-priority pool, round
// robin; a stream from there would now and then be NCCL's, and the step's
// collectives would queue behind an upload.) Returns 0, or 1 with the
// error message in err.
int simfreeze_cuda_pool_stream(int device, int64_t* id, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        *id = guard()->getStreamFromGlobalPool(cuda(device), true).pack3().stream_id;
        return 0;
    });
}

// The calling thread's current stream of CUDA device `device`: *id.
int simfreeze_cuda_current_stream(int device, int64_t* id, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        *id = guard()->getStream(cuda(device)).pack3().stream_id;
        return 0;
    });
}

// Makes stream `id` the calling thread's current stream of its device;
// *previous: the stream that was (to be set back).
int simfreeze_cuda_exchange_stream(int device, int64_t id, int64_t* previous, char* err,
                                   size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        *previous = guard()->exchangeStream(unpack(device, id)).pack3().stream_id;
        return 0;
    });
}

// A new event recorded on stream `id` of CUDA device `device` (one that can
// be timed when `timing`): *event, freed by simfreeze_cuda_event_free.
int simfreeze_cuda_event_record(int device, int64_t id, int timing, void** event, char* err,
                                size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        auto e = std::make_unique<c10::Event>(
            c10::DeviceType::CUDA,
            timing ? c10::EventFlag::BACKEND_DEFAULT : c10::EventFlag::PYTORCH_DEFAULT);
        e->record(unpack(device, id));
        *event = e.release();
        return 0;
    });
}

// Makes stream `id` wait for `event` before its later work (the host does
// not wait).
int simfreeze_cuda_event_block(void* event, int device, int64_t id, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        static_cast<c10::Event*>(event)->block(unpack(device, id));
        return 0;
    });
}

// Milliseconds from timing event `from` to timing event `to`, waiting for
// `to` first: *ms.
int simfreeze_cuda_event_elapsed_ms(void* from, void* to, double* ms, char* err,
                                    size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        static_cast<c10::Event*>(to)->synchronize();
        *ms = static_cast<c10::Event*>(from)->elapsedTime(*static_cast<c10::Event*>(to));
        return 0;
    });
}

void simfreeze_cuda_event_free(void* event) {
    delete static_cast<c10::Event*>(event);
}

// Marks `t`'s memory as used by stream `id` of CUDA device `device`
// (Tensor::record_stream): freed, it is reused only after the work that
// stream has queued so far is done.
int simfreeze_cuda_record_stream(const at::Tensor* t, int device, int64_t id, char* err,
                                 size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        t->record_stream(unpack(device, id));
        return 0;
    });
}
}
