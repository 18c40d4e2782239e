// Shared by the native kernels: a parallel loop on XLA:CPU's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxserve_native {

// Runs body(i) for i in [0, n) on the caller and up to `workers` pool threads. Items are claimed
// from a shared counter, so the caller never waits on a task that has not started (XLA may call
// us from one of the pool's own threads); a late task finds nothing left and returns.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t workers, int64_t n, F body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = n;
  auto work = [state, body]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < state->total) {
      body(i);
      if (state->done.fetch_add(1) + 1 == state->total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t w = 0; w < std::min(workers, n - 1); ++w) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->total; });
}

}  // namespace jaxserve_native
