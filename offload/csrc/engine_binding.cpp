// Python binding of the engine: _C.Engine(threads) with linear / moe / moe_submit / wait.
// Thin: shapes, dtypes and ids are checked here (ValueError naming the argument and the fix);
// arrays cross as raw pointers (numpy, or torch through DLPack - no torch linkage).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "binding.h"
#include "engine.h"
#include "gqa.h"
#include "mla.h"
#include "pages.h"
#include "repack.h"
#include "router.h"
#include "stream.h"

namespace nb = nanobind;
using namespace tandem;

namespace {

using Any = nb::ndarray<nb::ro, nb::device::cpu>;
// Written in place (outputs, a KV cache): taken as they come and checked here (`written`). With a dtype or
// layout in the type, nanobind would hand a mismatched array (float64, a column slice) over as a converted
// temporary copy, and the results would be lost without a word.
using Mut = nb::ndarray<nb::device::cpu>;
using CF32 = nb::ndarray<nb::ro, float, nb::device::cpu, nb::c_contig>;
using I64 = nb::ndarray<nb::ro, int64_t, nb::device::cpu, nb::c_contig>;
using U8 = nb::ndarray<nb::ro, uint8_t, nb::device::cpu, nb::c_contig>;

using tandem::binding::dtype_name;
using tandem::binding::fail;

bool c_contiguous(const Any& a) {
    for (size_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) == 0) return true;  // no element to place
    int64_t expect = 1;
    for (int i = static_cast<int>(a.ndim()) - 1; i >= 0; --i) {
        if (a.shape(i) > 1 && a.stride(i) != expect) return false;
        expect *= static_cast<int64_t>(a.shape(i));
    }
    return true;
}

const TypeInfo& weight_type(int id, const char* what) {
    const TypeInfo* t = type_info(id);
    if (!t || !t->is_weight)
        fail(std::string(what) + ": ggml type id " + std::to_string(id) + " is not a weight type the engine runs; "
             "re-quantize with `tandem convert --quant q4_k_m` (or q8_0)");
    return *t;
}

// The dtype a weight's bytes come in: uint8 (the raw blocks of any type), or the values' own dtype for F32, F16
// and BF16 (float32, float16; bfloat16 or its uint16 / int16 bits). Another dtype of the right size (float64
// bytes called F32) would be read as garbage.
void check_weight_dtype(const Any& a, GgmlType type, const TypeInfo& t, const char* what) {
    if (a.dtype() == nb::dtype<uint8_t>() || tandem::binding::value_dtype(a.dtype(), type)) return;
    fail(std::string(what) + " is " + dtype_name(a.dtype()) + "; a " + t.name + " weight comes as uint8 bytes" +
         tandem::binding::or_value_dtype(type));
}

// A stack of `count` matrices [count, rows, row bytes] (count = 1: a 2-D matrix) in `type`, cols values per row,
// checked; at(i) is matrix i.
struct Stack {
    GgmlType type;
    const uint8_t* data;
    int64_t count, rows, cols;
    size_t row_bytes;
    Weight at(int64_t i) const { return Weight{type, data + i * rows * row_bytes, rows, cols, row_bytes}; }
};

Stack stack(const Any& a, int type_id, int64_t cols, const char* what) {
    const TypeInfo& t = weight_type(type_id, what);
    if (!c_contiguous(a)) fail(std::string(what) + " is not C-contiguous");
    if (a.ndim() != 2 && a.ndim() != 3) fail(std::string(what) + " must be 2-D or 3-D");
    check_weight_dtype(a, static_cast<GgmlType>(type_id), t, what);
    if (cols < 1 || a.shape(a.ndim() - 2) < 1 || (a.ndim() == 3 && a.shape(0) < 1))
        fail(std::string(what) + " must hold at least one matrix of at least one row of at least one value, got " +
             (a.ndim() == 3 ? std::to_string(a.shape(0)) + " x " : std::string()) +
             std::to_string(a.shape(a.ndim() - 2)) + " rows of " + std::to_string(cols) + " values");
    if (cols % t.block_size) fail(std::string(what) + ": rows of " + std::to_string(cols) + " values do not split into " +
                                  t.name + " blocks of " + std::to_string(t.block_size));
    const int64_t count = a.ndim() == 3 ? a.shape(0) : 1, rows = a.shape(a.ndim() - 2);
    const size_t rb = row_size(static_cast<GgmlType>(type_id), cols);
    if (a.nbytes() != static_cast<size_t>(count * rows) * rb)
        fail(std::string(what) + ": " + std::to_string(a.nbytes()) + " bytes do not hold " + std::to_string(count * rows) +
             " rows of " + std::to_string(cols) + " " + t.name + " values (" + std::to_string(rb) + " bytes each)");
    if (is_r16(static_cast<GgmlType>(type_id)) && rows % kR16)
        fail(std::string(what) + ": a row-interleaved " + t.name + " matrix needs a multiple of 16 rows, got " +
             std::to_string(rows));
    return Stack{static_cast<GgmlType>(type_id), static_cast<const uint8_t*>(a.data()), count, rows, cols, rb};
}

// The matrices of `stack(a, ...)`, one Weight each.
std::vector<Weight> matrices(const Any& a, int type_id, int64_t cols, const char* what) {
    const Stack st = stack(a, type_id, cols, what);
    std::vector<Weight> out;
    out.reserve(static_cast<size_t>(st.count));
    for (int64_t i = 0; i < st.count; ++i) out.push_back(st.at(i));
    return out;
}

// The `isa` argument ("auto" or a level name) as an Isa; ValueError when unknown or unsupported here.
Isa isa_arg(const std::string& isa) {
    try {
        return parse_isa(isa.c_str());
    } catch (const std::invalid_argument& e) {
        fail(e.what());
    }
}

void check_2d(const Any& a, int64_t r, int64_t c, const char* what) {
    if (a.ndim() != 2 || static_cast<int64_t>(a.shape(0)) != r || static_cast<int64_t>(a.shape(1)) != c)
        fail(std::string(what) + " must have shape [" + std::to_string(r) + ", " + std::to_string(c) + "]");
}

