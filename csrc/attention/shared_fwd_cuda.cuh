// The forward pass's per-tile steps, shared by both loop orders (attention_fwd_cuda.cu: FlashAttention-2,
// Q tiles outer; attention_fwd_v1_cuda.cu: FlashAttention-1, K/V tiles outer) and by the paged attention
// kernels (kvcache/paged_*_cuda.cu): tile configuration, scores in the log2 domain, masking, the online
// softmax and the final normalisation.
#pragma once

#include "shared_cuda.cuh"
#include "shared_softmax.h"

namespace flashlm::attention::cuda {

// kBlockM query rows x kBlockN keys per step, kWarps warps each owning kMT 16-row m-tiles (rows warp * 16 kMT
// ..). Choices (after flash-attn's for A100/H100, whose mma.sync kernels are what torch's flash backend runs):
//  * d <= 128: kBlockM = 128 with 4 warps of 2 m-tiles each. A warp reuses every K/V fragment it loads from
//    smem for two m-tiles: one m16n8k16 needs a 256-byte B fragment, and at 16 rows per warp the ldmatrix
//    traffic alone would cap the tensor cores well below their peak. O takes kDT x 2 x 4 f32 registers per
//    thread (128 at d = 128), S kNT x 2 x 4; 128 threads x 255 registers still fit 2 CTAs per SM.
//    kBlockN = 64 for d <= 96; 32 at d = 128, where 64 needs more than 255 registers (ptxas spills in the
//    main loop). Smem traffic per mma is the same for both (Q fragments are re-read per K tile either way);
//    the smaller tile only pays the per-tile barriers and softmax bookkeeping twice as often.
//  * d = 192, 256: 128 x 64 with 8 warps of one m-tile each (O at d = 256 is 32 x 4 = 128 f32 per thread).
// Shared memory: Q (kBlockM rows) + one K and one V tile (kBlockN rows each), rows padded by 16 bytes:
// 51 KiB at d = 128, 135 KiB at d = 256 (A100 allows 163 KiB, H100 227 KiB).
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_>
struct FwdConfig {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMT = kBlockM / (16 * kWarps);  // 16-row m-tiles per warp
  static constexpr int kNT = kBlockN / 8;              // 8-key n-blocks of S
  static constexpr int kDT = kHeadDim / 8;             // 8-column n-blocks of O
  static constexpr int kStride = kHeadDim + kPad;      // smem row stride, elements
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kBlockN) * kStride * 2;
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0 && kMT >= 1 && kBlockM == kMT * 16 * kWarps,
                "bad forward tile configuration");
};
template <int kHeadDim>
using FwdConfigFor = std::conditional_t<(kHeadDim <= 96), FwdConfig<kHeadDim, 128, 64, 4>,
                                        std::conditional_t<(kHeadDim <= 128), FwdConfig<kHeadDim, 128, 32, 4>,
                                                           FwdConfig<kHeadDim, 128, 64, 8>>>;

// How raw dot products x become log2-domain scores: t = log2(e) * scale * x, or with the softcap
// t = log2(e) * softcap * tanh(scale * x / softcap); then plus the ALiBi bias where alibi2 (the head's slope
// times log2 e) is not 0.
struct ScoreMap {
  float scale2, cap2, cap_in;
  bool softcap;
  float alibi2 = 0.f;
  __device__ __forceinline__ explicit ScoreMap(const Params& p)
      : scale2(p.scale * kLog2e),
        cap2(p.softcap * kLog2e),
        cap_in(p.softcap > 0.f ? p.scale / p.softcap : 0.f),
        softcap(p.softcap > 0.f) {}
  __device__ __forceinline__ ScoreMap(float scale, float cap)
      : scale2(scale * kLog2e), cap2(cap * kLog2e), cap_in(cap > 0.f ? scale / cap : 0.f), softcap(cap > 0.f) {}
};

template <int kMT, int kNT>
__device__ __forceinline__ void scores_log2(float (&s)[kMT][kNT][4], const ScoreMap& sm) {
  if (sm.softcap) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = sm.cap2 * tanhf(s[mt][nt][e] * sm.cap_in);
  } else {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= sm.scale2;
  }
}

