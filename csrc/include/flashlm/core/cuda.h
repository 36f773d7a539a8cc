// What the library knows of CUDA at run time. Nothing here throws: a build without CUDA, a machine
// without a driver and a machine without a GPU all report zero devices and say why.
#pragma once

#include <string>

#include "flashlm/core/export.h"

namespace flashlm {

FLASHLM_API bool cuda_compiled();
FLASHLM_API int cuda_device_count();
FLASHLM_API std::string cuda_status();  // "2 devices", "no CUDA driver (...)", "built without CUDA"

}  // namespace flashlm
