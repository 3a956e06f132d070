#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace tandem {
namespace {

// Rows of a weight matrix one task computes, at least: enough to amortize the task hand-out...
constexpr int64_t kRowsPerTask = 64;
// ...and at least this many weight bytes: short rows (MLA's 128-wide W_UK heads) in 64-row tasks spent
// more time handing tasks out than reading.
constexpr size_t kTaskBytes = 32 << 10;
// Up to this many weight bytes a task: one contiguous run streams from memory faster the longer it is
// (2 threads, far from cache: Q4_K 21 GB/s in 64-row tasks, 25.5 in 1 MiB ones; Q8_0 28 -> 30.7).
constexpr size_t kMaxTaskBytes = 1 << 20;
// Below this many weight bytes x tokens a linear runs on the calling thread alone.
constexpr size_t kInlineBytes = 64 << 10;

// Rows per linear task for `total` rows of `row_stride` bytes on `threads` threads: as long as
// kMaxTaskBytes allows while every thread still gets four tasks (balance), at least kRowsPerTask and
// kTaskBytes' worth; a multiple of 16. For more than 2 tokens (prefill) two tasks a thread: each task
// prepares all T activation rows for its kernels (packs them for AMX), and 1 MiB tasks did that 32 times
// for a 4096 x 4096 BF16 matrix (2 threads, 128 tokens: BF16 4.0 -> 3.1 ms, Q8_0 5.9 -> 5.0, Q4_K 2.9 -> 2.6).
// Tried for decode and not kept (in-process alternation, Qwen3-30B-A3B and V2-Lite geometry at 8 layers, reads
// at 27-50 GB/s): shorter tasks at the end of each call and MoE phase (guided self-scheduling) brought the two
// threads' finishes from 11-62 us apart on average to 2-34, but the decode step ran 0.98-1.003x its time (0.999x
// over 80 rounds); a V2-Lite router (64 F32 rows, one 512 KiB task) in 16-row tasks ran 1.003x. One thread
// alone nearly saturates memory here, so the thread left reading at a call's end reads faster.
int64_t task_rows(size_t row_stride, int64_t total, int threads, int64_t T) {
    const int64_t by_bytes = static_cast<int64_t>((kTaskBytes + row_stride - 1) / row_stride + 15) / 16 * 16;
    const int64_t least = std::max<int64_t>(kRowsPerTask, by_bytes);
    const int64_t most = std::max<int64_t>(least, static_cast<int64_t>(kMaxTaskBytes / row_stride) / 16 * 16);
    const int64_t rows = std::clamp<int64_t>(total / (4 * static_cast<int64_t>(threads)) / 16 * 16, least, most);
    if (T <= 2) return rows;
    return std::max(rows, (total / (2 * static_cast<int64_t>(threads)) + 15) / 16 * 16);
}

// MoE slabs (rows per task) for `work` rows in all on `threads` threads: up to 1024 rows, but at least
// four tasks per thread so the threads stay balanced; a multiple of 32. Longer contiguous streams read
// faster: 256-row slabs were ~12% faster than 64-row ones at T=1 on V2-Lite, and in a model's decode
// (each layer's experts cold in DRAM) 1024-row ones another 2-4% (1825-1873 vs 1877-1914 us a MoE call,
// 8-layer V2-Lite, 3 runs each); neutral at T=128.
int64_t slab_rows(int64_t work, int threads) {
    return std::clamp<int64_t>(work / (4 * static_cast<int64_t>(threads)) / 32 * 32, 32, 1024);
}

// MoE down-projection slabs: the fewest that split `H` rows evenly over the threads with at most 1024 rows
// each (a multiple of 32; 1024 also bounds a thread's [tokens x rows] output buffer). Every down task
// reads a fragment of each expert and packs that expert's activations again, so fewer, longer slabs pay
// off more than slab_rows' four a thread: V2-Lite's 2048 rows as 2 x 1024 instead of 8 x 256 ran
// 0.93-0.97x at T=1 and 0.94x at T=128 (cold-cache A/Bs in one process); V3's 7168 stay 8 x 896 (as
// 2 x 3584 they ran 1.00-1.01x at T=1, 0.99x at T=128).
int64_t down_slab_rows(int64_t H, int threads) {
    const int64_t per_thread = (H + threads - 1) / threads, slabs = threads * ((per_thread + 1023) / 1024);
    return ((H + slabs - 1) / slabs + 31) / 32 * 32;
}

size_t act_row_bytes(const Weight& w) {
    return row_size(type_info(static_cast<int32_t>(w.type))->act_type, w.cols);
}

GgmlType act_type(const Weight& w) { return type_info(static_cast<int32_t>(w.type))->act_type; }

// Quantize T rows of X [T, K] to fmt into dst (row stride `stride` bytes), rows spread over the pool.
void quantize_rows(ThreadPool& pool, GgmlType fmt, const float* X, int64_t T, int64_t K, uint8_t* dst,
                   size_t stride) {
    if (T * K <= (64 << 10)) {  // a decode step's few rows: not worth waking the pool
        for (int64_t t = 0; t < T; ++t) quantize_activation_row(fmt, X + t * K, dst + t * stride, K);
        return;
    }
    pool.parallel_for(T, [&](int64_t t, int) { quantize_activation_row(fmt, X + t * K, dst + t * stride, K); });
}

}  // namespace

