// CPU kernels of the random_ltd ops. Arguments are validated by the binding (csrc/random_ltd.cpp) before these run,
// except index *values*, which the CPU kernels check themselves (cheap here; no device sync involved).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace random_ltd::cpu {

// x [s,b,h] (or [b,s,h] when batch_first), indices int64 [b,k] -> [k,b,h] (or [b,k,h]).
at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& indices, bool batch_first);

// Copy of x with the rows named by indices replaced by y ([k,b,h] or [b,k,h]).
at::Tensor scatter_tokens(const at::Tensor& x, const at::Tensor& y, const at::Tensor& indices, bool batch_first);

// The gradient of gather_tokens in x's layout ([b,seq_len,h] or [seq_len,b,h]): rows (b, indices[b, j]) = grad[(b, j)],
// every other row zero; each output row is written exactly once (no separate zero fill).
at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& indices, int64_t seq_len, bool batch_first);

// Fills out int64 [L,B,keep] with the sorted Philox sample of layers layer_offset .. layer_offset+L-1.
void sample_sorted_indices_(const at::Tensor& out, int64_t seq_len, uint64_t seed, uint64_t step, uint32_t micro_batch,
                            uint32_t layer_offset);

// mask [mb,mh,s,s] (mb in {1,b}, any strides), indices int64 [b,k] -> contiguous [b,mh,k,k].
at::Tensor slice_attention_mask(const at::Tensor& mask, const at::Tensor& indices);

}  // namespace random_ltd::cpu
