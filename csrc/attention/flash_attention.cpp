// Attention dispatcher: checks every view against the layout contract in flash_attention.h, fills the
// kernels' Params, and routes on device (CPU / CUDA) and, on the CPU, on the run-time ISA (AVX2, with its
// AVX-512 build where the CPU has AVX-512F / scalar).
#include "flashlm/attention/flash_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "shared_alibi.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/error.h"
#include "flashlm/core/thread_pool.h"

namespace flashlm {
namespace {

using attention::Params;

std::atomic<bool> avx512_switch{true};  // set_attention_avx512

constexpr int64_t kMaxHeadDimCpu = 256;

// Batch, row and head strides of a [B, S, H, D] (padded) or [T, H, D] (packed) tensor.
struct Strides {
  int64_t batch, row, head;
};

// Checks a q/k/v-like tensor: ndim, last dimension contiguous, dtype, device and (where given) shape.
Strides check_qkv(const TensorView& t, const char* name, bool packed, const TensorView& like, const int64_t* shape) {
  const int ndim = packed ? 3 : 4;
  FLASHLM_CHECK(t.data != nullptr || t.numel() == 0, name, ": missing tensor");
  FLASHLM_CHECK(t.ndim == ndim, name, ": expected ", ndim, " dimensions (", packed ? "[total, heads, head_dim]" :
                "[batch, seqlen, heads, head_dim]", "), got ", t.shape_string());
  FLASHLM_CHECK(t.dtype == like.dtype, name, ": dtype ", dtype_name(t.dtype), " differs from q's ", dtype_name(like.dtype));
  FLASHLM_CHECK(t.device == like.device, name, ": on a different device than q");
  FLASHLM_CHECK(t.strides[ndim - 1] == 1 || t.shape[ndim - 1] <= 1, name, ": the last dimension must be contiguous");
  if (shape) {
    for (int d = 0; d < ndim; ++d)
      FLASHLM_CHECK(t.shape[d] == shape[d], name, ": expected shape ",
                    TensorView::contiguous(nullptr, t.dtype, ndim, shape).shape_string(), ", got ", t.shape_string());
  }
  if (packed) return {0, t.strides[0], t.strides[1]};
  return {t.strides[0], t.strides[1], t.strides[2]};
}

// Checks an f32 row-statistics tensor (lse, delta): [B, H, Sq] or [H, total_q], contiguous.
void check_stats(const TensorView& t, const char* name, const Params& p, const Device& device) {
  const bool ok = p.packed() ? (t.ndim == 2 && t.shape[0] == p.heads && t.shape[1] == p.total_q)
                             : (t.ndim == 3 && t.shape[0] == p.batch && t.shape[1] == p.heads && t.shape[2] == p.seqlen_q);
  FLASHLM_CHECK(ok, name, ": expected shape ", p.packed() ? "[heads, total_q]" : "[batch, heads, seqlen_q]", " = ",
                p.packed() ? TensorView::contiguous(nullptr, DType::F32, {p.heads, p.total_q}).shape_string()
                           : TensorView::contiguous(nullptr, DType::F32, {p.batch, p.heads, p.seqlen_q}).shape_string(),
                ", got ", t.shape_string());
  FLASHLM_CHECK(t.dtype == DType::F32, name, ": must be float32, got ", dtype_name(t.dtype));
  FLASHLM_CHECK(t.device == device, name, ": on a different device than q");
  FLASHLM_CHECK(t.is_contiguous(), name, ": must be contiguous");
  FLASHLM_CHECK(t.data != nullptr || t.numel() == 0, name, ": missing tensor");
}

// Checks cu_seqlens (int32 [B + 1], non-decreasing, within the packed tensor, no sequence longer than
// max_seqlen). The values are read only where they are on the CPU; CUDA kernels clamp them.
void check_cu_seqlens(const TensorView& cu, const char* name, const Device& device, int64_t total, int64_t max_seqlen,
                      const char* max_name) {
  FLASHLM_CHECK(cu.data != nullptr, name, ": missing (packed batches need both cu_seqlens_q and cu_seqlens_k)");
  FLASHLM_CHECK(cu.ndim == 1 && cu.shape[0] >= 1, name, ": expected a 1-D tensor [batch + 1], got ", cu.shape_string());
  FLASHLM_CHECK(cu.dtype == DType::I32, name, ": must be int32, got ", dtype_name(cu.dtype));
  FLASHLM_CHECK(cu.device == device, name, ": on a different device than q");
  FLASHLM_CHECK(cu.is_contiguous(), name, ": must be contiguous");
  FLASHLM_CHECK(max_seqlen >= 0, max_name, ": must be >= 0, got ", max_seqlen);
  if (!device.is_cpu()) return;
  const auto* c = static_cast<const int32_t*>(cu.data);
  FLASHLM_CHECK(c[0] >= 0, name, "[0] is negative (", c[0], ")");
  for (int64_t b = 0; b + 1 < cu.shape[0]; ++b) {
    FLASHLM_CHECK(c[b + 1] >= c[b], name, " must be non-decreasing: [", b, "] = ", c[b], " > [", b + 1, "] = ", c[b + 1]);
    FLASHLM_CHECK(c[b + 1] - c[b] <= max_seqlen, name, ": sequence ", b, " has ", c[b + 1] - c[b], " rows, more than ",
                  max_name, " = ", max_seqlen);
  }
  FLASHLM_CHECK(c[cu.shape[0] - 1] <= total, name, ": the last offset (", c[cu.shape[0] - 1], ") is past the ", total,
                " rows of the packed tensor");
}

void check_dropout_p(float p) {
  FLASHLM_CHECK(p >= 0.f && p < 1.f, "dropout_p: must be in [0, 1), got ", p);  // NaN fails both
}

void check_options(const AttentionOptions& o) {
  FLASHLM_CHECK(std::isfinite(o.softmax_scale) && o.softmax_scale != 0.f, "softmax_scale: must be finite and non-zero, got ",
                o.softmax_scale);
  FLASHLM_CHECK(std::isfinite(o.softcap) && o.softcap >= 0.f, "softcap: must be >= 0, got ", o.softcap);
  FLASHLM_CHECK(o.window_left >= -1 && o.window_right >= -1, "window_size: each side must be >= -1 (-1: unbounded), got (",
                o.window_left, ", ", o.window_right, ")");
  FLASHLM_CHECK(o.version == 1 || o.version == 2, "version: must be 1 or 2, got ", o.version);
  check_dropout_p(o.dropout_p);
}

attention::dropout::Rng dropout_rng(float p, uint64_t seed, uint64_t offset, int heads) {
  attention::dropout::Rng r;
  r.seed = seed;
  r.offset = offset;
  r.keep_below = attention::dropout::keep_below(p);
  r.scale = float(1.0 / (1.0 - double(p)));
  r.heads = heads;
  return r;
}

// The shape-independent part of Params: geometry from q and k, options, cu_seqlens.
Params make_params(const TensorView& q, const TensorView& k, const TensorView& cu_q, const TensorView& cu_k,
                   int64_t max_seqlen_q, int64_t max_seqlen_k, const AttentionOptions& o) {
  check_options(o);
  Params p;
  const bool packed = cu_q.data != nullptr || cu_k.data != nullptr;
  FLASHLM_CHECK(q.ndim == (packed ? 3 : 4), "q: expected ", packed ? "3 dimensions [total_q, heads, head_dim]" :
                "4 dimensions [batch, seqlen_q, heads, head_dim]", ", got ", q.shape_string());
  FLASHLM_CHECK(k.ndim == q.ndim, "k: expected ", q.ndim, " dimensions like q, got ", k.shape_string());
  p.dtype = q.dtype;
  if (q.device.is_cpu()) {
    FLASHLM_CHECK(q.dtype == DType::F32 || q.dtype == DType::BF16, "q: CPU attention takes float32 or bfloat16, got ",
                  dtype_name(q.dtype));
  } else {
    FLASHLM_CHECK(q.dtype == DType::F16 || q.dtype == DType::BF16, "q: CUDA attention takes float16 or bfloat16, got ",
                  dtype_name(q.dtype));
  }
  const int hd = q.ndim - 2;  // index of the heads dimension
  p.heads = count_as_int(q.shape[hd], "q", "heads");
  p.kv_heads = count_as_int(k.shape[hd], "k", "heads");
  p.head_dim = count_as_int(q.shape[hd + 1], "q", "head_dim");
  FLASHLM_CHECK(p.heads >= 1, "q: needs at least one head, got ", q.shape_string());
  FLASHLM_CHECK(p.kv_heads >= 1 && p.heads % p.kv_heads == 0, "k: the number of heads (", p.kv_heads,
                ") must divide q's (", p.heads, ")");
  FLASHLM_CHECK(k.shape[hd + 1] == p.head_dim, "k: head_dim ", k.shape[hd + 1], " differs from q's ", p.head_dim);
  FLASHLM_CHECK(p.head_dim >= 1, "q: head_dim must be >= 1");
  if (q.device.is_cpu()) {
    FLASHLM_CHECK(p.head_dim <= kMaxHeadDimCpu, "q: head_dim ", p.head_dim, " is above the CPU kernels' ", kMaxHeadDimCpu);
  } else {
    FLASHLM_CHECK(flash_attention_cuda_supports_head_dim(p.head_dim), "q: head_dim ", p.head_dim,
                  " is not supported on CUDA (multiples of 8 up to 256 are)");
  }
  if (packed) {
    p.total_q = q.shape[0];
    p.total_k = k.shape[0];
    check_cu_seqlens(cu_q, "cu_seqlens_q", q.device, p.total_q, max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens(cu_k, "cu_seqlens_k", q.device, p.total_k, max_seqlen_k, "max_seqlen_k");
    FLASHLM_CHECK(cu_q.shape[0] == cu_k.shape[0], "cu_seqlens_k: has ", cu_k.shape[0], " entries, cu_seqlens_q ",
                  cu_q.shape[0]);
    p.batch = count_as_int(cu_q.shape[0] - 1, "cu_seqlens_q", "batch (entries - 1)");
    // No sequence has more rows than the packed tensor: a larger bound would only size CUDA grids for nothing.
    p.seqlen_q = std::min(max_seqlen_q, p.total_q);
    p.seqlen_k = std::min(max_seqlen_k, p.total_k);
    p.cu_seqlens_q = static_cast<const int32_t*>(cu_q.data);
    p.cu_seqlens_k = static_cast<const int32_t*>(cu_k.data);
  } else {
    p.batch = count_as_int(q.shape[0], "q", "batch");
    FLASHLM_CHECK(k.shape[0] == q.shape[0], "k: batch ", k.shape[0], " differs from q's ", q.shape[0]);
    p.seqlen_q = q.shape[1];
    p.seqlen_k = k.shape[1];
    p.total_q = p.batch * p.seqlen_q;
    p.total_k = p.batch * p.seqlen_k;
  }
  p.scale = o.softmax_scale;
  p.softcap = o.softcap;
  p.causal = o.causal;
  p.window_left = o.window_left;
  p.window_right = o.causal ? 0 : o.window_right;
  // A window side that reaches past every key of every row is no window. Query i sits at key i + Sk - Sq, so
  // the left side reaches key 0 from every row once it is >= Sk - 1, and the right side reaches key Sk - 1
  // from row 0 once it is >= Sq - 1 (flash-attn compares it with Sk, which cuts rows short when Sq > Sk + 1).
  // The longest sequence's lengths bound every sequence's (CUDA clamps the rows to them). Both sides are then
  // below the tensors' row counts, so the kernels' index arithmetic cannot overflow.
  if (p.window_left >= p.seqlen_k) p.window_left = -1;
  if (p.window_right >= p.seqlen_q) p.window_right = -1;
  p.version = o.version;
  p.dropout_p = o.dropout_p;
  p.philox_seed = o.philox_seed;
  p.philox_offset = o.philox_offset;
  p.rng = dropout_rng(o.dropout_p, o.philox_seed, o.philox_offset, p.heads);
  return p;
}

// Points Params at the optional ALiBi slopes once shared_alibi.h has checked them.
void fill_alibi(Params& p, const TensorView& t, const Device& device) {
  const int64_t stride = attention::check_alibi_slopes(t, p.batch, p.heads, device);
  if (stride < 0) return;
  p.alibi_slopes = static_cast<const float*>(t.data);
  p.alibi_batch_stride = stride;
}

void check_device(const Device& device, const char* op) {
  if (device.is_cpu()) return;
  if (!cuda_compiled()) throw NotImplementedError(std::string(op) + ": flashlm was built without CUDA");
  FLASHLM_CHECK(device.index >= 0 && device.index < cuda_device_count(), op, ": no CUDA device ", device.index, " (",
                cuda_status(), ")");
}

}  // namespace

void flash_attention_dropout_mask(const TensorView& mask, float dropout_p, uint64_t philox_seed, uint64_t philox_offset) {
  check_dropout_p(dropout_p);
  FLASHLM_CHECK(mask.ndim == 4, "mask: expected 4 dimensions [batch, heads, seqlen_q, seqlen_k], got ",
                mask.shape_string());
  FLASHLM_CHECK(mask.dtype == DType::U8, "mask: must be uint8, got ", dtype_name(mask.dtype));
  FLASHLM_CHECK(mask.device.is_cpu(), "mask: must be on the CPU");
  FLASHLM_CHECK(mask.is_contiguous(), "mask: must be contiguous");
  FLASHLM_CHECK(mask.data != nullptr || mask.numel() == 0, "mask: missing tensor");
  const int batch = count_as_int(mask.shape[0], "mask", "batch");
  const int heads = count_as_int(mask.shape[1], "mask", "heads");
  const int64_t sq = mask.shape[2], sk = mask.shape[3];
  const attention::dropout::Rng r = dropout_rng(dropout_p, philox_seed, philox_offset, heads);
  auto* out = static_cast<uint8_t*>(mask.data);
  parallel_for(int64_t(batch) * heads * sq, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> factors(size_t(std::max<int64_t>(sk, 1)));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / std::max<int64_t>(sq, 1);
      attention::dropout::row_factors(r, int(bh / heads), int(bh % heads), t % sq, 0, sk, factors.data());
      for (int64_t j = 0; j < sk; ++j) out[t * sk + j] = factors[j] != 0.f;
    }
  });
}

