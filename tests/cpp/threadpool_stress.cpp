// The engine's thread pool under stress, built by tests/test_threadpool_stress.py (natively, and with
// -fsanitize=thread where the compiler has it): every task of every call runs exactly once, on a thread index
// in range, and what a task writes without atomics is seen by the caller once parallel_for returns; a call of
// more tasks than one claim word holds (kMaxTasks, 2^21) runs as several; submit() / wait() run a job that
// calls parallel_for, and wait() rethrows the job's exception. Prints one line per check; exits 1 at the
// first wrong count.
//
// usage: threadpool_stress CALLS [big]   (big: also the call of 2^21 + 3 tasks)
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "threadpool.h"

namespace {

int fail(const char* what, long call, long task, int got) {
    std::printf("FAIL %s: call %ld task %ld ran %d times\n", what, call, task, got);
    return 1;
}

// calls parallel_for `calls` times on sizes 1..300, checking every task ran once
int exactly_once(tandem::ThreadPool& pool, long calls) {
    const int threads = pool.threads();
    std::vector<std::atomic<int>> hits(300);
    std::atomic<int> bad_index{0};
    for (long call = 0; call < calls; ++call) {
        const int n = 1 + static_cast<int>((call * 7919) % 300);
        for (int i = 0; i < n; ++i) hits[i].store(0, std::memory_order_relaxed);
        std::vector<int> plain(n, 0);  // written without atomics: the sanitizer checks the happens-before
        pool.parallel_for(n, [&](int64_t t, int th) {
            if (th < 0 || th >= threads) bad_index.store(1);
            hits[t].fetch_add(1, std::memory_order_relaxed);
            plain[t] += 1;
        });
        for (int i = 0; i < n; ++i)
            if (hits[i].load() != 1 || plain[i] != 1) return fail("exactly once", call, i, hits[i].load());
        if (bad_index.load()) {
            std::printf("FAIL thread index out of [0, %d) in call %ld\n", threads, call);
            return 1;
        }
        if (call % 1000 == 0) {  // a job on the driver thread, itself calling parallel_for
            std::vector<int> job_plain(50, 0);
            pool.submit([&] { pool.parallel_for(50, [&](int64_t t, int) { job_plain[t] += 1; }); });
            pool.wait();
            for (int i = 0; i < 50; ++i)
                if (job_plain[i] != 1) return fail("submitted job", call, i, job_plain[i]);
        }
    }
    std::printf("threads %d: %ld calls, every task once\n", threads, calls);
    return 0;
}

// more tasks than one claim word holds: the call runs in rounds, each index once
int big_call(tandem::ThreadPool& pool) {
    const int64_t n = (int64_t{1} << 21) + 3;
    std::vector<std::atomic<unsigned char>> hits(static_cast<size_t>(n));
    for (auto& h : hits) h.store(0, std::memory_order_relaxed);
    pool.parallel_for(n, [&](int64_t t, int) { hits[static_cast<size_t>(t)].fetch_add(1, std::memory_order_relaxed); });
    for (int64_t i = 0; i < n; ++i)
        if (hits[static_cast<size_t>(i)].load() != 1) return fail("big call", 0, static_cast<long>(i), hits[i].load());
    std::printf("threads %d: one call of %lld tasks, every task once\n", pool.threads(), static_cast<long long>(n));
    return 0;
}

int job_error(tandem::ThreadPool& pool) {
    pool.submit([] { throw std::runtime_error("job failed"); });
    try {
        pool.wait();
    } catch (const std::runtime_error& e) {
        if (std::string(e.what()) != "job failed") return fail("rethrown message", 0, 0, 0);
        pool.wait();  // the error is reported once
        std::printf("threads %d: wait() rethrew the job's exception once\n", pool.threads());
        return 0;
    }
    std::printf("FAIL wait() did not rethrow the job's exception\n");
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::printf("usage: %s CALLS [big]\n", argv[0]);
        return 2;
    }
    const long calls = std::atol(argv[1]);
    const bool big = argc > 2 && std::string(argv[2]) == "big";
    for (int threads : {1, 2, 3, 5}) {
        tandem::ThreadPool pool(threads);
        if (exactly_once(pool, calls) || job_error(pool) || (big && big_call(pool))) return 1;
    }
    std::printf("ok\n");
    return 0;
}
