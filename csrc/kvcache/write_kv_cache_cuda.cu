// CUDA write of new tokens' K and V into the paged caches: token t's rows of key/value [num_tokens, kv_heads,
// head_dim] go to slot slot_mapping[t] (block * block_size + offset) of k_cache/v_cache [num_blocks,
// block_size, kv_heads, head_dim]. A slot of -1 skips the token; so does any slot outside the cache, since a
// kernel cannot raise (the CPU path does). The copy is dtype-blind: 16-byte units when every pointer and
// stride allows it, else one element at a time.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../core/cuda_guard.h"
#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"
#include "paged_kernels.h"
#include "paged_tiles.h"

namespace flashlm::kvcache {
namespace {

constexpr int kThreads = 128;

// The write, in units of `Unit` (uint4: 16 bytes; else one element). Strides and head_units count units.
struct UnitParams {
  int64_t num_blocks;
  int block_size, kv_heads, head_units;
  const int64_t* slot_mapping;
  const void* key;
  const void* value;
  void* k_cache;
  void* v_cache;
  int64_t key_row, key_head, value_row, value_head;
  int64_t kc_block, kc_row, kc_head, vc_block, vc_row, vc_head;
};

// blockIdx.x: the token; blockIdx.y * kThreads + threadIdx.x: the unit within the token's kv_heads rows.
template <class Unit>
__global__ void __launch_bounds__(kThreads) write_kv_cache_kernel(const UnitParams p) {
  const int64_t t = blockIdx.x;
  const int j = int(blockIdx.y) * kThreads + int(threadIdx.x);
  if (j >= p.kv_heads * p.head_units) return;
  tiles::Slot slot;
  if (!tiles::slot_from_mapping(p.slot_mapping[t], p.num_blocks, p.block_size, slot)) return;
  const int h = j / p.head_units, u = j - h * p.head_units;
  const Unit* key = static_cast<const Unit*>(p.key);
  const Unit* value = static_cast<const Unit*>(p.value);
  Unit* kc = static_cast<Unit*>(p.k_cache);
  Unit* vc = static_cast<Unit*>(p.v_cache);
  kc[slot.block * p.kc_block + slot.offset * p.kc_row + h * p.kc_head + u] = key[t * p.key_row + h * p.key_head + u];
  vc[slot.block * p.vc_block + slot.offset * p.vc_row + h * p.vc_head + u] =
      value[t * p.value_row + h * p.value_head + u];
}

// True when ptr and every stride (in bytes) are multiples of `unit`.
bool divides(int64_t unit, const void* ptr, std::initializer_list<int64_t> byte_strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % uint64_t(unit) != 0) return false;
  for (int64_t s : byte_strides)
    if (s % unit != 0) return false;
  return true;
}

template <class Unit>
void launch(const WriteParams& p, int64_t esize, cudaStream_t stream) {
  const int64_t u = int64_t(sizeof(Unit)) / esize;  // elements per unit
  UnitParams q;
  q.num_blocks = p.num_blocks;
  q.block_size = p.block_size;
  q.kv_heads = p.kv_heads;
  q.head_units = int(p.head_dim / u);
  q.slot_mapping = p.slot_mapping;
  q.key = p.key;
  q.value = p.value;
  q.k_cache = p.k_cache;
  q.v_cache = p.v_cache;
  q.key_row = p.key_row_stride / u, q.key_head = p.key_head_stride / u;
  q.value_row = p.value_row_stride / u, q.value_head = p.value_head_stride / u;
  q.kc_block = p.kc_block_stride / u, q.kc_row = p.kc_row_stride / u, q.kc_head = p.kc_head_stride / u;
  q.vc_block = p.vc_block_stride / u, q.vc_row = p.vc_row_stride / u, q.vc_head = p.vc_head_stride / u;
  const int64_t units = int64_t(p.kv_heads) * q.head_units;
  const int64_t blocks_y = tiles::ceil_div(units, kThreads);
  FLASHLM_CHECK(p.num_tokens <= 0x7fffffff && blocks_y <= 65535 && units <= 0x7fffffff,
                "write_kv_cache: ", p.num_tokens, " tokens of ", units, " units exceed the CUDA grid limits");
  write_kv_cache_kernel<Unit><<<dim3(unsigned(p.num_tokens), unsigned(blocks_y)), kThreads, 0, stream>>>(q);
  throw_on_cuda_error(cudaGetLastError(), "write_kv_cache: kernel launch");
}

}  // namespace

void write_kv_cache_cuda(const WriteParams& p, int device, void* stream) {
  if (p.num_tokens <= 0 || p.kv_heads <= 0 || p.head_dim <= 0) return;
  CudaDeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t esize = dtype_info(p.dtype).block_bytes;
  FLASHLM_CHECK(dtype_info(p.dtype).block_size == 1 && (esize == 2 || esize == 4),
                "write_kv_cache: CUDA takes 2- or 4-byte element types, not ", dtype_name(p.dtype));
  const bool vec = int64_t(p.head_dim) * esize % 16 == 0 &&
                   divides(16, p.key, {p.key_row_stride * esize, p.key_head_stride * esize}) &&
                   divides(16, p.value, {p.value_row_stride * esize, p.value_head_stride * esize}) &&
                   divides(16, p.k_cache,
                           {p.kc_block_stride * esize, p.kc_row_stride * esize, p.kc_head_stride * esize}) &&
                   divides(16, p.v_cache,
                           {p.vc_block_stride * esize, p.vc_row_stride * esize, p.vc_head_stride * esize});
  if (vec) launch<uint4>(p, esize, s);
  else if (esize == 2) launch<uint16_t>(p, esize, s);
  else launch<uint32_t>(p, esize, s);
}

}  // namespace flashlm::kvcache