void linear_batched(ThreadPool& pool, const Weight* ws, int64_t B, const float* X, int64_t T, float* Y, Isa isa) {
    const Weight& w0 = ws[0];
    const size_t a_stride = act_row_bytes(w0);
    const int64_t K = w0.cols, N = w0.rows;
    std::vector<uint8_t> A(static_cast<size_t>(B * T) * a_stride);
    size_t bytes = 0;
    for (int64_t b = 0; b < B; ++b) bytes += static_cast<size_t>(ws[b].rows) * ws[b].row_stride;
    if (bytes * static_cast<size_t>(T) < kInlineBytes) {  // too small to pay for handing work to other threads
        for (int64_t i = 0; i < B * T; ++i) quantize_activation_row(act_type(w0), X + i * K, A.data() + i * a_stride, K);
        for (int64_t b = 0; b < B; ++b)
            matmul_rows(w0.type, K, ws[b].data, ws[b].row_stride, 0, N, A.data() + b * T * a_stride, a_stride, T,
                        Y + b * T * N, N, isa);
        return;
    }
    quantize_rows(pool, act_type(w0), X, B * T, K, A.data(), a_stride);
    const int64_t rows = task_rows(w0.row_stride, B * N, pool.threads(), T), per = (N + rows - 1) / rows;
    pool.parallel_for(B * per, [&](int64_t task, int) {
        const int64_t b = task / per, r0 = (task % per) * rows, r1 = std::min(N, r0 + rows);
        matmul_rows(w0.type, K, ws[b].data, ws[b].row_stride, r0, r1, A.data() + b * T * a_stride, a_stride, T,
                    Y + b * T * N, N, isa);
    });
}

void linear(ThreadPool& pool, const Weight& w, const float* X, int64_t T, float* Y, Isa isa) {
    linear_batched(pool, &w, 1, X, T, Y, isa);
}

