// The Python binding of the CPU engine: thin, validating at the boundary.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>

#include <map>
#include <string>
#include <vector>

#include "binding.h"
#include "cpu_features.h"
#include "quantize.h"

namespace nb = nanobind;

void register_dot(nb::module_& m);  // dot_binding.cpp
void register_engine(nb::module_& m);  // engine_binding.cpp

namespace {

using tandem::binding::dtype_name;

// float32 C-contiguous [..., n] -> uint8 [..., n / block * type_size], as quant.formats.quantize.
nb::ndarray<nb::numpy, uint8_t> quantize(nb::ndarray<nb::ro> data, int qtype, int threads, const std::string& isa) {
    using namespace tandem;
    if (!is_quant_type(qtype))
        throw nb::value_error(("ggml type id " + std::to_string(qtype) +
                               " is not one the engine quantizes (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K Q8_K)").c_str());
    const auto type = static_cast<QuantType>(qtype);
    const std::string name = quant_type_name(type);
    if (threads < 0) throw nb::value_error("threads must be >= 1 (or 0 / None for every hardware thread)");
    const Isa level = parse_isa(isa.c_str());   // std::invalid_argument -> ValueError
    if (data.dtype() != nb::dtype<float>())
        throw nb::value_error(("quantize to " + name + " takes float32 data, got " + dtype_name(data.dtype()) +
                               ": pass data.astype(np.float32)").c_str());
    if (data.device_type() != nb::device::cpu::value)
        throw nb::value_error(("quantize to " + name + " takes data in host memory: pass tensor.cpu()").c_str());
    const size_t ndim = data.ndim();
    if (ndim == 0) throw nb::value_error(("cannot quantize a 0-d array to " + name + ": pass rows, shape [..., n]").c_str());
    int64_t expect = 1;
    for (size_t i = ndim; i-- > 0;) {
        if (data.shape(i) != 1 && data.size() != 0 && data.stride(i) != expect)
            throw nb::value_error(("quantize to " + name + " takes a C-contiguous array: pass np.ascontiguousarray(data)").c_str());
        expect *= static_cast<int64_t>(data.shape(i));
    }
    const int64_t n = static_cast<int64_t>(data.shape(ndim - 1));
    const int bs = quant_block_size(type);
    if (n % bs != 0) {
        const std::string alt = bs == 256 ? "Q8_0, Q5_0 or Q4_0 (32-value blocks), as llama-quantize falls back to for such rows"
                                          : "F16, BF16 or F32";
        throw nb::value_error((name + " quantizes rows in blocks of " + std::to_string(bs) + " values, but the row length is " +
                               std::to_string(n) + ": pad the row to a multiple of " + std::to_string(bs) + " or use " + alt).c_str());
    }
    const int64_t row_bytes = n / bs * quant_type_size(type);
    const int64_t nrows = n ? static_cast<int64_t>(data.size()) / n : 0;
    std::vector<size_t> shape(ndim);
    for (size_t i = 0; i < ndim; ++i) shape[i] = data.shape(i);
    shape[ndim - 1] = static_cast<size_t>(row_bytes);
    uint8_t* out = new uint8_t[static_cast<size_t>(std::max<int64_t>(1, nrows * row_bytes))];
    nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
    {
        nb::gil_scoped_release unlocked;
        quantize_rows_parallel(type, static_cast<const float*>(data.data()), out, nrows, n, threads, level);
    }
    return nb::ndarray<nb::numpy, uint8_t>(out, ndim, shape.data(), owner);
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "Tandem CPU engine";
    tandem::configure_stream_prefetch();  // before any kernel runs; a bad TANDEM_PREFETCH fails the import
    register_dot(m);
    register_engine(m);
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
        "stream_prefetch", []() { return std::string(tandem::stream_prefetch_name()); },
        "Where the streaming kernels prefetch the weights: 'l2' (AMD CPUs) or 'l1' (others), or as "
        "TANDEM_PREFETCH (l1 | l2 | auto) says.");
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
    m.def("quantize", &quantize, nb::arg("data"), nb::arg("qtype"), nb::arg("threads") = 0, nb::arg("isa") = "auto",
          "float32 C-contiguous [..., n] -> uint8 [..., row_bytes] in ggml type id qtype, bit-exact with "
          "quant.formats.quantize; threads 0 = every hardware thread; isa caps the SIMD variant. Releases the GIL.");
    m.def(
        "quant_types",
        []() {
            std::map<std::string, int> out;
            for (int id = 0; id < 64; ++id)
                if (tandem::is_quant_type(id)) out[tandem::quant_type_name(static_cast<tandem::QuantType>(id))] = id;
            return out;
        },
        "The ggml types offload.quantize produces: name -> ggml type id.");
    m.def(
        "quantize_variant",
        [](int qtype, const std::string& isa) {
            if (!tandem::is_quant_type(qtype)) throw nb::value_error("not a type the engine quantizes");
            const auto type = static_cast<tandem::QuantType>(qtype);
            return std::string(tandem::isa_name(tandem::quantize_variant_isa(type, tandem::parse_isa(isa.c_str()))));
        },
        nb::arg("qtype"), nb::arg("isa") = "auto",
        "The SIMD variant quantize(qtype, isa=isa) runs: scalar, avx2 or avx512 (a type without a variant at "
        "that level falls back to the next one down).");
}
