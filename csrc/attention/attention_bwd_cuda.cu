// FlashAttention-2 backward on tensor cores, deterministic and free of atomics, and the CUDA backward entry
// point. Reference: backward_scalar (attention_scalar.cpp): P = exp(s - lse) recomputed from the saved lse,
// dP = dO V^T, dS = P (dP - delta) ds/dx with delta = rowsum(dO * O), dV = P^T dO, dK = dS^T Q, dQ = dS K,
// dK and dV summed over the query heads that share a K/V head. With dropout (factor z of each element, drawn
// again as the forward drew it: shared_dropout.h), dP = z dO V^T and dV = (z P)^T dO.
//
// Three kernels, in stream order:
//  1. bwd_delta_kernel: delta = rowsum(dO * O) per query row and head, written to p.delta (lse layout).
//  2. bwd_dkdv_kernel, a CTA per (K/V tile, K/V head, sequence): it keeps its K and V tiles in smem and its
//     dK, dV tiles in registers, and walks every query head of its group and every query tile that sees its
//     keys (Q, dO, lse, delta double-buffered with cp.async). It works in the transposed view: each warp owns
//     16 keys, computes S^T = K Q^T and dP^T = V dO^T (keys x queries) as accumulators, turns them into P^T
//     and dS^T in registers, and feeds those straight back as A operands of dV += P^T dO and dK += dS^T Q; no
//     score tile goes through smem. For d > 128 the dK/dV accumulators would not fit one warp, so two warps
//     share each 16 keys and own half the columns each (both compute S^T and dP^T: 1.5x the mma work of the
//     split-free case at those sizes).
//  3. bwd_dq_kernel, a CTA per (query tile, head, sequence): it walks the K/V tiles its rows see (double-
//     buffered) and accumulates dQ = dS K in registers; each warp owns 16 query rows.
// Every output element is written by exactly one thread with a fixed summation order, so results are
// deterministic; the price is that S and dP are computed twice (once per kernel).
#include "shared_cuda.cuh"
#include "attention_kernels.h"
#include "shared_softmax.h"

