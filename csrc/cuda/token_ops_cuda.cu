// CUDA kernels of the random_ltd ops (mirrors csrc/cpu/token_ops_cpu.cpp). No torch/ATen/c10 include on purpose:
// see token_ops_cuda.h.
//
// gather/scatter are row copies (a row = hidden elements). Copying is bit-exact, so the kernels are templated on
// the element *size* only (1, 2, 4, 8, 16 bytes); the binding maps every supported dtype to its size. All offsets
// are int64 (tensors above 2^31 elements work).
#include "token_ops_cuda.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "../common/philox.h"

namespace random_ltd::cuda {
namespace {

// Element types by size; only their bits are moved.
struct alignas(16) Elem16 {
  uint64_t lo, hi;
};
template <int kBytes> struct ElemOf;
template <> struct ElemOf<1> { using type = uint8_t; };
template <> struct ElemOf<2> { using type = uint16_t; };
template <> struct ElemOf<4> { using type = uint32_t; };
template <> struct ElemOf<8> { using type = uint64_t; };
template <> struct ElemOf<16> { using type = Elem16; };

constexpr int kCopyThreads = 256;
// ptxas (sm_80/sm_90) gives the copy kernels 48-64 registers: 64 x 256 threads x 4 blocks fills the 64K-register
// file, so 4 blocks (1024 threads) are resident per SM; __launch_bounds__ holds every instantiation to that.
constexpr int kCopyBlocksPerSm = 4;
constexpr int kCopyWaves = 4;

int sm_count() {
  // Cached per device: cudaDeviceGetAttribute is cheap but this runs on every launch.
  static std::atomic<int> cache[64];  // Zero-initialised (static storage).
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (dev >= 0 && dev < 64) {
    int n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 108;
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Copies one row of h elements with `group` cooperating lanes using vectors of type V, when src and dst have the
// same address phase modulo sizeof(V): scalar head up to the V boundary, V body (4 independent loads in flight per
// lane), scalar tail. Alignment is per row, so any hidden size (1, 7, 4099, ...) works.
template <typename Elem, typename V>
__device__ __forceinline__ void copy_row_vec(Elem* __restrict__ dst, const Elem* __restrict__ src, int64_t h,
                                             int lane, int group) {
  constexpr int64_t kPer = sizeof(V) / sizeof(Elem);
  const uintptr_t sa = reinterpret_cast<uintptr_t>(src);
  int64_t head = static_cast<int64_t>(((sizeof(V) - (sa % sizeof(V))) % sizeof(V)) / sizeof(Elem));
  if (head > h) head = h;
  for (int64_t i = lane; i < head; i += group) dst[i] = src[i];
  const int64_t nvec = (h - head) / kPer;
  const V* __restrict__ vs = reinterpret_cast<const V*>(src + head);
  V* __restrict__ vd = reinterpret_cast<V*>(dst + head);
  int64_t v = lane;
  for (; v + 3 * group < nvec; v += 4 * group) {
    const V a = vs[v], b = vs[v + group], c = vs[v + 2 * group], d = vs[v + 3 * group];
    vd[v] = a;
    vd[v + group] = b;
    vd[v + 2 * group] = c;
    vd[v + 3 * group] = d;
  }
  for (; v < nvec; v += group) vd[v] = vs[v];
  for (int64_t i = head + nvec * kPer + lane; i < h; i += group) dst[i] = src[i];
}

// Picks the widest vector (16, 8, 4 bytes) for which src and dst share the same alignment phase; the choice depends
// only on the row, so all lanes of a group take the same branch.
template <typename Elem>
__device__ __forceinline__ void copy_row(Elem* __restrict__ dst, const Elem* __restrict__ src, int64_t h, int lane,
                                         int group) {
  const uintptr_t phase = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
  if ((phase & 15) == 0) {
    copy_row_vec<Elem, uint4>(dst, src, h, lane, group);
    return;
  }
  if constexpr (sizeof(Elem) < 8) {
    if ((phase & 7) == 0) {
      copy_row_vec<Elem, uint2>(dst, src, h, lane, group);
      return;
    }
  }
  if constexpr (sizeof(Elem) < 4) {
    if ((phase & 3) == 0) {
      copy_row_vec<Elem, uint32_t>(dst, src, h, lane, group);
      return;
    }
  }
  for (int64_t i = lane; i < h; i += group) dst[i] = src[i];
}

// Zeroes one row with 16-byte stores between a scalar head (up to the 16-byte boundary) and a scalar tail.
template <typename Elem>
__device__ __forceinline__ void zero_row(Elem* __restrict__ dst, int64_t h, int lane, int group) {
  constexpr int64_t kPer = sizeof(uint4) / sizeof(Elem);
  const uintptr_t da = reinterpret_cast<uintptr_t>(dst);
  int64_t head = static_cast<int64_t>(((sizeof(uint4) - (da % sizeof(uint4))) % sizeof(uint4)) / sizeof(Elem));
  if (head > h) head = h;
  for (int64_t i = lane; i < head; i += group) dst[i] = Elem{};
  const int64_t nvec = (h - head) / kPer;
  uint4* __restrict__ vd = reinterpret_cast<uint4*>(dst + head);
  for (int64_t v = lane; v < nvec; v += group) vd[v] = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t i = head + nvec * kPer + lane; i < h; i += group) dst[i] = Elem{};
}

// Row (b, pos) of a token tensor with `len` positions per sample, in either layout.
__device__ __forceinline__ int64_t row_of(int64_t b, int64_t pos, int64_t len, int64_t batch, bool batch_first) {
  return batch_first ? b * len + pos : pos * batch + b;
}

// n / d and n % d; 64-bit division is a long software sequence on the GPU, so use 32-bit when the caller knows
// every n fits (`narrow`, uniform per launch).
__device__ __forceinline__ void div_mod(int64_t n, int64_t d, bool narrow, int64_t& q, int64_t& r) {
  if (narrow) {
    const uint32_t q32 = static_cast<uint32_t>(n) / static_cast<uint32_t>(d);
    q = q32;
    r = n - static_cast<int64_t>(q32) * d;
  } else {
    q = n / d;
    r = n - q * d;
  }
}

// Groups of `group` lanes (a power of two <= 32) each copy one output row; grid-stride over rows, so a capped grid
// covers any number of rows and short rows still fill the machine.
template <typename Elem>
__global__ void __launch_bounds__(kCopyThreads, kCopyBlocksPerSm)
    gather_kernel(const Elem* __restrict__ x, const int64_t* __restrict__ indices, Elem* __restrict__ out,
                  int64_t batch, int64_t seq_len, int64_t keep, int64_t h, bool batch_first, int group) {
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_per_block = kCopyThreads / group;
  const int64_t rows = batch * keep;
  const bool narrow = rows <= static_cast<int64_t>(UINT32_MAX);
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / group; r < rows;
       r += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    int64_t outer, inner;
    div_mod(r, batch_first ? keep : batch, narrow, outer, inner);
    const int64_t b = batch_first ? outer : inner;
    const int64_t j = batch_first ? inner : outer;
    const int64_t pos = indices[b * keep + j];
    if (pos < 0 || pos >= seq_len) {  // Validated in Python; never read out of bounds.
      zero_row(out + r * h, h, lane, group);
      continue;
    }
    copy_row(out + r * h, x + row_of(b, pos, seq_len, batch, batch_first) * h, h, lane, group);
  }
}

// y_row_of[row of x] = the row of y that replaces it, or -1 (memset beforehand). Indexed like the output, so the
// copy kernel needs no index arithmetic at all.
__global__ void fill_y_rows_kernel(const int64_t* __restrict__ indices, int64_t* __restrict__ y_row_of,
                                   int64_t batch, int64_t seq_len, int64_t keep, bool batch_first) {
  const int64_t n = batch * keep;
  const bool narrow = n <= static_cast<int64_t>(UINT32_MAX);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, j;
    div_mod(i, keep, narrow, b, j);
    const int64_t pos = indices[i];
    if (pos >= 0 && pos < seq_len) {
      y_row_of[row_of(b, pos, seq_len, batch, batch_first)] = row_of(b, j, keep, batch, batch_first);
    }
  }
}

// Every output row is written exactly once, from x (dropped position) or from y (kept position): 2*|x| bytes of
// traffic instead of the 2*|x| + 2*|y| of copy-then-overwrite (up to ~2x less when almost every token is kept).
template <typename Elem>
__global__ void __launch_bounds__(kCopyThreads, kCopyBlocksPerSm)
    scatter_kernel(const Elem* __restrict__ x, const Elem* __restrict__ y, const int64_t* __restrict__ y_row_of,
                   Elem* __restrict__ out, int64_t rows, int64_t h, int group) {
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_per_block = kCopyThreads / group;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / group; r < rows;
       r += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t yr = y_row_of[r];
    copy_row(out + r * h, yr < 0 ? x + r * h : y + yr * h, h, lane, group);
  }
}