// The data of an array the call writes: of dtype T (float32 or int64), the given shape, C-contiguous.
template <class T>
T* written(const Mut& a, std::initializer_list<int64_t> shape, const char* what) {
    std::string dims;
    for (int64_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    const char* type = std::is_same_v<T, float> ? "float32" : "int64";
    bool same = a.ndim() == shape.size();
    for (size_t i = 0; same && i < shape.size(); ++i) same = static_cast<int64_t>(a.shape(i)) == shape.begin()[i];
    if (!same) fail(std::string(what) + " must have shape [" + dims + "]");
    if (a.dtype() != nb::dtype<T>())
        fail(std::string(what) + " is " + dtype_name(a.dtype()) + "; the results are written into it in place, so it " +
             "must be " + type + " (allocate it as " + type + ", or leave it out)");
    if (!c_contiguous(Any(a)))
        fail(std::string(what) + " is not C-contiguous; the results are written into it in place (pass a contiguous " +
             "array, e.g. numpy.empty([" + dims + "], " + type + "), or leave it out)");
    return static_cast<T*>(a.data());
}

// An RMSNorm epsilon from Python: finite and >= 0 (`where` prefixes the error).
void check_eps(float eps, const std::string& where = "") {
    if (!(eps >= 0 && std::isfinite(eps))) fail(where + "eps must be a finite number >= 0, not " + std::to_string(eps));
}

// A layer's dimensions, each at most 2^20 (so that their products, the matrices' rows, fit an int64).
void check_dims(std::initializer_list<int64_t> dims, const char* what) {
    for (int64_t d : dims)
        if (d > (int64_t{1} << 20))
            fail(std::string(what) + " dimensions must be at most 1048576, got " + std::to_string(d));
}

// An attention scale from Python: finite.
void check_scale(float scale) {
    if (!std::isfinite(scale)) fail("scale must be a finite number, not " + std::to_string(scale));
}

// A fused layer reads x [T, D] while it writes out: the two must not share memory.
void check_no_overlap(const float* x, int64_t T, int64_t D, const void* out) {
    const auto* o = static_cast<const char*>(out);
    const auto* xb = reinterpret_cast<const char*>(x);
    const size_t bytes = static_cast<size_t>(T * D) * sizeof(float);
    if (o < xb + bytes && xb < o + bytes)
        fail("out overlaps x: the layer reads x while it writes out (pass a separate output array)");
}

struct EngineHandle {
    explicit EngineHandle(int threads) : pool(threads) {}
    ThreadPool pool;
    std::vector<nb::object> keep_alive;  // inputs of the running async call
};

using SharedSpec = std::tuple<Any, int, Any, int, Any, int>;  // gate, type, up, type, down, type

struct MoeCall {
    std::vector<Expert> experts, shared;
    std::vector<uint8_t> skip;
    std::vector<int64_t> picked_ids;  // with picked_only: the ids renumbered to the experts they pick
    const float* x;
    const int64_t* ids;
    const float* w;
    float* out;
    int64_t T, H, E;
    int A;
    Isa isa;
};

// The arrays of the shared experts, held in `keep` as long as something reads them.
void keep_shared(const std::vector<SharedSpec>& shared, std::vector<nb::object>& keep) {
    for (const auto& sp : shared)
        for (const Any* a : {&std::get<0>(sp), &std::get<2>(sp), &std::get<4>(sp)}) keep.push_back(nb::cast(*a));
}

// The routed expert stacks (gate/up [E, I, bytes], down [E, H, bytes]) for hidden size H, checked.
struct ExpertStacks {
    Stack gate, up, down;
    Expert at(int64_t e) const { return Expert{gate.at(e), up.at(e), down.at(e)}; }
    std::vector<Expert> all() const {
        std::vector<Expert> table;
        table.reserve(static_cast<size_t>(gate.count));
        for (int64_t e = 0; e < gate.count; ++e) table.push_back(at(e));
        return table;
    }
};

ExpertStacks expert_stacks(const Any& gate, int gate_type, const Any& up, int up_type, const Any& down, int down_type,
                           int64_t H) {
    if (gate.ndim() != 3) fail("gate must be the 3-D expert stack [experts, intermediate, row bytes]");
    const int64_t E = gate.shape(0), I = gate.shape(1);
    ExpertStacks st{stack(gate, gate_type, H, "gate"), stack(up, up_type, H, "up"), stack(down, down_type, I, "down")};
    if (st.up.count != E || st.down.count != E || st.up.rows != I || st.down.rows != H)
        fail("up must be [experts, intermediate, ...] and down [experts, hidden, ...] like gate");
    return st;
}

// The shared experts (gate/up [I_s, bytes], down [H, bytes] each), for hidden size H.
std::vector<Expert> shared_experts(const std::vector<SharedSpec>& shared, int64_t H) {
    std::vector<Expert> out;
    for (size_t s = 0; s < shared.size(); ++s) {
        const auto& [sg, sgt, su, sut, sd, sdt] = shared[s];
        auto a = matrices(sg, sgt, H, "shared gate"), b = matrices(su, sut, H, "shared up");
        if (a.size() != 1 || b.size() != 1 || a[0].rows != b[0].rows) fail("shared gate/up must be 2-D [intermediate, ...]");
        auto dd = matrices(sd, sdt, a[0].rows, "shared down");
        if (dd.size() != 1 || dd[0].rows != H) fail("shared down must be 2-D [hidden, ...]");
        out.push_back(Expert{a[0], b[0], dd[0]});
    }
    return out;
}

// Expert ids [T, A] as int64 C-contiguous: taken untyped and checked, since nanobind would convert float ids
// to int64 by truncating them (1.9 -> expert 1) without a word.
const int64_t* expert_ids(const Any& ids, int64_t T, const char* what) {
    if (ids.ndim() != 2 || static_cast<int64_t>(ids.shape(0)) != T)
        fail(std::string(what) + " must be [tokens, top_k] int64 with x's " + std::to_string(T) + " tokens");
    if (ids.dtype() != nb::dtype<int64_t>())
        fail(std::string(what) + " is " + dtype_name(ids.dtype()) +
             "; expert ids must be int64 (pass ids.astype(np.int64) where they are integers)");
    if (!c_contiguous(ids)) fail(std::string(what) + " is not C-contiguous");
    return static_cast<const int64_t*>(ids.data());
}

// The call's arrays, checked. picked_only (the ids are final): the table holds only the experts the ids pick,
// in ascending id order, and the call takes the ids renumbered to it (skipped ones -1), instead of a table of
// all E experts (building that took a cold call with Qwen3's 128 experts ~8 us more). moe() sums the experts in
// table order, so both give the same floats.
MoeCall prepare_moe(const CF32& x, const Any& ids, const CF32& weights, const Any& gate, int gate_type, const Any& up,
                    int up_type, const Any& down, int down_type, const std::vector<SharedSpec>& shared,
                    const std::optional<U8>& skip, const Mut& out, const std::string& isa, bool picked_only) {
    MoeCall c{};
    if (x.ndim() != 2) fail("x must be [tokens, hidden] float32");
    c.T = x.shape(0);
    c.H = x.shape(1);
    const int64_t* id = expert_ids(ids, c.T, "ids");
    c.A = static_cast<int>(ids.shape(1));
    check_2d(Any(weights), c.T, c.A, "weights");
    c.out = written<float>(out, {c.T, c.H}, "out");
    check_no_overlap(x.data(), c.T, c.H, c.out);
    const ExpertStacks st = expert_stacks(gate, gate_type, up, up_type, down, down_type, c.H);
    c.shared = shared_experts(shared, c.H);
    const int64_t E = st.gate.count, n = c.T * c.A;
    for (int64_t i = 0; i < n; ++i)
        if (id[i] < -1 || id[i] >= E)
            fail("ids holds " + std::to_string(id[i]) + ", outside -1 (skip) .. " + std::to_string(E - 1));
    const uint8_t* skipped = nullptr;
    if (skip) {
        if (skip->ndim() != 1 || static_cast<int64_t>(skip->shape(0)) != E) fail("skip must be uint8 [experts]");
        skipped = skip->data();
    }
    c.x = x.data();
    c.w = weights.data();
    c.isa = isa_arg(isa);
    if (!picked_only) {
        c.experts = st.all();
        if (skipped) c.skip.assign(skipped, skipped + E);
        c.E = E;
        c.ids = id;
        return c;
    }
    std::vector<uint8_t> picked(static_cast<size_t>(E), 0);
    for (int64_t i = 0; i < n; ++i)
        if (id[i] >= 0 && !(skipped && skipped[id[i]])) picked[static_cast<size_t>(id[i])] = 1;
    std::vector<int64_t> slot(static_cast<size_t>(E), -1);  // an expert's place in the table; -1: none
    for (int64_t e = 0; e < E; ++e)
        if (picked[static_cast<size_t>(e)]) {
            slot[static_cast<size_t>(e)] = static_cast<int64_t>(c.experts.size());
            c.experts.push_back(st.at(e));
        }
    c.picked_ids.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
        c.picked_ids[static_cast<size_t>(i)] = id[i] < 0 ? -1 : slot[static_cast<size_t>(id[i])];
    c.E = static_cast<int64_t>(c.experts.size());
    c.ids = c.picked_ids.data();
    return c;
}

void run_moe(ThreadPool& pool, const MoeCall& c) {
    moe(pool, c.x, c.T, c.H, c.ids, c.w, c.A, c.experts.data(), c.E, c.shared.data(), static_cast<int>(c.shared.size()),
        c.skip.empty() ? nullptr : c.skip.data(), c.out, c.isa);
}

// Streaming-read kernels for the bandwidth probe: XOR every 64-byte line into independent accumulators,
// with the widest vectors this CPU has (a scalar loop cannot saturate DRAM), over the two halves of the
// range at once, each prefetched kReadAhead bytes ahead. One core here reads ~13 GB/s with plain loads,
// ~16.5 with the prefetch, ~17 with the prefetch over two streams (2 threads: 24, 31, 33 GB/s): the
// probe is the roofline the kernels are measured against, so it reads the fastest way known, as they do.
constexpr size_t kReadAhead = 1024 / sizeof(uint64_t);

__attribute__((target("avx512f"))) uint64_t read_avx512(const uint64_t* p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const size_t half = n / 2 / 16 * 16;
    const uint64_t* q = p + half;
    size_t i = 0;
    for (; i + 16 <= half; i += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(p + i + kReadAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p + i + 8 + kReadAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q + i + kReadAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q + i + 8 + kReadAhead), _MM_HINT_T0);
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 8));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(q + i));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(q + i + 8));
    }
    for (i = 2 * half; i + 8 <= n; i += 8) a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    uint64_t out[8];
    _mm512_storeu_si512(out, a0);
    return out[0] ^ out[7];
}

