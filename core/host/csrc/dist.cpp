// Data-parallel communication through PyTorch's own c10d: a TCPStore for
// rendezvous (a client of torchrun's agent store, or served by rank 0) and
// ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA, when built with
// USE_C10D_NCCL) for the collectives, from the libtorch the project links.
// The torch wheel ships c10d's headers but not gloo's; `gloo-decl/` declares
// the few gloo types ProcessGroupGloo.hpp names (see its README).
//
// Handles cross as opaque pointers and tch tensor handles; a C++ exception
// (a timeout, a peer that closed its connection) is caught here and its
// message returned, never thrown into Rust.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/autograd.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim.h"

namespace {

// The buckets of one overlapped backward (see
// simfreeze_dist_backward_allreduce): the hooks touch it under
// Hooks::mutex while the backward runs, the caller alone after it.
struct Overlap {
    c10d::Backend* backend = nullptr;
    c10::Device stage{c10::kCPU};  // where the collectives run (the CPU for Gloo)
    std::unordered_map<const c10::TensorImpl*, size_t> index;  // parameter -> i
    std::vector<size_t> bucket_of;             // per parameter
    std::vector<std::vector<size_t>> members;  // per bucket, parameter indices
    std::vector<size_t> pending;               // gradients still to come, per bucket
    std::vector<at::Tensor> grads;             // per parameter, as they arrive
    std::vector<at::Tensor> flat;              // per launched bucket
    std::vector<std::vector<at::Tensor>> lists;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    size_t next = 0;  // the next bucket to launch

    // Parameter i's gradient is in: counts it into its bucket.
    void arrive(size_t i, at::Tensor grad) {
        grads[i] = std::move(grad);
        --pending[bucket_of[i]];
    }

    // Launches every ready bucket from `next` on, in bucket order: every
    // rank issues its collectives in the same order, whatever order its
    // backward finished them in.
    void launch_ready() {
        while (next < members.size() && pending[next] == 0) {
            std::vector<at::Tensor> parts;
            parts.reserve(members[next].size());
            for (size_t i : members[next]) {
                parts.push_back(grads[i].reshape({-1}));
            }
            // Gloo reduces host memory: a GPU's gradients are staged (NCCL
            // reduces them where they are).
            flat[next] = at::cat(parts, 0).to(stage);
            lists[next] = {flat[next]};
            c10d::AllreduceOptions o;
            o.reduceOp = c10d::ReduceOp::SUM;
            works[next] = backend->allreduce(lists[next], o);
            ++next;
        }
    }
};

// The gradient hooks of a group's parameters. A hook is registered once per
// parameter (libtorch's remove_hook only blanks a slot, so hooks added and
// removed every step would pile up) and acts only while a backward of this
// group is in progress (`current`); the hooks share this object, which
// outlives the group if the parameters do.
struct Hooks {
    std::mutex mutex;
    std::shared_ptr<Overlap> current;
    std::unordered_set<const c10::TensorImpl*> hooked;
};

// Clears Hooks::current however the backward ends.
struct InProgress {
    Hooks& hooks;
    ~InProgress() {
        std::lock_guard<std::mutex> lock(hooks.mutex);
        hooks.current.reset();
    }
};

struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
    std::shared_ptr<Hooks> hooks;
    // On a GPU, the last backward's exposed communication as two timing
    // events on the compute stream: recorded when the backward's kernels
    // and the last buckets' packing were queued, and when the stream's wait
    // for the last bucket was (simfreeze_dist_exposed_ms reads them).
    std::unique_ptr<c10::Event> exposed_from, exposed_to;
};

// A timing event recorded now on the current stream of CUDA device `device`.
std::unique_ptr<c10::Event> cuda_mark(int device) {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    auto e = std::make_unique<c10::Event>(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    e->record(impl->getStream(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device))));
    return e;
}

}  // namespace

extern "C" {

// Whether this build has ProcessGroupNCCL.
int simfreeze_dist_has_nccl() {
#ifdef USE_C10D_NCCL
    return 1;
#else
    return 0;
#endif
}

// Joins the group: connects to (or, with `serve`, serves) the TCPStore at
// host:port, waiting at most `rendezvous_ms` for the ranks, keys under
// `prefix`, and creates a process group of `world` ranks (NCCL with `nccl`,
// else Gloo) with collectives timing out after `timeout_ms`. Returns the
// group, or null with the error message in err.
void* simfreeze_dist_init(const char* host, int port, int serve, const char* prefix, int rank,
                          int world, long long timeout_ms, long long rendezvous_ms, int nccl,
                          char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, static_cast<void*>(nullptr), [&]() -> void* {
        const std::chrono::milliseconds timeout(timeout_ms);
        c10d::TCPStoreOptions opts;
        opts.port = static_cast<std::uint16_t>(port);
        opts.isServer = serve != 0;
        opts.numWorkers = static_cast<std::size_t>(world);
        // Every rank checks in (a client only counts itself; the server
        // waits for all of them).
        opts.waitWorkers = true;
        opts.timeout = std::chrono::milliseconds(rendezvous_ms);
        auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
        auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
        if (nccl) {
#ifdef USE_C10D_NCCL
            auto options = c10d::ProcessGroupNCCL::Options::create();
            options->timeout = timeout;
            auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
            return new Group{store, backend, std::make_shared<Hooks>()};
#else
            throw std::runtime_error("this build has no NCCL (its CUDA headers were missing)");
#endif
        }
        auto options = c10d::ProcessGroupGloo::Options::create(timeout);
        // Bind where the peers reach us: the interface GLOO_SOCKET_IFNAME
        // names (as PyTorch honours it), the loopback for a local group,
        // else this host's address.
        const std::string h(host);
        const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
        options->devices.push_back(
            (ifname && *ifname)
                ? c10d::ProcessGroupGloo::createDeviceForInterface(std::string(ifname))
            : (h == "127.0.0.1" || h == "localhost")
                ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                : c10d::ProcessGroupGloo::createDefaultDevice());
        auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
        return new Group{store, backend, std::make_shared<Hooks>()};
    });
}