// The gradient of gather in one pass: every row of out (x's layout) is written exactly once, a grad row for a kept
// position, zeros otherwise; |x| + |grad| bytes of traffic instead of a zero fill followed by a scatter.
template <typename Elem>
__global__ void __launch_bounds__(kCopyThreads, kCopyBlocksPerSm)
    gather_backward_kernel(const Elem* __restrict__ grad, const int64_t* __restrict__ y_row_of,
                           Elem* __restrict__ out, int64_t rows, int64_t h, int group) {
  const int lane = threadIdx.x & (group - 1);
  const int64_t groups_per_block = kCopyThreads / group;
  for (int64_t r = blockIdx.x * groups_per_block + threadIdx.x / group; r < rows;
       r += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t yr = y_row_of[r];
    if (yr < 0) {
      zero_row(out + r * h, h, lane, group);
    } else {
      copy_row(out + r * h, grad + yr * h, h, lane, group);
    }
  }
}

// Lanes per row: enough for ~2 16-byte vectors per lane, a power of two in [1, 32].
int lanes_per_row(int64_t row_bytes) {
  const int64_t vecs = (row_bytes + 15) / 16;
  int g = 1;
  while (g < 32 && 2 * g < vecs) g *= 2;
  return g;
}

int copy_grid(int64_t rows, int group) {
  const int64_t per_block = kCopyThreads / group;
  const int64_t needed = (rows + per_block - 1) / per_block;
  // kCopyBlocksPerSm (4) resident blocks of 256 threads per SM, kCopyWaves (4) waves of them: enough loads in
  // flight, grid-stride does the rest.
  const int64_t cap = static_cast<int64_t>(sm_count()) * kCopyBlocksPerSm * kCopyWaves;
  return static_cast<int>(needed < cap ? needed : cap);
}

