// Mixture-of-experts kernels: top-k routing, and expert-indexed matrix products whose rows are grouped by
// expert so that each expert's weight is read once per call (a grouped GEMM), for float weights or weights
// kept in their GGML blocks.
//
// CPU: the rows are counting-sorted by expert once per call; each expert's rows run through its weight as one
// GEMM (GGUF types: the GGUF matmul's integer block dot products, the activations quantized once per row;
// float types: f32 accumulation), and the results are scattered back (moe_expert_ffn: weighted by the routing
// weights). CUDA (moe_expert_matmul): the rows are grouped by expert on the device the same way (counts,
// offsets, a permutation), and each weight row is read once per 8 of its expert's rows, its blocks decoded in
// registers and multiplied with x unquantized.
#pragma once

#include <cstdint>

#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm {

enum class MoeActivation : int { SiLU = 0, GeluTanh = 1 };

// One family of expert weights, W[e] [n, k] for e < num_experts: float (F32 or BF16; F16 too on CUDA) with
// `data` [num_experts, n, k] contiguous and `type` == data.dtype, or GGML blocks (a type gguf_matmul reads)
// with `data` uint8, contiguous, num_experts * n rows of k / block_size blocks.
struct ExpertWeights {
  TensorView data;
  DType type = DType::F32;
  int64_t num_experts = 0, n = 0, k = 0;
};

// Top-k routing of each row of logits [T, E] (F32 or BF16; F16 too on CUDA): weights [T, top_k] F32 and
// experts [T, top_k] I32, both contiguous. softmax_first: softmax over all E, keep the k largest (then, with
// renormalize, divide them by their sum); otherwise the k largest logits, softmaxed over those k. Ties go to
// the lower expert index, and the k experts come largest first. 1 <= top_k <= E. A row with a NaN is refused.
FLASHLM_API void moe_route(const TensorView& logits, int64_t top_k, bool softmax_first, bool renormalize,
                           const TensorView& weights, const TensorView& experts, void* stream = nullptr);

// y[r] = W[experts[r]] @ x[r]: x [R, K] contiguous (F32 or BF16; F16 too on CUDA), experts [R] I32 in
// [0, E) (checked: out of range is a ValueError on the CPU; the CUDA kernel leaves such rows at zero, so the
// caller checks them), y [R, N] with x's dtype.
FLASHLM_API void moe_expert_matmul(const TensorView& x, const TensorView& experts, const ExpertWeights& weight,
                                   const TensorView& y, void* stream = nullptr);

// The expert feed-forward of a token's k experts, on the CPU: out[t] = sum_j route_weights[t, j] *
// down_e(act(gate_e x_t) * up_e x_t), e = experts[t, j]. x [T, D] F32 or BF16; route_weights [T, k] F32;
// experts [T, k] I32; gate, up: [E, F, D]; down: [E, D, F]; out [T, D] with x's dtype. The intermediate
// act(g) * u is kept in f32. Each product is one grouped GEMM over the T * k (token, expert) pairs.
FLASHLM_API void moe_expert_ffn(const TensorView& x, const TensorView& route_weights, const TensorView& experts,
                                const ExpertWeights& gate, const ExpertWeights& up, const ExpertWeights& down,
                                MoeActivation activation, const TensorView& out);

}  // namespace flashlm
