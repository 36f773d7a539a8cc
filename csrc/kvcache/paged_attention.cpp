// Paged KV-cache dispatcher: checks every view against the layout contract in paged_attention.h (and, on
// the CPU, the values of the index tensors), fills the kernels' params, and routes on device (CPU / CUDA)
// and, on the CPU, on the run-time ISA (AVX2 / scalar). Also the split-count heuristic of decode.
#include "flashlm/kvcache/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"
#include "../attention/shared_alibi.h"
#include "paged_kernels.h"

namespace flashlm {
namespace {

using kvcache::PagedParams;
using kvcache::WriteParams;

constexpr int64_t kMaxHeadDimCpu = 256;

void check_device(const Device& device, const char* op) {
  if (device.is_cpu()) return;
  if (!cuda_compiled()) throw NotImplementedError(std::string(op) + ": flashlm was built without CUDA");
  FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), op, ": no CUDA device ", device.index, " (",
                cuda_status(), ")");
}

void check_present(const TensorView& t, const char* name) {
  FLASHLM_CHECK(t.data != nullptr || t.numel() == 0, name, ": missing tensor");
}

void check_float_dtype(const TensorView& t, const char* name) {
  if (t.device.is_cpu()) {
    FLASHLM_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16, name,
                  ": the CPU kernels take float32 or bfloat16, got ", dtype_name(t.dtype));
  } else {
    FLASHLM_CHECK(t.dtype == DType::F16 || t.dtype == DType::BF16, name,
                  ": the CUDA kernels take float16 or bfloat16, got ", dtype_name(t.dtype));
  }
}

// A [rows, heads, head_dim] tensor (q, out, key, value) like `like` (same dtype and device), the last
// dimension contiguous; `shape` (optional) is the exact shape it must have.
void check_rows(const TensorView& t, const char* name, const TensorView& like, const char* like_name,
                const int64_t* shape) {
  check_present(t, name);
  FLASHLM_CHECK(t.ndim == 3, name, ": expected 3 dimensions [tokens, heads, head_dim], got ", t.shape_string());
  FLASHLM_CHECK(t.dtype == like.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from ", like_name, "'s ",
                dtype_name(like.dtype));
  FLASHLM_CHECK(t.device == like.device, name, ": on a different device than ", like_name);
  FLASHLM_CHECK(t.strides[2] == 1 || t.shape[2] <= 1, name, ": the last dimension must be contiguous");
  if (shape) {
    FLASHLM_CHECK(t.shape[0] == shape[0] && t.shape[1] == shape[1] && t.shape[2] == shape[2], name, ": expected shape ",
                  TensorView::contiguous(nullptr, t.dtype, 3, shape).shape_string(), ", got ", t.shape_string());
  }
}

// A cache tensor [num_blocks, block_size, kv_heads, head_dim]; v_cache must match k_cache exactly.
void check_cache(const TensorView& t, const char* name, const TensorView& like, const char* like_name) {
  check_present(t, name);
  FLASHLM_CHECK(t.ndim == 4, name, ": expected 4 dimensions [num_blocks, block_size, kv_heads, head_dim], got ",
                t.shape_string());
  FLASHLM_CHECK(t.dtype == like.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from ", like_name, "'s ",
                dtype_name(like.dtype));
  FLASHLM_CHECK(t.device == like.device, name, ": on a different device than ", like_name);
  FLASHLM_CHECK(t.strides[3] == 1 || t.shape[3] <= 1, name, ": the last dimension must be contiguous");
  FLASHLM_CHECK(t.shape[1] >= 1, name, ": block_size (dimension 1) must be >= 1, got ", t.shape_string());
  FLASHLM_CHECK(t.shape[2] >= 1 && t.shape[3] >= 1, name, ": needs at least one head and head_dim >= 1, got ",
                t.shape_string());
}

void check_same_shape(const TensorView& t, const char* name, const TensorView& like, const char* like_name) {
  for (int d = 0; d < like.ndim; ++d)
    FLASHLM_CHECK(t.ndim == like.ndim && t.shape[d] == like.shape[d], name, ": shape ", t.shape_string(),
                  " differs from ", like_name, "'s ", like.shape_string());
}