template <int kBytes>
cudaError_t launch_gather(const void* x, const int64_t* indices, void* out, int64_t batch, int64_t seq_len,
                          int64_t keep, int64_t hidden, bool batch_first, cudaStream_t stream) {
  using Elem = typename ElemOf<kBytes>::type;
  const int group = lanes_per_row(hidden * kBytes);
  gather_kernel<Elem><<<copy_grid(batch * keep, group), kCopyThreads, 0, stream>>>(
      static_cast<const Elem*>(x), indices, static_cast<Elem*>(out), batch, seq_len, keep, hidden, batch_first, group);
  return cudaGetLastError();
}

template <int kBytes>
cudaError_t launch_gather_backward(const void* grad, const int64_t* y_row_of, void* out, int64_t rows, int64_t hidden,
                                   cudaStream_t stream) {
  using Elem = typename ElemOf<kBytes>::type;
  const int group = lanes_per_row(hidden * kBytes);
  gather_backward_kernel<Elem><<<copy_grid(rows, group), kCopyThreads, 0, stream>>>(
      static_cast<const Elem*>(grad), y_row_of, static_cast<Elem*>(out), rows, hidden, group);
  return cudaGetLastError();
}

template <int kBytes>
cudaError_t launch_scatter(const void* x, const void* y, const int64_t* y_row_of, void* out, int64_t rows,
                           int64_t hidden, cudaStream_t stream) {
  using Elem = typename ElemOf<kBytes>::type;
  const int group = lanes_per_row(hidden * kBytes);
  scatter_kernel<Elem><<<copy_grid(rows, group), kCopyThreads, 0, stream>>>(
      static_cast<const Elem*>(x), static_cast<const Elem*>(y), y_row_of, static_cast<Elem*>(out), rows, hidden,
      group);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------------
// Fused sampler: one block per (layer, sample) row; all rows of a micro-batch in one launch (RandomLTDState draws
// every dropping layer at once), so a [22 layers x 8] draw fills 176 blocks.
//
// 1. Each thread hashes its positions of the first kSampleCachedChunks chunks once and keeps the hashes in registers
//    (blocked arrangement: chunk c, item i = position c * kSampleChunk + tid * kSampleItems + i, the emit pass's
//    order), so for seq_len <= kSampleCachedChunks * kSampleChunk every position is hashed once instead of five
//    times; positions beyond are rehashed each pass (any seq_len < 2^31 works, no shared memory sized by seq_len).
// 2. Radix select over the 32-bit hashes, 8 bits per pass from the top (4 passes, a 256-bin shared histogram). It
//    yields the keep-th smallest hash h* and need_eq = how many positions with hash == h* are kept (keep - #{h < h*}).
// 3. One ordered pass over positions in chunks (cub::BlockScan, blocked arrangement so thread order = position
//    order) emitting every j with h < h* and the first need_eq positions with h == h*: exactly the keep smallest
//    (h, j) pairs in ascending j, the reference's tie rule.
// Registers: __launch_bounds__(512, 2) caps them at 64 so two blocks (1024 threads) fit an SM.
constexpr int kSampleThreads = 512;
constexpr int kSampleItems = 4;
constexpr int kSampleChunk = kSampleThreads * kSampleItems;  // positions per emit chunk
constexpr int kSampleCachedChunks = 2;                       // 4096 positions hashed once (8 registers)
constexpr int kSampleBlocksPerSm = 2;
static_assert(kSampleThreads >= 256, "one histogram bin per thread in the bucket search");

// One scan type for the histogram and the emit pass. Emit flags are packed as (#equal << 16) | #less per chunk: a
// chunk has kSampleChunk (2048) positions, so each count fits 16 bits and one 32-bit scan counts both.
using SampleScan = cub::BlockScan<uint32_t, kSampleThreads>;
static_assert(kSampleChunk < (1 << 16), "per-chunk counts are packed in 16 bits");

// Emits the kept positions of one chunk [base, base + kSampleChunk) from this thread's hashes hs; less_seen/eq_seen
// count the positions with h < threshold / h == threshold in all earlier chunks. Returns true once all `keep` are
// written (every thread sees the same aggregate, so the result is uniform).
__device__ __forceinline__ bool emit_chunk(typename SampleScan::TempStorage& storage, int64_t* __restrict__ out_row,
                                           uint32_t base, const uint32_t (&hs)[kSampleItems], uint32_t seq_len,
                                           uint32_t keep, uint32_t threshold, uint32_t need_eq, uint32_t& less_seen,
                                           uint32_t& eq_seen) {
  const int tid = threadIdx.x;
  uint32_t flags[kSampleItems];
  uint32_t before[kSampleItems];
#pragma unroll
  for (int i = 0; i < kSampleItems; ++i) {
    const uint32_t j = base + static_cast<uint32_t>(tid) * kSampleItems + i;
    const uint32_t h = hs[i];
    flags[i] = j >= seq_len ? 0u : (h < threshold ? 1u : (h == threshold ? (1u << 16) : 0u));
  }
  uint32_t aggregate;
  SampleScan(storage).ExclusiveSum(flags, before, aggregate);
#pragma unroll
  for (int i = 0; i < kSampleItems; ++i) {
    if (!flags[i]) continue;
    const uint32_t j = base + static_cast<uint32_t>(tid) * kSampleItems + i;
    const uint32_t less_before = less_seen + (before[i] & 0xFFFFu);
    const uint32_t eq_before = eq_seen + (before[i] >> 16);
    if (flags[i] == 1u) {
      out_row[static_cast<int64_t>(less_before) + (eq_before < need_eq ? eq_before : need_eq)] = j;
    } else if (eq_before < need_eq) {
      out_row[static_cast<int64_t>(less_before) + eq_before] = j;
    }
  }
  less_seen += aggregate & 0xFFFFu;
  eq_seen += aggregate >> 16;
  __syncthreads();  // Scan storage reuse.
  return less_seen + (eq_seen < need_eq ? eq_seen : need_eq) == keep;
}

__global__ void __launch_bounds__(kSampleThreads, kSampleBlocksPerSm)
    sample_kernel(int64_t* __restrict__ out, int64_t rows, int64_t batch, int64_t keep, int64_t seq_len, uint64_t seed,
                  uint64_t step, uint32_t micro_batch, uint32_t layer_offset) {
  __shared__ typename SampleScan::TempStorage scan_storage;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_rank;
  const int tid = threadIdx.x;
  constexpr uint32_t kCachedEnd = static_cast<uint32_t>(kSampleCachedChunks) * kSampleChunk;
  // Positions and counts in 32 bits: the launcher guarantees keep <= seq_len < 2^31.
  const uint32_t n = static_cast<uint32_t>(seq_len);
  const uint32_t keep32 = static_cast<uint32_t>(keep);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t* out_row = out + row * keep;
    if (keep == seq_len) {  // Everything is kept (uniform branch).
      for (int64_t j = tid; j < seq_len; j += kSampleThreads) out_row[j] = j;
      continue;
    }
    const uint32_t sample = static_cast<uint32_t>(row % batch);
    const PhiloxKey key = row_key(seed, step, micro_batch, layer_offset + static_cast<uint32_t>(row / batch));

    // This thread's hashes of the cached chunks (0 past seq_len; never counted, see the j < n tests).
    uint32_t cached[kSampleCachedChunks][kSampleItems];
#pragma unroll
    for (int c = 0; c < kSampleCachedChunks; ++c) {
#pragma unroll
      for (int i = 0; i < kSampleItems; ++i) {
        const uint32_t j = static_cast<uint32_t>(c) * kSampleChunk + static_cast<uint32_t>(tid) * kSampleItems + i;
        cached[c][i] = j < n ? position_hash(key, j, sample) : 0u;
      }
    }

    uint32_t prefix = 0;                            // High bits of h* fixed so far.
    uint32_t rank = keep32;                         // 1-based rank of h* among hashes matching `prefix`.
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      const uint32_t high_mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
      if (tid < 256) hist[tid] = 0;
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kSampleCachedChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kSampleItems; ++i) {
          const uint32_t j = static_cast<uint32_t>(c) * kSampleChunk + static_cast<uint32_t>(tid) * kSampleItems + i;
          const uint32_t h = cached[c][i];
          if (j < n && (h & high_mask) == prefix) atomicAdd(&hist[(h >> shift) & 255u], 1u);
        }
      }
      for (uint32_t j = kCachedEnd + tid; j < n; j += kSampleThreads) {
        const uint32_t h = position_hash(key, j, sample);
        if ((h & high_mask) == prefix) atomicAdd(&hist[(h >> shift) & 255u], 1u);
      }
      __syncthreads();
      const uint32_t count = tid < 256 ? hist[tid] : 0u;
      uint32_t inclusive;
      SampleScan(scan_storage).InclusiveSum(count, inclusive);
      // Exactly one bin holds the rank-th candidate.
      if (tid < 256 && inclusive >= rank && inclusive - count < rank) {
        s_prefix = prefix | (static_cast<uint32_t>(tid) << shift);
        s_rank = rank - (inclusive - count);
      }
      __syncthreads();
      prefix = s_prefix;
      rank = s_rank;
      // No barrier here: hist, s_prefix/s_rank and the scan storage are next written after the next pass's first
      // barrier, and every read of them above precedes the barrier just passed.
    }
    const uint32_t threshold = prefix;
    const uint32_t need_eq = rank;

    uint32_t less_seen = 0, eq_seen = 0;  // Counts of all earlier chunks (each < 2^31).
    bool done = false;
