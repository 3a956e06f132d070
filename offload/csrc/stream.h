// Stream-ordered CPU work, as KTransformers orders its CPU MoE jobs (cudaLaunchHostFunc): a GPU stream
// runs "start the routed experts" and "wait for them" as host nodes, so a decode step that uses the CPU
// engine needs no host synchronisation and can be captured into a CUDA graph.
//
// The CUDA driver (libcuda.so.1) is opened at run time: the extension links no CUDA library and loads
// on machines without one.
#pragma once

#include <cstdint>

namespace tandem {

using HostFn = void (*)(void*);

// Whether a CUDA driver with cuLaunchHostFunc could be opened (false on a machine without a GPU driver).
bool cuda_driver_available();

// Enqueue fn(arg) on a CUDA stream (a CUstream / cudaStream_t handle, as torch's Stream.cuda_stream):
// it runs once the work enqueued before it is done, and blocks the work enqueued after it until it
// returns. Throws std::runtime_error naming what is missing when the driver is absent or refuses.
void launch_host_fn(uintptr_t stream, HostFn fn, void* arg);

}  // namespace tandem
