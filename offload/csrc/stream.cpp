#include "stream.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace tandem {

namespace {

using CuResult = int;  // CUresult: 0 = CUDA_SUCCESS
using LaunchHostFunc = CuResult (*)(void* stream, HostFn fn, void* user_data);
using GetErrorString = CuResult (*)(CuResult error, const char** str);

struct Driver {
    LaunchHostFunc launch = nullptr;
    GetErrorString error_string = nullptr;
    std::string problem;
};

const Driver& driver() {
    static Driver d;
    static std::once_flag once;
    std::call_once(once, [] {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            d.problem = "no CUDA driver (libcuda.so.1) could be opened";
            return;
        }
        d.launch = reinterpret_cast<LaunchHostFunc>(dlsym(lib, "cuLaunchHostFunc"));
        d.error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
        if (!d.launch) d.problem = "the CUDA driver has no cuLaunchHostFunc (it needs CUDA 10 or newer)";
    });
    return d;
}

}  // namespace

bool cuda_driver_available() { return driver().launch != nullptr; }

void launch_host_fn(uintptr_t stream, HostFn fn, void* arg) {
    const Driver& d = driver();
    if (!d.launch) throw std::runtime_error(d.problem + ": stream-ordered CPU experts need a CUDA GPU");
    const CuResult rc = d.launch(reinterpret_cast<void*>(stream), fn, arg);
    if (rc != 0) {
        const char* what = nullptr;
        if (d.error_string) d.error_string(rc, &what);
        throw std::runtime_error("cuLaunchHostFunc failed: " + std::string(what ? what : "CUresult " + std::to_string(rc)));
    }
}

}  // namespace tandem