#pragma unroll
    for (int c = 0; c < kSampleCachedChunks; ++c) {
      const uint32_t base = static_cast<uint32_t>(c) * kSampleChunk;
      if (done || base >= n) break;
      done = emit_chunk(scan_storage, out_row, base, cached[c], n, keep32, threshold, need_eq, less_seen, eq_seen);
    }
    // Past the cached chunks (base stays below 2^31 + kSampleChunk: no uint32 overflow).
    for (uint32_t base = kCachedEnd; !done && base < n; base += kSampleChunk) {
      uint32_t hs[kSampleItems];
#pragma unroll
      for (int i = 0; i < kSampleItems; ++i) {
        const uint32_t j = base + static_cast<uint32_t>(tid) * kSampleItems + i;
        hs[i] = j < n ? position_hash(key, j, sample) : 0u;
      }
      done = emit_chunk(scan_storage, out_row, base, hs, n, keep32, threshold, need_eq, less_seen, eq_seen);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// slice_attention_mask, by output row: row r = (i, hh, p) of out [batch, heads, keep, keep] is
// mask[i or 0, hh, idx[i, p], idx[i, q]] for q < keep. Each block takes a contiguous range of rows (grid-stride over
// ranges). The rows of one sample share the kept columns, whose mask offsets (idx[i, q] * st3, or -1 for an
// out-of-range index) are staged in shared memory a tile at a time and reused by every row of the range. Groups of
// `group` lanes write one row each, with 16-byte stores where the output row is aligned (bool masks: 16 elements per
// store). Division happens once per row and range, never per element. Index is the type of that row arithmetic:
// uint32 when every intermediate fits (64-bit division is slow on the GPU), int64 otherwise.
constexpr int kMaskThreads = 256;
constexpr int kMaskTile = 1024;  // columns per shared tile (8 KiB); a multiple of 16, so every tile keeps the row's
                                 // 16-byte phase
constexpr int kMaskBlocksPerSm = 8;

// Writes out_row[0, n) = src_row[col[q]] (0 where col[q] < 0, or everywhere when src_row is null).
template <typename Elem>
__device__ __forceinline__ void write_mask_span(Elem* __restrict__ out_row, const Elem* __restrict__ src_row,
                                                const int64_t* __restrict__ col, int n, int lane, int group) {
  if constexpr (sizeof(Elem) >= sizeof(uint4)) {
    for (int q = lane; q < n; q += group) out_row[q] = src_row && col[q] >= 0 ? src_row[col[q]] : Elem{};
  } else {
    constexpr int kPer = static_cast<int>(sizeof(uint4) / sizeof(Elem));
    const uintptr_t da = reinterpret_cast<uintptr_t>(out_row);
    int head = static_cast<int>(((sizeof(uint4) - (da % sizeof(uint4))) % sizeof(uint4)) / sizeof(Elem));
    if (head > n) head = n;
    for (int q = lane; q < head; q += group) out_row[q] = src_row && col[q] >= 0 ? src_row[col[q]] : Elem{};
    const int nvec = (n - head) / kPer;
    uint4* __restrict__ vd = reinterpret_cast<uint4*>(out_row + head);
    for (int v = lane; v < nvec; v += group) {
      union {
        uint4 vec;
        Elem e[kPer];
      } pack;
      const int q0 = head + v * kPer;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int64_t c = col[q0 + e];
        pack.e[e] = src_row && c >= 0 ? src_row[c] : Elem{};
      }
      vd[v] = pack.vec;
    }
    for (int q = head + nvec * kPer + lane; q < n; q += group) {
      out_row[q] = src_row && col[q] >= 0 ? src_row[col[q]] : Elem{};
    }
  }
}