// Adds the ALiBi bias (log2 domain) to a tile's scores; rows and columns as in mask_rows.
template <int kMT, int kNT>
__device__ __forceinline__ void add_alibi(float (&s)[kMT][kNT][4], float alibi2, const tiles::Band& band, int64_t row0,
                                          int64_t j0, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = row0 + mt * 16 + (lane >> 2) + 8 * h;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) s[mt][nt][2 * h + e] += alibi_log2(alibi2, band, i, j0 + nt * 8 + 2 * (lane & 3) + e);
    }
}

// Sets the scores a query does not see to -inf. row0: the query index of the warp's first row; j0: the key
// index of the tile's first column. Rows outside the sequence are masked entirely.
template <int kMT, int kNT>
__device__ __forceinline__ void mask_rows(float (&s)[kMT][kNT][4], const tiles::Band& band, int64_t row0, int64_t j0,
                                          int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const tiles::Cols c = tiles::key_cols(band, row0 + mt * 16 + (lane >> 2) + 8 * h, j0, kNT * 8);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nt * 8 + 2 * (lane & 3) + e;
          if (col < c.lo || col >= c.hi) s[mt][nt][2 * h + e] = -INFINITY;
        }
    }
}

// One online-softmax step: folds the tile's scores into the running max m (quad-uniform) and this lane's
// partial sum l, rescales O, and turns s into p = 2^(t - m). A row with no visible key so far keeps m = -inf
// and contributes nothing (the exponent base is 0 then, never -inf - -inf). The max is max.NaN: a NaN score
// makes m NaN for good, and with it every p and O of the row (shared_softmax.h). Once the running maxima
// settle, most tiles leave every row's max unchanged; the warp then skips the O rescale (a vote, 2 kDT kMT
// FMULs saved per lane).
template <int kMT, int kNT, int kDT>
__device__ __forceinline__ void online_softmax(float (&s)[kMT][kNT][4], float (&o)[kMT][kDT][4], float (&m)[kMT][2],
                                               float (&l)[kMT][2]) {
  float alpha[kMT][2];
  bool rescale = false;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m[mt][h];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = max_nan(mx, max_nan(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
      mx = quad_max(mx);
      const float base = softmax::base(mx);
      alpha[mt][h] = exp2_approx(m[mt][h] - base);
      rescale |= alpha[mt][h] != 1.f;
      m[mt][h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2_approx(s[mt][nt][2 * h + e] - base);
          s[mt][nt][2 * h + e] = pe;
          sum += pe;
        }
      l[mt][h] = l[mt][h] * alpha[mt][h] + sum;
    }
  if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][dt][e] *= alpha[mt][e >> 1];
  }
}

// The end of a row (shared_softmax.h): inv = 1 / rowsum and lse = ln(sum exp(s)) = (m + log2 l) ln 2, or 0 and
// +inf for a row that sees no key: `band` says which, for the rows of the warp from query row0 on. l is per
// lane on entry.
template <int kMT>
__device__ __forceinline__ void finish_rows(const float (&m)[kMT][2], const float (&l)[kMT][2], const tiles::Band& band,
                                            int64_t row0, int lane, float (&inv)[kMT][2], float (&lse)[kMT][2]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(l[mt][h]);
      const int64_t i = row0 + mt * 16 + (lane >> 2) + 8 * h;
      const bool seen = i < band.sq && band.first_key(i) < band.end_key(i);
      inv[mt][h] = softmax::out_scale(seen, sum);
      lse[mt][h] = softmax::row_lse(seen, m[mt][h], (m[mt][h] + log2f(sum)) * kLn2);
    }
}