__attribute__((target("avx2"))) uint64_t read_avx2(const uint64_t* p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    const size_t half = n / 2 / 8 * 8;
    const uint64_t* q = p + half;
    size_t i = 0;
    for (; i + 8 <= half; i += 8) {  // a 64-byte line from each stream
        _mm_prefetch(reinterpret_cast<const char*>(p + i + kReadAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q + i + kReadAhead), _MM_HINT_T0);
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 4)));
    }
    for (i = 2 * half; i + 4 <= n; i += 4)
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t out[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a0);
    return out[0] ^ out[3];
}

uint64_t read_scalar(const uint64_t* p, size_t n) {
    uint64_t a = 0;
    for (size_t i = 0; i < n; ++i) a ^= p[i];
    return a;
}

// One streaming read over buf[0, n) on the pool's threads; returns seconds.
double read_pass(ThreadPool& pool, const uint64_t* buf, size_t n) {
    auto kernel = isa_supported(Isa::Avx512) ? read_avx512 : isa_supported(Isa::Avx2) ? read_avx2 : read_scalar;
    const int64_t chunks = pool.threads() * 16;
    std::vector<uint64_t> sink(pool.threads() * 8, 0);
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(chunks, [&](int64_t c, int thread) {
        const size_t lo = n * c / chunks / 32 * 32, hi = n * (c + 1) / chunks / 32 * 32;
        sink[thread * 8] ^= kernel(buf + lo, hi - lo);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    volatile uint64_t keep = sink[0];
    (void)keep;
    return s;
}

// GB/s of streaming reads over a buffer far larger than the caches, on the pool's threads (best of
// `repeats`): the roofline that decode speed is measured against. The buffer is weight memory
// (pages.h, huge pages where the kernel gives them), as the weights the engine streams are.
double read_bandwidth(ThreadPool& pool, size_t bytes, int repeats) {
    const size_t n = bytes / sizeof(uint64_t);
    std::unique_ptr<PageBuffer, void (*)(PageBuffer*)> pages(new PageBuffer(allocate_pages(n * sizeof(uint64_t))),
                                                            [](PageBuffer* b) { release_pages(*b); delete b; });
    auto* buf = reinterpret_cast<uint64_t*>(pages->data);
    for (size_t i = 0; i < n; i += 512) buf[i] = i;  // touch every page
    double best = 0;
    for (int r = 0; r < repeats; ++r)
        best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / read_pass(pool, buf, n) / 1e9);
    return best;
}

// The GgmlType of a KV cache array (float32, float16 or bfloat16).
template <typename Array>
GgmlType cache_type_of(const Array& a, const char* what) {
    const auto dt = a.dtype();
    if (dt == nb::dtype<float>()) return GgmlType::F32;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16) return GgmlType::F16;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) return GgmlType::BF16;
    fail(std::string(what) + " must be float32, float16 or bfloat16");
}

using WeightArg = std::tuple<Any, int>;  // (bytes, ggml type id)

// One layer's MLA weights, checked once at load so that a decode step's call checks only its activations.
struct MlaHandle {
    MlaLayer layer;
    int64_t D = 0, Rq = 0;
    std::vector<nb::object> keep_alive;  // the arrays the Weights point into
};

Weight one_matrix(const WeightArg& w, int64_t cols, int64_t rows, const char* what, std::vector<nb::object>& keep) {
    auto ws = matrices(std::get<0>(w), std::get<1>(w), cols, what);
    if (ws.size() != 1 || ws[0].rows != rows)
        fail(std::string(what) + " must be one matrix of " + std::to_string(rows) + " rows of " + std::to_string(cols) +
             " values");
    keep.push_back(nb::cast(std::get<0>(w)));
    return ws[0];
}

std::vector<float> norm_weight(const CF32& w, int64_t n, const char* what) {
    if (w.ndim() != 1 || static_cast<int64_t>(w.shape(0)) != n)
        fail(std::string(what) + " must be float32 [" + std::to_string(n) + "]");
    return std::vector<float>(w.data(), w.data() + n);
}

MlaHandle make_mla(int64_t D, int64_t H, int64_t Dn, int64_t Dr, int64_t R, int64_t Dv,
                   const std::optional<WeightArg>& q_a, const std::optional<CF32>& q_a_norm, const WeightArg& q,
                   const WeightArg& kv_a, const CF32& kv_a_norm, const WeightArg& uk, const WeightArg& uv,
                   const WeightArg& o, float eps, float scale, bool rope_interleaved) {
    if (D <= 0 || H <= 0 || Dn <= 0 || Dr <= 0 || Dr % 2 || R <= 0 || Dv <= 0)
        fail("MLA dimensions must be positive (and the rope dim even)");
    check_dims({D, H, Dn, Dr, R, Dv}, "MLA");
    check_eps(eps);
    check_scale(scale);
    MlaHandle m;
    MlaLayer& L = m.layer;
    L.H = H, L.Dn = Dn, L.Dr = Dr, L.R = R, L.Dv = Dv, L.eps = eps, L.scale = scale;
    L.rope_interleaved = rope_interleaved;
    m.D = D;
    if (q_a.has_value() != q_a_norm.has_value()) fail("q_a and q_a_norm come together (a q LoRA) or not at all");
    if (q_a) {
        const Any& a = std::get<0>(*q_a);
        if (a.ndim() != 2) fail("q_a must be a 2-D matrix [q_lora_rank, row bytes]");
        m.Rq = a.shape(0);
        L.q_a = one_matrix(*q_a, D, m.Rq, "q_a", m.keep_alive);
        L.q_a_norm = norm_weight(*q_a_norm, m.Rq, "q_a_norm");
    }
    L.q = one_matrix(q, q_a ? m.Rq : D, H * (Dn + Dr), "q", m.keep_alive);
    L.kv_a = one_matrix(kv_a, D, R + Dr, "kv_a", m.keep_alive);
    L.kv_a_norm = norm_weight(kv_a_norm, R, "kv_a_norm");
    L.uk = matrices(std::get<0>(uk), std::get<1>(uk), Dn, "uk");
    L.uv = matrices(std::get<0>(uv), std::get<1>(uv), R, "uv");
    if (static_cast<int64_t>(L.uk.size()) != H || L.uk[0].rows != R)
        fail("uk must be the per-head stack [heads, kv_lora_rank, row bytes] of W_UK");
    if (static_cast<int64_t>(L.uv.size()) != H || L.uv[0].rows != Dv)
        fail("uv must be the per-head stack [heads, v_head_dim, row bytes] of W_UV");
    m.keep_alive.push_back(nb::cast(std::get<0>(uk)));
    m.keep_alive.push_back(nb::cast(std::get<0>(uv)));
    L.o = one_matrix(o, H * Dv, D, "o", m.keep_alive);
    return m;
}

// One layer's grouped-query attention weights (Qwen3-MoE), checked once at load.
struct GqaHandle {
    GqaLayer layer;
    int64_t D = 0;
    std::vector<nb::object> keep_alive;  // the arrays the Weights point into
};