template <typename Elem, typename Index>
__global__ void __launch_bounds__(kMaskThreads)
    slice_mask_kernel(const Elem* __restrict__ mask, const int64_t* __restrict__ indices, Elem* __restrict__ out,
                      Index rows, Index rows_per_block, Index heads, Index keep, int64_t seq_len, bool broadcast,
                      int64_t st0, int64_t st1, int64_t st2, int64_t st3, int group) {
  __shared__ int64_t s_col[kMaskTile];
  const int lane = threadIdx.x & (group - 1);
  const Index slot = threadIdx.x / group;
  const Index slots = kMaskThreads / group;
  const Index per_sample = heads * keep;  // rows of one sample
  for (Index begin = blockIdx.x * rows_per_block; begin < rows; begin += gridDim.x * rows_per_block) {
    const Index end = rows - begin < rows_per_block ? rows : begin + rows_per_block;
    for (Index seg = begin; seg < end;) {  // rows of one sample i (block-uniform loop: barriers below are safe)
      const Index i = seg / per_sample;
      const Index sample_end = (i + 1) * per_sample;
      const Index seg_end = sample_end < end ? sample_end : end;
      const int64_t* __restrict__ idx_i = indices + static_cast<int64_t>(i) * keep;
      const Elem* __restrict__ mask_i = mask + (broadcast ? 0 : static_cast<int64_t>(i) * st0);
      for (Index t0 = 0; t0 < keep; t0 += kMaskTile) {
        const int tn = keep - t0 < static_cast<Index>(kMaskTile) ? static_cast<int>(keep - t0) : kMaskTile;
        __syncthreads();  // Every row of the previous tile is written.
        for (int c = threadIdx.x; c < tn; c += kMaskThreads) {
          const int64_t cq = idx_i[t0 + c];
          s_col[c] = cq < 0 || cq >= seq_len ? -1 : cq * st3;  // Validated in Python; never read out of bounds.
        }
        __syncthreads();
        for (Index r = seg + slot; r < seg_end; r += slots) {
          const Index in_sample = r - i * per_sample;
          const Index hh = in_sample / keep;
          const Index p = in_sample - hh * keep;
          const int64_t rp = idx_i[p];
          const Elem* src_row = rp < 0 || rp >= seq_len ? nullptr : mask_i + static_cast<int64_t>(hh) * st1 + rp * st2;
          write_mask_span(out + static_cast<int64_t>(r) * keep + t0, src_row, s_col, tn, lane, group);
        }
      }
      seg = seg_end;
    }
  }
}

