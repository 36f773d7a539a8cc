// The one rule of flashlm's AVX2 code, and the macro that keeps it.
//
// AVX2 kernels live in sources compiled with -mavx2 -mfma -mf16c (csrc/CMakeLists.txt, `_avx2_sources`) and
// run only after a run-time CPU check, so one build runs on any x86-64. An inline function with external
// linkage compiled with those flags could be the copy the linker keeps for callers on CPUs without AVX2.
// So AVX2 headers put everything in an anonymous namespace, force it inline, and instantiate no template of
// a standard header (std::min, std::vector).
#pragma once

#define FLASHLM_AVX2_INLINE __attribute__((always_inline)) inline
