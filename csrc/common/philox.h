// Philox4x32-10 and the random-LTD position hash, shared verbatim by the CPU (g++) and CUDA (nvcc) kernels.
//
// Plain C++ with no torch/ATen/c10 include, so token_ops_cuda.cu can use it and still compile on its own. The
// algorithm must stay bit-identical to random_ltd/ops/reference.py (the oracle):
//   row_key = philox(key=(seed_lo, seed_hi), counter=(step_lo, step_hi, micro_batch, layer))[0:2]
//   h[j]    = philox(key=row_key, counter=(j, sample, 0, 0))[0]
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RLTD_HD __host__ __device__ __forceinline__
#else
#define RLTD_HD inline
#endif

namespace random_ltd {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x, y, z, w;
};

struct PhiloxKey {
  uint32_t k0, k1;
};

// High 32 bits of a 32x32-bit product (one instruction on the GPU).
RLTD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox4x32; the key is bumped between rounds (Random123 / reference.py ordering).
RLTD_HD Philox4 philox4x32_10(Philox4 c, PhiloxKey k) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k.k0 += kPhiloxW0;
      k.k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(c.x, kPhiloxM0);
    const uint32_t lo0 = c.x * kPhiloxM0;
    const uint32_t hi1 = mulhi32(c.z, kPhiloxM1);
    const uint32_t lo1 = c.z * kPhiloxM1;
    c = Philox4{hi1 ^ c.y ^ k.k0, lo1, hi0 ^ c.w ^ k.k1, lo0};
  }
  return c;
}

// Key of one (seed, step, micro_batch, layer) row; seed and step are split into their 32-bit halves.
RLTD_HD PhiloxKey row_key(uint64_t seed, uint64_t step, uint32_t micro_batch, uint32_t layer) {
  const Philox4 r = philox4x32_10(
      Philox4{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), micro_batch, layer},
      PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
  return PhiloxKey{r.x, r.y};
}

// Hash of position j of sample b under a row key; the sampler keeps the positions with the smallest (hash, j).
RLTD_HD uint32_t position_hash(PhiloxKey key, uint32_t j, uint32_t sample) {
  return philox4x32_10(Philox4{j, sample, 0u, 0u}, key).x;
}

}  // namespace random_ltd
