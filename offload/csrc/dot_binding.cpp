// Python binding of the dot kernels: _C.matmul and _C.quantize_activation. Thin: every check on the
// arrays happens here, with a ValueError that says what to pass instead; the kernels trust it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding.h"
#include "dot.h"
#include "pages.h"
#include "quantize.h"
#include "repack.h"

namespace nb = nanobind;
using tandem::GgmlType;

namespace {

using Array = nb::ndarray<nb::ro, nb::device::cpu>;
using OutF32 = nb::ndarray<nb::numpy, float, nb::ndim<2>>;
using OutU8 = nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>;

using tandem::binding::dtype_name;
using tandem::binding::fail;

bool is_dtype(const Array& a, nb::dlpack::dtype_code code, int bits) {
    const nb::dlpack::dtype d = a.dtype();
    return d.code == static_cast<uint8_t>(code) && d.bits == bits && d.lanes == 1;
}

// A 2-D, row-major (C-contiguous) array on the CPU.
void check_matrix(const Array& a, const char* what) {
    if (a.ndim() != 2) fail(std::string(what) + " must be 2-D, got " + std::to_string(a.ndim()) + " dimensions");
    const bool contiguous = a.shape(0) == 0 || a.shape(1) == 0 ||  // no element to place (any strides)
                            ((a.shape(1) <= 1 || a.stride(1) == 1) &&
                             (a.shape(0) <= 1 || a.stride(0) == static_cast<int64_t>(a.shape(1))));
    if (!contiguous)
        fail(std::string(what) + " is not C-contiguous: pass np.ascontiguousarray(" + what + ")");
}

std::string upper(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    return s;
}

const char* kWeightTypes = "F32 (0), F16 (1), Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), "
                           "Q5_K (13), Q6_K (14), BF16 (30), and the row-interleaved Q4_0_R16 (1002), Q4_1_R16 (1003), "
                           "Q5_0_R16 (1006), Q5_1_R16 (1007), Q8_0_R16 (1008), Q4_K_R16 (1012), Q5_K_R16 (1013), "
                           "Q6_K_R16 (1014)";

const tandem::TypeInfo& weight_type(int wtype) {
    const tandem::TypeInfo* t = tandem::type_info(wtype);
    if (!t || !t->is_weight)
        fail("ggml type " + std::to_string(wtype) + (t ? std::string(" (") + t->name + ")" : std::string()) +
             " is not a weight type the dot kernels run; supported: " + kWeightTypes);
    return *t;
}

tandem::Isa isa_from(const std::string& name) {
    try {
        return tandem::parse_isa(name.c_str());
    } catch (const std::invalid_argument& e) {
        fail(e.what());
    }
}

GgmlType activation_format(const std::string& fmt) {
    const std::string f = upper(fmt);
    for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K, GgmlType::F16, GgmlType::BF16, GgmlType::F32})
        if (f == tandem::type_info(static_cast<int>(t))->name) return t;
    fail("unknown activation format '" + fmt + "': use q8_0, q8_1, q8_K, f16, bf16 or f32");
}

template <class T, class Out>
Out owned(T* data, size_t rows, size_t cols) {
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return Out(data, {rows, cols}, owner);
}

// x float32 [T, K] -> the activation rows, quantized to fmt (GIL released by the caller).
void quantize_rows(GgmlType fmt, const float* x, size_t T, size_t K, uint8_t* dst, tandem::Isa isa) {
    const size_t rb = tandem::row_size(fmt, static_cast<int64_t>(K));
    for (size_t t = 0; t < T; ++t)
        tandem::quantize_activation_row(fmt, x + t * K, dst + t * rb, static_cast<int64_t>(K), isa);
}

const float* float_rows(const Array& x, const char* what) {
    check_matrix(x, what);
    if (!is_dtype(x, nb::dlpack::dtype_code::Float, 32))
        fail(std::string(what) + " must be float32, got " + dtype_name(x.dtype()) + ": pass " + what +
             ".astype(np.float32)");
    return static_cast<const float*>(x.data());
}

