// The Python binding of the CPU engine: thin, validating at the boundary.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>

#include <map>
#include <string>

#include "cpu_features.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
    m.doc() = "Tandem CPU engine";
    m.def(
        "cpu_features",
        []() {
            const auto& f = tandem::cpu_features();
            return std::map<std::string, bool>{
                {"sse4_2", f.sse42},           {"avx", f.avx},
                {"avx2", f.avx2},              {"fma", f.fma},
                {"f16c", f.f16c},              {"avx512f", f.avx512f},
                {"avx512bw", f.avx512bw},      {"avx512dq", f.avx512dq},
                {"avx512vl", f.avx512vl},      {"avx512_vnni", f.avx512_vnni},
                {"avx512_bf16", f.avx512_bf16}, {"avx_vnni", f.avx_vnni},
                {"amx_tile", f.amx_tile},      {"amx_int8", f.amx_int8},
                {"amx_bf16", f.amx_bf16},
            };
        },
        "CPU features this machine can execute (CPUID and OS register-state checks).");
    m.def(
        "isa", []() { return std::string(tandem::isa_name(tandem::best_isa())); },
        "The SIMD level the kernels use here (scalar, avx2, avx512, avx512_vnni), capped by TANDEM_ISA.");
    m.def(
        "isa_supported",
        [](const std::string& name) {
            try {
                tandem::parse_isa(name.c_str());
                return true;
            } catch (const std::invalid_argument&) {
                return false;
            }
        },
        "Whether this CPU can run the kernels of the named SIMD level.");
}
