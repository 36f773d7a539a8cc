// CPU feature detection (cpuid + the OS's saved register state) and the run-time choice of kernel ISA,
// so one build runs on any x86-64: AVX2 kernels where the CPU and OS support AVX2+FMA+F16C, scalar
// kernels elsewhere. FLASHLM_CPU_ISA=scalar|avx2 (or set_cpu_isa) overrides the choice.
#pragma once

#include "flashlm/core/export.h"

namespace flashlm {

struct CpuFeatures {
  bool sse42 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512_vnni = false, avx_vnni = false;
  // AMD (or Hygon) cores, whose FMA units take subnormal operands at full speed; Intel's need a microcode
  // assist for some of them, so kernels that feed the FMA subnormals run only here.
  bool amd = false;
};

enum class CpuIsa : int { Scalar = 0, AVX2 = 1 };

FLASHLM_API const CpuFeatures& cpu_features();
FLASHLM_API bool cpu_isa_supported(CpuIsa isa);
FLASHLM_API CpuIsa cpu_isa();             // the ISA kernels dispatch to now
FLASHLM_API void set_cpu_isa(CpuIsa isa);  // throws ValueError if this CPU lacks it
FLASHLM_API const char* cpu_isa_name(CpuIsa isa);

}  // namespace flashlm