// The rows of `weight` (2-D, C-contiguous) hold those of K values of `wt`: uint8 raw blocks [N, row_bytes], or
// the natural dtype [N, K] for F32 / F16 / BF16 (uint16 bits).
void check_row_bytes(const tandem::TypeInfo& t, GgmlType wt, const Array& weight, size_t K, const char* what) {
    const size_t rb = tandem::row_size(wt, static_cast<int64_t>(K));
    size_t row_bytes;
    if (is_dtype(weight, nb::dlpack::dtype_code::UInt, 8)) {
        row_bytes = weight.shape(1);
    } else if (tandem::binding::value_dtype(weight.dtype(), wt)) {
        row_bytes = weight.shape(1) * t.type_size;
    } else {
        const std::string values = *tandem::binding::or_value_dtype(wt)
                                       ? tandem::binding::or_value_dtype(wt) + std::string(" values [N, K]") : "";
        fail(std::string(what) + " of type " + t.name + " must be uint8 raw blocks [N, row_bytes]" + values +
             ", got " + dtype_name(weight.dtype()));
    }
    if (row_bytes != rb)
        fail(std::string(what) + " rows hold " + std::to_string(row_bytes) + " bytes, but " + t.name + " rows of K = " +
             std::to_string(K) + " values take " + std::to_string(rb) + " bytes (" + std::to_string(K / t.block_size) +
             " blocks of " + std::to_string(t.type_size) + ")");
}

OutF32 matmul(int wtype, const Array& weight, const Array& x, const std::string& isa_name) {
    const tandem::TypeInfo& t = weight_type(wtype);
    const GgmlType wt = static_cast<GgmlType>(wtype);
    const tandem::Isa isa = isa_from(isa_name);
    const float* xp = float_rows(x, "x");
    const size_t T = x.shape(0), K = x.shape(1);
    if (K % t.block_size)
        fail(std::string(t.name) + " works in blocks of " + std::to_string(t.block_size) + " values, but x has rows of " +
             std::to_string(K) + ": K must be a multiple of " + std::to_string(t.block_size));
    check_matrix(weight, "weight");
    const size_t N = weight.shape(0), rb = tandem::row_size(wt, static_cast<int64_t>(K));
    check_row_bytes(t, wt, weight, K, "weight");

    if (tandem::is_r16(wt) && N % tandem::kR16)
        fail(std::string("a row-interleaved ") + t.name + " weight needs a multiple of 16 rows, got " +
             std::to_string(N));
    const size_t ab = tandem::row_size(t.act_type, static_cast<int64_t>(K));
    std::vector<uint8_t> act(T * ab);
    auto* y = new float[std::max<size_t>(1, T * N)];
    {
        nb::gil_scoped_release release;
        quantize_rows(t.act_type, xp, T, K, act.data(), isa);
        tandem::matmul_rows(wt, static_cast<int64_t>(K), weight.data(), rb, 0, static_cast<int64_t>(N), act.data(), ab,
                            static_cast<int64_t>(T), y, N, isa);
    }
    return owned<float, OutF32>(y, T, N);
}

OutU8 quantize_activation(const std::string& fmt, const Array& x, const std::string& isa_name) {
    const GgmlType f = activation_format(fmt);
    const tandem::Isa isa = isa_from(isa_name);
    const tandem::TypeInfo& t = *tandem::type_info(static_cast<int>(f));
    const float* xp = float_rows(x, "x");
    const size_t T = x.shape(0), K = x.shape(1);
    if (K % t.block_size)
        fail(std::string(t.name) + " works in blocks of " + std::to_string(t.block_size) + " values, but x has rows of " +
             std::to_string(K) + ": K must be a multiple of " + std::to_string(t.block_size));
    const size_t rb = tandem::row_size(f, static_cast<int64_t>(K));
    auto* out = new uint8_t[std::max<size_t>(1, T * rb)];
    {
        nb::gil_scoped_release release;
        quantize_rows(f, xp, T, K, out, isa);
    }
    return owned<uint8_t, OutU8>(out, T, rb);
}

OutF32 swiglu(const Array& g, const Array& u, const std::string& isa_name) {
    const tandem::Isa isa = isa_from(isa_name);
    const float* gp = float_rows(g, "g");
    const float* up = float_rows(u, "u");
    if (g.shape(0) != u.shape(0) || g.shape(1) != u.shape(1))
        fail("g and u must have one shape, got [" + std::to_string(g.shape(0)) + ", " + std::to_string(g.shape(1)) +
             "] and [" + std::to_string(u.shape(0)) + ", " + std::to_string(u.shape(1)) + "]");
    const size_t T = g.shape(0), K = g.shape(1);
    auto* out = new float[std::max<size_t>(1, T * K)];
    {
        nb::gil_scoped_release release;
        for (size_t t = 0; t < T; ++t) tandem::swiglu(gp + t * K, up + t * K, out + t * K, static_cast<int64_t>(K), isa);
    }
    return owned<float, OutF32>(out, T, K);
}

using OutU8N = nb::ndarray<nb::numpy, uint8_t>;
using OutAny = nb::ndarray<nb::numpy>;

