// How this libflashlm was built.
#pragma once

#include <string>

#include "flashlm/core/export.h"

namespace flashlm {

struct BuildInfo {
  std::string version;
  std::string compiler;
  bool cuda = false;
  std::string cuda_archs;     // "80-real;90a-real"
  std::string cuda_version;   // of the toolkit it was built with
  bool nccl = false;          // the NCCL transport is built (libnccl.so.2 is loaded at run time)
};

FLASHLM_API const BuildInfo& build_info();

}  // namespace flashlm
