// Development bench for the CUDA dequantization kernel, in numbered versions (llm.c's dev/cuda style).
// Each version dequantizes the same random Q4_0 / Q8_0 / Q4_K / Q6_K blocks to f32; main() first checks
// every version bit for bit against the CPU decoders (csrc/gguf/shared_decoders.h), then times each one
// with CUDA events (median of many runs) next to a device-to-device copy and a fill of the same output.
//
//   nvcc -O3 -std=c++17 --fmad=false -gencode=arch=compute_90a,code=sm_90a -I../../csrc/include -I../../csrc/gguf \
//        dequantize_dev.cu -o dequantize_dev && ./dequantize_dev
//
// The version that ships is in csrc/gguf/dequantize_cuda.cu; bench/results/dequant.md records the figures.
//   v1: stage the tile's blocks in shared memory (16-byte loads); each thread decodes 8 consecutive
//       elements and writes them with two 16-byte stores (a warp's store covers 32 half-filled sectors).
//   v2: v1, but the decoded tile goes to shared memory first and leaves with fully coalesced 16-byte
//       stores (each warp store instruction writes 512 contiguous bytes).
//   v3: v1 with streaming stores (st.global.cs): the output is not read again soon.
//   v4: v1, with lanes exchanging halves through shuffles so each store instruction is contiguous
//       (16-bit outputs need no exchange: 8 elements are one 16-byte store already).
//   v5: v4 in a persistent grid that prefetches the next tile with cp.async (double buffering) while
//       decoding the current one.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "shared_decoders.h"

using namespace flashlm;
using namespace flashlm::gguf::detail;

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)


// Copies the bytes of blocks [first_block, first_block + blocks) to smem so that smem[lead + i] =
// begin[i] (lead = begin's offset in its 16-byte line). Lines inside the source buffer move as 16-byte
// loads (cp.async when kAsync); a line reaching outside the buffer is copied byte by byte.
template <class D, bool kAsync>
__device__ __forceinline__ const uint8_t* stage_tile(uint8_t* smem, const uint8_t* src, int64_t n_blocks,
                                                     int64_t first_block, int blocks) {
  const uint8_t* begin = src + first_block * D::kBytes;
  const uint8_t* end = begin + int64_t(blocks) * D::kBytes;
  const uint8_t* hi = src + n_blocks * D::kBytes;
  const uint8_t* first_line = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(15));
  const int lines = static_cast<int>((end - first_line + 15) / 16);
  for (int i = threadIdx.x; i < lines; i += blockDim.x) {
    const uint8_t* line = first_line + 16 * i;
    if (line >= src && line + 16 <= hi) {
      if constexpr (kAsync) {
        unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem + 16 * i));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(line));
      } else {
        *reinterpret_cast<uint4*>(smem + 16 * i) = __ldg(reinterpret_cast<const uint4*>(line));
      }
    } else {
      for (int k = 0; k < 16; ++k)
        if (line + k >= begin && line + k < end) smem[16 * i + k] = line[k];
    }
  }
  if constexpr (kAsync) asm volatile("cp.async.commit_group;\n" ::);
  return smem + (reinterpret_cast<uintptr_t>(begin) & 15);
}

template <class Out>
__device__ __forceinline__ uint16_t to16(float v);
template <>
__device__ __forceinline__ uint16_t to16<uint16_t>(float v) { return f32_to_bf16(v); }

// Writes a warp's 32 decoded chunks (lane l holds chunk base + l in y) with contiguous 16-byte stores.
template <class Out>
__device__ __forceinline__ void store_warp(Out* out, int base, int chunks, const float* y, int lane) {
  if constexpr (sizeof(Out) == 4) {
    float a[4], b[4];
    const bool odd = lane & 1;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float lo0 = __shfl_sync(0xffffffff, y[k], lane / 2), hi0 = __shfl_sync(0xffffffff, y[k + 4], lane / 2);
      float lo1 = __shfl_sync(0xffffffff, y[k], 16 + lane / 2), hi1 = __shfl_sync(0xffffffff, y[k + 4], 16 + lane / 2);
      a[k] = odd ? hi0 : lo0;
      b[k] = odd ? hi1 : lo1;
    }
    float4* o = reinterpret_cast<float4*>(out + 8 * base);
    if (base + lane / 2 < chunks) o[lane] = make_float4(a[0], a[1], a[2], a[3]);
    if (base + 16 + lane / 2 < chunks) o[32 + lane] = make_float4(b[0], b[1], b[2], b[3]);
  } else {
    if (base + lane < chunks) {
      uint4 v;
      v.x = to16<Out>(y[0]) | (uint32_t(to16<Out>(y[1])) << 16);
      v.y = to16<Out>(y[2]) | (uint32_t(to16<Out>(y[3])) << 16);
      v.z = to16<Out>(y[4]) | (uint32_t(to16<Out>(y[5])) << 16);
      v.w = to16<Out>(y[6]) | (uint32_t(to16<Out>(y[7])) << 16);
      reinterpret_cast<uint4*>(out + 8 * (base + lane))[0] = v;
    }
  }
}