// Sums each of the n tensors over the ranks, in place: every all-reduce is
// started before the first is waited for, so buckets overlap. Returns 0, or
// 1 with the error message in err.
int simfreeze_dist_allreduce_sum(void* group, at::Tensor* const* tensors, size_t n, char* err,
                                 size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&]() -> int {
        auto* g = static_cast<Group*>(group);
        std::vector<c10::intrusive_ptr<c10d::Work>> works;
        std::vector<std::vector<at::Tensor>> lists(n);
        works.reserve(n);
        for (size_t i = 0; i < n; ++i) {
            lists[i].push_back(*tensors[i]);
            c10d::AllreduceOptions o;
            o.reduceOp = c10d::ReduceOp::SUM;
            works.push_back(g->backend->allreduce(lists[i], o));
        }
        for (auto& w : works) {
            w->wait();
        }
        return 0;
    });
}

// Backpropagates `loss` into the n parameters and averages their gradients
// over the ranks while the backward runs, as PyTorch's DDP does: the
// parameters are cut into buckets of at most `bucket` elements from the last
// (whose gradients come first) to the first; a hook on each parameter counts
// its bucket's gradients in, and a complete bucket's all-reduce is started at
// once (in bucket order, the same on every rank), so communication overlaps
// the rest of the backward. The first bucket holds at most 1 MiB (256 Ki
// float32 values), as DDP's does, so that communication starts early even
// when the whole model fits one bucket. A parameter the loss does not reach
// has a zero gradient (and holds its bucket, and the ones after it, back
// until the backward ends). out[i] receives parameter i's averaged gradient (a view into its
// bucket, on the parameters' device); *exposed_s the host's seconds from the
// end of the backward to the last bucket's arrival (the communication the
// backward did not hide; under NCCL the host does not wait, and
// simfreeze_dist_exposed_ms reads the compute stream's wait instead); *early the buckets started before the backward ended. The
// collectives run on CUDA device `stage_cuda` (NCCL), or
// in host memory when it is -1 (Gloo). Without `overlap` the hooks stay idle
// and every bucket is started after the backward (the same buckets, so the
// same sums). Returns 0, or 1 with the error message in err (then nothing is
// written to out).
int simfreeze_dist_backward_allreduce(void* group, const at::Tensor* loss,
                                      at::Tensor* const* params, size_t n, long long bucket,
                                      int stage_cuda, int overlap, at::Tensor** out,
                                      double* exposed_s,
                                      size_t* early, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&]() -> int {
        auto* g = static_cast<Group*>(group);
        const int world = g->backend->getSize();
        *exposed_s = 0.0;
        *early = 0;
        if (n == 0) {
            return 0;
        }
        auto state = std::make_shared<Overlap>();
        Overlap& s = *state;
        s.backend = g->backend.get();
        s.stage = stage_cuda < 0 ? c10::Device(c10::kCPU)
                                 : c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(stage_cuda));
        s.bucket_of.assign(n, 0);
        long long filled = 0;
        for (size_t k = n; k-- > 0;) {
            const long long numel = params[k]->numel();
            const long long cap = s.members.size() == 1 ? std::min(bucket, 1LL << 18) : bucket;
            if (s.members.empty() || (filled > 0 && filled + numel > cap)) {
                s.members.emplace_back();
                filled = 0;
            }
            s.members.back().push_back(k);
            s.bucket_of[k] = s.members.size() - 1;
            filled += numel;
        }
        const size_t nb = s.members.size();
        s.pending.resize(nb);
        for (size_t b = 0; b < nb; ++b) {
            s.pending[b] = s.members[b].size();
        }
        s.grads.resize(n);
        s.flat.resize(nb);
        s.lists.resize(nb);
        s.works.resize(nb);
        std::vector<at::Tensor> inputs;
        inputs.reserve(n);
        for (size_t i = 0; i < n; ++i) {
            inputs.push_back(*params[i]);
            s.index.emplace(params[i]->unsafeGetTensorImpl(), i);
        }
        Hooks& hooks = *g->hooks;
        if (overlap) {
            std::lock_guard<std::mutex> lock(hooks.mutex);
            for (size_t i = 0; i < n; ++i) {
                const c10::TensorImpl* key = params[i]->unsafeGetTensorImpl();
                if (hooks.hooked.count(key)) {
                    continue;
                }
                // A tensor hook on a leaf runs before autograd::grad
                // captures its gradient: the gradient is final by then.
                std::weak_ptr<Hooks> weak = g->hooks;
                params[i]->register_hook([weak, key](const at::TensorBase& grad) {
                    auto h = weak.lock();
                    if (!h || !grad.defined()) {
                        return;
                    }
                    std::lock_guard<std::mutex> lock(h->mutex);
                    Overlap* o = h->current.get();
                    if (!o) {
                        return;
                    }
                    auto found = o->index.find(key);
                    if (found == o->index.end() || o->grads[found->second].defined()) {
                        return;
                    }
                    o->arrive(found->second, at::Tensor(grad));
                    o->launch_ready();
                });
                hooks.hooked.insert(key);
            }
            hooks.current = state;
        }
        std::vector<at::Tensor> got;
        {
            InProgress in_progress{hooks};
            got = torch::autograd::grad({*loss}, inputs, {}, false, false, true);
        }
        const auto end = std::chrono::steady_clock::now();
        g->exposed_from.reset();
        g->exposed_to.reset();
        *early = s.next;
        for (size_t i = 0; i < n; ++i) {
            if (!s.grads[i].defined()) {
                s.arrive(i, got[i].defined() ? got[i] : at::zeros_like(*params[i]));
            }
        }
        s.launch_ready();
        // On a GPU the stream's wait is timed from here: the buckets
        // packed after the backward are queued before this mark.
        std::unique_ptr<c10::Event> from;
        if (stage_cuda >= 0) {
            from = cuda_mark(stage_cuda);
        }
        c10::AutoGradMode no_grad(false);
        std::vector<at::Tensor> averaged(n);
        // Under NCCL a wait makes the compute stream wait, not the host:
        // the events around the waits time what the stream waited.
        for (size_t b = 0; b < nb; ++b) {
            s.works[b]->wait();
        }
        if (from) {
            g->exposed_to = cuda_mark(stage_cuda);
            g->exposed_from = std::move(from);
        }
        for (size_t b = 0; b < nb; ++b) {
            // In place: the bucket is ours, no second gradient-sized buffer.
            auto avg = s.flat[b].div_(world).to(params[s.members[b][0]]->device());
            long long offset = 0;
            for (size_t i : s.members[b]) {
                const long long numel = params[i]->numel();
                averaged[i] = avg.narrow(0, offset, numel).view(params[i]->sizes());
                offset += numel;
            }
        }
        *exposed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - end).count();
        for (size_t i = 0; i < n; ++i) {
            out[i] = new at::Tensor(std::move(averaged[i]));
        }
        return 0;
    });
}

