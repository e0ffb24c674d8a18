// What the CPU sources' hot loops share: their ISA clones and the fixed-order lane sums.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HSAE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HSAE_VECTOR_CLONES
#endif
// Helpers of the cloned loops are inlined into each clone, so they are compiled for its ISA too.
#define HSAE_INLINE inline __attribute__((always_inline))

namespace hsae_cpu {

// Vector width of the lane-split loops: 16 floats = one AVX-512 register (two AVX2 ones).
constexpr int64_t kLanes = 16;

// Sums in kLanes independent partial sums, then adds those in a fixed order: vectorizes without
// reassociation flags and gives the same bits on every machine width.
HSAE_INLINE float reduce_lanes(const float* acc) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

}  // namespace hsae_cpu
