// The CPU scatter of new tokens' K and V into their cache slots (any dtype of 2 or 4 bytes: rows are
// copied, never converted). The dispatcher has checked every slot; tokens with slot -1 are skipped.
#include <cstring>

#include "flashlm/core/thread_pool.h"
#include "paged_cpu.h"
#include "paged_kernels.h"

namespace flashlm::kvcache {

void write_kv_cache_cpu(const WriteParams& p) {
  const int64_t es = cpu::elem_bytes(p.dtype), row_bytes = p.head_dim * es;
  auto copy = [&](const void* src, int64_t src_row, int64_t src_head, void* dst, int64_t block_stride,
                  int64_t row_stride, int64_t head_stride, int64_t t, int64_t slot) {
    const int64_t block = slot / p.block_size, off = slot % p.block_size;
    for (int h = 0; h < p.kv_heads; ++h)
      std::memcpy(static_cast<char*>(dst) + (block * block_stride + off * row_stride + h * head_stride) * es,
                  static_cast<const char*>(src) + (t * src_row + h * src_head) * es, size_t(row_bytes));
  };
  // Rows are small: one task copies many tokens.
  parallel_for(p.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;
      copy(p.key, p.key_row_stride, p.key_head_stride, p.k_cache, p.kc_block_stride, p.kc_row_stride,
           p.kc_head_stride, t, slot);
      copy(p.value, p.value_row_stride, p.value_head_stride, p.v_cache, p.vc_block_stride, p.vc_row_stride,
           p.vc_head_stride, t, slot);
    }
  });
}

}  // namespace flashlm::kvcache