GqaHandle make_gqa(int64_t D, int64_t H, int64_t G, int64_t Dh, const WeightArg& q, const WeightArg& k,
                   const WeightArg& v, const WeightArg& o, const std::optional<CF32>& q_norm,
                   const std::optional<CF32>& k_norm, float eps, float scale, bool rope_interleaved) {
    if (D <= 0 || H <= 0 || G <= 0 || Dh <= 0 || Dh % 2)
        fail("GQA dimensions must be positive (and the head dim even: rope rotates pairs)");
    check_dims({D, H, G, Dh}, "GQA");
    check_scale(scale);
    if (H % G) fail("heads (" + std::to_string(H) + ") must be a multiple of kv_heads (" + std::to_string(G) + ")");
    if (q_norm.has_value() != k_norm.has_value())
        fail("q_norm and k_norm come together (per-head norms) or not at all");
    check_eps(eps);
    GqaHandle m;
    GqaLayer& L = m.layer;
    L.H = H, L.G = G, L.Dh = Dh, L.eps = eps, L.scale = scale, L.rope_interleaved = rope_interleaved;
    m.D = D;
    L.q = one_matrix(q, D, H * Dh, "q", m.keep_alive);
    L.k = one_matrix(k, D, G * Dh, "k", m.keep_alive);
    L.v = one_matrix(v, D, G * Dh, "v", m.keep_alive);
    L.o = one_matrix(o, H * Dh, D, "o", m.keep_alive);
    if (q_norm) {
        L.q_norm = norm_weight(*q_norm, Dh, "q_norm");
        L.k_norm = norm_weight(*k_norm, Dh, "k_norm");
    }
    return m;
}

// The RMSNorm a call applies to its input rows of D values, if any: the weight [D] and eps checked when made
// (`whose` names the weight in the error), with the GIL held; apply() once it is released.
struct InputNorm {
    const float* w = nullptr;
    float eps = 0;
    InputNorm(const std::optional<CF32>& norm, int64_t D, float eps_, const char* whose) : eps(eps_) {
        if (!norm) return;
        if (norm->ndim() != 1 || static_cast<int64_t>(norm->shape(0)) != D)
            fail("norm must be float32 [" + std::to_string(D) + "] (" + whose + ")");
        check_eps(eps);
        w = norm->data();
    }
    // x [T, D], or x normed into a buffer of the calling thread.
    const float* apply(const float* x, int64_t T, int64_t D) const {
        if (!w) return x;
        thread_local std::vector<float> buf;
        buf.resize(static_cast<size_t>(T * D));
        rms_norm_rows(x, T, D, w, eps, buf.data());
        return buf.data();
    }
};

// The pre-norm block around a fused layer (Engine.moe_layer / mla_forward): the layer reads
// rmsnorm(x) * norm where a norm is given, and with `residual` its output is x + layer(...), so a
// decoder layer's `h = x + op(norm(x))` is one call (in a decode step each torch op between two
// engine calls cost ~40 us, with the caches just swept by the weights). Checked when made, with the
// GIL held; input() norms x once the GIL is released (a 512-token chunk is ~1 ms of it).
struct PreNorm {
    const float* x;
    InputNorm norm;
    bool residual;
    int64_t T, D;
    PreNorm(const CF32& x_, int64_t D_, const std::optional<CF32>& norm_, float eps_, bool residual_, const void* out)
        : x(x_.data()), norm(norm_, D_, eps_, "the block's RMSNorm weight"), residual(residual_),
          T(static_cast<int64_t>(x_.shape(0))), D(D_) {
        check_no_overlap(x, T, D, out);
    }
    // What the layer reads: x, or x normed into a buffer of the calling thread.
    const float* input() const { return norm.apply(x, T, D); }
    void finish(float* y) const {
        if (residual)
            for (int64_t i = 0; i < T * D; ++i) y[i] += x[i];
    }
};

// One MoE layer's router, routed and shared experts, checked once at load (Engine.moe_layer).
struct MoeHandle {
    Router router;
    std::vector<Expert> experts, shared;
    int64_t H = 0;
    std::vector<nb::object> keep_alive;
};

MoeHandle make_moe(const Any& gate, int gate_type, const Any& up, int up_type, const Any& down, int down_type,
                   const std::vector<SharedSpec>& shared, const WeightArg& router, const std::optional<CF32>& bias,
                   int top_k, const std::string& scoring, const std::string& method, int n_group, int topk_group,
                   bool norm_topk, float scaling) {
    MoeHandle m;
    const Any& rw = std::get<0>(router);
    if (rw.ndim() != 2) fail("router must be a 2-D matrix [experts, hidden]");
    m.H = rw.shape(1);
    m.experts = expert_stacks(gate, gate_type, up, up_type, down, down_type, m.H).all();
    m.shared = shared_experts(shared, m.H);
    const int64_t E = static_cast<int64_t>(m.experts.size());
    Router& r = m.router;
    auto rws = matrices(rw, std::get<1>(router), m.H, "router");
    if (rws[0].rows != E) fail("router has " + std::to_string(rws[0].rows) + " rows for " + std::to_string(E) + " experts");
    r.w = rws[0];
    if (top_k < 1 || top_k > E) fail("top_k must be 1.." + std::to_string(E));
    r.top_k = top_k;
    if (scoring == "softmax") r.scoring = Router::Scoring::Softmax;
    else if (scoring == "sigmoid") r.scoring = Router::Scoring::Sigmoid;
    else fail("scoring '" + scoring + "' is not softmax or sigmoid");
    if (method == "greedy") r.method = Router::Method::Greedy;
    else if (method == "group_limited_greedy") r.method = Router::Method::GroupLimited;
    else if (method == "noaux_tc") r.method = Router::Method::NoAuxTc;
    else fail("topk_method '" + method + "' is not greedy, group_limited_greedy or noaux_tc");
    if (n_group < 1 || E % n_group || topk_group < 1 || topk_group > n_group)
        fail("n_group must divide the " + std::to_string(E) + " experts and topk_group be 1..n_group");
    if (r.method == Router::Method::NoAuxTc && E / n_group < 2) fail("noaux_tc needs at least 2 experts per group");
    if (r.method != Router::Method::Greedy &&
        static_cast<int64_t>(topk_group) * (E / n_group) < top_k)
        fail("the kept groups hold fewer experts than top_k");
    if (!std::isfinite(scaling)) fail("routed_scaling_factor must be finite, not " + std::to_string(scaling));
    r.n_group = n_group, r.topk_group = topk_group, r.norm_topk = norm_topk, r.scaling = scaling;
    if (r.method == Router::Method::NoAuxTc) {
        if (!bias || bias->ndim() != 1 || static_cast<int64_t>(bias->shape(0)) != E)
            fail("noaux_tc needs the correction bias, float32 [" + std::to_string(E) + "]");
        r.bias.assign(bias->data(), bias->data() + E);
        for (float b : r.bias)
            if (!std::isfinite(b)) fail("the correction bias holds " + std::to_string(b) + "; it must be finite");
    }
    m.keep_alive = {nb::cast(gate), nb::cast(up), nb::cast(down), nb::cast(rw)};
    keep_shared(shared, m.keep_alive);
    return m;
}

// One MoE layer's routed experts behind fixed staging buffers (pinned host memory when the model is on a
// GPU): x [T, H], ids / weights [T, A] and out [T, H] never move, so the host functions that start
// (staged_submit) and join (staged_wait) the call can be enqueued on a GPU stream and replayed by a CUDA
// graph. The stream writes the inputs before the first and reads out after the second. A host function
// cannot raise: an error is kept for check().
struct StagedMoe {
    EngineHandle* engine = nullptr;
    MoeCall call;
    std::vector<nb::object> keep_alive;  // the engine, the buffers and the weights
    std::mutex error_mutex;
    std::string error;

    void record(const std::string& what) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = what;
    }
    ~StagedMoe() {
        try {
            if (engine) engine->pool.wait();
        } catch (...) {
        }
    }
};

void staged_submit(void* arg) noexcept {
    auto* s = static_cast<StagedMoe*>(arg);
    const MoeCall& c = s->call;
    for (int64_t i = 0; i < c.T * c.A; ++i)  // the ids were written after the object was checked
        if (c.ids[i] < -1 || c.ids[i] >= c.E) {
            s->record("staged MoE: ids holds " + std::to_string(c.ids[i]) + ", outside -1 (skip) .. " +
                      std::to_string(c.E - 1) + "; the layer's routed experts were skipped");
            std::fill(c.out, c.out + c.T * c.H, 0.0f);
            return;
        }
    try {
        s->engine->pool.submit([s] { run_moe(s->engine->pool, s->call); });
    } catch (const std::exception& e) {
        s->record(std::string("staged MoE: ") + e.what());
    }
}

void staged_wait(void* arg) noexcept {
    auto* s = static_cast<StagedMoe*>(arg);
    try {
        s->engine->pool.wait();
    } catch (const std::exception& e) {
        s->record(std::string("staged MoE: ") + e.what());
    }
}