namespace flashlm::attention {
namespace cuda {
namespace {

// Raw dot products x -> log2-domain scores t and the local gradient g = ds/dx of the natural-domain score.
struct ScoreGrad {
  float scale, scale2, cap2, cap_in;
  bool softcap;
  __device__ __forceinline__ explicit ScoreGrad(const Params& p)
      : scale(p.scale),
        scale2(p.scale * kLog2e),
        cap2(p.softcap * kLog2e),
        cap_in(p.softcap > 0.f ? p.scale / p.softcap : 0.f),
        softcap(p.softcap > 0.f) {}
  __device__ __forceinline__ float operator()(float x, float& g) const {
    if (softcap) {
      const float th = tanhf(x * cap_in);
      g = scale * (1.f - th * th);
      return cap2 * th;
    }
    g = scale;
    return x * scale2;
  }
};

// 1. delta. A warp per row; 8 rows per CTA.
template <bool kBf16>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const Params p) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int head = blockIdx.y, b = blockIdx.z;
  const tiles::SeqRows seq = sequence_rows(p, b);
  const int64_t i = int64_t(blockIdx.x) * 8 + warp;
  if (i >= seq.sq) return;
  const auto* dout = static_cast<const uint16_t*>(p.dout) + b * p.do_batch_stride + (seq.q0 + i) * p.do_row_stride +
                     head * p.do_head_stride;
  const auto* out = static_cast<const uint16_t*>(p.out) + b * p.o_batch_stride + (seq.q0 + i) * p.o_row_stride +
                    head * p.o_head_stride;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc += to_f32<kBf16>(dout[c]) * to_f32<kBf16>(out[c]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) p.delta[b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0 + i] = acc;
}

// 2. dK, dV. kBlockN = 64 keys (4 key warps x 16) per CTA, kBlockM queries per step, kColSplit warps per 16
// keys: d <= 128: 4 warps; d > 128: 8 warps. kBlockM = 64 up to d = 96, 32 above (at d = 128, 64 needs more
// than 255 registers: dK, dV, S^T, dP^T are 64 + 64 + 32 + 32 f32 per thread). Smem: K, V + 2 stages of Q,
// dO = 68 KiB at d = 128, 135 KiB at d = 256.
template <int kHeadDim_>
struct BwdKVConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kColSplit = kHeadDim <= 128 ? 1 : 2;
  static constexpr int kBlockN = 64, kBlockM = kHeadDim <= 96 ? 64 : 32;
  static constexpr int kWarps = 4 * kColSplit, kThreads = kWarps * 32;
  static constexpr int kQT = kBlockM / 8;                     // 8-query n-blocks of S^T
  static constexpr int kDTw = kHeadDim / 8 / kColSplit;       // 8-column blocks of dK/dV per warp
  static constexpr int kStride = kHeadDim + kPad;
  static constexpr int kTileN = kBlockN * kStride, kTileM = kBlockM * kStride;  // elements
  static constexpr size_t kSmemBytes = size_t(2 * kTileN + 4 * kTileM) * 2 + 4 * kBlockM * sizeof(float);
  static_assert(kDTw % 2 == 0 && kQT % 2 == 0 && kBlockM <= kThreads, "bad dK/dV tile configuration");
};

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_dkdv_kernel(const Params p, bool aligned) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride, kHeadDim = Cfg::kHeadDim;
  constexpr int kQT = Cfg::kQT, kDTw = Cfg::kDTw;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Cfg::kTileN;
  T* sQ = sV + Cfg::kTileN;   // [2][kBlockM][kStride]
  T* sdO = sQ + 2 * Cfg::kTileM;  // [2][kBlockM][kStride]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * Cfg::kTileM);  // [2][kBlockM]
  float* sDelta = sLse + 2 * kBlockM;                             // [2][kBlockM]

  const int kvh = blockIdx.y, b = blockIdx.z;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int kw = warp % 4, col0 = (warp / 4) * kDTw * 8;  // the warp's 16 keys and first dK/dV column
  const tiles::SeqRows seq = sequence_rows(p, b);
  const int64_t j0 = int64_t(blockIdx.x) * kBlockN;
  if (j0 >= seq.sk) return;
  const int keys = int(tiles::min64(seq.sk - j0, kBlockN));
  const tiles::Band band = band_of(p, seq);
  const tiles::Range m_tiles = tiles::tile_range(band.queries(j0, j0 + keys), kBlockM);
  const int group = p.heads / p.kv_heads, d = p.head_dim;
  const int64_t per_head = m_tiles.end - m_tiles.begin, steps = group * per_head;

  // Step t: query head kvh * group + t / per_head, query tile m_tiles.begin + t % per_head.
  auto load_step = [&](int64_t t, int stage) {
    const int head = kvh * group + int(t / per_head);
    const int64_t i0 = (m_tiles.begin + t % per_head) * kBlockM;
    const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (seq.q0 + i0) * p.q_row_stride + head * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + (seq.q0 + i0) * p.do_row_stride +
                    head * p.do_head_stride;
    load_tile<kBlockM, kHeadDim, Cfg::kThreads>(sQ + stage * Cfg::kTileM, q, p.q_row_stride, rows, d, aligned,
                                                static_cast<const T*>(p.q));
    load_tile<kBlockM, kHeadDim, Cfg::kThreads>(sdO + stage * Cfg::kTileM, dout, p.do_row_stride, rows, d, aligned,
                                                static_cast<const T*>(p.dout));
    const int r = int(threadIdx.x);
    if (r < kBlockM) {
      const int64_t at = b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0 + i0 + r;
      cp_async_4(smem_addr(sLse + stage * kBlockM + r), r < rows ? p.lse + at : p.lse, r < rows);
      cp_async_4(smem_addr(sDelta + stage * kBlockM + r), r < rows ? p.delta + at : p.delta, r < rows);
    }
  };

  float dk[1][kDTw][4], dv[1][kDTw][4];
  zero(dk);
  zero(dv);
  const ScoreGrad score(p);
  const uint32_t k_warp = smem_addr(sK + kw * 16 * kStride), v_warp = smem_addr(sV + kw * 16 * kStride);

  if (steps > 0) {
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + (seq.k0 + j0) * p.k_row_stride + kvh * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + (seq.k0 + j0) * p.v_row_stride + kvh * p.v_head_stride;
    load_tile<kBlockN, kHeadDim, Cfg::kThreads>(sK, k, p.k_row_stride, keys, d, aligned, static_cast<const T*>(p.k));
    load_tile<kBlockN, kHeadDim, Cfg::kThreads>(sV, v, p.v_row_stride, keys, d, aligned, static_cast<const T*>(p.v));
    load_step(0, 0);
    cp_async_commit();
  }
  for (int64_t t = 0; t < steps; ++t) {
    const int stage = int(t & 1);
    if (t + 1 < steps) {
      load_step(t + 1, stage ^ 1);  // that stage was last read in step t - 1, which ended with a barrier
      cp_async_commit();
      cp_async_wait<1>();  // step t's group has landed (for this thread)
    } else {
      cp_async_wait<0>();
    }
    if (threadIdx.x < kBlockM) {  // the thread that copied row threadIdx.x's lse and delta
      float* lse_r = sLse + stage * kBlockM + threadIdx.x;
      *lse_r = softmax::backward_lse(*lse_r, sDelta[stage * kBlockM + threadIdx.x]);
    }
    __syncthreads();  // ... for every thread

    const T* sQs = sQ + stage * Cfg::kTileM;
    const T* sdOs = sdO + stage * Cfg::kTileM;
    const float* lse = sLse + stage * kBlockM;
    const float* delta = sDelta + stage * kBlockM;
    const int64_t i0 = (m_tiles.begin + t % per_head) * kBlockM;
    const int head = kvh * group + int(t / per_head);  // for ALiBi's slope and dropout's draw
    const float alibi2 = alibi_slope2(p, b, head);

    // dP^T = V dO^T and S^T = K Q^T for the warp's 16 keys x kBlockM queries.
    float dp[1][kQT][4], s[1][kQT][4];
    zero(dp);
    zero(s);
    mma_abt<kBf16, 1, kQT, kHeadDim, kStride, kStride>(dp, v_warp, smem_addr(sdOs), lane);
    mma_abt<kBf16, 1, kQT, kHeadDim, kStride, kStride>(s, k_warp, smem_addr(sQs), lane);

    // P^T = 2^(t - lse log2 e) where the query sees the key; dS^T = P^T (dP^T - delta) g there. Both are
    // exactly 0 where it does not (0 times a NaN delta or dP would not be).
    const bool full = band.tile_full(i0, i0 + kBlockM, j0, j0 + kBlockN);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const tiles::Cols c = full ? tiles::Cols{0, kBlockM}
                                 : tiles::query_cols(band, j0 + kw * 16 + (lane >> 2) + 8 * h, i0, kBlockM);
#pragma unroll
      for (int nt = 0; nt < kQT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * (lane & 3) + e;
          const bool seen = col >= c.lo && col < c.hi;
          float g;
          float t2 = score(s[0][nt][2 * h + e], g);
          if (alibi2 != 0.f) t2 += alibi_log2(alibi2, band, i0 + col, j0 + kw * 16 + (lane >> 2) + 8 * h);
          const float pe = seen ? exp2_approx(t2 - lse[col] * kLog2e) : 0.f;
          const int64_t key = j0 + kw * 16 + (lane >> 2) + 8 * h;
          const float z = p.dropout_p > 0.f ? dropout::factor(p.rng, b, head, i0 + col, key) : 1.f;
          s[0][nt][2 * h + e] = pe * z;
          dp[0][nt][2 * h + e] = seen ? pe * (z * dp[0][nt][2 * h + e] - delta[col]) * g : 0.f;
        }
    }

    // dV += P^T dO and dK += dS^T Q over the warp's columns.
    uint32_t a[1][kQT / 2][4];
    acc_to_a<kBf16>(a, s);
    mma_pv<kBf16, 1, kQT / 2, kDTw, kStride>(dv, a, smem_addr(sdOs + col0), lane);
    acc_to_a<kBf16>(a, dp);
    mma_pv<kBf16, 1, kQT / 2, kDTw, kStride>(dk, a, smem_addr(sQs + col0), lane);
    __syncthreads();  // every warp is done with this stage before step t + 1 refills it
  }

  const float one[1][2] = {{1.f, 1.f}};
  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_batch_stride + (seq.k0 + j0) * p.dk_row_stride + kvh * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_batch_stride + (seq.k0 + j0) * p.dv_row_stride + kvh * p.dv_head_stride;
  store_acc<kBf16>(dk_out, p.dk_row_stride, dk, one, kw * 16, col0, keys, d, aligned, lane);
  store_acc<kBf16>(dv_out, p.dv_row_stride, dv, one, kw * 16, col0, keys, d, aligned, lane);
}

