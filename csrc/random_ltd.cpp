// Schemas and dispatcher bindings of the random_ltd ops (extension-cpp layout).
//
// One TORCH_LIBRARY block defines the schemas; the CPU and CUDA kernels live in csrc/cpu and csrc/cuda and are
// registered per dispatch key, so the dispatcher routes by device. Argument validation (dtypes, shapes, devices,
// contiguity) is shared by both backends and happens here, before any kernel touches memory. Fake (meta) kernels are
// registered from Python (random_ltd/ops/_extension.py) so torch.compile and torch.library.opcheck work.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <limits>

#include "cpu/token_ops_cpu.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/token_ops_cuda.h"
#endif

// `import random_ltd._C` only has to load this library (which runs the registrations below); the ops themselves are
// reached through torch.ops.random_ltd.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace random_ltd {
namespace {

// Bytes moved per element. The ops only copy elements, which is bit-exact, so every dtype with a plain fixed-size
// representation is supported through its size. Others (the opaque bits* types, any dtype added to torch later) are
// refused rather than guessed; quantized tensors never get here (they dispatch to QuantizedCPU/QuantizedCUDA).
int64_t copy_unit_bytes(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kBool:
    case at::kByte:
    case at::kChar:
    case at::kFloat8_e5m2:
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2fnuz:
    case at::kFloat8_e4m3fnuz:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)  // Added in torch 2.7/2.8.
    case at::kFloat8_e8m0fnu:
    case at::kFloat4_e2m1fn_x2:  // Two fp4 values per byte: rows are whole bytes, so a byte copy is exact.
#endif
      return 1;
    case at::kHalf:
    case at::kBFloat16:
    case at::kShort:
    case at::kUInt16:
      return 2;
    case at::kFloat:
    case at::kInt:
    case at::kUInt32:
    case at::kComplexHalf:
      return 4;
    case at::kDouble:
    case at::kLong:
    case at::kUInt64:
    case at::kComplexFloat:
      return 8;
    case at::kComplexDouble:
      return 16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " of ", arg);
  }
}

void check_indices(const at::Tensor& indices, const at::Tensor& other, const char* other_name, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2, op, ": indices must be 2-D [batch, keep], got shape ", indices.sizes());
  TORCH_CHECK(indices.is_contiguous(), op, ": indices must be contiguous");
  TORCH_CHECK(indices.device() == other.device(), op, ": indices (on ", indices.device(), ") and ", other_name,
              " (on ", other.device(), ") must be on the same device");
}

void check_tokens(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D ([seq, batch, hidden] or [batch, seq, hidden]), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  copy_unit_bytes(t, op, name);
}

// Shared checks of gather and scatter: x [s,b,h] / [b,s,h], indices [b,k] with k <= s.
void check_gather_args(const at::Tensor& x, const at::Tensor& indices, bool batch_first, const char* op) {
  check_tokens(x, "x", op);
  check_indices(indices, x, "x", op);
  const int64_t b = x.size(batch_first ? 0 : 1), s = x.size(batch_first ? 1 : 0);
  TORCH_CHECK(indices.size(0) == b, op, ": indices has batch ", indices.size(0), " but x of shape ", x.sizes(),
              " has batch ", b, " (batch_first=", batch_first, ")");
  TORCH_CHECK(indices.size(1) <= s, op, ": indices keeps ", indices.size(1), " tokens but x of shape ", x.sizes(),
              " has only ", s, " (batch_first=", batch_first, ")");
}

void check_scatter_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& indices, bool batch_first,
                        const char* op) {
  check_gather_args(x, indices, batch_first, op);
  check_tokens(y, "y", op);
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y has dtype ", y.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(y.device() == x.device(), op, ": y (on ", y.device(), ") and x (on ", x.device(),
              ") must be on the same device");
  const int64_t b = indices.size(0), k = indices.size(1), h = x.size(2);
  const bool ok = batch_first ? (y.size(0) == b && y.size(1) == k && y.size(2) == h)
                              : (y.size(0) == k && y.size(1) == b && y.size(2) == h);
  TORCH_CHECK(ok, op, ": y must have shape ", batch_first ? "[batch, keep, hidden] = [" : "[keep, batch, hidden] = [",
              batch_first ? b : k, ", ", batch_first ? k : b, ", ", h, "], got ", y.sizes());
}

// gather_tokens_backward: grad [b,k,h] / [k,b,h], indices [b,k], seq_len >= k; the output has x's shape.
void check_gather_backward_args(const at::Tensor& grad, const at::Tensor& indices, int64_t seq_len, bool batch_first,
                                const char* op) {
  check_tokens(grad, "grad", op);
  check_indices(indices, grad, "grad", op);
  const int64_t b = indices.size(0), k = indices.size(1);
  const int64_t gb = grad.size(batch_first ? 0 : 1), gk = grad.size(batch_first ? 1 : 0);
  TORCH_CHECK(gb == b && gk == k, op, ": grad must have shape ",
              batch_first ? "[batch, keep, hidden] = [" : "[keep, batch, hidden] = [", batch_first ? b : k, ", ",
              batch_first ? k : b, ", hidden], got ", grad.sizes(), " (indices ", indices.sizes(), ")");
  TORCH_CHECK(seq_len >= k, op, ": seq_len must be >= keep ", k, ", got ", seq_len);
}

