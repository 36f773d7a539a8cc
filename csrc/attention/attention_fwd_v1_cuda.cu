// FlashAttention-1 loop order on CUDA, kept to compare loop orders with attention_fwd_cuda.cu (it is slower
// by design). Reference: forward_scalar with p.version == 1 (attention_scalar.cpp).
//
// Grid: (head, sequence), as in the FA1 paper. A CTA walks the K/V tiles (outer loop); for each, it walks the
// query tiles that see any of its keys (inner loop), and every query tile's running max m, sum l and
// unnormalised f32 output are read from and written back to global scratch (B * H * Sq rows of D + 2 floats,
// stream-ordered cudaMallocAsync) around the tile step. A last pass normalises the scratch into out and lse.
// The tile step itself (S = Q K^T, mask, online softmax, O += P V on mma.sync) is the one of the v2 kernel,
// with the same tile shapes.
//
// Scratch row layout: o[0, D), m, l (D = head_dim). A lane keeps exactly the o elements of its own fragments,
// so it re-reads only what it wrote; m and l are written by lane 0 of each row's quad (l summed over the quad)
// and re-read by the whole quad after the __syncthreads that separate tile steps; on re-read only lane 0 takes
// l, so that the quad's partial sums still add up to l.
#include "shared_fwd_cuda.cuh"

namespace flashlm::attention::cuda {
namespace {

template <class Cfg, bool kBf16>
__global__ void __launch_bounds__(Cfg::kThreads) flash_fwd_v1_kernel(const Params p, bool aligned, float* scratch) {
  using T = Elem<kBf16>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kDT = Cfg::kDT;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kStride;
  T* sV = sK + kBlockN * kStride;

  const int head = blockIdx.x, b = blockIdx.y;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const tiles::SeqRows seq = sequence_rows(p, b);
  const tiles::Band band = band_of(p, seq);
  const int kvh = head / (p.heads / p.kv_heads);
  const int d = p.head_dim, row0 = warp * kMT * 16;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + seq.q0 * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + seq.k0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + seq.k0 * p.v_row_stride + kvh * p.v_head_stride;
  float* state = scratch + (int64_t(b) * p.heads + head) * p.seqlen_q * (d + 2);  // row i at state + i (d + 2)
  const uint32_t q_base = smem_addr(sQ + row0 * kStride), k_base = smem_addr(sK);
  ScoreMap score_map(p);
  score_map.alibi2 = alibi_slope2(p, b, head);
  const TileDropout drop{p.dropout_p > 0.f, p.rng, b, head};

  for (int64_t j0 = 0; j0 < seq.sk; j0 += kBlockN) {
    const int keys = int(tiles::min64(seq.sk - j0, kBlockN));
    const tiles::Range m_tiles = tiles::tile_range(band.queries(j0, j0 + keys), kBlockM);
    if (m_tiles.begin >= m_tiles.end) continue;
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(sK, k + j0 * p.k_row_stride, p.k_row_stride, keys, d, aligned,
                                                     static_cast<const T*>(p.k));
    load_tile<kBlockN, Cfg::kHeadDim, Cfg::kThreads>(sV, v + j0 * p.v_row_stride, p.v_row_stride, keys, d, aligned,
                                                     static_cast<const T*>(p.v));
    for (int64_t mb = m_tiles.begin; mb < m_tiles.end; ++mb) {
      const int64_t i0 = mb * kBlockM;
      const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
      load_tile<kBlockM, Cfg::kHeadDim, Cfg::kThreads>(sQ, q + i0 * p.q_row_stride, p.q_row_stride, rows, d, aligned,
                                                       static_cast<const T*>(p.q));
      cp_async_commit();
      cp_async_wait<0>();
      const bool masked = !band.tile_full(i0, i0 + rows, j0, j0 + kBlockN);
      const bool v_nonfinite = sync_and_check_v<Cfg, kBf16>(masked, sV);

      // The query tile's state: fresh on its first K/V tile, else from scratch.
      const bool first = tiles::tile_range(band.keys(i0, i0 + rows), kBlockN).begin * kBlockN == j0;
      float o[kMT][kDT][4], m[kMT][2], l[kMT][2];
      zero(o);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m[mt][h] = -INFINITY, l[mt][h] = 0.f;
          const int r = row0 + mt * 16 + (lane >> 2) + 8 * h;
          if (first || r >= rows) continue;
          const float* row = state + (i0 + r) * (d + 2);
          m[mt][h] = row[d];
          l[mt][h] = (lane & 3) == 0 ? row[d + 1] : 0.f;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const int c = dt * 8 + 2 * (lane & 3);
            if (c < d) {
              const float2 x = *reinterpret_cast<const float2*>(row + c);
              o[mt][dt][2 * h] = x.x, o[mt][dt][2 * h + 1] = x.y;
            }
          }
        }

      float s[kMT][kNT][4];
      zero(s);
      mma_abt<kBf16, kMT, kNT, Cfg::kHeadDim, kStride, kStride>(s, q_base, k_base, lane);
      softmax_pv<Cfg, kBf16>(s, o, m, l, score_map, band, masked, v_nonfinite, sV, i0 + row0, j0, lane, drop);

#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float l_row = quad_sum(l[mt][h]);
          const int r = row0 + mt * 16 + (lane >> 2) + 8 * h;
          if (r >= rows) continue;
          float* row = state + (i0 + r) * (d + 2);
          if ((lane & 3) == 0) row[d] = m[mt][h], row[d + 1] = l_row;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const int c = dt * 8 + 2 * (lane & 3);
            if (c < d) *reinterpret_cast<float2*>(row + c) = make_float2(o[mt][dt][2 * h], o[mt][dt][2 * h + 1]);
          }
        }
      __syncthreads();  // sQ (and, after the last query tile, sK and sV) are reloaded next
    }
  }
  __syncthreads();  // the quads' m and l are visible to all their lanes

  // Normalise: out = o / l, lse = m + ln(l); rows that see no key get 0 and +inf (finish_rows).
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + seq.q0 * p.o_row_stride + head * p.o_head_stride;
  float* lse_base = p.lse + b * p.lse_batch_stride + head * p.lse_head_stride + seq.q0;
  for (int64_t i0 = 0; i0 < seq.sq; i0 += kBlockM) {
    const int rows = int(tiles::min64(seq.sq - i0, kBlockM));
    const tiles::Range n_tiles = tiles::tile_range(band.keys(i0, i0 + rows), kBlockN);
    const bool seen = n_tiles.begin < n_tiles.end;
    float o[kMT][kDT][4], m[kMT][2], l[kMT][2];
    zero(o);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m[mt][h] = -INFINITY, l[mt][h] = 0.f;
        const int r = row0 + mt * 16 + (lane >> 2) + 8 * h;
        if (!seen || r >= rows) continue;
        const float* row = state + (i0 + r) * (d + 2);
        m[mt][h] = row[d];
        l[mt][h] = (lane & 3) == 0 ? row[d + 1] : 0.f;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int c = dt * 8 + 2 * (lane & 3);
          if (c < d) {
            const float2 x = *reinterpret_cast<const float2*>(row + c);
            o[mt][dt][2 * h] = x.x, o[mt][dt][2 * h + 1] = x.y;
          }
        }
      }
    float inv[kMT][2], lse[kMT][2];
    finish_rows(m, l, band, i0 + row0, lane, inv, lse);
    store_acc<kBf16>(out + i0 * p.o_row_stride, p.o_row_stride, o, inv, row0, 0, rows, d, aligned, lane);
    store_lse(lse_base + i0, lse, row0, rows, lane);
  }
}