// A staging buffer, float32 C-contiguous as it comes: the call reads it when it starts, so a converted copy
// (nanobind's, of a float64 or strided array) would never see what the stream writes into the array later.
CF32 staging_buffer(const Any& a, const char* what) {
    if (a.dtype() != nb::dtype<float>() || !c_contiguous(a))
        fail(std::string(what) + " is " + dtype_name(a.dtype()) + (c_contiguous(a) ? "" : " and not C-contiguous") +
             "; a staging buffer is read when each call starts, so it must be a C-contiguous float32 array itself");
    return nb::cast<CF32>(nb::cast(a));
}

void make_staged(StagedMoe* self, nb::object engine, const Any& x, const Any& ids, const Any& weights, const Mut& out,
                 const Any& gate, int gate_type, const Any& up, int up_type, const Any& down, int down_type,
                 const std::optional<U8>& skip, const std::string& isa) {
    if (!nb::isinstance<EngineHandle>(engine)) fail("engine must be an offload._C.Engine");
    MoeCall c = prepare_moe(staging_buffer(x, "x"), ids, staging_buffer(weights, "weights"), gate, gate_type, up,
                            up_type, down, down_type, {}, skip, out, isa, false);
    EngineHandle* handle = &nb::cast<EngineHandle&>(engine);
    auto* s = new (self) StagedMoe();
    s->engine = handle;
    s->call = std::move(c);
    s->keep_alive = {engine, nb::cast(x), nb::cast(ids), nb::cast(weights), nb::cast(out), nb::cast(gate),
                     nb::cast(up), nb::cast(down)};
}

// Room in a layer's cache arrays (`held` positions) for positions start..start+T.
void check_room(int64_t held, int64_t start, int64_t T) {
    if (start < 0 || T > held || start > held - T)
        fail("the cache holds " + std::to_string(held) + " positions; positions " + std::to_string(start) + ".." +
             std::to_string(start + T) + " do not fit (reserve the cache first)");
}

// What Engine.mla_forward, gqa_forward and decoder_stack do alike with either attention block: the width of
// its cos / sin rows, the checks of its two cache arrays at the boundary (their dtype, the cache type they
// share; their shapes; room for the new positions), and the block itself.
int64_t rope_half(const MlaHandle& m) { return m.layer.Dr / 2; }
int64_t rope_half(const GqaHandle& m) { return m.layer.Dh / 2; }
GgmlType cache_type(const MlaHandle& m, const Mut& c_kv, const Mut& k_pe, int64_t start, int64_t T) {
    const MlaLayer& L = m.layer;
    const GgmlType type = cache_type_of(c_kv, "c_kv");
    if (cache_type_of(k_pe, "k_pe") != type) fail("c_kv and k_pe must share a dtype");
    if (c_kv.ndim() != 2 || k_pe.ndim() != 2 || static_cast<int64_t>(c_kv.shape(1)) != L.R ||
        static_cast<int64_t>(k_pe.shape(1)) != L.Dr || !c_contiguous(Any(c_kv)) || !c_contiguous(Any(k_pe)))
        fail("c_kv must be C-contiguous [positions, " + std::to_string(L.R) + "] and k_pe [positions, " +
             std::to_string(L.Dr) + "]");
    check_room(static_cast<int64_t>(std::min(c_kv.shape(0), k_pe.shape(0))), start, T);
    return type;
}
GgmlType cache_type(const GqaHandle& m, const Mut& k_cache, const Mut& v_cache, int64_t start, int64_t T) {
    const GqaLayer& L = m.layer;
    const GgmlType type = cache_type_of(k_cache, "k_cache");
    if (cache_type_of(v_cache, "v_cache") != type) fail("k_cache and v_cache must share a dtype");
    for (const Mut* c : {&k_cache, &v_cache})
        if (c->ndim() != 3 || static_cast<int64_t>(c->shape(1)) != L.G || static_cast<int64_t>(c->shape(2)) != L.Dh ||
            !c_contiguous(Any(*c)))
            fail("k_cache and v_cache must be C-contiguous [positions, " + std::to_string(L.G) + ", " +
                 std::to_string(L.Dh) + "]");
    check_room(static_cast<int64_t>(std::min(k_cache.shape(0), v_cache.shape(0))), start, T);
    return type;
}
void run_block(ThreadPool& pool, const MlaHandle& m, const float* x, int64_t T, const float* cos, const float* sin,
               GgmlType type, const Mut& a, const Mut& b, int64_t start, float* out, Isa isa) {
    mla_forward(pool, m.layer, x, T, cos, sin, type, static_cast<uint8_t*>(a.data()), static_cast<uint8_t*>(b.data()),
                start, out, isa);
}
void run_block(ThreadPool& pool, const GqaHandle& m, const float* x, int64_t T, const float* cos, const float* sin,
               GgmlType type, const Mut& a, const Mut& b, int64_t start, float* out, Isa isa) {
    gqa_forward(pool, m.layer, x, T, cos, sin, type, static_cast<uint8_t*>(a.data()), static_cast<uint8_t*>(b.data()),
                start, out, isa);
}

// Engine.mla_forward / gqa_forward: one layer's attention block, its caches a, b (c_kv, k_pe or k, v) written
template <class Handle>
void attention_block(EngineHandle& h, const Handle& m, const CF32& x, const CF32& cos, const CF32& sin, const Mut& a,
                     const Mut& b, int64_t start, const Mut& out, const std::string& isa,
                     const std::optional<CF32>& norm, float eps, bool residual) {
    if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != m.D)
        fail("x must be float32 [tokens, " + std::to_string(m.D) + "]");
    const int64_t T = x.shape(0);
    check_2d(Any(cos), T, rope_half(m), "cos");
    check_2d(Any(sin), T, rope_half(m), "sin");
    float* y = written<float>(out, {T, m.D}, "out");
    const GgmlType type = cache_type(m, a, b, start, T);
    const Isa level = isa_arg(isa);
    const PreNorm block(x, m.D, norm, eps, residual, y);
    h.pool.wait();
    nb::gil_scoped_release release;
    run_block(h.pool, m, block.input(), T, cos.data(), sin.data(), type, a, b, start, y, level);
    block.finish(y);
}

// Consecutive decoder layers whose attention block (MLA or GQA) and MoE layer are each one engine call, with
// their two RMSNorms: Engine.decoder_stack runs them all in one call, the hidden state kept here between
// layers (in a decode step the Python between two layers' calls cost ~0.1 ms, run with cold caches).
struct StackLayer {
    const MlaHandle* mla = nullptr;
    const GqaHandle* gqa = nullptr;
    const MoeHandle* moe = nullptr;
    std::vector<float> norm1, norm2;
    float eps1 = 0, eps2 = 0;
};

struct DecoderStack {
    std::vector<StackLayer> layers;
    int64_t D = 0, rope_half = 0;
    std::vector<nb::object> keep_alive;  // the layer handles
};