// A capsule that unmaps a weight buffer when numpy lets go of the array over it.
nb::capsule page_owner(const tandem::PageBuffer& b) {
    return nb::capsule(new tandem::PageBuffer(b), [](void* p) noexcept {
        auto* buffer = static_cast<tandem::PageBuffer*>(p);
        tandem::release_pages(*buffer);
        delete buffer;
    });
}

void check_contiguous(const Array& a, const char* what) {
    for (size_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) == 0) return;  // no element to place (any strides)
    int64_t expect = 1;
    for (int i = static_cast<int>(a.ndim()) - 1; i >= 0; --i) {
        if (a.shape(i) > 1 && a.stride(i) != expect)
            fail(std::string(what) + " is not C-contiguous: pass np.ascontiguousarray(" + what + ")");
        expect *= static_cast<int64_t>(a.shape(i));
    }
}

// weight (any dtype, C-contiguous) -> a copy of the same shape in huge-page weight memory (pages.h).
OutAny resident_copy(const Array& weight) {
    check_contiguous(weight, "weight");
    const size_t bytes = weight.nbytes();
    tandem::PageBuffer b = tandem::allocate_pages(std::max<size_t>(1, bytes));
    {
        nb::gil_scoped_release release;
        std::memcpy(b.data, weight.data(), bytes);
    }
    std::vector<size_t> shape(weight.ndim());
    for (size_t i = 0; i < weight.ndim(); ++i) shape[i] = weight.shape(i);
    return OutAny(b.data, weight.ndim(), shape.data(), page_owner(b), nullptr, weight.dtype());
}

// table [V, row] of `wtype` as matmul's weight (the file's layout, not a row-interleaved one), ids int64 [T]
// -> float32 [T, cols]: the rows dequantized (llama.cpp's get_rows; a token embedding's lookup).
OutF32 get_rows(int wtype, const Array& table, const Array& ids, int64_t cols) {
    const tandem::TypeInfo& t = weight_type(wtype);
    const GgmlType wt = static_cast<GgmlType>(wtype);
    if (tandem::is_r16(wt))
        fail(std::string("get_rows reads a table in the file's layout; ") + t.name + " is row-interleaved");
    if (cols <= 0 || cols % t.block_size)
        fail(std::string(t.name) + " rows of " + std::to_string(cols) + " values do not split into blocks of " +
             std::to_string(t.block_size));
    check_matrix(table, "table");
    check_row_bytes(t, wt, table, static_cast<size_t>(cols), "table");
    if (ids.ndim() != 1 || !is_dtype(ids, nb::dlpack::dtype_code::Int, 64) || (ids.shape(0) > 1 && ids.stride(0) != 1))
        fail("ids must be a contiguous int64 array [T], got " + std::to_string(ids.ndim()) + "-D " + dtype_name(ids.dtype()));
    const size_t T = ids.shape(0), V = table.shape(0), rb = tandem::row_size(wt, cols);
    const int64_t* id = static_cast<const int64_t*>(ids.data());
    for (size_t i = 0; i < T; ++i)
        if (id[i] < 0 || static_cast<size_t>(id[i]) >= V)
            fail("id " + std::to_string(id[i]) + " is outside the table's " + std::to_string(V) + " rows");
    float* out = new float[std::max<size_t>(1, T * static_cast<size_t>(cols))];
    const auto* base = static_cast<const uint8_t*>(table.data());
    for (size_t i = 0; i < T; ++i) tandem::dequantize_row(wtype, base + id[i] * rb, cols, out + i * cols);
    return owned<float, OutF32>(out, T, static_cast<size_t>(cols));
}