template <class Cfg, bool kBf16>
void launch_fwd_v1(const Params& p, bool aligned, cudaStream_t stream) {
  auto kernel = flash_fwd_v1_kernel<Cfg, kBf16>;
  set_smem(kernel, Cfg::kSmemBytes);
  const dim3 grid = make_grid(p.heads, p.batch, 1, "attention forward (v1)");
  const size_t scratch_bytes = size_t(p.batch) * p.heads * p.seqlen_q * (p.head_dim + 2) * sizeof(float);
  void* scratch = nullptr;
  check_cuda(cudaMallocAsync(&scratch, scratch_bytes, stream), "cudaMallocAsync (v1 scratch)");
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, aligned, static_cast<float*>(scratch));
  const cudaError_t launch = cudaGetLastError();
  check_cuda(cudaFreeAsync(scratch, stream), "cudaFreeAsync (v1 scratch)");
  check_cuda(launch, "forward (v1) kernel launch");
}

}  // namespace

// Head dims 64, 128 and 256 only (others run on the next one up): this path exists for comparison, and
// fewer instantiations keep the build short.
void forward_v1_cuda(const Params& p, bool aligned, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto bf16) {
    dispatch_head_dim<64, 128, 256>(p.head_dim, [&](auto dim) {
      launch_fwd_v1<FwdConfigFor<decltype(dim)::value>, decltype(bf16)::value>(p, aligned, stream);
    });
  });
}

}  // namespace flashlm::attention::cuda