int elementwise_grid(int64_t n, int threads) {
  const int64_t needed = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<int>(needed < cap ? needed : cap);
}

template <int kBytes>
cudaError_t launch_slice_mask(const void* mask, const int64_t* indices, void* out, int64_t batch, bool broadcast,
                              int64_t heads, int64_t seq_len, int64_t keep, const int64_t* st, cudaStream_t stream) {
  using Elem = typename ElemOf<kBytes>::type;
  const int64_t rows = batch * heads * keep;
  // One wave of resident blocks (the uint32 kernels take 30-32 registers on sm_80/sm_90, so 8 blocks of 256 threads
  // fit an SM; the rare int64 ones ~60, i.e. two waves), each taking a contiguous range of rows.
  const int64_t cap = static_cast<int64_t>(sm_count()) * kMaskBlocksPerSm;
  const int grid = static_cast<int>(rows < cap ? rows : cap);
  const int64_t rows_per_block = (rows + grid - 1) / grid;
  // Lanes per row: one 16-byte store each over a tile, a power of two in [1, kMaskThreads].
  const int64_t tile = keep < kMaskTile ? keep : kMaskTile;
  const int64_t vecs = (tile * kBytes + 15) / 16;
  int group = 1;
  while (group < kMaskThreads && group < vecs) group *= 2;
  const auto* src = static_cast<const Elem*>(mask);
  auto* dst = static_cast<Elem*>(out);
  // The row arithmetic reaches at most rows + per_sample and rows + grid * rows_per_block, hence the margin.
  if (rows + heads * keep + static_cast<int64_t>(grid) * rows_per_block <= static_cast<int64_t>(UINT32_MAX)) {
    slice_mask_kernel<Elem, uint32_t><<<grid, kMaskThreads, 0, stream>>>(
        src, indices, dst, static_cast<uint32_t>(rows), static_cast<uint32_t>(rows_per_block),
        static_cast<uint32_t>(heads), static_cast<uint32_t>(keep), seq_len, broadcast, st[0], st[1], st[2], st[3],
        group);
  } else {
    slice_mask_kernel<Elem, int64_t><<<grid, kMaskThreads, 0, stream>>>(src, indices, dst, rows, rows_per_block, heads,
                                                                         keep, seq_len, broadcast, st[0], st[1], st[2],
                                                                         st[3], group);
  }
  return cudaGetLastError();
}

