#include "threadpool.h"

#include <chrono>
#include <stdexcept>

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
}  // namespace

ThreadPool::ThreadPool(int threads) {
    if (threads < 1) throw std::invalid_argument("thread pool needs at least 1 thread");
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
    driver_ = std::thread([this] { driver_loop(); });
}

ThreadPool::~ThreadPool() {
    try {
        wait();
    } catch (...) {
    }
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        stop_.store(true, std::memory_order_release);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    wake_cv_.notify_all();
    {
        std::lock_guard<std::mutex> lock(job_mutex_);
    }
    job_cv_.notify_all();
    for (auto& t : workers_) t.join();
    driver_.join();
}

void ThreadPool::run_tasks(int thread_index) {
    for (;;) {
        const int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
        if (task >= n_tasks_) break;
        (*fn_)(task, thread_index);
    }
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = generation_.load(std::memory_order_acquire);
        const auto spin_until = std::chrono::steady_clock::now() + kWorkerSpin;
        for (int spin = 0; gen == seen; ++spin) {
            cpu_relax();
            gen = generation_.load(std::memory_order_acquire);
            if ((spin & 255) == 255 && std::chrono::steady_clock::now() > spin_until) break;
        }
        if (gen == seen) {
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            wake_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            gen = generation_.load(std::memory_order_acquire);
        }
        seen = gen;
        if (stop_.load(std::memory_order_acquire)) return;
        run_tasks(index);
        if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            done_cv_.notify_all();
        }
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> call(call_mutex_);
    if (workers_.empty() || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) fn(i, 0);
        return;
    }
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    active_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    wake_cv_.notify_all();
    run_tasks(0);
    for (int spin = 0; active_.load(std::memory_order_acquire) != 0 && spin < kSpinRounds; ++spin) cpu_relax();
    if (active_.load(std::memory_order_acquire) != 0) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        done_cv_.wait(lock, [&] { return active_.load(std::memory_order_acquire) == 0; });
    }
    fn_ = nullptr;
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
    for (int spin = 0; job_running_.load(std::memory_order_acquire) && spin < kSpinRounds; ++spin) cpu_relax();
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