void linear_group(ThreadPool& pool, const Weight* ws, int n, const float* X, int64_t T, float* const* Ys, Isa isa) {
    // X quantized once per activation format the matrices take (usually one)
    std::vector<std::pair<GgmlType, std::vector<uint8_t>>> quantized;
    std::vector<const uint8_t*> acts(n);
    std::vector<int64_t> first(n + 1, 0), rows(n);
    size_t bytes = 0;
    const int64_t K = ws[0].cols;
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += ws[i].rows;
    for (int i = 0; i < n; ++i) {
        const GgmlType fmt = act_type(ws[i]);
        auto it = std::find_if(quantized.begin(), quantized.end(), [&](const auto& q) { return q.first == fmt; });
        if (it == quantized.end()) {
            quantized.emplace_back(fmt, std::vector<uint8_t>(static_cast<size_t>(T) * act_row_bytes(ws[i])));
            it = quantized.end() - 1;
            quantize_rows(pool, fmt, X, T, K, it->second.data(), act_row_bytes(ws[i]));
        }
        acts[i] = it->second.data();
        rows[i] = task_rows(ws[i].row_stride, total, pool.threads(), T);
        first[i + 1] = first[i] + (ws[i].rows + rows[i] - 1) / rows[i];
        bytes += static_cast<size_t>(ws[i].rows) * ws[i].row_stride;
    }
    auto run = [&](int i, int64_t r0, int64_t r1) {
        matmul_rows(ws[i].type, K, ws[i].data, ws[i].row_stride, r0, r1, acts[i], act_row_bytes(ws[i]), T, Ys[i],
                    ws[i].rows, isa);
    };
    if (bytes * static_cast<size_t>(T) < kInlineBytes) {
        for (int i = 0; i < n; ++i) run(i, 0, ws[i].rows);
        return;
    }
    pool.parallel_for(first[n], [&](int64_t task, int) {
        const int i = static_cast<int>(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
        const int64_t r0 = (task - first[i]) * rows[i];
        run(i, r0, std::min(ws[i].rows, r0 + rows[i]));
    });
}

namespace {

// The buffers of a MoE call, kept from call to call (one set per calling thread: the Python thread, or
// the pool's driver for an asynchronous call), growing only: allocated afresh, a T=128 call spent 7%
// of its time in the kernel zeroing new pages.
struct MoeScratch {
    std::vector<uint8_t> x_q;     // the inputs quantized, per activation format [T, act bytes]
    std::vector<uint8_t> x_jobs;  // gathered per job [pairs, act bytes of gate/up]
    std::vector<uint8_t> h_q;     // silu(gate) * up quantized for down, per job [pairs, act bytes of down]
    std::vector<float> work;      // per thread: gate, up and h rows of an up task, or a down task's rows
};

template <class T>
T* grown(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

}  // namespace

void rms_norm_rows(const float* X, int64_t T, int64_t n, const float* w, float eps, float* Y) {
    for (int64_t t = 0; t < T; ++t) {
        const float* x = X + t * n;
        float* y = Y + t * n;
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
        for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
    }
}

void moe(ThreadPool& pool, const float* X, int64_t T, int64_t H, const int64_t* ids, const float* weights,
         int A, const Expert* experts, int64_t E, const Expert* shared, int n_shared, const uint8_t* skip,
         float* out, Isa isa) {
    // 1. who goes where: per expert (routed, then shared) the tokens and their weights
    struct Job {
        const Expert* expert;
        std::vector<int64_t> tokens;
        std::vector<float> weight;
        uint8_t* x_q = nullptr;  // gathered quantized inputs [n, act bytes of gate/up]
        uint8_t* h_q = nullptr;  // silu(gate) * up quantized for down [n, act bytes of down]
    };
    std::vector<Job> jobs;
    std::vector<int64_t> slot_of(E, -1);
    for (int64_t t = 0; t < T; ++t) {
        for (int a = 0; a < A; ++a) {
            const int64_t e = ids[t * A + a];
            if (e < 0 || (skip && skip[e])) continue;
            if (slot_of[e] < 0) {
                slot_of[e] = static_cast<int64_t>(jobs.size());
                jobs.push_back(Job{&experts[e], {}, {}});
            }
            Job& j = jobs[slot_of[e]];
            j.tokens.push_back(t);
            j.weight.push_back(weights[t * A + a]);
        }
    }
    // routed experts in ascending id order (the order the reference sums them in), shared last
    std::sort(jobs.begin(), jobs.end(), [](const Job& a, const Job& b) { return a.expert < b.expert; });
    for (int s = 0; s < n_shared; ++s) {
        Job j{&shared[s], {}, {}};
        for (int64_t t = 0; t < T; ++t) {
            j.tokens.push_back(t);
            j.weight.push_back(1.0f);
        }
        jobs.push_back(std::move(j));
    }
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(T * H));
    if (jobs.empty()) return;

    // 2. the inputs, quantized once per activation format, gathered per expert
    thread_local MoeScratch scratch;
    std::vector<std::pair<GgmlType, size_t>> formats;  // (format, offset in scratch.x_q)
    auto format_of = [&](const Weight& w) {
        return std::find_if(formats.begin(), formats.end(), [&](const auto& f) { return f.first == act_type(w); });
    };
    size_t x_bytes = 0, gathered = 0, h_bytes = 0;
    for (const Job& j : jobs) {
        const Weight& g = j.expert->gate;
        if (act_type(j.expert->up) != act_type(g)) throw std::invalid_argument("gate and up of an expert must share an activation format");
        if (format_of(g) == formats.end()) {
            formats.emplace_back(act_type(g), x_bytes);
            x_bytes += static_cast<size_t>(T) * act_row_bytes(g);
        }
        gathered += j.tokens.size() * act_row_bytes(g);
        h_bytes += j.tokens.size() * act_row_bytes(j.expert->down);
    }
    uint8_t* x_q = grown(scratch.x_q, x_bytes);
    for (const auto& [fmt, off] : formats) quantize_rows(pool, fmt, X, T, H, x_q + off, row_size(fmt, H));
    uint8_t* x_next = grown(scratch.x_jobs, gathered);
    uint8_t* h_next = grown(scratch.h_q, h_bytes);
    for (Job& j : jobs) {
        const Weight& g = j.expert->gate;
        const size_t rb = act_row_bytes(g);
        const uint8_t* q = x_q + format_of(g)->second;
        j.x_q = x_next;
        for (size_t i = 0; i < j.tokens.size(); ++i) std::memcpy(j.x_q + i * rb, q + j.tokens[i] * rb, rb);
        x_next += j.tokens.size() * rb;
        j.h_q = h_next;
        h_next += j.tokens.size() * act_row_bytes(j.expert->down);
    }

    // 3. gate and up, in slabs of rows per (expert, slab) task; silu(gate) * up, then those columns of h
    //    quantized for the down projection right away (slabs hold whole activation blocks)
    int64_t up_work = 0;
    for (const Job& j : jobs) up_work += j.expert->gate.rows;
    // gate/up rows per task, rounded up to whole blocks of the down projection's activation format,
    // so a task quantizes its own columns of h
    int64_t up_rows = slab_rows(up_work, pool.threads());
    for (const Job& j : jobs) {
        const int64_t block = type_info(static_cast<int32_t>(act_type(j.expert->down)))->block_size;
        up_rows = (up_rows + block - 1) / block * block;
    }
    std::vector<std::pair<int, int64_t>> tasks;  // (job, first row)
    for (size_t ji = 0; ji < jobs.size(); ++ji)
        for (int64_t r = 0; r < jobs[ji].expert->gate.rows; r += up_rows) tasks.emplace_back(static_cast<int>(ji), r);
    // the largest first (rows x tokens), so the phase ends on short tasks and no thread idles long at its
    // end: an expert's last slab is often a fraction of the others (V2-Lite: 1024 + 384 rows)
    auto work_of = [&](const std::pair<int, int64_t>& t) {
        const Job& j = jobs[t.first];
        return std::min(up_rows, j.expert->gate.rows - t.second) * static_cast<int64_t>(j.tokens.size());
    };
    std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& a, const auto& b) { return work_of(a) > work_of(b); });
    const int64_t max_n = static_cast<int64_t>(std::max_element(jobs.begin(), jobs.end(), [](const Job& a, const Job& b) {
                                                   return a.tokens.size() < b.tokens.size();
                                               })->tokens.size());
    const int64_t down_rows = down_slab_rows(H, pool.threads());
    const size_t per_thread = static_cast<size_t>(std::max(max_n * up_rows * 2 + up_rows, max_n * down_rows));
    float* work = grown(scratch.work, per_thread * static_cast<size_t>(pool.threads()));
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t ti, int thread) {
        Job& j = jobs[tasks[ti].first];
        const Weight &g = j.expert->gate, &u = j.expert->up, &d = j.expert->down;
        const int64_t n = static_cast<int64_t>(j.tokens.size()), I = g.rows;
        const int64_t r0 = tasks[ti].second, r1 = std::min(I, r0 + up_rows), rows = r1 - r0;
        float* gy = work + per_thread * static_cast<size_t>(thread);
        float* uy = gy + n * rows;
        float* h = uy + n * rows;
        const size_t rb = act_row_bytes(g), db = act_row_bytes(d);
        const GgmlType dfmt = act_type(d);
        // matmul_rows writes Y[t * stride + r]; offset the output so row r0 lands in column 0
        matmul_rows(g.type, g.cols, g.data, g.row_stride, r0, r1, j.x_q, rb, n, gy - r0, rows, isa);
        matmul_rows(u.type, u.cols, u.data, u.row_stride, r0, r1, j.x_q, rb, n, uy - r0, rows, isa);
        for (int64_t t = 0; t < n; ++t) {
            swiglu(gy + t * rows, uy + t * rows, h, rows, isa);
            quantize_activation_row(dfmt, h, j.h_q + t * db + row_size(dfmt, r0), rows, isa);
        }
    });

    // 5. down projections by slabs of output rows: every task owns its slab of `out`, and sums the
    //    experts in job order, so the result does not depend on the thread count
    const int64_t n_slabs = (H + down_rows - 1) / down_rows;
    pool.parallel_for(n_slabs, [&](int64_t slab, int thread) {
        const int64_t r0 = slab * down_rows, r1 = std::min(H, r0 + down_rows), rows = r1 - r0;
        float* y = work + per_thread * static_cast<size_t>(thread);
        for (Job& j : jobs) {
            const Weight& d = j.expert->down;
            const int64_t n = static_cast<int64_t>(j.tokens.size());
            matmul_rows(d.type, d.cols, d.data, d.row_stride, r0, r1, j.h_q, act_row_bytes(d), n, y - r0, rows, isa);
            for (int64_t i = 0; i < n; ++i) axpy(j.weight[i], y + i * rows, out + j.tokens[i] * H + r0, rows, isa);
        }
    });
}

}  // namespace tandem
