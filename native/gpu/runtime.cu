// Runtime queries for native_info() and the tests. No kernels here.
#include "portability.h"

#include "gemv_quant.h"

namespace glmrt {
namespace gpu {

const char* device_warp_size(int device, int* warp_size) {
  const gpuError_t err = gpuDeviceGetAttribute(warp_size, gpuDevAttrWarpSize, device);
  return err == gpuSuccess ? nullptr : gpuGetErrorString(err);
}

int runtime_version() {
  int v = 0;
  return gpuRuntimeGetVersion(&v) == gpuSuccess ? v : -1;
}

int driver_version() {
  int v = 0;
  return gpuDriverGetVersion(&v) == gpuSuccess ? v : -1;
}

}  // namespace gpu
}  // namespace glmrt
