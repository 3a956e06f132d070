#include "threadpool.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

namespace tandem {
namespace {
// Spin this many rounds (~tens of microseconds) before sleeping: a decode step issues a
// parallel_for every few hundred microseconds, and waking a sleeping thread costs ~10-50 us.
constexpr int kSpinRounds = 1 << 14;
// Idle workers keep spinning this long after their last task before they sleep: between two engine
// calls of a decode step the torch glue runs on the caller's core for ~0.1-2 ms, and a worker woken
// from sleep for every call cost ~50 us each (measured: 52 us per small linear call).
constexpr auto kWorkerSpin = std::chrono::microseconds(3000);
// Every this many spin rounds a spinning thread yields its CPU to any other runnable thread (the caller's
// glue, a UI, another process): with more threads than free CPUs a spinner would otherwise hold the CPU the
// thread it waits for needs, for a whole scheduler slice. With nothing else to run, a yield returns at once.
constexpr int kYieldEvery = 256;

// work_: generation (20 bits) | task count (22 bits) | next task (22 bits)
constexpr int kIndexBits = 22;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int64_t kMaxTasks = int64_t{1} << (kIndexBits - 1);  // one call's tasks; more run as several calls
inline uint64_t generation_of(uint64_t w) { return w >> (2 * kIndexBits); }
inline int64_t count_of(uint64_t w) { return static_cast<int64_t>((w >> kIndexBits) & kIndexMask); }
inline int64_t index_of(uint64_t w) { return static_cast<int64_t>(w & kIndexMask); }

inline void spin_pause(int spin) {
    cpu_relax();
    if ((spin % kYieldEvery) == kYieldEvery - 1) std::this_thread::yield();
}
}  // namespace

ThreadPool::ThreadPool(int threads) {
    if (threads < 1) throw std::invalid_argument("thread pool needs at least 1 thread");
    try {
        for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
        driver_ = std::thread([this] { driver_loop(); });
    } catch (const std::exception& e) {
        // the threads started so far wait on this object's members: stop and join them before they go
        const size_t started = workers_.size() + (driver_.joinable() ? 1 : 0);
        stop_threads();
        throw std::runtime_error("could not start the threads of a " + std::to_string(threads) + "-thread pool (" +
                                 std::to_string(started) + " started: " + e.what() + "); use fewer threads");
    }
}

ThreadPool::~ThreadPool() {
    try {
        wait();
    } catch (...) {
    }
    stop_threads();
}

void ThreadPool::stop_threads() {
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        stop_.store(true, std::memory_order_release);
        const uint64_t w = work_.load(std::memory_order_relaxed);
        work_.store((generation_of(w) + 1) << (2 * kIndexBits), std::memory_order_release);
    }
    wake_cv_.notify_all();
    {
        std::lock_guard<std::mutex> lock(job_mutex_);
    }
    job_cv_.notify_all();
    for (auto& t : workers_) t.join();
    if (driver_.joinable()) driver_.join();
}

// Claim and run tasks of the current call until none is left (or the call is over).
void ThreadPool::run_tasks(int thread_index) {
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
        const int64_t task = index_of(w);
        if (task >= count_of(w)) return;
        if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        // the claim proves the call is still running: its caller waits for this task, so fn_ is its fn
        (*fn_.load(std::memory_order_relaxed))(task, thread_index);
        if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_of(w) && thread_index != 0) {
            std::lock_guard<std::mutex> lock(sleep_mutex_);  // the caller may be asleep on done_cv_
            done_cv_.notify_all();
        }
        w = work_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = generation_of(work_.load(std::memory_order_acquire));
        const auto spin_until = std::chrono::steady_clock::now() + kWorkerSpin;
        for (int spin = 0; gen == seen; ++spin) {
            spin_pause(spin);
            gen = generation_of(work_.load(std::memory_order_acquire));
            if ((spin & 255) == 255 && std::chrono::steady_clock::now() > spin_until) break;
        }
        if (gen == seen) {
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            wake_cv_.wait(lock, [&] { return generation_of(work_.load(std::memory_order_acquire)) != seen; });
            gen = generation_of(work_.load(std::memory_order_acquire));
        }
        seen = gen;
        if (stop_.load(std::memory_order_acquire)) return;
        run_tasks(index);
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> call(call_mutex_);
    if (workers_.empty() || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) fn(i, 0);
        return;
    }
    for (int64_t base = 0; base < n_tasks; base += kMaxTasks) {  // in practice one round: calls have < 2M tasks
        const int64_t count = std::min(kMaxTasks, n_tasks - base);
        const std::function<void(int64_t, int)> shifted = [&](int64_t i, int t) { fn(base + i, t); };
        fn_.store(base == 0 && count == n_tasks ? &fn : &shifted, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            const uint64_t gen = generation_of(work_.load(std::memory_order_relaxed)) + 1;
            work_.store((gen << (2 * kIndexBits)) | (static_cast<uint64_t>(count) << kIndexBits),
                        std::memory_order_release);
        }
        wake_cv_.notify_all();
        run_tasks(0);
        for (int spin = 0; done_.load(std::memory_order_acquire) != count && spin < kSpinRounds; ++spin)
            spin_pause(spin);
        if (done_.load(std::memory_order_acquire) != count) {
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            done_cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) == count; });
        }
    }
    fn_.store(nullptr, std::memory_order_relaxed);
}

void ThreadPool::driver_loop() {
    for (;;) {
        std::function<void()> job;
        {
            std::unique_lock<std::mutex> lock(job_mutex_);
            job_cv_.wait(lock, [&] { return job_ != nullptr || stop_.load(std::memory_order_acquire); });
            if (!job_) return;
            job = std::move(job_);
            job_ = nullptr;
        }
        try {
            job();
        } catch (...) {
            std::lock_guard<std::mutex> lock(job_mutex_);
            job_error_ = std::current_exception();
        }
        {
            std::lock_guard<std::mutex> lock(job_mutex_);
            job_running_.store(false, std::memory_order_release);
        }
        job_done_cv_.notify_all();
    }
}

void ThreadPool::submit(std::function<void()> job) {
    wait();  // one job at a time
    {
        std::lock_guard<std::mutex> lock(job_mutex_);
        job_ = std::move(job);
        job_running_.store(true, std::memory_order_release);
    }
    job_cv_.notify_one();
}

void ThreadPool::wait() {
    // spin briefly: the typical wait follows GPU work that took about as long as the job
    for (int spin = 0; job_running_.load(std::memory_order_acquire) && spin < kSpinRounds; ++spin) spin_pause(spin);
    std::exception_ptr error;
    {
        std::unique_lock<std::mutex> lock(job_mutex_);
        job_done_cv_.wait(lock, [&] { return !job_running_.load(std::memory_order_acquire); });
        error = job_error_;
        job_error_ = nullptr;
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace tandem