// weight uint8 [..., rows, row bytes] of `wtype` (rows a multiple of 16) -> the same bytes row-interleaved.
OutU8N repack(int wtype, const Array& weight, int64_t cols, int threads) {
    const tandem::TypeInfo& t = weight_type(wtype);
    const GgmlType wt = static_cast<GgmlType>(wtype), r16 = tandem::r16_of(wt);
    if (r16 == wt)
        fail(std::string(t.name) +
             " has no row-interleaved layout (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K have); use the "
             "weight as it is");
    if (weight.ndim() < 2 || !is_dtype(weight, nb::dlpack::dtype_code::UInt, 8))
        fail("weight must be uint8 raw blocks [..., rows, row_bytes], got " + std::to_string(weight.ndim()) + "-D " +
             dtype_name(weight.dtype()));
    check_contiguous(weight, "weight");
    if (cols <= 0 || cols % t.block_size)
        fail(std::string(t.name) + " rows of " + std::to_string(cols) + " values do not split into blocks of " +
             std::to_string(t.block_size));
    const size_t rb = tandem::row_size(wt, cols), nd = weight.ndim();
    if (weight.shape(nd - 1) != rb)
        fail("weight rows hold " + std::to_string(weight.shape(nd - 1)) + " bytes, but " + t.name + " rows of " +
             std::to_string(cols) + " values take " + std::to_string(rb));
    if (weight.shape(nd - 2) % tandem::kR16)
        fail("weight has " + std::to_string(weight.shape(nd - 2)) +
             " rows per matrix; the row-interleaved layout needs a multiple of 16 (use the weight as it is)");
    const int64_t rows = static_cast<int64_t>(weight.size() / rb);
    tandem::PageBuffer out = tandem::allocate_pages(std::max<size_t>(1, weight.size()));
    if (rows > 0) {  // an empty stack ([0, rows, row bytes]) has nothing to interleave
        nb::gil_scoped_release release;
        tandem::repack_r16(wt, static_cast<const uint8_t*>(weight.data()), rows, cols, out.data, threads);
    }
    std::vector<size_t> shape(nd);
    for (size_t i = 0; i < nd; ++i) shape[i] = weight.shape(i);
    return OutU8N(out.data, nd, shape.data(), page_owner(out));
}

}  // namespace

void register_dot(nb::module_& m) {
    m.def("repack_r16", &repack, nb::arg("wtype"), nb::arg("weight"), nb::arg("cols"), nb::arg("threads") = 1,
          "weight uint8 [..., rows, row_bytes] in Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K (rows a\n"
          "multiple of 16) -> a new array of the same shape and bytes in the engine's row-interleaved layout, whose\n"
          "type id is r16_type(wtype); on up to `threads` threads (one for every few MiB).");
    m.def("resident_copy", &resident_copy, nb::arg("weight"),
          "A copy of a C-contiguous array (any dtype) in the engine's weight memory: 2 MiB aligned, advised\n"
          "MADV_HUGEPAGE, so streaming it takes a TLB entry per 2 MiB rather than per 4 KiB page.");
    m.def("huge_pages", &tandem::huge_pages_available,
          "Whether transparent huge pages back advised mappings on this machine (THP 'always' or 'madvise').");
    m.def(
        "r16_type", [](int wtype) { return static_cast<int>(tandem::r16_of(static_cast<GgmlType>(wtype))); },
        nb::arg("wtype"), "The row-interleaved type id for a ggml type id (the same id when it has none).");
    m.def("matmul", &matmul, nb::arg("wtype"), nb::arg("weight"), nb::arg("x"), nb::arg("isa") = "auto",
          "Y = x @ W.T with the quantized dot kernels: wtype a ggml type id, weight uint8 raw blocks [N, row_bytes]\n"
          "(or float32 / float16 / uint16-bf16 [N, K] for F32 / F16 / BF16), x float32 [T, K], quantized internally\n"
          "to the type's activation format. isa: 'auto' (best, capped by TANDEM_ISA), 'scalar', 'avx2', 'avx512'\n"
          "or 'avx512_vnni'. Returns float32 [T, N]. Single-threaded.");
    m.def("get_rows", &get_rows, nb::arg("wtype"), nb::arg("table"), nb::arg("ids"), nb::arg("cols"),
          "float32 [T, cols]: rows ids (int64 [T]) of table (as matmul's weight: uint8 raw blocks [V, row_bytes],\n"
          "or float32 / float16 / uint16-bf16 [V, cols]) dequantized, bit for bit as quant.formats.dequantize.");
    m.def("quantize_activation", &quantize_activation, nb::arg("fmt"), nb::arg("x"), nb::arg("isa") = "auto",
          "x float32 [T, K] -> uint8 [T, row_bytes]: activation rows as the dot kernels take them\n"
          "(fmt q8_0, q8_1, q8_K, f16, bf16 or f32; Q8_0/Q8_1 round half to even as llama.cpp's x86 path).");
    m.def("swiglu", &swiglu, nb::arg("g"), nb::arg("u"), nb::arg("isa") = "auto",
          "silu(g) * u for float32 [T, K] arrays, as the MoE op computes it (scalar: libm's expf; from avx2 a\n"
          "vector exp; both within 4 ulp of float64).");
    m.def(
        "activation_type",
        [](int wtype) -> std::string {
            const tandem::TypeInfo& t = weight_type(wtype);
            return tandem::type_info(static_cast<int>(t.act_type))->name;
        },
        nb::arg("wtype"), "The activation format a weight type is multiplied by ('Q8_K' for Q4_K, ...).");
}