void check_index(const TensorView& t, const char* name, DType dtype, int ndim, const Device& device) {
  FLASHLM_CHECK(t.data != nullptr || t.numel() == 0, name, ": missing tensor");
  FLASHLM_CHECK(t.ndim == ndim, name, ": expected ", ndim, " dimension", ndim == 1 ? "" : "s", ", got ",
                t.shape_string());
  FLASHLM_CHECK(t.dtype == dtype, name, ": must be ", dtype == DType::I32 ? "int32" : "int64", ", got ",
                dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == device, name, ": on a different device than the cache and q");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

void check_head_dim(int64_t head_dim, const Device& device) {
  if (device.is_cpu()) {
    FLASHLM_CHECK(head_dim <= kMaxHeadDimCpu, "q: head_dim ", head_dim, " is above the CPU kernels' ", kMaxHeadDimCpu);
  } else {
    FLASHLM_CHECK(head_dim % 8 == 0 && head_dim <= 256, "q: head_dim ", head_dim,
                  " is not supported on CUDA (multiples of 8 up to 256 are)");
  }
}

// The CPU-only value checks: lengths within the cache and every block id a kernel will read within the
// cache (a sequence may have more queries than tokens: those before its first token see none under causal). CUDA kernels clamp instead (reading device memory here would sync).
void check_values(const PagedParams& p) {
  const int64_t capacity = p.max_blocks_per_seq * p.block_size;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int64_t len = p.seq_lens[s];
    FLASHLM_CHECK(len >= 0 && len <= capacity, "seq_lens[", s, "] = ", len, " is outside [0, ", capacity,
                  "] (block_table holds ", p.max_blocks_per_seq, " blocks of ", p.block_size, " tokens per sequence)");
    const int32_t* row = p.block_table + s * p.block_table_stride;
    for (int64_t b = 0; b < (len + p.block_size - 1) / p.block_size; ++b)
      FLASHLM_CHECK(row[b] >= 0 && row[b] < p.num_blocks, "block_table[", s, ", ", b, "] = ", row[b],
                    " is not a block of the cache (num_blocks = ", p.num_blocks, ")");
  }
}

void check_cu_seqlens_q(const TensorView& cu, const PagedParams& p, int64_t max_seqlen_q, const Device& device) {
  check_index(cu, "cu_seqlens_q", DType::I32, 1, device);
  FLASHLM_CHECK(cu.shape[0] == int64_t(p.num_seqs) + 1, "cu_seqlens_q: expected ", int64_t(p.num_seqs) + 1,
                " entries (num_seqs + 1), got ", cu.shape[0]);
  FLASHLM_CHECK(max_seqlen_q >= 0, "max_seqlen_q: must be >= 0, got ", max_seqlen_q);
  if (!cu.device.is_cpu()) return;
  const auto* c = static_cast<const int32_t*>(cu.data);
  FLASHLM_CHECK(c[0] >= 0, "cu_seqlens_q[0] is negative (", c[0], ")");
  for (int s = 0; s < p.num_seqs; ++s) {
    FLASHLM_CHECK(c[s + 1] >= c[s], "cu_seqlens_q must be non-decreasing: [", s, "] = ", c[s], " > [", s + 1, "] = ",
                  c[s + 1]);
    FLASHLM_CHECK(c[s + 1] - c[s] <= max_seqlen_q, "cu_seqlens_q: sequence ", s, " has ", c[s + 1] - c[s],
                  " queries, more than max_seqlen_q = ", max_seqlen_q);
  }
  FLASHLM_CHECK(c[p.num_seqs] <= p.num_tokens, "cu_seqlens_q: the last offset (", c[p.num_seqs], ") is past the ",
                p.num_tokens, " rows of q");
}

}  // namespace