struct SamplerArgs {
  uint64_t seed, step;
  uint32_t micro_batch, layer_offset;
};

SamplerArgs check_sampler_args(const at::Tensor& out, int64_t seq_len, int64_t seed, int64_t step, int64_t micro_batch,
                               int64_t layer_offset) {
  constexpr const char* op = "sample_sorted_indices_";
  TORCH_CHECK(out.scalar_type() == at::kLong, op, ": out must be int64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3, op, ": out must be 3-D [layers, batch, keep], got shape ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(seq_len >= 0 && seq_len <= std::numeric_limits<int32_t>::max(), op, ": seq_len must be in [0, 2^31), got ",
              seq_len);
  TORCH_CHECK(out.size(2) <= seq_len, op, ": out keeps ", out.size(2), " tokens (shape ", out.sizes(),
              ") but seq_len is ", seq_len);
  TORCH_CHECK(seed >= 0, op, ": seed must be non-negative, got ", seed);
  TORCH_CHECK(step >= 0, op, ": step must be non-negative, got ", step);
  TORCH_CHECK(micro_batch >= 0, op, ": micro_batch must be non-negative, got ", micro_batch);
  TORCH_CHECK(layer_offset >= 0, op, ": layer_offset must be non-negative, got ", layer_offset);
  // micro_batch and layer enter Philox as 32-bit counter words (reference.py masks them the same way).
  return SamplerArgs{static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<uint32_t>(micro_batch),
                     static_cast<uint32_t>(layer_offset)};
}

void check_mask_args(const at::Tensor& mask, const at::Tensor& indices) {
  constexpr const char* op = "slice_attention_mask";
  TORCH_CHECK(mask.dim() == 4, op, ": mask must be 4-D [batch or 1, heads, seq, seq], got shape ", mask.sizes());
  TORCH_CHECK(mask.size(2) == mask.size(3), op, ": mask must be square in its last two dims, got shape ",
              mask.sizes());
  copy_unit_bytes(mask, op, "mask");
  check_indices(indices, mask, "mask", op);
  TORCH_CHECK(mask.size(0) == 1 || mask.size(0) == indices.size(0), op, ": mask batch ", mask.size(0),
              " must be 1 or match indices batch ", indices.size(0));
  TORCH_CHECK(indices.size(1) <= mask.size(2), op, ": indices keeps ", indices.size(1), " tokens but mask of shape ",
              mask.sizes(), " has only ", mask.size(2));
}

// ----------------------------------------------------------------------------------------------------------------
// CPU

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& indices, bool batch_first) {
  check_gather_args(x, indices, batch_first, "gather_tokens");
  return cpu::gather_tokens(x, indices, batch_first);
}

at::Tensor scatter_tokens_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& indices, bool batch_first) {
  check_scatter_args(x, y, indices, batch_first, "scatter_tokens");
  return cpu::scatter_tokens(x, y, indices, batch_first);
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& indices, int64_t seq_len,
                                      bool batch_first) {
  check_gather_backward_args(grad, indices, seq_len, batch_first, "gather_tokens_backward");
  return cpu::gather_tokens_backward(grad, indices, seq_len, batch_first);
}

void sample_sorted_indices_cpu(at::Tensor& out, int64_t seq_len, int64_t seed, int64_t step, int64_t micro_batch,
                               int64_t layer_offset) {
  const SamplerArgs a = check_sampler_args(out, seq_len, seed, step, micro_batch, layer_offset);
  cpu::sample_sorted_indices_(out, seq_len, a.seed, a.step, a.micro_batch, a.layer_offset);
}

at::Tensor slice_attention_mask_cpu(const at::Tensor& mask, const at::Tensor& indices) {
  check_mask_args(mask, indices);
  return cpu::slice_attention_mask(mask, indices);
}

// ----------------------------------------------------------------------------------------------------------------
// CUDA: validation as above, then the raw-pointer launchers of csrc/cuda on the current stream. Index values are
// not checked here (a device->host sync per call); the Python layer validates them and the kernels never read out of
// bounds on bad values.

