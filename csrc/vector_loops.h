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

// kLanes floats as one GCC vector: loops written with it keep several independent lane sums in
// flight where GCC's vectorizer, given several lane arrays, interleaves them with permutes (3x
// slower). Lowered to one AVX-512, two AVX2 or four SSE registers per clone.
using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));

HSAE_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// The first n < kLanes floats of p, zeros after them.
HSAE_INLINE Lanes load_lanes_partial(const float* p, int64_t n) {
  float buffer[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) buffer[l] = p[l];
  return load_lanes(buffer);
}

// reduce_lanes of a Lanes value: the same order, the same bits.
HSAE_INLINE float reduce_lanes(Lanes v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

}  // namespace hsae_cpu