void write_kv_cache(const KVCacheWriteParams& a, void* stream) {
  check_cache(a.k_cache, "k_cache", a.k_cache, "k_cache");
  check_float_dtype(a.k_cache, "k_cache");
  check_cache(a.v_cache, "v_cache", a.k_cache, "k_cache");
  check_same_shape(a.v_cache, "v_cache", a.k_cache, "k_cache");
  const int64_t* cs = a.k_cache.shape;
  check_rows(a.key, "key", a.k_cache, "k_cache", nullptr);
  const int64_t key_shape[3] = {a.key.shape[0], cs[2], cs[3]};
  check_rows(a.key, "key", a.k_cache, "k_cache", key_shape);
  check_rows(a.value, "value", a.k_cache, "k_cache", key_shape);
  check_index(a.slot_mapping, "slot_mapping", DType::I64, 1, a.k_cache.device);
  FLASHLM_CHECK(a.slot_mapping.shape[0] == a.key.shape[0], "slot_mapping: has ", a.slot_mapping.shape[0],
                " entries, key has ", a.key.shape[0], " tokens");
  check_device(a.k_cache.device, "write_kv_cache");

  WriteParams p;
  p.dtype = a.k_cache.dtype;
  p.num_tokens = a.key.shape[0];
  p.num_blocks = cs[0];
  p.block_size = count_as_int(cs[1], "k_cache", "block_size");
  p.kv_heads = count_as_int(cs[2], "k_cache", "kv_heads");
  p.head_dim = count_as_int(cs[3], "k_cache", "head_dim");
  p.key = a.key.data, p.value = a.value.data, p.k_cache = a.k_cache.data, p.v_cache = a.v_cache.data;
  p.slot_mapping = static_cast<const int64_t*>(a.slot_mapping.data);
  p.key_row_stride = a.key.strides[0], p.key_head_stride = a.key.strides[1];
  p.value_row_stride = a.value.strides[0], p.value_head_stride = a.value.strides[1];
  p.kc_block_stride = a.k_cache.strides[0], p.kc_row_stride = a.k_cache.strides[1], p.kc_head_stride = a.k_cache.strides[2];
  p.vc_block_stride = a.v_cache.strides[0], p.vc_row_stride = a.v_cache.strides[1], p.vc_head_stride = a.v_cache.strides[2];
  if (p.num_tokens == 0) return;
  if (a.k_cache.device.is_cuda()) {
    kvcache::write_kv_cache_cuda(p, a.k_cache.device.index, stream);
    return;
  }
  const int64_t slots = p.num_blocks * p.block_size;
  for (int64_t t = 0; t < p.num_tokens; ++t)
    FLASHLM_CHECK(p.slot_mapping[t] >= -1 && p.slot_mapping[t] < slots, "slot_mapping[", t, "] = ", p.slot_mapping[t],
                  " is outside [-1, ", slots, ") (num_blocks * block_size; -1 skips the token)");
  kvcache::write_kv_cache_cpu(p);
}

// Decode splits. The work of a batch is num_seqs * kv_heads tasks (each takes a whole GQA group); splitting
// the context multiplies the tasks but adds a merge (a pass over splits x heads x head_dim floats) and a
// second parallel pass: it pays only when there are too few tasks to keep every worker busy.
//   CPU: enough tasks for 2 per thread of the pool (threads finish unevenly on a shared machine), each split
//     at least 512 tokens (at D = 128 f32 a split then reads >= 512 KiB per K/V head, against a merge of a
//     few KiB). A batch of 8 K/V heads on 2 threads is never split; MQA (one K/V head) at B = 1 is. On the
//     2-core development machine, loaded by other jobs, B=1 Hkv=1 context 8192 measured 3-11 ms with 1, 2
//     or 4 splits alike (bench/compare_kvcache.py --kv-heads 1 --batches 1 --splits N): the load's noise was
//     larger than the effect, so the rule is the reasoning above, not a fit.
//   CUDA: an H100 has 132 SMs; a CTA per (seq, kv_head, split) and aim for ~2 waves (264 CTAs) so the last
//     wave's tail is short, but never parts shorter than 256 tokens (or 4 blocks), below which the partial
//     results' write and the merge cost more than the parallelism gains. At most 64 splits.
int paged_attention_num_splits(int device_type, int64_t num_seqs, int64_t kv_heads, int64_t max_seq_len,
                               int64_t block_size) {
  if (num_seqs <= 0 || kv_heads <= 0 || max_seq_len <= 0) return 1;
  block_size = std::max<int64_t>(1, block_size);
  const int64_t tasks = num_seqs * kv_heads;
  int64_t want, min_part;
  if (device_type == 1) {
    want = (2 * 132 + tasks - 1) / tasks;
    min_part = std::max<int64_t>(256, 4 * block_size);
  } else {
    want = (2 * int64_t(num_threads()) + tasks - 1) / tasks;
    min_part = 512;
  }
  const int64_t by_length = std::max<int64_t>(1, max_seq_len / min_part);
  return int(std::clamp<int64_t>(std::min(want, by_length), 1, 64));
}