DecoderStack make_stack(const std::vector<nb::object>& attn, const std::vector<nb::object>& moe,
                        const std::vector<CF32>& norm1, const std::vector<float>& eps1, const std::vector<CF32>& norm2,
                        const std::vector<float>& eps2) {
    const size_t n = attn.size();
    if (n == 0) fail("a decoder stack needs at least one layer");
    if (moe.size() != n || norm1.size() != n || eps1.size() != n || norm2.size() != n || eps2.size() != n)
        fail("attn, moe, norm1, eps1, norm2 and eps2 must have one entry per layer");
    DecoderStack st;
    for (size_t i = 0; i < n; ++i) {
        StackLayer l;
        const std::string at = "layer " + std::to_string(i);
        if (nb::isinstance<MlaHandle>(attn[i])) l.mla = nb::inst_ptr<MlaHandle>(attn[i]);
        else if (nb::isinstance<GqaHandle>(attn[i])) l.gqa = nb::inst_ptr<GqaHandle>(attn[i]);
        else fail(at + ": attn must be an MlaLayer or a GqaLayer");
        if (!nb::isinstance<MoeHandle>(moe[i])) fail(at + ": moe must be a MoeLayer");
        l.moe = nb::inst_ptr<MoeHandle>(moe[i]);
        const int64_t D = l.mla ? l.mla->D : l.gqa->D;
        const int64_t half = l.mla ? rope_half(*l.mla) : rope_half(*l.gqa);
        if (i == 0) st.D = D, st.rope_half = half;
        if (D != st.D || l.moe->H != D || half != st.rope_half)
            fail(at + ": its hidden size or rope dims differ from layer 0's (" + std::to_string(st.D) + ", " +
                 std::to_string(2 * st.rope_half) + ")");
        if (!st.layers.empty() && (l.mla != nullptr) != (st.layers[0].mla != nullptr))
            fail(at + ": every layer of a stack has the same attention (MLA or GQA)");
        for (float e : {eps1[i], eps2[i]}) check_eps(e, at + ": ");
        if (!st.layers.empty() && l.moe->router.top_k != st.layers[0].moe->router.top_k)
            fail(at + ": its MoE picks " + std::to_string(l.moe->router.top_k) + " experts a token, layer 0's " +
                 std::to_string(st.layers[0].moe->router.top_k));
        l.norm1 = norm_weight(norm1[i], D, "norm1");
        l.norm2 = norm_weight(norm2[i], D, "norm2");
        l.eps1 = eps1[i], l.eps2 = eps2[i];
        st.layers.push_back(std::move(l));
        st.keep_alive.push_back(attn[i]);
        st.keep_alive.push_back(moe[i]);
    }
    return st;
}

}  // namespace