// y_row_of[row of x] = the row of y (or grad) that replaces it, or -1: memset, then one thread per index.
cudaError_t fill_y_rows(const int64_t* indices, int64_t* y_row_workspace, int64_t batch, int64_t seq_len, int64_t keep,
                        bool batch_first, cudaStream_t stream) {
  // All bytes 0xFF = -1 (row kept from x / zero), then the replacing row for each index.
  cudaError_t err = cudaMemsetAsync(y_row_workspace, 0xFF, static_cast<size_t>(batch * seq_len) * sizeof(int64_t),
                                    stream);
  if (err != cudaSuccess || batch * keep == 0) return err;
  constexpr int kThreads = 256;
  fill_y_rows_kernel<<<elementwise_grid(batch * keep, kThreads), kThreads, 0, stream>>>(
      indices, y_row_workspace, batch, seq_len, keep, batch_first);
  return cudaGetLastError();
}

bool valid_elem_size(int64_t elem_size) {
  return elem_size == 1 || elem_size == 2 || elem_size == 4 || elem_size == 8 || elem_size == 16;
}

}  // namespace

cudaError_t gather_tokens(const void* x, const int64_t* indices, void* out, int64_t batch, int64_t seq_len,
                          int64_t keep, int64_t hidden, int64_t elem_size, bool batch_first, cudaStream_t stream) {
  if (batch * keep * hidden == 0) return cudaSuccess;
  switch (elem_size) {
    case 1: return launch_gather<1>(x, indices, out, batch, seq_len, keep, hidden, batch_first, stream);
    case 2: return launch_gather<2>(x, indices, out, batch, seq_len, keep, hidden, batch_first, stream);
    case 4: return launch_gather<4>(x, indices, out, batch, seq_len, keep, hidden, batch_first, stream);
    case 8: return launch_gather<8>(x, indices, out, batch, seq_len, keep, hidden, batch_first, stream);
    case 16: return launch_gather<16>(x, indices, out, batch, seq_len, keep, hidden, batch_first, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t scatter_tokens(const void* x, const void* y, const int64_t* indices, void* out, int64_t* y_row_workspace,
                           int64_t batch, int64_t seq_len, int64_t keep, int64_t hidden, int64_t elem_size,
                           bool batch_first, cudaStream_t stream) {
  const int64_t rows = batch * seq_len;
  if (rows * hidden == 0) return cudaSuccess;
  if (!valid_elem_size(elem_size)) return cudaErrorInvalidValue;
  const cudaError_t err = fill_y_rows(indices, y_row_workspace, batch, seq_len, keep, batch_first, stream);
  if (err != cudaSuccess) return err;
  switch (elem_size) {
    case 1: return launch_scatter<1>(x, y, y_row_workspace, out, rows, hidden, stream);
    case 2: return launch_scatter<2>(x, y, y_row_workspace, out, rows, hidden, stream);
    case 4: return launch_scatter<4>(x, y, y_row_workspace, out, rows, hidden, stream);
    case 8: return launch_scatter<8>(x, y, y_row_workspace, out, rows, hidden, stream);
    default: return launch_scatter<16>(x, y, y_row_workspace, out, rows, hidden, stream);
  }
}

cudaError_t gather_tokens_backward(const void* grad, const int64_t* indices, void* out, int64_t* y_row_workspace,
                                   int64_t batch, int64_t seq_len, int64_t keep, int64_t hidden, int64_t elem_size,
                                   bool batch_first, cudaStream_t stream) {
  const int64_t rows = batch * seq_len;
  if (rows * hidden == 0) return cudaSuccess;
  if (!valid_elem_size(elem_size)) return cudaErrorInvalidValue;
  const cudaError_t err = fill_y_rows(indices, y_row_workspace, batch, seq_len, keep, batch_first, stream);
  if (err != cudaSuccess) return err;
  switch (elem_size) {
    case 1: return launch_gather_backward<1>(grad, y_row_workspace, out, rows, hidden, stream);
    case 2: return launch_gather_backward<2>(grad, y_row_workspace, out, rows, hidden, stream);
    case 4: return launch_gather_backward<4>(grad, y_row_workspace, out, rows, hidden, stream);
    case 8: return launch_gather_backward<8>(grad, y_row_workspace, out, rows, hidden, stream);
    default: return launch_gather_backward<16>(grad, y_row_workspace, out, rows, hidden, stream);
  }
}

cudaError_t sample_sorted_indices(int64_t* out, int64_t num_layers, int64_t batch, int64_t keep, int64_t seq_len,
                                  uint64_t seed, uint64_t step, uint32_t micro_batch, uint32_t layer_offset,
                                  cudaStream_t stream) {
  const int64_t rows = num_layers * batch;
  if (rows == 0 || keep == 0) return cudaSuccess;
  if (keep > seq_len || seq_len > INT32_MAX) return cudaErrorInvalidValue;
  const int grid = static_cast<int>(rows < INT32_MAX ? rows : INT32_MAX);
  sample_kernel<<<grid, kSampleThreads, 0, stream>>>(out, rows, batch, keep, seq_len, seed, step, micro_batch,
                                                     layer_offset);
  return cudaGetLastError();
}

cudaError_t slice_attention_mask(const void* mask, const int64_t* indices, void* out, int64_t batch,
                                 int64_t mask_batch, int64_t heads, int64_t seq_len, int64_t keep,
                                 const int64_t* mask_strides, int64_t elem_size, cudaStream_t stream) {
  if (batch * heads * keep == 0) return cudaSuccess;
  const bool broadcast = mask_batch == 1;
  switch (elem_size) {
    case 1: return launch_slice_mask<1>(mask, indices, out, batch, broadcast, heads, seq_len, keep, mask_strides, stream);
    case 2: return launch_slice_mask<2>(mask, indices, out, batch, broadcast, heads, seq_len, keep, mask_strides, stream);
    case 4: return launch_slice_mask<4>(mask, indices, out, batch, broadcast, heads, seq_len, keep, mask_strides, stream);
    case 8: return launch_slice_mask<8>(mask, indices, out, batch, broadcast, heads, seq_len, keep, mask_strides, stream);
    case 16:
      return launch_slice_mask<16>(mask, indices, out, batch, broadcast, heads, seq_len, keep, mask_strides, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace random_ltd::cuda