void paged_attention(const PagedAttentionParams& a, void* stream) {
  const AttentionOptions& o = a.options;
  check_present(a.q, "q");
  check_float_dtype(a.q, "q");
  check_rows(a.q, "q", a.q, "q", nullptr);
  check_cache(a.k_cache, "k_cache", a.q, "q");
  check_cache(a.v_cache, "v_cache", a.q, "q");
  check_same_shape(a.v_cache, "v_cache", a.k_cache, "k_cache");
  const int64_t q_shape[3] = {a.q.shape[0], a.q.shape[1], a.q.shape[2]};
  check_rows(a.out, "out", a.q, "q", q_shape);

  PagedParams p;
  p.dtype = a.q.dtype;
  p.num_tokens = a.q.shape[0];
  p.heads = count_as_int(a.q.shape[1], "q", "heads");
  p.head_dim = count_as_int(a.q.shape[2], "q", "head_dim");
  p.num_blocks = a.k_cache.shape[0];
  p.block_size = count_as_int(a.k_cache.shape[1], "k_cache", "block_size");
  p.kv_heads = count_as_int(a.k_cache.shape[2], "k_cache", "kv_heads");
  FLASHLM_CHECK(p.heads >= 1, "q: needs at least one head, got ", a.q.shape_string());
  FLASHLM_CHECK(p.heads % p.kv_heads == 0, "k_cache: its ", p.kv_heads, " heads must divide q's ", p.heads);
  FLASHLM_CHECK(a.k_cache.shape[3] == p.head_dim, "k_cache: head_dim ", a.k_cache.shape[3], " differs from q's ",
                p.head_dim);
  FLASHLM_CHECK(p.head_dim >= 1, "q: head_dim must be >= 1");
  check_head_dim(p.head_dim, a.q.device);

  check_index(a.block_table, "block_table", DType::I32, 2, a.q.device);
  check_index(a.seq_lens, "seq_lens", DType::I32, 1, a.q.device);
  p.num_seqs = count_as_int(a.seq_lens.shape[0], "seq_lens", "num_seqs");
  FLASHLM_CHECK(a.block_table.shape[0] == p.num_seqs, "block_table: has ", a.block_table.shape[0],
                " rows, seq_lens ", p.num_seqs, " sequences");
  p.max_blocks_per_seq = a.block_table.shape[1];
  p.block_table_stride = a.block_table.shape[1];
  p.max_seq_len = p.max_blocks_per_seq * p.block_size;
  if (a.cu_seqlens_q.data != nullptr) {
    check_cu_seqlens_q(a.cu_seqlens_q, p, a.max_seqlen_q, a.q.device);
    p.cu_seqlens_q = static_cast<const int32_t*>(a.cu_seqlens_q.data);
    p.max_seqlen_q = a.max_seqlen_q;
  } else {
    FLASHLM_CHECK(p.num_tokens == p.num_seqs, "q: decode (no cu_seqlens_q) takes one query per sequence: ",
                  p.num_seqs, " rows, got ", a.q.shape_string());
    p.max_seqlen_q = 1;
  }
  if (a.lse.data != nullptr) {
    FLASHLM_CHECK(a.lse.ndim == 2 && a.lse.shape[0] == p.heads && a.lse.shape[1] == p.num_tokens,
                  "lse: expected shape [heads, num_tokens] = [", p.heads, ", ", p.num_tokens, "], got ",
                  a.lse.shape_string());
    FLASHLM_CHECK(a.lse.dtype == DType::F32, "lse: must be float32, got ", dtype_name(a.lse.dtype));
    FLASHLM_CHECK(a.lse.device == a.q.device, "lse: on a different device than q");
    FLASHLM_CHECK(a.lse.is_contiguous(), "lse: must be contiguous");
    p.lse = static_cast<float*>(a.lse.data);
  }

  FLASHLM_CHECK(std::isfinite(o.softmax_scale) && o.softmax_scale != 0.f,
                "softmax_scale: must be finite and non-zero, got ", o.softmax_scale);
  FLASHLM_CHECK(std::isfinite(o.softcap) && o.softcap >= 0.f, "softcap: must be >= 0, got ", o.softcap);
  FLASHLM_CHECK(o.window_left >= -1 && o.window_right >= -1,
                "window_size: each side must be >= -1 (-1: unbounded), got (", o.window_left, ", ", o.window_right, ")");
  FLASHLM_CHECK(a.num_splits >= 0, "num_splits: must be >= 0 (0: the library chooses), got ", a.num_splits);
  p.scale = o.softmax_scale, p.softcap = o.softcap, p.causal = o.causal;
  // causal is window_right = 0; a window side as wide as the longest possible context is no window.
  const int64_t right = o.causal ? 0 : o.window_right;
  p.window_left = o.window_left >= p.max_seq_len ? -1 : o.window_left;
  p.window_right = right >= p.max_seq_len ? -1 : right;

  const int64_t alibi_stride = attention::check_alibi_slopes(a.alibi_slopes, p.num_seqs, p.heads, a.q.device);
  if (alibi_stride >= 0) {
    p.alibi_slopes = static_cast<const float*>(a.alibi_slopes.data);
    p.alibi_batch_stride = alibi_stride;
  }

  const TensorView& kc = a.k_cache;
  const TensorView& vc = a.v_cache;
  p.q = a.q.data, p.k_cache = kc.data, p.v_cache = vc.data, p.out = a.out.data;
  p.block_table = static_cast<const int32_t*>(a.block_table.data);
  p.seq_lens = static_cast<const int32_t*>(a.seq_lens.data);
  p.q_row_stride = a.q.strides[0], p.q_head_stride = a.q.strides[1];
  p.o_row_stride = a.out.strides[0], p.o_head_stride = a.out.strides[1];
  p.kc_block_stride = kc.strides[0], p.kc_row_stride = kc.strides[1], p.kc_head_stride = kc.strides[2];
  p.vc_block_stride = vc.strides[0], p.vc_row_stride = vc.strides[1], p.vc_head_stride = vc.strides[2];

  const int device_type = a.q.device.is_cuda() ? 1 : 0;
  p.num_splits = !p.decode() ? 1
                 : a.num_splits > 0
                     ? std::min(a.num_splits, 256)
                     : paged_attention_num_splits(device_type, p.num_seqs, p.kv_heads, p.max_seq_len, p.block_size);
  check_device(a.q.device, "paged_attention");
  if (p.num_seqs == 0 || p.num_tokens == 0) return;
  if (a.q.device.is_cuda()) {
    kvcache::paged_attention_cuda(p, a.q.device.index, stream);
    return;
  }
  check_values(p);
  if (cpu_isa() == CpuIsa::AVX2 && kvcache::paged_attention_avx2(p)) return;
  kvcache::paged_attention_scalar(p);
}

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::kvcache {
void write_kv_cache_cuda(const WriteParams&, int, void*) {
  throw NotImplementedError("write_kv_cache: flashlm was built without CUDA");
}
void paged_attention_cuda(const PagedParams&, int, void*) {
  throw NotImplementedError("paged_attention: flashlm was built without CUDA");
}
}  // namespace flashlm::kvcache
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::kvcache {
bool paged_attention_avx2(const PagedParams&) { return false; }
}  // namespace flashlm::kvcache
#endif