// O += P V for a masked tile whose V holds an inf or NaN, key by key over the keys each row sees: the MMA
// would multiply a hidden key's p = 0 by it and poison rows that never see that key. p is rounded to the
// input type as acc_to_a rounds it for the MMA. Rare (it takes a non-finite V in a masked tile), so plain:
// each lane fetches every p of its rows from the lane of its quad that holds it. row0: the query index of
// the warp's first row; j0: the key index of the tile's first column; sV: the V tile in smem.
template <bool kBf16, int kMT, int kNT, int kDT, int kStride>
__device__ __forceinline__ void pv_visible(float (&o)[kMT][kDT][4], const float (&p)[kMT][kNT][4],
                                           const Elem<kBf16>* sV, const tiles::Band& band, int64_t row0, int64_t j0,
                                           int lane) {
  const uint16_t* v = reinterpret_cast<const uint16_t*>(sV);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const tiles::Cols c = tiles::key_cols(band, row0 + mt * 16 + (lane >> 2) + 8 * h, j0, kNT * 8);
#pragma unroll 1
      for (int j = 0; j < kNT * 8; ++j) {
        // Column j of the row is element j % 2 of n-block j / 8 in lane (j % 8) / 2 of the quad; the register
        // is picked with compile-time indices (a run-time index would put p in local memory).
        float mine = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) mine = nt * 8 + e == (j & ~7) + (j & 1) ? p[mt][nt][2 * h + e] : mine;
        const float pj = __shfl_sync(0xffffffffu, mine, (lane & ~3) | ((j & 7) >> 1));
        if (j < c.lo || j >= c.hi) continue;
        const float pr = round_to_elem<kBf16>(pj);
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int d = dt * 8 + 2 * (lane & 3);
          o[mt][dt][2 * h] += pr * to_f32<kBf16>(v[j * kStride + d]);
          o[mt][dt][2 * h + 1] += pr * to_f32<kBf16>(v[j * kStride + d + 1]);
        }
      }
    }
}

// Writes the rows' lse (lane 0 of each quad): row r of the tile at lse_row0[r], for r < rows.
template <int kMT>
__device__ __forceinline__ void store_lse(float* lse_row0, const float (&lse)[kMT][2], int row0, int rows, int lane) {
  if ((lane & 3) != 0) return;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + mt * 16 + (lane >> 2) + 8 * h;
      if (r < rows) lse_row0[r] = lse[mt][h];
    }
}

// The barrier between a tile's loads and its math (__syncthreads), at which a masked tile also learns whether
// its V tile holds an inf or NaN (each thread checks the chunks it copied, before the barrier): then only the
// rows that see a key may get its V row (softmax_pv).
template <class Cfg, bool kBf16>
__device__ __forceinline__ bool sync_and_check_v(bool masked, const Elem<kBf16>* sV) {
  if (!masked) {
    __syncthreads();
    return false;
  }
  return __syncthreads_or(own_chunks_nonfinite<Cfg::kBlockN, Cfg::kHeadDim, Cfg::kThreads, kBf16>(sV)) != 0;
}

// Dropout of a tile step's P (flash attention's forward; paged attention has none): the rows are those of head
// h of sequence b, drawn as shared_dropout.h says.
struct TileDropout {
  bool on = false;
  dropout::Rng rng;
  int b = 0, h = 0;
};

// p *= the dropout factor of each element, after the online softmax has summed it into l and before P V.
// row0: the query index of the warp's first row; j0: the tile's first key.
template <int kMT, int kNT>
__device__ __forceinline__ void apply_dropout(float (&p)[kMT][kNT][4], const TileDropout& drop, int64_t row0,
                                              int64_t j0, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + mt * 16 + (lane >> 2) + 8 * h;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // The lane's two columns of the n-block are one even and the next: words of one Philox call.
        const int64_t col = j0 + nt * 8 + 2 * (lane & 3);
        const dropout::Words w = dropout::group_words(drop.rng, drop.b, drop.h, row, col >> 2);
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (dropout::word(w, col + e) >= drop.rng.keep_below) p[mt][nt][2 * h + e] = 0.f;
          else p[mt][nt][2 * h + e] *= drop.rng.scale;
      }
    }
}

// The rest of a tile step once S = Q K^T is in s: log2-domain scores, the mask (masked tiles), the online
// softmax, dropout, and O += P V, element-wise for a masked tile whose V holds an inf or NaN (pv_visible). row0:
// the query index of the warp's first row; j0: the tile's first key; sV: the V tile in smem.
template <class Cfg, bool kBf16>
__device__ __forceinline__ void softmax_pv(float (&s)[Cfg::kMT][Cfg::kNT][4], float (&o)[Cfg::kMT][Cfg::kDT][4],
                                           float (&m)[Cfg::kMT][2], float (&l)[Cfg::kMT][2], const ScoreMap& score_map,
                                           const tiles::Band& band, bool masked, bool v_nonfinite,
                                           const Elem<kBf16>* sV, int64_t row0, int64_t j0, int lane,
                                           const TileDropout& drop = TileDropout{}) {
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT, kStride = Cfg::kStride;
  scores_log2(s, score_map);
  if (score_map.alibi2 != 0.f) add_alibi(s, score_map.alibi2, band, row0, j0, lane);
  if (masked) mask_rows(s, band, row0, j0, lane);
  online_softmax(s, o, m, l);
  if (drop.on) apply_dropout(s, drop, row0, j0, lane);
  if (v_nonfinite) {
    pv_visible<kBf16, kMT, kNT, kDT, kStride>(o, s, sV, band, row0, j0, lane);
  } else {
    uint32_t pa[kMT][kNT / 2][4];
    acc_to_a<kBf16>(pa, s);
    mma_pv<kBf16, kMT, kNT / 2, kDT, kStride>(o, pa, smem_addr(sV), lane);
  }
}