bool flash_attention_cuda_supports_head_dim(int64_t head_dim) { return head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0; }

namespace {

// Checks q, k, v, out and lse (shared by the forward and backward passes) and fills their part of Params.
// Returns the shapes of q and k, for the tensors shaped like them.
void fill_inputs(Params& p, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                 const TensorView& lse, int64_t* q_shape, int64_t* kv_shape) {
  const bool packed = p.packed();
  for (int d = 0; d < q.ndim; ++d) q_shape[d] = q.shape[d], kv_shape[d] = k.shape[d];
  const Strides qs = check_qkv(q, "q", packed, q, nullptr);
  const Strides ks = check_qkv(k, "k", packed, q, nullptr);
  const Strides vs = check_qkv(v, "v", packed, q, kv_shape);
  const Strides os = check_qkv(out, "out", packed, q, q_shape);
  check_stats(lse, "lse", p, q.device);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out = out.data;
  p.lse = static_cast<float*>(lse.data);
  p.q_batch_stride = qs.batch, p.q_row_stride = qs.row, p.q_head_stride = qs.head;
  p.k_batch_stride = ks.batch, p.k_row_stride = ks.row, p.k_head_stride = ks.head;
  p.v_batch_stride = vs.batch, p.v_row_stride = vs.row, p.v_head_stride = vs.head;
  p.o_batch_stride = os.batch, p.o_row_stride = os.row, p.o_head_stride = os.head;
  p.lse_batch_stride = packed ? 0 : int64_t(p.heads) * p.seqlen_q;
  p.lse_head_stride = packed ? p.total_q : p.seqlen_q;
}

}  // namespace

