#include "flashlm/core/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "flashlm/core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FLASHLM_X86 1
#endif

namespace flashlm {
namespace {

#ifdef FLASHLM_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef FLASHLM_X86
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    // The vendor string is in ebx, edx, ecx: "Auth" "enti" "cAMD" (Hygon: "Hygo" "nGen" "uine").
    f.amd = (b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u) ||
            (b == 0x6f677948u && d == 0x6e65476eu && c == 0x656e6975u);
  }
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.sse42 = c & bit_SSE4_2;
  bool osxsave = c & bit_OSXSAVE;
  // The CPU having AVX is not enough: the OS must save the YMM (and for AVX-512, ZMM/opmask) state.
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xE6) == 0xE6;
  f.avx = (c & bit_AVX) && ymm;
  f.fma = (c & bit_FMA) && ymm;
  f.f16c = (c & bit_F16C) && ymm;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = (b & bit_AVX2) && ymm;
    f.avx512f = (b & bit_AVX512F) && zmm;
    f.avx512bw = (b & bit_AVX512BW) && zmm;
    f.avx512_vnni = (c & (1u << 11)) && zmm;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx_vnni = (a & (1u << 4)) && ymm;
#endif
  return f;
}

CpuIsa best_isa() {
  const char* env = std::getenv("FLASHLM_CPU_ISA");
  if (env && *env) {
    if (!std::strcmp(env, "scalar")) return CpuIsa::Scalar;
    if (!std::strcmp(env, "avx2")) {
      FLASHLM_CHECK(cpu_isa_supported(CpuIsa::AVX2), "FLASHLM_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
      return CpuIsa::AVX2;
    }
    throw ValueError(std::string("FLASHLM_CPU_ISA must be 'scalar' or 'avx2', got '") + env + "'");
  }
  return cpu_isa_supported(CpuIsa::AVX2) ? CpuIsa::AVX2 : CpuIsa::Scalar;
}

std::atomic<int> g_isa{-1};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool cpu_isa_supported(CpuIsa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case CpuIsa::Scalar: return true;
#ifdef FLASHLM_HAVE_AVX2_KERNELS
    case CpuIsa::AVX2: return f.avx2 && f.fma && f.f16c;
#endif
    default: return false;
  }
}

CpuIsa cpu_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    g_isa.store(isa);
  }
  return static_cast<CpuIsa>(isa);
}

void set_cpu_isa(CpuIsa isa) {
  FLASHLM_CHECK(cpu_isa_supported(isa), "set_cpu_isa: ", cpu_isa_name(isa), " is not supported on this CPU/build");
  g_isa.store(static_cast<int>(isa));
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return "scalar";
    case CpuIsa::AVX2: return "avx2";
  }
  return "unknown";
}

}  // namespace flashlm
