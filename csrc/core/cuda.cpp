#include "flashlm/core/cuda.h"

#include <string>

#ifdef FLASHLM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace flashlm {

bool cuda_compiled() {
#ifdef FLASHLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef FLASHLM_WITH_CUDA
namespace {
// cudaGetDeviceCount fails (rather than returning 0) where there is no driver or no GPU; keep its answer.
struct DeviceQuery {
  int count = 0;
  std::string status;
  DeviceQuery() {
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      count = 0;
      status = std::string("no CUDA device (") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
      cudaGetLastError();  // clear the sticky-free error so later calls start clean
    } else {
      status = std::to_string(count) + (count == 1 ? " device" : " devices");
    }
  }
};
const DeviceQuery& query() {
  static const DeviceQuery q;
  return q;
}
}  // namespace

int cuda_device_count() { return query().count; }
std::string cuda_status() { return query().status; }
#else
int cuda_device_count() { return 0; }
std::string cuda_status() { return "built without CUDA"; }
#endif

}  // namespace flashlm