// 3. dQ. kBlockM = 64 query rows (4 warps x 16) per CTA, kBlockN keys per step: 64 for d <= 128, 32 above
// (smem: Q, dO + 2 stages of K, V = 105 KiB at d = 128, 135 KiB at d = 256).
template <int kHeadDim_>
struct BwdQConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64, kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kNT = kBlockN / 8, kDT = kHeadDim / 8;
  static constexpr int kStride = kHeadDim + kPad;
  static constexpr int kTileM = kBlockM * kStride, kTileN = kBlockN * kStride;
  static constexpr size_t kSmemBytes = size_t(2 * kTileM + 4 * kTileN) * 2;
};

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_dq_kernel(const Params p, bool aligned) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride, kHeadDim = Cfg::kHeadDim;
  constexpr int kNT = Cfg::kNT, kDT = Cfg::kDT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + Cfg::kTileM;
  T* sK = sdO + Cfg::kTileM;      // [2][kBlockN][kStride]
  T* sV = sK + 2 * Cfg::kTileN;   // [2][kBlockN][kStride]

  const int head = blockIdx.y, b = blockIdx.z;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const tiles::SeqRows seq = sequence_rows(p, b);
  const int64_t i0 = int64_t(blockIdx.x) * kBlockM;
  if (i0 >= seq.sq) return;
  const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
  const tiles::Band band = band_of(p, seq);
  const tiles::Range n_tiles = tiles::tile_range(band.keys(i0, i0 + rows), kBlockN);
  const int kvh = head / (p.heads / p.kv_heads), d = p.head_dim, row0 = warp * 16;
  const float alibi2 = alibi_slope2(p, b, head);
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + seq.k0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + seq.k0 * p.v_row_stride + kvh * p.v_head_stride;

  // The lane's two rows: lse in the log2 domain (+inf for rows outside the sequence: P = 0) and delta.
  float lse2[2], delta[2];
  const int64_t stat0 = b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0 + i0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + (lane >> 2) + 8 * h;
    delta[h] = r < rows ? p.delta[stat0 + r] : 0.f;
    lse2[h] = r < rows ? softmax::backward_lse(p.lse[stat0 + r], delta[h]) * kLog2e : INFINITY;
  }

  auto load_kv = [&](int64_t n, int stage) {
    const int64_t j0 = n * kBlockN;
    const int keys = int(tiles::min64(seq.sk - j0, kBlockN));
    load_tile<kBlockN, kHeadDim, Cfg::kThreads>(sK + stage * Cfg::kTileN, k + j0 * p.k_row_stride, p.k_row_stride, keys,
                                                d, aligned, static_cast<const T*>(p.k));
    load_tile<kBlockN, kHeadDim, Cfg::kThreads>(sV + stage * Cfg::kTileN, v + j0 * p.v_row_stride, p.v_row_stride, keys,
                                                d, aligned, static_cast<const T*>(p.v));
  };

  float dq[1][kDT][4];
  zero(dq);
  const ScoreGrad score(p);
  if (n_tiles.begin < n_tiles.end) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + (seq.q0 + i0) * p.q_row_stride + head * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + (seq.q0 + i0) * p.do_row_stride +
                    head * p.do_head_stride;
    load_tile<kBlockM, kHeadDim, Cfg::kThreads>(sQ, q, p.q_row_stride, rows, d, aligned, static_cast<const T*>(p.q));
    load_tile<kBlockM, kHeadDim, Cfg::kThreads>(sdO, dout, p.do_row_stride, rows, d, aligned,
                                                static_cast<const T*>(p.dout));
    load_kv(n_tiles.begin, 0);
    cp_async_commit();
  }
  const uint32_t q_warp = smem_addr(sQ + row0 * kStride), do_warp = smem_addr(sdO + row0 * kStride);
  for (int64_t n = n_tiles.begin; n < n_tiles.end; ++n) {
    const int stage = int((n - n_tiles.begin) & 1);
    if (n + 1 < n_tiles.end) {
      load_kv(n + 1, stage ^ 1);  // that stage was last read in the previous step, which ended with a barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t j0 = n * kBlockN;
    float dp[1][kNT][4], s[1][kNT][4];
    zero(dp);
    zero(s);
    mma_abt<kBf16, 1, kNT, kHeadDim, kStride, kStride>(dp, do_warp, smem_addr(sV + stage * Cfg::kTileN), lane);
    mma_abt<kBf16, 1, kNT, kHeadDim, kStride, kStride>(s, q_warp, smem_addr(sK + stage * Cfg::kTileN), lane);

    const bool full = band.tile_full(i0, i0 + rows, j0, j0 + kBlockN);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const tiles::Cols c = full ? tiles::Cols{0, kBlockN}
                                 : tiles::key_cols(band, i0 + row0 + (lane >> 2) + 8 * h, j0, kBlockN);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * (lane & 3) + e;
          float g;
          float t2 = score(s[0][nt][2 * h + e], g);
          if (alibi2 != 0.f) t2 += alibi_log2(alibi2, band, i0 + row0 + (lane >> 2) + 8 * h, j0 + col);
          const bool seen = col >= c.lo && col < c.hi;
          const float pe = seen ? exp2_approx(t2 - lse2[h]) : 0.f;
          const int64_t row = i0 + row0 + (lane >> 2) + 8 * h;
          const float z = p.dropout_p > 0.f ? dropout::factor(p.rng, b, head, row, j0 + col) : 1.f;
          dp[0][nt][2 * h + e] = seen ? pe * (z * dp[0][nt][2 * h + e] - delta[h]) * g : 0.f;
        }
    }

    // dQ += dS K.
    uint32_t a[1][kNT / 2][4];
    acc_to_a<kBf16>(a, dp);
    mma_pv<kBf16, 1, kNT / 2, kDT, kStride>(dq, a, smem_addr(sK + stage * Cfg::kTileN), lane);
    __syncthreads();  // every warp is done with this stage before the next step refills it
  }

  const float one[1][2] = {{1.f, 1.f}};
  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_batch_stride + (seq.q0 + i0) * p.dq_row_stride + head * p.dq_head_stride;
  store_acc<kBf16>(dq_out, p.dq_row_stride, dq, one, row0, 0, rows, d, aligned, lane);
}