void flash_attention_forward(const AttentionForwardParams& a, void* stream) {
  Params p = make_params(a.q, a.k, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.options);
  int64_t q_shape[4], kv_shape[4];
  fill_inputs(p, a.q, a.k, a.v, a.out, a.lse, q_shape, kv_shape);
  fill_alibi(p, a.alibi_slopes, a.q.device);
  check_device(a.q.device, "flash_attention_forward");
  if (p.batch == 0 || p.seqlen_q == 0) return;
  if (a.q.device.is_cuda()) {
    attention::forward_cuda(p, a.q.device.index, stream);
    return;
  }
  if (cpu_isa() == CpuIsa::AVX2) {
    if (attention::avx512_allowed() && attention::forward_avx512(p)) return;
    if (attention::forward_avx2(p)) return;
  }
  attention::forward_scalar(p);
}

void flash_attention_backward(const AttentionBackwardParams& a, void* stream) {
  Params p = make_params(a.q, a.k, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.options);
  int64_t q_shape[4], kv_shape[4];
  fill_inputs(p, a.q, a.k, a.v, a.out, a.lse, q_shape, kv_shape);
  const bool packed = p.packed();
  const Strides dos = check_qkv(a.dout, "dout", packed, a.q, q_shape);
  const Strides dqs = check_qkv(a.dq, "dq", packed, a.q, q_shape);
  const Strides dks = check_qkv(a.dk, "dk", packed, a.q, kv_shape);
  const Strides dvs = check_qkv(a.dv, "dv", packed, a.q, kv_shape);
  check_stats(a.delta, "delta", p, a.q.device);
  p.dout = a.dout.data, p.dq = a.dq.data, p.dk = a.dk.data, p.dv = a.dv.data;
  p.delta = static_cast<float*>(a.delta.data);
  p.do_batch_stride = dos.batch, p.do_row_stride = dos.row, p.do_head_stride = dos.head;
  p.dq_batch_stride = dqs.batch, p.dq_row_stride = dqs.row, p.dq_head_stride = dqs.head;
  p.dk_batch_stride = dks.batch, p.dk_row_stride = dks.row, p.dk_head_stride = dks.head;
  p.dv_batch_stride = dvs.batch, p.dv_row_stride = dvs.row, p.dv_head_stride = dvs.head;
  p.version = 2;
  fill_alibi(p, a.alibi_slopes, a.q.device);
  check_device(a.q.device, "flash_attention_backward");
  if (p.batch == 0) return;
  // dk and dv of keys that no query reaches (or of a batch with no queries) are zero, so the kernels run
  // even when seqlen_q is 0.
  if (a.q.device.is_cuda()) {
    attention::backward_cuda(p, a.q.device.index, stream);
    return;
  }
  if (cpu_isa() == CpuIsa::AVX2) {
    if (attention::avx512_allowed() && attention::backward_avx512(p)) return;
    if (attention::backward_avx2(p)) return;
  }
  attention::backward_scalar(p);
}

bool set_attention_avx512(bool allowed) { return avx512_switch.exchange(allowed); }

namespace attention {
bool avx512_allowed() {
#ifdef FLASHLM_HAVE_AVX512_ATTENTION
  return cpu_features().avx512f && avx512_switch.load(std::memory_order_relaxed);
#else
  return false;
#endif
}
}  // namespace attention

}  // namespace flashlm

#ifndef FLASHLM_WITH_CUDA
namespace flashlm::attention {
void forward_cuda(const Params&, int, void*) { throw NotImplementedError("attention: flashlm was built without CUDA"); }
void backward_cuda(const Params&, int, void*) { throw NotImplementedError("attention: flashlm was built without CUDA"); }
}  // namespace flashlm::attention
#endif
#ifndef FLASHLM_HAVE_AVX2_KERNELS
namespace flashlm::attention {
bool forward_avx2(const Params&) { return false; }
bool backward_avx2(const Params&) { return false; }
}  // namespace flashlm::attention
#endif
#ifndef FLASHLM_HAVE_AVX512_ATTENTION
namespace flashlm::attention {
bool forward_avx512(const Params&) { return false; }
bool backward_avx512(const Params&) { return false; }
}  // namespace flashlm::attention
#endif