// One query tile of the FlashAttention-2 loop order (attention_fwd_cuda.cu, and the paged prefill of
// csrc/kvcache): the rows [i0, i0 + rows) of a sequence (row r of Q at q + r * q_row_stride, of out at out +
// r * o_row_stride, its lse at lse_row0[r] unless lse_row0 is null) against every K/V tile that any of them
// sees under `band`. The caller says where keys live: load_k(dst, j0) and load_v(dst, j0) issue, without a
// commit, the cp.async copies of the K or V tile whose first key is j0 into the smem tile dst, zero-filling
// rows past the sequence's end (load_tile does for a strided tensor). Pipeline, with one K and one V buffer:
// V(n) is loaded while S = Q K(n)^T is computed, and K(n + 1) while the softmax and O += P V(n) run, so a
// load is always in flight behind the math. drop: the rows' dropout (none by default).
template <class Cfg, bool kBf16, class LoadK, class LoadV>
__device__ __forceinline__ void forward_q_tile(unsigned char* smem, const Elem<kBf16>* q, int64_t q_row_stride,
                                               Elem<kBf16>* out, int64_t o_row_stride, float* lse_row0,
                                               const tiles::Band& band, int64_t i0, int rows, int d,
                                               const ScoreMap& score_map, bool aligned, LoadK&& load_k,
                                               LoadV&& load_v, const TileDropout& drop = TileDropout{}) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT;
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const tiles::Range n_tiles = tiles::tile_range(band.keys(i0, i0 + rows), kBlockN);

  float o[kMT][kDT][4];
  float m[kMT][2], l[kMT][2];
  zero(o);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  const int row0 = warp * kMT * 16;  // the warp's first row in the tile
  const uint32_t q_base = smem_addr(sQ + row0 * kStride), k_base = smem_addr(sK);

  if (n_tiles.begin < n_tiles.end) {
    load_tile<kBlockM, Cfg::kHeadDim, Cfg::kThreads>(sQ, q, q_row_stride, rows, d, aligned, q);
    load_k(sK, n_tiles.begin * kBlockN);
    cp_async_commit();
  }
  for (int64_t n = n_tiles.begin; n < n_tiles.end; ++n) {
    const int64_t j0 = n * kBlockN;
    cp_async_wait<0>();  // Q and K(n) have landed
    __syncthreads();     // ... for every thread, and every warp is done with V(n - 1)
    load_v(sV, j0);
    cp_async_commit();

    float s[kMT][kNT][4];
    zero(s);
    mma_abt<kBf16, kMT, kNT, Cfg::kHeadDim, kStride, kStride>(s, q_base, k_base, lane);

    cp_async_wait<0>();  // V(n) has landed
    const bool masked = !band.tile_full(i0, i0 + rows, j0, j0 + kBlockN);
    const bool v_nonfinite = sync_and_check_v<Cfg, kBf16>(masked, sV);  // ... for every thread, and every warp
                                                                        // is done with K(n)
    if (n + 1 < n_tiles.end) {
      load_k(sK, j0 + kBlockN);
      cp_async_commit();
    }
    softmax_pv<Cfg, kBf16>(s, o, m, l, score_map, band, masked, v_nonfinite, sV, i0 + row0, j0, lane, drop);
  }

  float inv[kMT][2], lse[kMT][2];
  finish_rows(m, l, band, i0 + row0, lane, inv, lse);
  store_acc<kBf16>(out, o_row_stride, o, inv, row0, 0, rows, d, aligned, lane);
  if (lse_row0 != nullptr) store_lse(lse_row0, lse, row0, rows, lane);
}

// FlashAttention-1 loop order (attention_fwd_v1_cuda.cu), called by forward_cuda for p.version == 1.
void forward_v1_cuda(const Params& p, bool aligned, cudaStream_t stream);

}  // namespace flashlm::attention::cuda