void register_engine(nb::module_& m) {
    nb::class_<MoeHandle>(m, "MoeLayer", nb::is_weak_referenceable(),
                          "One MoE layer (router, routed and shared experts) for Engine.moe_layer, checked once.")
        .def(nb::new_(&make_moe), nb::arg("gate"), nb::arg("gate_type"), nb::arg("up"), nb::arg("up_type"),
             nb::arg("down"), nb::arg("down_type"), nb::arg("shared"), nb::arg("router"), nb::arg("bias").none(),
             nb::arg("top_k"), nb::arg("scoring"), nb::arg("topk_method"), nb::arg("n_group") = 1,
             nb::arg("topk_group") = 1, nb::arg("norm_topk_prob") = false, nb::arg("routed_scaling_factor") = 1.0f,
             "Expert stacks as Engine.moe takes them; router (bytes [E, H], ggml type id); bias [E] for noaux_tc.");

    nb::class_<MlaHandle>(m, "MlaLayer", nb::is_weak_referenceable(),
                          "One layer's MLA weights for Engine.mla_forward (checked here once, at load).")
        .def(nb::new_(&make_mla), nb::arg("hidden"), nb::arg("heads"), nb::arg("nope_dim"), nb::arg("rope_dim"),
             nb::arg("kv_lora_rank"), nb::arg("v_dim"), nb::arg("q_a").none(), nb::arg("q_a_norm").none(),
             nb::arg("q"), nb::arg("kv_a"), nb::arg("kv_a_norm"), nb::arg("uk"), nb::arg("uv"), nb::arg("o"),
             nb::arg("eps"), nb::arg("scale"), nb::arg("rope_interleaved") = true,
             "Weights are (bytes, ggml type id): q_a [Rq, D] with q_a_norm [Rq] (or None without a q LoRA), q [H*(Dn+Dr), "
             "Rq or D], kv_a [R+Dr, D], kv_a_norm [R], uk [H, R, Dn], uv [H, Dv, R], o [D, H*Dv].");

    nb::class_<GqaHandle>(m, "GqaLayer", nb::is_weak_referenceable(),
                          "One layer's grouped-query attention weights for Engine.gqa_forward (checked here once).")
        .def(nb::new_(&make_gqa), nb::arg("hidden"), nb::arg("heads"), nb::arg("kv_heads"), nb::arg("head_dim"),
             nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("o"), nb::arg("q_norm").none(), nb::arg("k_norm").none(),
             nb::arg("eps"), nb::arg("scale"), nb::arg("rope_interleaved") = false,
             "Weights are (bytes, ggml type id): q [H*Dh, D], k and v [G*Dh, D], o [D, H*Dh]; q_norm, k_norm [Dh] "
             "float32 (per-head RMSNorms before rope, Qwen3) or None.");

    nb::class_<DecoderStack>(m, "DecoderStack", nb::is_weak_referenceable(),
                             "Consecutive decoder layers (attention block + MoE layer, each one engine call) for "
                             "Engine.decoder_stack, checked here once.")
        .def(nb::new_(&make_stack), nb::arg("attn"), nb::arg("moe"), nb::arg("norm1"), nb::arg("eps1"),
             nb::arg("norm2"), nb::arg("eps2"),
             "Per layer: its MlaLayer or GqaLayer, its MoeLayer, and the RMSNorms before them (float32 [D], eps).")
        .def("__len__", [](const DecoderStack& st) { return st.layers.size(); });

    m.def("cuda_driver_available", &cuda_driver_available,
          "Whether the CUDA driver (libcuda.so.1) is there, for StagedMoe.launch / launch_wait.");

    nb::class_<StagedMoe>(m, "StagedMoe",
                          "One MoE layer's routed experts over fixed staging buffers, started and joined by host "
                          "functions: enqueued on a CUDA stream (launch / launch_wait, capturable in a CUDA graph) "
                          "or called here (submit / wait).")
        .def("__init__", &make_staged, nb::arg("engine"), nb::arg("x"), nb::arg("ids"), nb::arg("weights"),
             nb::arg("out"), nb::arg("gate"), nb::arg("gate_type"), nb::arg("up"), nb::arg("up_type"), nb::arg("down"),
             nb::arg("down_type"), nb::arg("skip").none() = nb::none(), nb::arg("isa") = "auto",
             "Buffers x [T, H], weights [T, A] float32, ids [T, A] int64 (filled with -1 until written), out [T, H]; "
             "expert stacks as Engine.moe takes them; skip [E] uint8 leaves experts out.")
        .def(
            "launch",
            [](StagedMoe& s, uintptr_t stream) { launch_host_fn(stream, &staged_submit, &s); }, nb::arg("stream"),
            "Enqueue the start of the call on a CUDA stream (a cudaStream_t as an int: torch's Stream.cuda_stream).")
        .def(
            "launch_wait",
            [](StagedMoe& s, uintptr_t stream) { launch_host_fn(stream, &staged_wait, &s); }, nb::arg("stream"),
            "Enqueue the join: the stream's later work (the copy of out) waits for the CPU experts.")
        .def(
            "submit", [](StagedMoe& s) { staged_submit(&s); }, "Start the call now (what launch enqueues).")
        .def(
            "wait",
            [](StagedMoe& s) {
                nb::gil_scoped_release release;
                staged_wait(&s);
            },
            "Join it now (what launch_wait enqueues).")
        .def(
            "check",
            [](StagedMoe& s) {
                std::string error;
                {
                    std::lock_guard<std::mutex> lock(s.error_mutex);
                    std::swap(error, s.error);
                }
                if (!error.empty()) throw std::runtime_error(error);
            },
            "Raise the error a host function kept since the last check (RuntimeError), if any.");

    nb::class_<EngineHandle>(m, "Engine", "The CPU engine: a persistent thread pool and the ops that run on it.")
        .def(nb::init<int>(), nb::arg("threads"))
        .def_prop_ro("threads", [](EngineHandle& h) { return h.pool.threads(); })
        .def(
            "linear",
            [](EngineHandle& h, int wtype, const Any& weight, const CF32& x, const Mut& out, const std::string& isa,
               const std::optional<CF32>& norm, float eps) {
                if (x.ndim() != 2) fail("x must be [tokens, in_features] float32");
                const int64_t T = x.shape(0), K = x.shape(1);
                auto w = matrices(weight, wtype, K, "weight");
                if (w.size() != 1) fail("weight must be a 2-D matrix");
                float* y = written<float>(out, {T, w[0].rows}, "out");
                const Isa level = isa_arg(isa);
                const InputNorm pre(norm, K, eps, "the RMSNorm weight before the matrix");
                h.pool.wait();
                nb::gil_scoped_release release;
                linear(h.pool, w[0], pre.apply(x.data(), T, K), T, y, level);
            },
            nb::arg("wtype"), nb::arg("weight"), nb::arg("x"), nb::arg("out"), nb::arg("isa") = "auto",
            nb::arg("norm") = nb::none(), nb::arg("eps") = 1e-6f,
            "out[T, N] = x[T, K] @ weight[N, K]^T with weight in a GGUF block type (its ggml id). norm [K] (float32): "
            "the matrix takes rmsnorm(x) * norm instead of x (a model's final norm before its output head).")
        .def(
            "moe_layer",
            [](EngineHandle& h, const MoeHandle& m, const CF32& x, const Mut& out, const Mut& ids, const Mut& weights,
               const std::string& isa, const std::optional<CF32>& norm, float eps, bool residual) {
                if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != m.H)
                    fail("x must be float32 [tokens, " + std::to_string(m.H) + "]");
                const int64_t T = x.shape(0), A = m.router.top_k;
                float* y = written<float>(out, {T, m.H}, "out");
                int64_t* id = written<int64_t>(ids, {T, A}, "ids");
                float* wt = written<float>(weights, {T, A}, "weights");
                const Isa level = isa_arg(isa);
                const PreNorm block(x, m.H, norm, eps, residual, y);
                h.pool.wait();
                nb::gil_scoped_release release;
                const float* in = block.input();
                route(h.pool, m.router, in, T, id, wt, level);
                moe(h.pool, in, T, m.H, id, wt, static_cast<int>(A), m.experts.data(),
                    static_cast<int64_t>(m.experts.size()), m.shared.data(), static_cast<int>(m.shared.size()), nullptr,
                    y, level);
                block.finish(y);
            },
            nb::arg("layer"), nb::arg("x"), nb::arg("out"), nb::arg("ids"), nb::arg("weights"), nb::arg("isa") = "auto",
            nb::arg("norm") = nb::none(), nb::arg("eps") = 1e-6f, nb::arg("residual") = false,
            "One MoE layer: route x [T, H] (ids, weights [T, top_k] are written), then the fused experts -> out. "
            "norm [H] (float32): the layer reads rmsnorm(x) * norm instead of x; residual: out = x + the layer's output.")
        .def("mla_forward", &attention_block<MlaHandle>, nb::arg("layer"), nb::arg("x"), nb::arg("cos"), nb::arg("sin"),
             nb::arg("c_kv"), nb::arg("k_pe"), nb::arg("start"), nb::arg("out"), nb::arg("isa") = "auto",
             nb::arg("norm") = nb::none(), nb::arg("eps") = 1e-6f, nb::arg("residual") = false,
             "One layer's absorbed MLA (mla.h): x [T, D] -> out [T, D], writing the new latents into rows "
             "start..start+T of the cache c_kv [positions, R] / k_pe [positions, Dr]. norm [D] (float32): the layer "
             "reads rmsnorm(x) * norm instead of x; residual: out = x + the layer's output.")
        .def("gqa_forward", &attention_block<GqaHandle>, nb::arg("layer"), nb::arg("x"), nb::arg("cos"), nb::arg("sin"),
             nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("start"), nb::arg("out"), nb::arg("isa") = "auto",
             nb::arg("norm") = nb::none(), nb::arg("eps") = 1e-6f, nb::arg("residual") = false,
             "One layer's grouped-query attention (gqa.h): x [T, D] -> out [T, D], writing the new keys and values "
             "into rows start..start+T of the caches [positions, kv_heads, head_dim]. norm [D] (float32): the layer "
             "reads rmsnorm(x) * norm instead of x; residual: out = x + the layer's output.")
        .def(
            "decoder_stack",
            [](EngineHandle& h, const DecoderStack& st, const CF32& x, const CF32& cos, const CF32& sin,
               const std::vector<Mut>& cache_a, const std::vector<Mut>& cache_b, int64_t start, const Mut& out,
               const Mut& ids, const Mut& weights, const std::string& isa) {
                const int64_t n = static_cast<int64_t>(st.layers.size()), D = st.D;
                if (x.ndim() != 2 || static_cast<int64_t>(x.shape(1)) != D)
                    fail("x must be float32 [tokens, " + std::to_string(D) + "]");
                const int64_t T = x.shape(0), A = st.layers[0].moe->router.top_k;
                check_2d(Any(cos), T, st.rope_half, "cos");
                check_2d(Any(sin), T, st.rope_half, "sin");
                if (static_cast<int64_t>(cache_a.size()) != n || static_cast<int64_t>(cache_b.size()) != n)
                    fail("cache_a and cache_b must hold one array per layer (" + std::to_string(n) + ")");
                std::vector<GgmlType> types(static_cast<size_t>(n));
                for (int64_t i = 0; i < n; ++i) {
                    const StackLayer& l = st.layers[static_cast<size_t>(i)];
                    types[static_cast<size_t>(i)] = l.mla ? cache_type(*l.mla, cache_a[i], cache_b[i], start, T)
                                                          : cache_type(*l.gqa, cache_a[i], cache_b[i], start, T);
                }
                float* y = written<float>(out, {T, D}, "out");
                int64_t* id = written<int64_t>(ids, {n, T, A}, "ids");
                float* wt = written<float>(weights, {n, T, A}, "weights");
                check_no_overlap(x.data(), T, D, y);
                const Isa level = isa_arg(isa);
                h.pool.wait();
                nb::gil_scoped_release release;
                // per layer, as Engine.mla_forward / gqa_forward and moe_layer with norm= and residual=True:
                // hid = cur + attn(rmsnorm(cur)), then out = hid + moe(rmsnorm(hid)); out is the next layer's cur
                thread_local std::vector<float> hid, normed;
                hid.resize(static_cast<size_t>(T * D));
                normed.resize(static_cast<size_t>(T * D));
                const float* cur = x.data();
                for (int64_t i = 0; i < n; ++i) {
                    const StackLayer& l = st.layers[static_cast<size_t>(i)];
                    const size_t k = static_cast<size_t>(i);
                    rms_norm_rows(cur, T, D, l.norm1.data(), l.eps1, normed.data());
                    if (l.mla)
                        run_block(h.pool, *l.mla, normed.data(), T, cos.data(), sin.data(), types[k], cache_a[k],
                                  cache_b[k], start, hid.data(), level);
                    else
                        run_block(h.pool, *l.gqa, normed.data(), T, cos.data(), sin.data(), types[k], cache_a[k],
                                  cache_b[k], start, hid.data(), level);
                    for (int64_t j = 0; j < T * D; ++j) hid[static_cast<size_t>(j)] += cur[j];
                    rms_norm_rows(hid.data(), T, D, l.norm2.data(), l.eps2, normed.data());
                    const MoeHandle& m = *l.moe;
                    route(h.pool, m.router, normed.data(), T, id + i * T * A, wt + i * T * A, level);
                    moe(h.pool, normed.data(), T, D, id + i * T * A, wt + i * T * A, static_cast<int>(A),
                        m.experts.data(), static_cast<int64_t>(m.experts.size()), m.shared.data(),
                        static_cast<int>(m.shared.size()), nullptr, y, level);
                    for (int64_t j = 0; j < T * D; ++j) y[j] += hid[static_cast<size_t>(j)];
                    cur = y;
                }
            },
            nb::arg("stack"), nb::arg("x"), nb::arg("cos"), nb::arg("sin"), nb::arg("cache_a"), nb::arg("cache_b"),
            nb::arg("start"), nb::arg("out"), nb::arg("ids"), nb::arg("weights"), nb::arg("isa") = "auto",
            "Decoder layers in one call: per layer h = x + attn(rmsnorm(x)), then x = h + moe(rmsnorm(h)), the "
            "attention writing rows start..start+T of its caches (cache_a[i], cache_b[i]: c_kv and k_pe, or k and "
            "v). out [T, D] gets the last layer's x; ids, weights [layers, T, top_k] each layer's routing.")
        .def(
            "gqa_attention",
            [](EngineHandle& h, const CF32& q, const Any& k, const Any& v, float scale, const Mut& out,
               const std::string& isa) {
                if (q.ndim() != 3) fail("q must be float32 [heads, tokens, head_dim]");
                const int64_t H = q.shape(0), T = q.shape(1), Dh = q.shape(2);
                if (H < 1 || Dh < 1) fail("q must hold at least one head of at least one value");
                if (k.ndim() != 3 || v.ndim() != 3 || k.shape(0) != v.shape(0) || k.shape(1) != v.shape(1) ||
                    static_cast<int64_t>(k.shape(2)) != Dh || static_cast<int64_t>(v.shape(2)) != Dh)
                    fail("k and v must be [positions, kv_heads, head_dim] with q's head_dim and as many positions");
                const int64_t G = k.shape(1), S = k.shape(0);
                if (G < 1 || H % G) fail("q's heads must be a multiple of the cache's kv_heads");
                if (!c_contiguous(k) || !c_contiguous(v)) fail("k and v must be C-contiguous");
                if (k.dtype() != v.dtype()) fail("k and v must share a dtype");
                const GgmlType type = cache_type_of(k, "the cache");
                if (S < T) fail("the cache holds fewer positions than there are new tokens");
                float* y = written<float>(out, {H, T, Dh}, "out (q's shape)");
                const Isa level = isa_arg(isa);
                h.pool.wait();
                nb::gil_scoped_release release;
                gqa_attention(h.pool, H, G, T, S, Dh, q.data(), type, static_cast<const uint8_t*>(k.data()),
                              static_cast<const uint8_t*>(v.data()), scale, y, level);
            },
            nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"), nb::arg("out"), nb::arg("isa") = "auto",
            "Grouped-query attention: softmax(scale q k^T, causal) v per KV head -> out; q [H, T, Dh] float32, "
            "k and v [positions, G, Dh] (the new tokens the last T positions).")
        .def(
            "mla_attention",
            [](EngineHandle& h, const CF32& q_lat, const CF32& q_pe, const Any& c_kv, const Any& k_pe, float scale,
               const Mut& out, const std::string& isa) {
                if (q_lat.ndim() != 3 || q_pe.ndim() != 3 || q_pe.shape(0) != q_lat.shape(0) ||
                    q_pe.shape(1) != q_lat.shape(1))
                    fail("q_lat must be float32 [heads, tokens, kv_lora_rank] and q_pe [heads, tokens, rope dim]");
                const int64_t H = q_lat.shape(0), T = q_lat.shape(1), R = q_lat.shape(2), Dr = q_pe.shape(2);
                if (H < 1 || R < 1) fail("q_lat must hold at least one head of at least one value");
                if (c_kv.ndim() != 2 || k_pe.ndim() != 2 || static_cast<int64_t>(c_kv.shape(1)) != R ||
                    static_cast<int64_t>(k_pe.shape(1)) != Dr || c_kv.shape(0) != k_pe.shape(0))
                    fail("c_kv must be [positions, kv_lora_rank] and k_pe [positions, rope dim], with as many positions");
                if (!c_contiguous(c_kv) || !c_contiguous(k_pe)) fail("c_kv and k_pe must be C-contiguous");
                if (c_kv.dtype() != k_pe.dtype()) fail("c_kv and k_pe must share a dtype");
                const GgmlType type = cache_type_of(c_kv, "the cache");
                const int64_t S = c_kv.shape(0);
                if (S < T) fail("the cache holds fewer positions than there are new tokens");
                float* y = written<float>(out, {H, T, R}, "out (q_lat's shape)");
                const Isa level = isa_arg(isa);
                h.pool.wait();
                nb::gil_scoped_release release;
                mla_attention(h.pool, H, T, S, R, Dr, q_lat.data(), q_pe.data(), type,
                              static_cast<const uint8_t*>(c_kv.data()), static_cast<const uint8_t*>(k_pe.data()), scale,
                              y, level);
            },
            nb::arg("q_lat"), nb::arg("q_pe"), nb::arg("c_kv"), nb::arg("k_pe"), nb::arg("scale"), nb::arg("out"),
            nb::arg("isa") = "auto",
            "MLA attention in latent space: softmax(scale (q_lat c_kv^T + q_pe k_pe^T), causal) c_kv -> out.")
        .def(
            "linear_batched",
            [](EngineHandle& h, int wtype, const Any& weight, const CF32& x, const Mut& out, const std::string& isa) {
                if (x.ndim() != 3) fail("x must be [batch, tokens, in_features] float32");
                if (weight.ndim() != 3) fail("weight must be a 3-D stack [batch, out_features, row bytes]");
                auto w = matrices(weight, wtype, x.shape(2), "weight");
                if (static_cast<int64_t>(w.size()) != static_cast<int64_t>(x.shape(0)))
                    fail("weight holds " + std::to_string(w.size()) + " matrices but x has a batch of " +
                         std::to_string(x.shape(0)));
                float* y = written<float>(
                    out, {static_cast<int64_t>(x.shape(0)), static_cast<int64_t>(x.shape(1)), w[0].rows}, "out");
                const Isa level = isa_arg(isa);
                h.pool.wait();
                nb::gil_scoped_release release;
                linear_batched(h.pool, w.data(), static_cast<int64_t>(w.size()), x.data(), x.shape(1), y, level);
            },
            nb::arg("wtype"), nb::arg("weight"), nb::arg("x"), nb::arg("out"), nb::arg("isa") = "auto",
            "out[b] = x[b] @ weight[b]^T for a stack of matrices in one GGUF type (MLA's per-head W_UK / W_UV).")
        .def(
            "moe",
            [](EngineHandle& h, const CF32& x, const Any& ids, const CF32& weights, const Any& gate, int gate_type,
               const Any& up, int up_type, const Any& down, int down_type, const std::vector<SharedSpec>& shared,
               const std::optional<U8>& skip, const Mut& out, const std::string& isa, bool async) {
                MoeCall c = prepare_moe(x, ids, weights, gate, gate_type, up, up_type, down, down_type, shared, skip,
                                        out, isa, true);
                h.pool.wait();
                if (async) {
                    h.keep_alive = {nb::cast(x), nb::cast(ids), nb::cast(weights), nb::cast(gate), nb::cast(up),
                                    nb::cast(down), nb::cast(out)};
                    keep_shared(shared, h.keep_alive);  // the call reads the shared experts as well
                    auto call = std::make_shared<MoeCall>(std::move(c));
                    h.pool.submit([&pool = h.pool, call] { run_moe(pool, *call); });
                    return;
                }
                nb::gil_scoped_release release;
                run_moe(h.pool, c);
            },
            nb::arg("x"), nb::arg("ids"), nb::arg("weights"), nb::arg("gate"), nb::arg("gate_type"), nb::arg("up"),
            nb::arg("up_type"), nb::arg("down"), nb::arg("down_type"), nb::arg("shared") = std::vector<SharedSpec>(),
            nb::arg("skip") = nb::none(), nb::arg("out"), nb::arg("isa") = "auto", nb::arg("async_") = false,
            "Fused MoE: out = sum_a weights[t,a] * expert[ids[t,a]](x[t]) + sum of shared experts. With "
            "async_=True it returns at once and runs on the pool; call wait() before reading out.")
        .def(
            "read_bandwidth",
            [](EngineHandle& h, size_t bytes, int repeats) {
                if (bytes < (size_t(1) << 20) || bytes > (size_t(1) << 40) || repeats < 1)
                    fail("read_bandwidth reads 1 MiB .. 1 TiB (bytes=" + std::to_string(bytes) +
                         ") at least once (repeats=" + std::to_string(repeats) + ")");
                nb::gil_scoped_release release;
                return read_bandwidth(h.pool, bytes, repeats);
            },
            nb::arg("bytes") = size_t(1) << 30, nb::arg("repeats") = 5,
            "Best GB/s of streaming reads over `bytes` on this engine's threads (the memory roofline).")
        .def(
            "read_pass",
            [](EngineHandle& h, const U8& buf) {
                const size_t n = buf.nbytes() / sizeof(uint64_t);
                nb::gil_scoped_release release;
                return read_pass(h.pool, reinterpret_cast<const uint64_t*>(buf.data()), n);
            },
            nb::arg("buf"), "Seconds for one streaming read of a uint8 buffer on this engine's threads.")
        .def(
            "wait",
            [](EngineHandle& h) {
                {
                    nb::gil_scoped_release release;
                    h.pool.wait();
                }
                h.keep_alive.clear();
            },
            "Block until the asynchronous call finished (re-raising its error).");
}