template <int kHeadDim, bool kBf16>
void launch_bwd(const Params& p, bool aligned, cudaStream_t stream) {
  if (p.seqlen_k > 0) {
    using Cfg = BwdKVConfig<kHeadDim>;
    auto kernel = bwd_dkdv_kernel<Cfg, kBf16>;
    set_smem(kernel, Cfg::kSmemBytes);
    const dim3 grid = make_grid(tiles::ceil_div(p.seqlen_k, Cfg::kBlockN), p.kv_heads, p.batch, "attention backward");
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, aligned);
    check_cuda(cudaGetLastError(), "backward dK/dV kernel launch");
  }
  if (p.seqlen_q > 0) {
    using Cfg = BwdQConfig<kHeadDim>;
    auto kernel = bwd_dq_kernel<Cfg, kBf16>;
    set_smem(kernel, Cfg::kSmemBytes);
    const dim3 grid = make_grid(tiles::ceil_div(p.seqlen_q, Cfg::kBlockM), p.heads, p.batch, "attention backward");
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, aligned);
    check_cuda(cudaGetLastError(), "backward dQ kernel launch");
  }
}

}  // namespace
}  // namespace cuda

void backward_cuda(const Params& p, int device, void* stream) {
  using namespace cuda;
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = qkv_vector_ok(p) &&
                       vector_ok(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride) &&
                       vector_ok(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) &&
                       vector_ok(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) &&
                       vector_ok(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  dispatch_dtype(p.dtype, [&](auto bf16) {
    constexpr bool kBf16 = decltype(bf16)::value;
    if (p.seqlen_q > 0) {
      const dim3 grid = make_grid(tiles::ceil_div(p.seqlen_q, 8), p.heads, p.batch, "attention backward");
      bwd_delta_kernel<kBf16><<<grid, 256, 0, s>>>(p);
      check_cuda(cudaGetLastError(), "backward delta kernel launch");
    }
    dispatch_head_dim<32, 64, 96, 128, 192, 256>(p.head_dim, [&](auto dim) {
      launch_bwd<decltype(dim)::value, kBf16>(p, aligned, s);
    });
  });
}

}  // namespace flashlm::attention
