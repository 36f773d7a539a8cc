// The GGUF matmul's interface for the rest of the library's native code (runtime/decoder.cpp): several
// products of one f32 input as one thread-pool job, and the regrouped weight layout the CPU kernels read
// fastest. Public callers use flashlm/gemm/gguf_matmul.h; this header skips its argument checks, so its
// callers check what they pass.
#pragma once

#include <cstdint>
#include <functional>

#include "flashlm/core/dtype.h"

namespace flashlm::gemm::detail {

// Several products of one f32 input on the CPU, as one job for the thread pool: y_i = x @ W_i.T (+ bias_i)
// for x [M, K] and each part's W_i [n_i, K] (any gguf_matmul types). x is quantized once per activation
// format, and the rows of all parts are split over the threads together, so q/k/v (or gate/up) cost one
// pass instead of three. Arguments are trusted: the callers have checked them.
struct MatmulPart {
  DType type;
  const uint8_t* w;    // n rows of storage_bytes(type, K) bytes
  int64_t n;
  const float* bias;   // [n] or null
  float* y;            // [M, n], contiguous
  const uint8_t* packed = nullptr;  // optional: w in the x4 layout (repack_x4), read instead of w (w may be null)
};
void gguf_matmul_parts_f32(const float* x, int64_t m, int64_t k, const MatmulPart* parts, int count);

// The same for parts of one width n, handed out row range by row range across all of them: a thread computes
// rows [n0, n1) of every part, then calls after(n0, n1) on them, inside the same job. So an elementwise step that
// pairs the parts row by row (a gated MLP's activation of gate and up) needs no job of its own. n0 is a multiple
// of `multiple` (itself a multiple of 4), n1 too or n.
void gguf_matmul_aligned_f32(const float* x, int64_t m, int64_t k, const MatmulPart* parts, int count,
                             int64_t multiple, const std::function<void(int64_t, int64_t)>& after);

// The x4 layouts: Q4_0, Q8_0, Q4_K or Q6_K rows regrouped for the CPU kernels. Rows 4g .. 4g + 3 form group g.
// Q4_0 and Q8_0, per pair of blocks (2p, 2p + 1): the 8 f16 scales [r0 b0, r0 b1, r1 b0, r1 b1, r2 b0, r2 b1,
// r3 b0, r3 b1], then per row the pair's quants: Q4_0 the 16 bytes of block 2p then those of block 2p + 1 (32
// bytes); Q8_0 the first 16 quants of both blocks then the last 16 of both (64 bytes, the activation pair's
// interleaving). The K-quants, per super-block of 256: Q4_K the 4 f16 d, the 4 f16 dmin, the 4 rows' 12 bytes
// of 6-bit scales and mins, then for each 32 bytes i of qs (sub-blocks 2i and 2i + 1) the 4 rows' bytes one
// after the other; Q6_K the 4 f16 d, the 4 rows' 16 int8 scales, then for each half h the 4 rows' ql[64h ..
// +32], the 4 rows' ql[64h + 32 .. +32] and the 4 rows' qh[32h .. +32]. So a 64-byte load gives two rows' same
// 32 bytes, and the headers of the 4 rows come first. As many bytes as the 4 rows' blocks. The last N % 4
// rows follow the groups unchanged, so every row sits where the plain layout has it and the copy replaces the
// weight (unpack_x4 gives the plain bytes back). Requires K % 64 == 0 (Q4_0, Q8_0) or K % 256 == 0 (the
// K-quants). The kernels compute every output exactly as the plain GEMV does.
bool repack_x4_supported(DType type, int64_t n, int64_t k);
void repack_x4(DType type, const uint8_t* w, int64_t n, int64_t k, uint8_t* packed);  // storage_bytes(type, n * k)
void unpack_x4(DType type, const uint8_t* packed, int64_t n, int64_t k, uint8_t* w);

}  // namespace flashlm::gemm::detail
