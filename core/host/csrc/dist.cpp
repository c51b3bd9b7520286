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
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim.h"

namespace {

struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
};

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
            return new Group{store, backend};
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
        return new Group{store, backend};
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