// The exposed communication of the group's last backward on a GPU, in
// milliseconds of the compute stream (waiting for it to get there): *ms and
// 1 in *had; 0 in *had when there is none to read (Gloo, or read already).
// Returns 0, or 1 with the error message in err.
int simfreeze_dist_exposed_ms(void* group, double* ms, int* had, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&]() -> int {
        auto* g = static_cast<Group*>(group);
        *had = 0;
        if (g->exposed_from && g->exposed_to) {
            g->exposed_to->synchronize();
            *ms = g->exposed_from->elapsedTime(*g->exposed_to);
            *had = 1;
        }
        g->exposed_from.reset();
        g->exposed_to.reset();
        return 0;
    });
}

// Sets `key` to `value` (n bytes) in the group's store.
int simfreeze_dist_store_set(void* group, const char* key, const unsigned char* value, size_t n,
                             char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&]() -> int {
        auto* g = static_cast<Group*>(group);
        g->store->set(std::string(key), std::vector<uint8_t>(value, value + n));
        return 0;
    });
}

// Reads `key` into out (at most cap bytes) if it exists: returns its length,
// -1 when it does not exist, -2 with the error message in err.
long long simfreeze_dist_store_get(void* group, const char* key, unsigned char* out, size_t cap,
                                   char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, -2LL, [&]() -> long long {
        auto* g = static_cast<Group*>(group);
        const std::string k(key);
        if (!g->store->check({k})) {
            return -1;
        }
        const auto v = g->store->get(k);
        std::memcpy(out, v.data(), std::min(cap, v.size()));
        return static_cast<long long>(v.size());
    });
}

// Leaves the group (closes its connections).
void simfreeze_dist_free(void* group) {
    auto* g = static_cast<Group*>(group);
    if (g) {
        try {
            g->backend->shutdown();
        } catch (...) {
        }
    }
    delete g;
}
}
