// The activation kernels of the training path: GELU(tanh) forward and backward (gelu_tanh.h) and silu_mul's
// backward (silu_mul.h). One element-wise argument struct; the dispatchers (gelu_tanh.cpp, silu_mul.cpp) check
// the views and route between the scalar kernel (the oracle), AVX2 (bit for bit) and CUDA (to rounding).
#pragma once

#include <cstdint>

#include "flashlm/core/dtype.h"
#include "flashlm/core/tensor.h"

namespace flashlm::activation::detail {

enum class TrainOp {
  GeluTanh,          // out = gelu(in0)
  GeluTanhBackward,  // out = in1 * gelu'(in0)
  SiluMulBackward,   // in0 gate, in1 up, in2 dout: out = dgate, out2 = dup
};

struct TrainArgs {
  TrainOp op = TrainOp::GeluTanh;
  DType dtype = DType::F32;
  const void* in0 = nullptr;
  const void* in1 = nullptr;
  const void* in2 = nullptr;
  void* out = nullptr;
  void* out2 = nullptr;
  int64_t n = 0;
};

// GELU's constants: sqrt(2 / pi) and the cubic term's factor.
constexpr float kGeluA = 0.7978845608028654f, kGeluB = 0.044715f;

// Elements [begin, end).
void train_scalar(const TrainArgs& a, int64_t begin, int64_t end);
void train_avx2(const TrainArgs& a, int64_t begin, int64_t end);
void train_cuda(const TrainArgs& a, int device, void* stream);

// Checks shared by the activation dispatchers (views named in the messages) and the CPU run.
void check_dtype(const TensorView& t, const char* name);
void check_like(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name);
// out may be `in` exactly, but not overlap it in part.
void check_out(const TensorView& out, const char* out_name, const TensorView& in, const char* in_name);
// Runs a on the CPU kernels (AVX2 where the CPU has it) over the pool, or on CUDA for a CUDA `device_of`.
void run(const TrainArgs& a, const TensorView& device_of, const char* op, void* stream);

}  // namespace flashlm::activation::detail
