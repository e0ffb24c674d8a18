// How the CPU sources split work over ATen's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace hsae_cpu {

// Runs body(task) for tasks 0..n-1 in one parallel region, each thread taking the next task as
// it gets free: on a loaded machine a thread the OS pauses then delays one task, not a fixed share
// of them (as a static split would). Every task writes its own outputs, so results do not depend
// on which thread ran what.
template <typename Body>
inline void for_each_task(int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) body(t);
  });
}

// body(begin, end) over [0, n) in chunks of `chunk`, the chunks taken as threads get free.
template <typename Body>
inline void for_each_chunk(int64_t n, int64_t chunk, const Body& body) {
  for_each_task((n + chunk - 1) / chunk, [&](int64_t t) { body(t * chunk, std::min(n, (t + 1) * chunk)); });
}

}  // namespace hsae_cpu
