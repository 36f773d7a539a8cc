#include "flashlm/core/build_info.h"

namespace flashlm {

const BuildInfo& build_info() {
  static const BuildInfo info = [] {
    BuildInfo b;
    b.version = FLASHLM_VERSION;
#if defined(__clang__)
    b.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    b.compiler = "gcc " __VERSION__;
#else
    b.compiler = "unknown";
#endif
#ifdef FLASHLM_WITH_CUDA
    b.cuda = true;
    b.cuda_archs = FLASHLM_CUDA_ARCHS;
    b.cuda_version = FLASHLM_CUDA_VERSION;
#endif
#ifdef FLASHLM_WITH_NCCL
    b.nccl = true;
#endif
    return b;
  }();
  return info;
}

}  // namespace flashlm
