// CUDA launchers of the random_ltd ops, on raw pointers (mirrors csrc/cpu/token_ops_cpu.h).
//
// Deliberately free of torch/ATen/c10 includes: token_ops_cuda.cu compiles with plain nvcc (CI checks it with
// `nvcc -c` against a CPU-only torch). The torch side (validation, device guard, stream, dtype -> element size)
// lives in csrc/random_ltd.cpp. Every launcher enqueues on `stream`, never synchronises, and returns the
// cudaError_t of its launches. Index *values* are not validated on the device (that would need a sync): the
// Python layer validates them, and the kernels skip out-of-range indices instead of reading out of bounds
// (gather writes zeros for such a row; scatter and slice ignore it / write zeros).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace random_ltd::cuda {

// out[(b, j)] = x[(b, indices[b, j])] for rows of `hidden` elements of `elem_size` bytes (1, 2, 4, 8 or 16).
// batch_first: x [batch, seq_len, hidden] -> out [batch, keep, hidden]; else [seq_len, batch, hidden] ->
// [keep, batch, hidden]. All tensors contiguous; indices int64 [batch, keep].
cudaError_t gather_tokens(const void* x, const int64_t* indices, void* out, int64_t batch, int64_t seq_len,
                          int64_t keep, int64_t hidden, int64_t elem_size, bool batch_first, cudaStream_t stream);

// out = x with rows (b, indices[b, j]) taken from y[(b, j)]; every output row is written once, from x or y.
// y_row_workspace: int64 scratch of batch * seq_len entries (row of x -> replacing row of y, or -1).
cudaError_t scatter_tokens(const void* x, const void* y, const int64_t* indices, void* out, int64_t* y_row_workspace,
                           int64_t batch, int64_t seq_len, int64_t keep, int64_t hidden, int64_t elem_size,
                           bool batch_first, cudaStream_t stream);

// out = the gradient of gather_tokens, in x's layout ([batch, seq_len, hidden] with batch_first, else
// [seq_len, batch, hidden]): rows (b, indices[b, j]) = grad[(b, j)] (grad [batch, keep, hidden] or
// [keep, batch, hidden]), every other row zero; every output row is written exactly once (no zero-fill pass).
// y_row_workspace: int64 scratch of batch * seq_len entries (row of out -> row of grad, or -1), as scatter_tokens.
cudaError_t gather_tokens_backward(const void* grad, const int64_t* indices, void* out, int64_t* y_row_workspace,
                                   int64_t batch, int64_t seq_len, int64_t keep, int64_t hidden, int64_t elem_size,
                                   bool batch_first, cudaStream_t stream);

// out int64 [num_layers, batch, keep]: row (l, b) = the sorted Philox sample of layer (layer_offset + l), sample b.
// One block per row; no shared memory sized by seq_len (any seq_len < 2^31 works).
cudaError_t sample_sorted_indices(int64_t* out, int64_t num_layers, int64_t batch, int64_t keep, int64_t seq_len,
                                  uint64_t seed, uint64_t step, uint32_t micro_batch, uint32_t layer_offset,
                                  cudaStream_t stream);

// out [batch, heads, keep, keep] contiguous = mask[b or 0, h, idx[b, p], idx[b, q]]; mask [mask_batch, heads, s, s]
// with arbitrary element strides (mask_strides[4]); mask_batch == 1 broadcasts over the batch.
cudaError_t slice_attention_mask(const void* mask, const int64_t* indices, void* out, int64_t batch,
                                 int64_t mask_batch, int64_t heads, int64_t seq_len, int64_t keep,
                                 const int64_t* mask_strides, int64_t elem_size, cudaStream_t stream);

}  // namespace random_ltd::cuda