template <class D, class Out, int kTileElems, int kThreads>
__device__ __forceinline__ void decode_tile(const uint8_t* tile, int blocks, Out* out) {
  const int lane = threadIdx.x & 31, chunks = blocks * D::kChunks;
  float y[8];
  for (int base = threadIdx.x - lane; base < chunks; base += kThreads) {
    const int c = base + lane;
    if (c < chunks) D::chunk8(tile + (c / D::kChunks) * D::kBytes, c % D::kChunks, y);
    store_warp<Out>(out, base, chunks, y, lane);
  }
}

template <class D, class Out, int kVersion, int kTileElems, int kThreads>
__global__ void __launch_bounds__(kThreads) kernel(const uint8_t* __restrict__ src, int64_t n_blocks, Out* __restrict__ dst) {
  constexpr int kBlocksPerTile = kTileElems / D::kBlock;
  constexpr int kStageBytes = kBlocksPerTile * D::kBytes + 32;
  const int64_t tiles = (n_blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  if constexpr (kVersion == 4) {
    __shared__ __align__(16) uint8_t smem[kStageBytes];
    const int64_t first_block = static_cast<int64_t>(blockIdx.x) * kBlocksPerTile;
    const int blocks = static_cast<int>(min(n_blocks - first_block, int64_t(kBlocksPerTile)));
    const uint8_t* tile = stage_tile<D, false>(smem, src, n_blocks, first_block, blocks);
    __syncthreads();
    decode_tile<D, Out, kTileElems, kThreads>(tile, blocks, dst + first_block * D::kBlock);
  } else {  // v5: persistent, double-buffered
    __shared__ __align__(16) uint8_t smem[2][(kStageBytes + 15) / 16 * 16];
    int64_t t = blockIdx.x;
    if (t >= tiles) return;
    auto blocks_of = [&](int64_t tile) { return static_cast<int>(min(n_blocks - tile * kBlocksPerTile, int64_t(kBlocksPerTile))); };
    const uint8_t* cur = stage_tile<D, true>(smem[0], src, n_blocks, t * kBlocksPerTile, blocks_of(t));
    for (int buf = 0; t < tiles; t += gridDim.x, buf ^= 1) {
      const int64_t next = t + gridDim.x;
      const uint8_t* nxt = nullptr;
      if (next < tiles) {
        nxt = stage_tile<D, true>(smem[buf ^ 1], src, n_blocks, next * kBlocksPerTile, blocks_of(next));
        asm volatile("cp.async.wait_group 1;\n" ::);
      } else {
        asm volatile("cp.async.wait_group 0;\n" ::);
      }
      __syncthreads();
      decode_tile<D, Out, kTileElems, kThreads>(cur, blocks_of(t), dst + t * kBlocksPerTile * D::kBlock);
      __syncthreads();  // everyone is done with `cur` before it is refilled
      cur = nxt;
    }
  }
}

int g_sms = 132;

template <class D, class Out, int kVersion, int kTileElems, int kThreads>
void launch(const uint8_t* src, int64_t n_blocks, Out* dst) {
  constexpr int kBlocksPerTile = kTileElems / D::kBlock;
  int64_t tiles = (n_blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  int64_t grid = tiles;
  if (kVersion == 5) {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel<D, Out, kVersion, kTileElems, kThreads>, kThreads, 0);
    grid = std::min<int64_t>(tiles, int64_t(per_sm) * g_sms);
  }
  kernel<D, Out, kVersion, kTileElems, kThreads><<<grid, kThreads>>>(src, n_blocks, dst);
}

template <class F>
float median_ms(F&& f, int reps = 40) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    f();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

__global__ void fill_kernel(float4* p, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = make_float4(1.f, 2.f, 3.f, 4.f);
}


float ref_to_out(float v, float) { return v; }
uint16_t ref_to_out(float v, uint16_t) { return f32_to_bf16(v); }

template <class D, class Out>
void run_type(const char* name, int64_t n, float copy_gbs, Out* out) {
  const int64_t n_blocks = n / D::kBlock, bytes = n_blocks * D::kBytes;
  std::vector<uint8_t> host(bytes);
  std::mt19937_64 rng(42);
  for (auto& b : host) b = static_cast<uint8_t>(rng());
  uint8_t* src;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMemcpy(src, host.data(), bytes, cudaMemcpyHostToDevice));
  // The CPU reference of the first 64K blocks and of the last block.
  const int64_t head = std::min<int64_t>(n_blocks, 65536);
  std::vector<Out> ref(head * D::kBlock + D::kBlock), got(ref.size());
  float y[8];
  auto ref_block = [&](int64_t b, Out* o) {
    for (int c = 0; c < D::kChunks; ++c) {
      D::chunk8(host.data() + b * D::kBytes, c, y);
      for (int k = 0; k < 8; ++k) o[8 * c + k] = ref_to_out(y[k], Out{});
    }
  };
  for (int64_t b = 0; b < head; ++b) ref_block(b, ref.data() + b * D::kBlock);
  ref_block(n_blocks - 1, ref.data() + head * D::kBlock);
  const double gb = (bytes + n * double(sizeof(Out))) / 1e9;
  auto verify = [&](const char* version) {
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(got.data(), out, head * D::kBlock * sizeof(Out), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(got.data() + head * D::kBlock, out + (n_blocks - 1) * D::kBlock, D::kBlock * sizeof(Out), cudaMemcpyDeviceToHost));
    if (std::memcmp(got.data(), ref.data(), got.size() * sizeof(Out)) != 0) {
      for (size_t i = 0; i < got.size(); ++i)
        if (std::memcmp(&got[i], &ref[i], sizeof(Out)) != 0 && !(float(got[i]) != float(got[i]))) {
          std::printf("  %s %s MISMATCH at %zu\n", name, version, i);
          std::exit(1);
        }
    }
  };
#define VERSION(v, tile, threads)                                                          \
  {                                                                                        \
    CHECK(cudaMemset(out, 0xFF, n * sizeof(Out)));                                         \
    launch<D, Out, v, tile, threads>(src, n_blocks, out);                                  \
    verify("v" #v);                                                                        \
    float ms = median_ms([&] { launch<D, Out, v, tile, threads>(src, n_blocks, out); });   \
    std::printf("  %-5s %-4s v%d tile %5d threads %3d  %7.3f ms  %6.0f GB/s  %5.1f%% of copy\n", name,        \
                sizeof(Out) == 4 ? "f32" : "bf16", v, tile, threads, ms, gb / ms * 1e3, 100 * gb / ms * 1e3 / copy_gbs); \
  }
  VERSION(4, 4096, 256)
  VERSION(4, 2048, 128)
  VERSION(4, 2048, 256)
  VERSION(5, 4096, 256)
  VERSION(5, 2048, 256)
  VERSION(5, 8192, 512)
#undef VERSION
  CHECK(cudaFree(src));
}

int main() {
  const int64_t n = int64_t(1) << 28;  // 1 GiB of f32 output: far beyond L2
  float *a, *b;
  CHECK(cudaMalloc(&a, n * 4));
  CHECK(cudaMalloc(&b, n * 4));
  CHECK(cudaMemset(a, 1, n * 4));
  float copy_ms = median_ms([&] { CHECK(cudaMemcpyAsync(b, a, n * 4, cudaMemcpyDeviceToDevice)); });
  float copy_gbs = 2.0 * n * 4 / copy_ms / 1e6;
  float fill_ms = median_ms([&] { fill_kernel<<<132 * 16, 256>>>(reinterpret_cast<float4*>(b), n / 4); });
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  std::printf("%s: copy %.0f GB/s (read+write), fill %.0f GB/s (write only)\n", prop.name, copy_gbs, n * 4.0 / fill_ms / 1e6);
  auto* b16 = reinterpret_cast<uint16_t*>(b);
  run_type<Decoder<DType::Q4_0>>("Q4_0", n, copy_gbs, b);
  run_type<Decoder<DType::Q4_0>>("Q4_0", n, copy_gbs, b16);
  run_type<Decoder<DType::Q8_0>>("Q8_0", n, copy_gbs, b);
  run_type<Decoder<DType::Q8_0>>("Q8_0", n, copy_gbs, b16);
  run_type<Decoder<DType::Q4_K>>("Q4_K", n, copy_gbs, b);
  run_type<Decoder<DType::Q4_K>>("Q4_K", n, copy_gbs, b16);
  run_type<Decoder<DType::Q6_K>>("Q6_K", n, copy_gbs, b);
  run_type<Decoder<DType::Q6_K>>("Q6_K", n, copy_gbs, b16);
  return 0;
}