#ifdef WITH_CUDA
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& indices, bool batch_first) {
  constexpr const char* op = "gather_tokens";
  check_gather_args(x, indices, batch_first, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = indices.size(0), k = indices.size(1), s = x.size(batch_first ? 1 : 0), h = x.size(2);
  at::Tensor out = batch_first ? at::empty({b, k, h}, x.options()) : at::empty({k, b, h}, x.options());
  check_launch(cuda::gather_tokens(x.const_data_ptr(), indices.const_data_ptr<int64_t>(), out.mutable_data_ptr(), b, s,
                                   k, h, copy_unit_bytes(x, op, "x"), batch_first,
                                   c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& indices, bool batch_first) {
  constexpr const char* op = "scatter_tokens";
  check_scatter_args(x, y, indices, batch_first, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = indices.size(0), k = indices.size(1), s = x.size(batch_first ? 1 : 0), h = x.size(2);
  at::Tensor out = at::empty_like(x);
  // Row of x -> replacing row of y (or -1): b*s int64 from the caching allocator (no cudaMalloc in the hot path).
  at::Tensor y_rows = at::empty({b, s}, x.options().dtype(at::kLong));
  check_launch(cuda::scatter_tokens(x.const_data_ptr(), y.const_data_ptr(), indices.const_data_ptr<int64_t>(),
                                    out.mutable_data_ptr(), y_rows.mutable_data_ptr<int64_t>(), b, s, k, h,
                                    copy_unit_bytes(x, op, "x"), batch_first,
                                    c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& indices, int64_t seq_len,
                                       bool batch_first) {
  constexpr const char* op = "gather_tokens_backward";
  check_gather_backward_args(grad, indices, seq_len, batch_first, op);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t b = indices.size(0), k = indices.size(1), h = grad.size(2);
  at::Tensor out = batch_first ? at::empty({b, seq_len, h}, grad.options()) : at::empty({seq_len, b, h}, grad.options());
  // Row of out -> row of grad (or -1): b*seq_len int64 from the caching allocator, as scatter_tokens.
  at::Tensor grad_rows = at::empty({b, seq_len}, grad.options().dtype(at::kLong));
  check_launch(cuda::gather_tokens_backward(grad.const_data_ptr(), indices.const_data_ptr<int64_t>(),
                                            out.mutable_data_ptr(), grad_rows.mutable_data_ptr<int64_t>(), b, seq_len,
                                            k, h, copy_unit_bytes(grad, op, "grad"), batch_first,
                                            c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

void sample_sorted_indices_cuda(at::Tensor& out, int64_t seq_len, int64_t seed, int64_t step, int64_t micro_batch,
                                int64_t layer_offset) {
  const SamplerArgs a = check_sampler_args(out, seq_len, seed, step, micro_batch, layer_offset);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(cuda::sample_sorted_indices(out.mutable_data_ptr<int64_t>(), out.size(0), out.size(1), out.size(2),
                                           seq_len, a.seed, a.step, a.micro_batch, a.layer_offset,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "sample_sorted_indices_");
}

at::Tensor slice_attention_mask_cuda(const at::Tensor& mask, const at::Tensor& indices) {
  constexpr const char* op = "slice_attention_mask";
  check_mask_args(mask, indices);
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t b = indices.size(0), k = indices.size(1);
  at::Tensor out = at::empty({b, mask.size(1), k, k}, mask.options());
  const int64_t strides[4] = {mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3)};
  check_launch(cuda::slice_attention_mask(mask.const_data_ptr(), indices.const_data_ptr<int64_t>(),
                                          out.mutable_data_ptr(), b, mask.size(0), mask.size(1), mask.size(2), k,
                                          strides, copy_unit_bytes(mask, op, "mask"),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}
#endif  // WITH_CUDA

}  // namespace
}  // namespace random_ltd

TORCH_LIBRARY(random_ltd, m) {
  m.def("gather_tokens(Tensor x, Tensor indices, bool batch_first) -> Tensor");
  m.def("scatter_tokens(Tensor x, Tensor y, Tensor indices, bool batch_first) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad, Tensor indices, int seq_len, bool batch_first) -> Tensor");
  m.def(
      "sample_sorted_indices_(Tensor(a!) out, int seq_len, int seed, int step, int micro_batch, int layer_offset) -> "
      "()");
  m.def("slice_attention_mask(Tensor mask, Tensor indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(random_ltd, CPU, m) {
  m.impl("gather_tokens", &random_ltd::gather_tokens_cpu);
  m.impl("scatter_tokens", &random_ltd::scatter_tokens_cpu);
  m.impl("gather_tokens_backward", &random_ltd::gather_tokens_backward_cpu);
  m.impl("sample_sorted_indices_", &random_ltd::sample_sorted_indices_cpu);
  m.impl("slice_attention_mask", &random_ltd::slice_attention_mask_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(random_ltd, CUDA, m) {
  m.impl("gather_tokens", &random_ltd::gather_tokens_cuda);
  m.impl("scatter_tokens", &random_ltd::scatter_tokens_cuda);
  m.impl("gather_tokens_backward", &random_ltd::gather_tokens_backward_cuda);
  m.impl("sample_sorted_indices_", &random_ltd::sample_sorted_indices_cuda);
  m.impl("slice_attention_mask", &random_ltd::slice_attention_mask_cuda);
}
#endif
